"""The [state] keys of a fleet: overrides, validation that names the key, no password shown."""

from __future__ import annotations

import socket

import pytest

from sqlproxy.config import load_config, redact_url
from sqlproxy.errors import ConfigError
from sqlproxy.statestore.postgres import PostgresStore

URL = "postgresql://sqlproxy:s3cret-pw@state-db:5432/sqlproxy"


def test_environment_sets_the_fleet_keys() -> None:
    cfg = load_config(None, environ={"SQLPROXY_STATE__URL": URL,
                                     "SQLPROXY_STATE__INSTANCE": "proxy-7",
                                     "SQLPROXY_STATE__FLEET_WINDOW": "5",
                                     "SQLPROXY_STATE__TIMEOUT": "2.5"})
    st = cfg.state
    assert (st.url, st.instance_id, st.fleet_window, st.timeout) == (URL, "proxy-7", 5, 2.5)


def test_instance_defaults_to_the_host_name() -> None:
    cfg = load_config(None, environ={})
    assert cfg.state.url is None and cfg.state.instance is None
    assert cfg.state.instance_id == socket.gethostname()


@pytest.mark.parametrize(("env", "key"), [
    ({"SQLPROXY_STATE__URL": "mysql://sqlproxy:s3cret-pw@db/x"}, "state.url"),
    ({"SQLPROXY_STATE__URL": "postgresql://sqlproxy:s3cret-pw@db:99999/x"}, "state.url"),
    ({"SQLPROXY_STATE__FLEET_WINDOW": "0"}, "state.fleet_window"),
    ({"SQLPROXY_STATE__TIMEOUT": "0"}, "state.timeout"),
    ({"SQLPROXY_STATE__INSTANCE": '""'}, "state.instance"),
])
def test_bad_values_name_the_key_and_hide_the_password(env: dict[str, str], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, environ=env)
    assert key in info.value.message
    assert "s3cret-pw" not in info.value.message


def test_redact_url() -> None:
    assert redact_url(f"error at {URL}!") == \
        "error at postgresql://sqlproxy:***@state-db:5432/sqlproxy!"
    assert redact_url("postgresql://postgres@h/db") == "postgresql://postgres@h/db"


def test_store_status_before_it_ran_hides_the_password() -> None:
    store = PostgresStore(URL, "i1", list, lambda: 30.0)
    status = store.status().to_dict()
    assert "s3cret-pw" not in str(status)
    assert status["where"] == "postgresql://sqlproxy:***@state-db:5432/sqlproxy"
    assert status["ok"] is True and status["restored"] is False and status["failures"] == 0
    assert store.others() == []
