"""The command line: every command's help runs and says what the code does."""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from sqlproxy.cli import build_parser, overrides_from_args
from sqlproxy.config import Config, load_config
from tests.support.pg import free_port
from tests.support.proxy import ProxyThread

ROOT = Path(__file__).resolve().parent.parent
COMMANDS = ["serve", "check-config", "healthcheck", "demo"]


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("SQLPROXY_")}
    base["COLUMNS"] = "200"  # one help line per option: easier to read back
    return subprocess.run([sys.executable, "-m", "sqlproxy", *args], cwd=ROOT,
                          env={**base, **(env or {})}, capture_output=True, text=True,
                          timeout=60)


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_installed_console_script() -> None:
    script = Path(sys.executable).parent / "sqlproxy"
    assert script.exists(), "pip install gives a `sqlproxy` command"
    out = subprocess.run([str(script), "--version"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.startswith("sqlproxy ")


def test_top_level_help_lists_every_command() -> None:
    out = _run("--help")
    assert out.returncode == 0, out.stderr
    assert set(_subparsers()) == set(COMMANDS)
    for command in COMMANDS:
        assert re.search(rf"^\s+{re.escape(command)}\s", out.stdout, re.M), command
    bare = _run()
    assert bare.returncode == 2 and "usage: sqlproxy" in bare.stdout


@pytest.mark.parametrize("command", COMMANDS)
def test_command_help_runs_and_names_every_option(command: str) -> None:
    out = _run(command, "--help")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"usage: sqlproxy {command}")
    for action in _subparsers()[command]._actions:
        for flag in action.option_strings:
            assert flag in out.stdout, f"{command} --help does not show {flag}"


def test_help_defaults_are_the_config_defaults() -> None:
    defaults = Config()
    serve = _run("serve", "--help").stdout
    assert f"default {defaults.proxy.listen}" in serve
    assert f"default {defaults.admin.listen}" in serve
    health = _run("healthcheck", "--help").stdout
    assert f"default {defaults.admin.listen}" in health
    demo = _run("demo", "--help").stdout
    assert "default 127.0.0.1:6432" in demo and "default 127.0.0.1:8080" in demo


def test_flags_map_to_the_keys_the_help_names() -> None:
    args = build_parser().parse_args([
        "serve", "--listen", "127.0.0.1:7001", "--primary", "postgresql://u@h:5/d",
        "--admin", "127.0.0.1:7002", "--replica", "postgresql://u@r1/d",
        "--replica", "postgresql://u@r2/d"])
    cfg = load_config(None, overrides_from_args(args), environ={
        "SQLPROXY_REPLICAS": '["postgresql://u@from-env/d"]'})
    assert cfg.proxy.listen == "127.0.0.1:7001"
    assert cfg.proxy.primary == "postgresql://u@h:5/d"
    assert cfg.admin.listen == "127.0.0.1:7002"
    # "--replica ... replaces the file's [[replicas]]" (and the environment's).
    assert [r.url for r in cfg.replicas] == ["postgresql://u@r1/d", "postgresql://u@r2/d"]
    # "reads go to replicas only with routing.enabled = true"
    assert cfg.routing.enabled is False


def test_check_config_uses_sqlproxy_config_and_the_environment(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text("[analysis]\nslow_query_ms = 12.0\n")
    out = _run("check-config", env={"SQLPROXY_CONFIG": str(f),
                                    "SQLPROXY_ROUTING__ENABLED": "true"})
    assert out.returncode == 0, out.stderr
    effective = json.loads(out.stdout)
    assert effective["analysis"]["slow_query_ms"] == 12.0
    assert effective["routing"]["enabled"] is True


def test_serve_reports_a_config_error_found_at_start() -> None:
    out = _run("serve", "--listen", f"127.0.0.1:{free_port()}", "--admin", "0.0.0.0:0",
               env={"SQLPROXY_STATE__ENABLED": "false"})
    assert out.returncode == 2
    assert "admin.token" in out.stderr and "Traceback" not in out.stderr


def test_healthcheck(proxy: ProxyThread) -> None:
    assert proxy.runtime is not None and proxy.runtime.admin is not None
    port = proxy.runtime.admin.port
    ok = _run("healthcheck", "--admin", f"127.0.0.1:{port}")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert json.loads(ok.stdout)["status"] == "ok"
    # A wildcard listen address (as in the container image) is asked on loopback.
    wild = _run("healthcheck", env={"SQLPROXY_ADMIN__LISTEN": f"0.0.0.0:{port}"})
    assert wild.returncode == 0, wild.stdout + wild.stderr
    down = _run("healthcheck", "--admin", f"127.0.0.1:{free_port()}", "--timeout", "2")
    assert down.returncode == 1 and "healthz" in down.stderr
    bad = _run("healthcheck", env={"SQLPROXY_ADMIN__LISTN": "x"})
    assert bad.returncode == 2 and "SQLPROXY_ADMIN__LISTN" in bad.stderr
