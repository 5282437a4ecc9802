"""The host side of the throwaway PostgreSQL clusters (``devcluster.py``): finding the
installed server binaries, the unprivileged OS user they run as (PostgreSQL refuses root, and
CI runs as root), running commands as that user, the private directories handed to it, free
loopback ports, and asking the kernel to stop a child when its parent dies."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

DEBIAN_PACKAGE = "postgresql-15"
TEST_OS_USER = "sqlproxy-test"
SUPERUSER = "postgres"
LOOPBACK = "127.0.0.1"
BASE_DIR_PREFIX = "sqlproxy-pg-"

COMMAND_TIMEOUT = 120.0

_REQUIRED_TOOLS = ("initdb", "postgres", "pg_basebackup", "psql")
_OWNER_PID_FILE = "harness.pid"


class PgHarnessError(RuntimeError):
    """The test harness could not build, start, stop or query a cluster."""


class PgNotInstalledError(PgHarnessError):
    """No usable PostgreSQL server binaries on this machine."""


class PgCommandError(PgHarnessError):
    """A PostgreSQL program exited non-zero."""

    def __init__(self, cmd: Sequence[str], returncode: int, stdout: str, stderr: str) -> None:
        self.cmd = list(cmd)
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr
        detail = (stderr or stdout).strip()
        super().__init__(f"{' '.join(self.cmd)} exited with {returncode}:\n{detail}")


# --------------------------------------------------------------------------------------------
# Binaries and the OS user
# --------------------------------------------------------------------------------------------


def _version_key(bindir: Path) -> tuple[int, ...]:
    # /usr/lib/postgresql/<version>/bin; non-numeric versions sort first.
    try:
        return tuple(int(part) for part in bindir.parent.name.split("."))
    except ValueError:
        return (-1,)


def _has_tools(bindir: Path) -> bool:
    return all((bindir / tool).is_file() for tool in _REQUIRED_TOOLS)


@functools.cache
def find_pg_bindir() -> Path:
    """The directory holding ``initdb``, ``postgres``, ``pg_basebackup`` and ``psql``.

    ``$SQLPROXY_TEST_PG_BINDIR`` wins if set; then ``pg_config --bindir``; then the highest
    version under ``/usr/lib/postgresql/*/bin`` (Debian keeps the server binaries off PATH).
    """
    candidates: list[Path] = []
    override = os.environ.get("SQLPROXY_TEST_PG_BINDIR")
    if override:
        if not _has_tools(Path(override)):
            raise PgNotInstalledError(
                f"SQLPROXY_TEST_PG_BINDIR={override} does not contain {', '.join(_REQUIRED_TOOLS)}"
            )
        return Path(override)
    pg_config = shutil.which("pg_config")
    if pg_config is not None:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, check=True, timeout=10
            ).stdout.strip()
            if out:
                candidates.append(Path(out))
    candidates.extend(
        sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=_version_key, reverse=True)
    )
    for candidate in candidates:
        if _has_tools(candidate):
            return candidate
    raise PgNotInstalledError(
        "PostgreSQL server binaries (initdb, postgres, pg_basebackup, psql) not found via "
        "pg_config or in /usr/lib/postgresql/*/bin. On Debian/Ubuntu install them with "
        f"`apt-get install {DEBIAN_PACKAGE}` (or run `bash scripts/test`, which does), "
        "or point SQLPROXY_TEST_PG_BINDIR at a bin directory."
    )


@functools.cache
def server_os_user() -> str:
    """The OS user the servers run as: ourselves, unless we are root."""
    if os.geteuid() != 0:
        return pwd.getpwuid(os.geteuid()).pw_name
    for name in (SUPERUSER, TEST_OS_USER):
        with contextlib.suppress(KeyError):
            pwd.getpwnam(name)
            return name
    useradd = shutil.which("useradd") or "/usr/sbin/useradd"
    result = subprocess.run(
        [
            useradd,
            "--system",
            "--user-group",
            "--no-create-home",
            "--home-dir",
            "/nonexistent",
            "--shell",
            "/usr/sbin/nologin",
            TEST_OS_USER,
        ],
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT,
    )
    # 9: the user already exists (another test session created it a moment ago).
    if result.returncode not in (0, 9):
        raise PgCommandError(result.args, result.returncode, result.stdout, result.stderr)
    return TEST_OS_USER


def switch_user_kwargs(os_user: str | None) -> dict[str, Any]:
    """subprocess arguments that run the child as ``os_user`` (nothing unless we are root,
    or without one)."""
    if os_user is None or os.geteuid() != 0:
        return {}
    entry = pwd.getpwnam(os_user)
    return {
        "user": entry.pw_uid,
        "group": entry.pw_gid,
        "extra_groups": os.getgrouplist(os_user, entry.pw_gid),
    }


