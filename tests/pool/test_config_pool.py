"""The [pool] keys: defaults, validation errors that name the key, environment overrides."""

from __future__ import annotations

import pytest

from sqlproxy.config import load_config
from sqlproxy.errors import ConfigError


def test_defaults_are_session_mode() -> None:
    cfg = load_config(None, environ={})
    assert (cfg.pool.mode, cfg.pool.size, cfg.pool.min_idle) == ("session", 20, 0)


@pytest.mark.parametrize(("values", "named"), [
    ({"size": 0}, "pool.size"),
    ({"mode": "statement"}, "pool.mode"),
    ({"max_wait_ms": 0}, "pool.max_wait_ms"),
    ({"server_lifetime_s": -1}, "pool.server_lifetime_s"),
    ({"size": 5, "min_idle": 6}, "pool.min_idle (6) exceeds pool.size (5)"),
    ({"sizes": 5}, "pool.sizes: unknown key"),
    ({"auth_query": "SELECT passwd FROM pg_shadow"}, "pool.auth_query: Value error, must take "
                                                     "the user name as $1"),
])
def test_invalid_values_name_the_key(values: dict[str, object], named: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, {"pool": values}, environ={})
    assert named in str(err.value)


def test_environment_override() -> None:
    cfg = load_config(None, environ={"SQLPROXY_POOL__MODE": "transaction",
                                     "SQLPROXY_POOL__SIZE": "10"})
    assert (cfg.pool.mode, cfg.pool.size) == ("transaction", 10)


def test_auth_user_from_the_environment() -> None:
    cfg = load_config(None, environ={"SQLPROXY_POOL__AUTH_USER": "pgbouncer_auth"})
    assert cfg.pool.auth_user == "pgbouncer_auth"
    assert "$1" in cfg.pool.auth_query and cfg.pool.auth_dbname == ""
