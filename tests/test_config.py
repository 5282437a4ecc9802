"""The configuration: one typed object, every key documented, bad input named precisely."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from sqlproxy.config import Config, load_config
from sqlproxy.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "config" / "sqlproxy.example.toml"


def _keys(model: type[BaseModel], prefix: str) -> set[str]:
    out: set[str] = set()
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out |= _keys(ann, f"{prefix}{name}.")
        else:
            out.add(prefix + name)
    return out


def test_example_loads_and_equals_the_defaults() -> None:
    cfg = load_config(EXAMPLE, environ={})
    assert cfg == Config()


def test_every_key_is_documented_in_the_example() -> None:
    text = EXAMPLE.read_text()
    documented = {line.split("=", 1)[0].strip().lstrip("# ").strip()
                  for line in text.splitlines() if "=" in line}
    sections = {line.strip().strip("[]").lstrip("# ").strip("[]")
                for line in text.splitlines() if line.lstrip("# ").startswith("[")}
    for key in _keys(Config, ""):
        section, _, name = key.partition(".")
        assert section in sections, f"section [{section}] missing from the example"
        if name:
            in_header = f".{name}." in text  # a sub-table such as [analysis.applications.x]
            assert name in documented or in_header, f"{key} is not documented in {EXAMPLE.name}"
    from sqlproxy.config import ApplicationThresholds, ReplicaSection
    for model in (ApplicationThresholds, ReplicaSection):
        for name in model.model_fields:
            assert name in documented or name in text, f"{model.__name__}.{name} undocumented"


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ("[proxy]\nlisten_port = 5\n", "proxy.listen_port: unknown key"),
        ("[analysis]\nslow_query_ms = -1\n", "analysis.slow_query_ms"),
        ("[routing]\nbalance = 'random'\n", "routing.balance"),
        ("[proxy]\nprimary = 'mysql://x'\n", "proxy.primary"),
        ("[nosuch]\na = 1\n", "nosuch: unknown key"),
        ("[[replicas]]\nurl = 'http://x'\n", "replicas.0.url"),
    ],
)
def test_bad_values_name_the_key(tmp_path: Path, toml: str, message: str) -> None:
    f = tmp_path / "bad.toml"
    f.write_text(toml)
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        load_config(f, environ={})


def test_environment_overrides_and_precedence(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text("[analysis]\nslow_query_ms = 10\n[proxy]\nlisten = '127.0.0.1:7000'\n")
    env = {"SQLPROXY_ANALYSIS__SLOW_QUERY_MS": "250", "SQLPROXY_ROUTING__ENABLED": "true",
           "SQLPROXY_PROXY__LISTEN": "127.0.0.1:7001"}
    overrides: dict[str, Any] = {"proxy": {"listen": "127.0.0.1:7002"}}
    cfg = load_config(f, overrides, environ=env)
    assert cfg.analysis.slow_query_ms == 250
    assert cfg.routing.enabled is True
    assert cfg.proxy.listen == "127.0.0.1:7002"  # flags win over the environment
    # The build's and test harness's own switches are not configuration keys.
    assert load_config(None, environ={"SQLPROXY_TEST_PG_BINDIR": "/x", "SQLPROXY_NO_MYPYC": "1"})
    with pytest.raises(ConfigError, match="SQLPROXY_ANALYSIS__SLOW_QUERYMS"):
        load_config(None, environ={"SQLPROXY_ANALYSIS__SLOW_QUERYMS": "1"})


def test_check_config_command(tmp_path: Path) -> None:
    good = subprocess.run([sys.executable, "-m", "sqlproxy", "check-config", str(EXAMPLE)],
                          capture_output=True, text=True, timeout=60)
    assert good.returncode == 0, good.stderr
    assert '"slow_query_ms": 100.0' in good.stdout
    bad = tmp_path / "bad.toml"
    bad.write_text("[analysis]\nslow_querry_ms = 5\n")
    out = subprocess.run([sys.executable, "-m", "sqlproxy", "check-config", str(bad)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "analysis.slow_querry_ms: unknown key" in out.stderr
    assert tomllib.loads(EXAMPLE.read_text())  # the example itself is valid TOML