def _clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    # Ambient PG* variables (PGDATA, PGPORT, PGPASSWORD, ...) must not leak into the harness.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["LC_ALL"] = "C"
    env["LANG"] = "C"
    if extra:
        env.update(extra)
    return env


def _server_env(os_user: str) -> dict[str, str]:
    entry = pwd.getpwnam(os_user)
    return _clean_env({"HOME": entry.pw_dir, "USER": os_user, "LOGNAME": os_user})


def _run(
    cmd: Sequence[str | Path],
    *,
    os_user: str | None,
    cwd: Path | None = None,
    input: str | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float = COMMAND_TIMEOUT,
) -> str:
    """Run a program to completion, as ``os_user`` if given; return stdout or raise."""
    args = [str(part) for part in cmd]
    kwargs: dict[str, Any] = {}
    if os_user is not None:
        kwargs.update(switch_user_kwargs(os_user))
        if env is None:
            env = _server_env(os_user)
    try:
        result = subprocess.run(
            args,
            input=input,
            capture_output=True,
            text=True,
            cwd=cwd,
            env=dict(env) if env is not None else _clean_env(),
            timeout=timeout,
            **kwargs,
        )
    except subprocess.TimeoutExpired as exc:
        raise PgHarnessError(f"{' '.join(args)} did not finish within {timeout:.0f}s") from exc
    if result.returncode != 0:
        raise PgCommandError(args, result.returncode, result.stdout, result.stderr)
    stdout: str = result.stdout
    return stdout


# --------------------------------------------------------------------------------------------
# Directories
# --------------------------------------------------------------------------------------------


def _chown_to(path: Path, os_user: str, mode: int) -> None:
    if os.geteuid() == 0:
        entry = pwd.getpwnam(os_user)
        os.chown(path, entry.pw_uid, entry.pw_gid)
    path.chmod(mode)


def _make_private_dir(path: Path, os_user: str) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    _chown_to(path, os_user, 0o700)
    return path


def _write_owned(path: Path, text: str, os_user: str) -> None:
    path.write_text(text)
    _chown_to(path, os_user, 0o600)


def _check_writable_by(path: Path, os_user: str) -> None:
    if os.geteuid() != 0:
        return
    try:
        _run(["test", "-w", str(path), "-a", "-x", str(path)], os_user=os_user, timeout=10)
    except PgCommandError:
        raise PgHarnessError(
            f"PostgreSQL runs as OS user {os_user!r}, which cannot write to {path} (or one of "
            "its parents is closed to it). Build clusters under make_base_dir()."
        ) from None


_BASE_DIRS: list[Path] = []


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _sweep_stale_base_dirs() -> None:
    """Remove base dirs left by test runs that died too hard for atexit to clean up."""
    for candidate in Path(tempfile.gettempdir()).glob(BASE_DIR_PREFIX + "*"):
        owner = _read_pid(candidate / _OWNER_PID_FILE)
        if owner is None or _pid_alive(owner):
            continue
        postmasters = (_read_pid(pidfile) for pidfile in candidate.glob("*/postmaster.pid"))
        if any(pid is not None and _pid_alive(pid) for pid in postmasters):
            continue
        shutil.rmtree(candidate, ignore_errors=True)


def make_base_dir() -> Path:
    """A fresh temp dir, owned by the server OS user, to hold clusters; see remove_base_dir."""
    _sweep_stale_base_dirs()
    os_user = server_os_user()
    path = Path(tempfile.mkdtemp(prefix=BASE_DIR_PREFIX))
    (path / _OWNER_PID_FILE).write_text(f"{os.getpid()}\n")
    _chown_to(path, os_user, 0o700)
    _BASE_DIRS.append(path)
    return path


def free_port(host: str = LOOPBACK) -> int:
    """A port nothing listens on right now (the kernel's pick for an ephemeral bind)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def _log_tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"(no server log at {path}: {exc})"
    tail = "\n".join(text.splitlines()[-lines:])
    return f"--- last lines of {path} ---\n{tail}"


# --------------------------------------------------------------------------------------------
# Parent-death signal
# --------------------------------------------------------------------------------------------

_PR_SET_PDEATHSIG = 1


def _die_with_parent_hook() -> Callable[[], None] | None:
    """A preexec_fn that makes the kernel SIGQUIT the postmaster when we die, if possible.

    The signal fires when the *thread* that forked the child exits, so it is only armed for
    children started from the main thread; a cluster (re)started from a worker thread relies on
    atexit alone.
    """
    if not sys.platform.startswith("linux"):
        return None
    if threading.current_thread() is not threading.main_thread():
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def hook() -> None:
        prctl(_PR_SET_PDEATHSIG, int(signal.SIGQUIT), 0, 0, 0)
        if os.getppid() != parent:  # the parent died before the signal was armed
            os._exit(1)

    return hook
