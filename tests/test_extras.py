"""Optional features and their pip extras (sqlproxy/extras.py): a missing extra is one line
naming what to install, status 2; anything else that fails on import keeps its traceback.

A real install without the extra, then with it, is tests/test_demo.py's
test_pip_install_without_then_with_the_demo_extra.
"""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from sqlproxy import cli, extras
from sqlproxy.extras import EXTRAS, Extra, MissingExtra, require

ROOT = Path(__file__).resolve().parent.parent
DEMO_MESSAGE = ("sqlproxy: the demo needs SQLAlchemy and greenlet, which are not installed: "
                "pip install 'sqlproxy[demo]'")
# Extras that are not an optional feature of the installed package.
DEVELOPMENT_EXTRAS = {"test"}


def _requirement_name(requirement: str) -> str:
    """The normalized distribution name of a PEP 508 requirement ("SQLAlchemy[asyncio]>=2")."""
    m = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    assert m, requirement
    return re.sub(r"[-_.]+", "-", m.group(1)).lower()


def test_extras_agree_with_pyproject() -> None:
    optional = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    assert set(optional) - DEVELOPMENT_EXTRAS == set(EXTRAS), \
        "every extra in pyproject.toml is described in sqlproxy.extras.EXTRAS, and only those"
    for name, extra in EXTRAS.items():
        assert extra.name == name
        listed = {_requirement_name(r) for r in optional[name]}
        provided = {_requirement_name(dist) for _, dist in extra.provides}
        assert provided == listed, f"extra {name!r}: EXTRAS names {provided}, pyproject {listed}"


def test_installed_extras_pass() -> None:
    require("demo", "the demo")  # the test environment has the demo's packages


# -------------------------------------------------------------- a fake extra, in-process
@pytest.fixture
def fake_modules(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A directory on sys.path for modules the tests write; they are forgotten afterwards."""
    monkeypatch.syspath_prepend(str(tmp_path))
    before = set(sys.modules)
    yield tmp_path
    for name in set(sys.modules) - before:
        if name.startswith("sqlproxy_fake_"):
            del sys.modules[name]


def _fake_extra(monkeypatch: pytest.MonkeyPatch, *provides: tuple[str, str]) -> None:
    importlib.invalidate_caches()  # the finders may have listed fake_modules before a write
    monkeypatch.setitem(extras.EXTRAS, "demo", Extra("demo", provides))


def test_missing_modules_are_named_with_the_install_command(
        monkeypatch: pytest.MonkeyPatch, fake_modules: Path) -> None:
    (fake_modules / "sqlproxy_fake_present.py").write_text("")
    _fake_extra(monkeypatch, ("sqlproxy_fake_absent", "fake-absent"),
                ("sqlproxy_fake_present", "fake-present"),
                ("sqlproxy_fake_pkg.sdk", "fake-sdk"))  # its parent package is missing
    with pytest.raises(MissingExtra) as info:
        require("demo", "the feature")
    assert str(info.value) == ("the feature needs fake-absent and fake-sdk, which are not "
                               "installed: pip install 'sqlproxy[demo]'")
    assert info.value.extra == "demo"
    assert info.value.missing == ("fake-absent", "fake-sdk")


def test_one_missing_module(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_extra(monkeypatch, ("sqlproxy_fake_absent", "fake-absent"))
    with pytest.raises(MissingExtra, match="needs fake-absent, which is not installed"):
        require("demo", "the feature")


def test_other_import_failures_keep_their_traceback(
        monkeypatch: pytest.MonkeyPatch, fake_modules: Path) -> None:
    # Installed, but it needs something that is not the extra's: a broken install, not a
    # missing extra (installing the extra again would not mend it).
    (fake_modules / "sqlproxy_fake_broken.py").write_text("import sqlproxy_fake_dependency\n")
    _fake_extra(monkeypatch, ("sqlproxy_fake_broken", "fake-broken"))
    with pytest.raises(ModuleNotFoundError) as info:
        require("demo", "the feature")
    assert info.value.name == "sqlproxy_fake_dependency"
    # A module missing inside an installed package: the same.
    (fake_modules / "sqlproxy_fake_pkg2").mkdir()
    (fake_modules / "sqlproxy_fake_pkg2" / "__init__.py").write_text(
        "import sqlproxy_fake_pkg2.gone\n")
    _fake_extra(monkeypatch, ("sqlproxy_fake_pkg2", "fake-pkg2"))
    with pytest.raises(ModuleNotFoundError):
        require("demo", "the feature")
    # A bug.
    (fake_modules / "sqlproxy_fake_buggy.py").write_text("1 / 0\n")
    _fake_extra(monkeypatch, ("sqlproxy_fake_buggy", "fake-buggy"))
    with pytest.raises(ZeroDivisionError):
        require("demo", "the feature")


def test_cli_prints_one_line_and_exits_2(monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    _fake_extra(monkeypatch, ("sqlproxy_fake_absent", "fake-absent"))
    assert cli.main(["demo", "--exit"]) == 2  # checked before any server starts
    out, err = capsys.readouterr()
    assert out == ""
    assert err == ("sqlproxy: the demo needs fake-absent, which is not installed: "
                   "pip install 'sqlproxy[demo]'\n")


def test_cli_keeps_the_traceback_of_other_import_failures(
        monkeypatch: pytest.MonkeyPatch, fake_modules: Path) -> None:
    (fake_modules / "sqlproxy_fake_broken.py").write_text("import sqlproxy_fake_dependency\n")
    _fake_extra(monkeypatch, ("sqlproxy_fake_broken", "fake-broken"))
    with pytest.raises(ModuleNotFoundError):
        cli.main(["demo", "--exit"])


# ------------------------------------------- the real demo extra, blocked in a subprocess
def _without_demo_packages(code: str) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a Python where SQLAlchemy and greenlet cannot be imported (a None in
    sys.modules makes their import raise ModuleNotFoundError, as when not installed)."""
    prelude = "import sys\nsys.modules['sqlalchemy'] = sys.modules['greenlet'] = None\n"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SQLPROXY_")}
    return subprocess.run([sys.executable, "-c", prelude + code], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)


def test_demo_without_its_extra() -> None:
    out = _without_demo_packages(
        "from sqlproxy.cli import main\nsys.exit(main(['demo', '--exit']))")
    assert out.returncode == 2, out.stdout + out.stderr
    assert out.stdout == ""
    assert out.stderr == DEMO_MESSAGE + "\n"


def test_league_app_without_its_extra() -> None:
    out = _without_demo_packages(
        "from sqlproxy.demo.app import main\n"
        "sys.exit(main(['--url', 'postgresql://app@127.0.0.1:1/app']))")
    assert out.returncode == 2, out.stdout + out.stderr
    assert out.stderr == ("the league app needs SQLAlchemy and greenlet, which are not "
                          "installed: pip install 'sqlproxy[demo]'\n")


def test_demo_help_names_the_extra() -> None:
    env = {**os.environ, "COLUMNS": "400"}
    out = subprocess.run([sys.executable, "-m", "sqlproxy", "demo", "--help"], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "pip install 'sqlproxy[demo]'" in out.stdout
    assert "SQLAlchemy and greenlet" in out.stdout
