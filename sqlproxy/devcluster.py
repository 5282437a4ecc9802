"""Throwaway PostgreSQL clusters, for the test suite and ``sqlproxy demo``.

The integration tests run against real servers, never mocks: a primary with
``pg_stat_statements`` and, on demand, a streaming replica of it, both built with the installed
PostgreSQL binaries (``initdb``, ``postgres``, ``pg_basebackup``) in a temporary directory on free
loopback ports.

A few things shape the code below:

* PostgreSQL refuses to run as root, and CI runs as root. Every server-side binary therefore
  runs as an unprivileged OS user (``postgres`` if it exists, else a system user we create), and
  every directory it needs is created by us and handed to that user with mode 0700.
* The postmaster is started directly as a child of the test process rather than through
  ``pg_ctl``, which daemonises it. Owning the process lets us stop it with the same signals
  ``pg_ctl`` would send, reap it, and ask the kernel to send it SIGQUIT (immediate shutdown) if
  the test process dies without running its cleanup (SIGKILL, ``os._exit``). An ``atexit`` hook
  covers the ordinary exits.
* The host side (the binaries, that OS user, its directories, free ports, the parent-death
  signal) is ``pghost.py``; this module builds, starts and stops the clusters.
* Durability is switched off (``fsync``, ``full_page_writes``, ``synchronous_commit``): these
  clusters live for one test session.
"""

from __future__ import annotations

import atexit
import contextlib
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

from sqlproxy.pghost import (
    _BASE_DIRS,
    COMMAND_TIMEOUT,
    DEBIAN_PACKAGE,
    LOOPBACK,
    SUPERUSER,
    PgCommandError,
    PgHarnessError,
    PgNotInstalledError,
    _check_writable_by,
    _clean_env,
    _die_with_parent_hook,
    _log_tail,
    _make_private_dir,
    _run,
    _server_env,
    _write_owned,
    find_pg_bindir,
    free_port,
    make_base_dir,
    server_os_user,
    switch_user_kwargs,
)

__all__ = [
    "APP_DATABASE",
    "APP_USER",
    "DEBIAN_PACKAGE",
    "MD5_USER",
    "PASSWORD_USERS",
    "PW_USER",
    "SCRAM_USER",
    "SUPERUSER",
    "PasswordUser",
    "PgCluster",
    "PgCommandError",
    "PgHarnessError",
    "PgNotInstalledError",
    "find_pg_bindir",
    "free_port",
    "make_base_dir",
    "remove_base_dir",
    "server_os_user",
    "start_primary",
    "start_replica",
]

START_TIMEOUT = 60.0
STOP_TIMEOUT = 60.0
REPLAY_TIMEOUT = 60.0
_CONF_NAME = "sqlproxy_test.conf"
_LOG_NAME = "server.log"
_MARKER_TABLE = "sqlproxy_harness_replay_marker"


@dataclass(frozen=True, slots=True)
class PasswordUser:
    """A login role created on every primary, with the pg_hba method that guards it."""

    name: str
    password: str
    auth_method: str  # the pg_hba.conf method for host connections
    password_encryption: str  # how the stored verifier was made


SCRAM_USER = PasswordUser("scram_user", "scram_pw", "scram-sha-256", "scram-sha-256")
MD5_USER = PasswordUser("md5_user", "md5_pw", "md5", "md5")
# `password` sends the cleartext password; the server checks it against a SCRAM verifier.
PW_USER = PasswordUser("pw_user", "pw_pw", "password", "scram-sha-256")
APP_USER = PasswordUser("app", "app_pw", "scram-sha-256", "scram-sha-256")
PASSWORD_USERS = (SCRAM_USER, MD5_USER, PW_USER, APP_USER)
APP_DATABASE = "app"


# --------------------------------------------------------------------------------------------
# Clusters
# --------------------------------------------------------------------------------------------

_STOP_SIGNALS = {
    "smart": signal.SIGTERM,
    "fast": signal.SIGINT,
    "immediate": signal.SIGQUIT,
}

_LIVE: list[PgCluster] = []


def remove_base_dir(path: Path) -> None:
    """Stop any cluster still running under ``path``, then delete it."""
    for cluster in [c for c in _LIVE if c.datadir.is_relative_to(path)]:
        with contextlib.suppress(PgHarnessError):
            cluster.stop("immediate", timeout=STOP_TIMEOUT)
    shutil.rmtree(path, ignore_errors=True)
    with contextlib.suppress(ValueError):
        _BASE_DIRS.remove(path)


def _conf_value(value: str | int | bool) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, int):
        return str(value)
    return "'" + value.replace("'", "''") + "'"


@dataclass(eq=False)
class PgCluster:
    """One running (or stopped) PostgreSQL cluster owned by this test process."""

    name: str
    host: str
    port: int
    datadir: Path
    bindir: Path
    os_user: str
    socket_dir: Path | None = None
    primary: PgCluster | None = None  # set on streaming replicas
    settings: dict[str, str | int | bool] = field(default_factory=dict, repr=False)
    _proc: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)

    @property
    def pid(self) -> int | None:
        """The postmaster's process id while this object runs it."""
        return self._proc.pid if self.is_running() and self._proc is not None else None

    @property
    def log_file(self) -> Path:
        return self.datadir / _LOG_NAME

    def log_tail(self, lines: int = 40) -> str:
        return _log_tail(self.log_file, lines)

    def dsn(
        self, user: str = SUPERUSER, password: str | None = None, dbname: str = "postgres"
    ) -> str:
        """A ``postgresql://`` URL for a TCP connection to this cluster."""
        auth = quote(user, safe="")
        if password is not None:
            auth += ":" + quote(password, safe="")
        return f"postgresql://{auth}@{self.host}:{self.port}/{quote(dbname, safe='')}"

    def psql(
        self,
        sql: str,
        user: str = SUPERUSER,
        dbname: str = "postgres",
        *,
        password: str | None = None,
        timeout: float = COMMAND_TIMEOUT,
    ) -> str:
        """Run ``sql`` (one or more statements) with psql over TCP; return its output.

        Output is unaligned and tuples-only: one row per line, columns separated by ``|``.
        Statements run one by one (not in one implicit transaction), so ``CREATE DATABASE``
        can follow other statements. Any error raises PgCommandError.
        """
        cmd = [
            str(self.bindir / "psql"),
            "-X", "-A", "-t", "-q", "-w",
            "-v", "ON_ERROR_STOP=1",
            "-h", self.host,
            "-p", str(self.port),
            "-U", user,
            "-d", dbname,
            "-f", "-",
        ]  # fmt: skip
        env = _clean_env({"PGCONNECT_TIMEOUT": "10"})
        if password is not None:
            env["PGPASSWORD"] = password
        return _run(cmd, os_user=None, input=sql, env=env, timeout=timeout).strip()

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout: float = START_TIMEOUT) -> None:
        """Start the postmaster and wait until it accepts connections (or serves as standby)."""
        if self.is_running():
            return
        self._write_conf()
        if not self.log_file.exists():
            _write_owned(self.log_file, "", self.os_user)
        with self.log_file.open("ab") as log:
            self._proc = subprocess.Popen(
                [str(self.bindir / "postgres"), "-D", str(self.datadir)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.datadir,
                env=_server_env(self.os_user),
                start_new_session=True,  # a Ctrl-C at the terminal is for pytest, not for us
                preexec_fn=_die_with_parent_hook(),
                **switch_user_kwargs(self.os_user),
            )
        if self not in _LIVE:
            _LIVE.append(self)
        self._wait_ready(timeout)

    def stop(self, mode: str = "fast", timeout: float = STOP_TIMEOUT) -> None:
        """Shut down like ``pg_ctl stop -m mode`` (smart, fast or immediate) and wait."""
        try:
            sig = _STOP_SIGNALS[mode]
        except KeyError:
            raise ValueError(f"unknown shutdown mode {mode!r}") from None
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                raise PgHarnessError(
                    f"cluster {self.name} did not shut down ({mode}) within {timeout:.0f}s; "
                    f"killed it\n{self.log_tail()}"
                ) from None
        self._proc = None
        with contextlib.suppress(ValueError):
            _LIVE.remove(self)

    def kill(self) -> None:
        """Immediate shutdown: no checkpoint, crash recovery on the next start."""
        self.stop("immediate")

    def restart(self, mode: str = "fast") -> None:
        self.stop(mode)
        self.start()

    def reload(self) -> None:
        """Re-read the configuration files (like ``pg_ctl reload``)."""
        self.psql("SELECT pg_reload_conf()")

    def is_in_recovery(self) -> bool:
        return self.psql("SELECT pg_is_in_recovery()") == "t"

    # -- replicas --------------------------------------------------------------------------

    def set_apply_delay(self, ms: int) -> None:
        """Make this replica hold back WAL replay by ``ms`` milliseconds (0 disables)."""
        self._require_replica()
        self.psql(f"ALTER SYSTEM SET recovery_min_apply_delay = '{int(ms)}ms'")
        self.reload()

    def wait_for_replay(self, timeout: float = REPLAY_TIMEOUT) -> None:
        """Wait until everything committed on the primary so far is visible here."""
        primary = self._require_replica()
        target = int(
            primary.psql(f"UPDATE {_MARKER_TABLE} SET n = n + 1 RETURNING n").splitlines()[0]
        )

        def replayed() -> bool:
            with contextlib.suppress(PgCommandError):
                return int(self.psql(f"SELECT n FROM {_MARKER_TABLE}") or 0) >= target
            return False

        self._wait_until(replayed, timeout, f"replaying up to marker {target} from the primary")

    # -- internals -------------------------------------------------------------------------

    def _require_replica(self) -> PgCluster:
        if self.primary is None:
            raise PgHarnessError(f"cluster {self.name} is not a replica")
        return self.primary

    def _write_conf(self) -> None:
        settings: dict[str, str | int | bool] = {
            **self.settings,
            "port": self.port,
            "listen_addresses": self.host,
        }
        if self.socket_dir is not None:
            settings["unix_socket_directories"] = str(self.socket_dir)
        body = "".join(f"{key} = {_conf_value(value)}\n" for key, value in settings.items())
        header = "# Written by tests/support/pg.py; rewritten on every start.\n"
        _write_owned(self.datadir / _CONF_NAME, header + body, self.os_user)

    def _postmaster_status(self) -> str | None:
        """Line 8 of postmaster.pid ("starting", "ready", "standby", ...) if it is ours."""
        try:
            lines = (self.datadir / "postmaster.pid").read_text().splitlines()
        except OSError:
            return None
        if self._proc is None or len(lines) < 8 or lines[0].strip() != str(self._proc.pid):
            return None
        return lines[7].strip()

    def _wait_ready(self, timeout: float) -> None:
        def ready() -> bool:
            if self._proc is not None and self._proc.poll() is not None:
                code = self._proc.returncode
                self._proc = None
                with contextlib.suppress(ValueError):
                    _LIVE.remove(self)
                raise PgHarnessError(
                    f"postgres for cluster {self.name} exited with {code} during startup\n"
                    f"{self.log_tail()}"
                )
            return self._postmaster_status() in ("ready", "standby")

        self._wait_until(ready, timeout, "startup")

    def _wait_until(self, condition: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        delay = 0.02
        while not condition():
            if time.monotonic() > deadline:
                raise PgHarnessError(
                    f"cluster {self.name} (port {self.port}): timed out after {timeout:.0f}s "
                    f"waiting for {what}\n{self.log_tail()}"
                )
            time.sleep(delay)
            delay = min(delay * 1.5, 0.25)


def _start_on_free_port(cluster: PgCluster, attempts: int = 3) -> None:
    """Start a new cluster, moving to another port if the one picked was taken meanwhile."""
    for attempt in range(attempts):
        try:
            cluster.start()
            return
        except PgHarnessError as exc:
            if attempt == attempts - 1 or not re.search(
                r"could not bind|Address already in use", str(exc)
            ):
                raise
            cluster.port = free_port(cluster.host)


_BASE_SETTINGS: dict[str, str | int | bool] = {
    "max_connections": 1200,  # load tests hold ~1000 clients through the proxy
    "shared_buffers": "128MB",
    "shared_preload_libraries": "pg_stat_statements",
    "pg_stat_statements.track": "all",
    "wal_level": "replica",
    "max_wal_senders": 10,
    "hot_standby": True,
    # Throwaway clusters: trade durability for speed.
    "fsync": False,
    "synchronous_commit": False,
    "full_page_writes": False,
    "password_encryption": "scram-sha-256",
    "log_line_prefix": "%m [%p] %e %q%u@%d ",  # %e: SQLSTATE
}


def _hba_conf() -> str:
    rows = [("local", "all", "all", "", "trust"), ("local", "replication", "all", "", "trust")]
    for user in PASSWORD_USERS:
        for database in ("all", "replication"):
            rows.append(("host", database, user.name, f"{LOOPBACK}/32", user.auth_method))
    rows.append(("host", "all", "all", f"{LOOPBACK}/32", "trust"))
    rows.append(("host", "replication", "all", f"{LOOPBACK}/32", "trust"))
    lines = ["# Written by tests/support/pg.py. First match wins: password users, then trust."]
    lines += ["  ".join(f"{col:<12}" for col in row).rstrip() for row in rows]
    return "\n".join(lines) + "\n"


def _roles_sql() -> str:
    statements = []
    for user in PASSWORD_USERS:
        password = user.password.replace("'", "''")
        statements.append(f"SET password_encryption = '{user.password_encryption}';")
        statements.append(f"CREATE ROLE \"{user.name}\" LOGIN PASSWORD '{password}';")
    statements.append("RESET password_encryption;")
    statements.append(f'CREATE DATABASE "{APP_DATABASE}" OWNER "{APP_USER.name}";')
    return "\n".join(statements) + "\n"


def start_primary(
    base_dir: Path, name: str = "primary", *, bindir: Path | None = None
) -> PgCluster:
    """initdb and start a primary under ``base_dir/name``, with the test roles and databases.

    Roles (see PASSWORD_USERS): ``scram_user``/``scram_pw`` (scram-sha-256), ``md5_user``/
    ``md5_pw`` (md5, md5-stored), ``pw_user``/``pw_pw`` (cleartext ``password``), and
    ``app``/``app_pw`` (scram-sha-256) owning database ``app``. Everyone else, ``postgres``
    included, is trusted on 127.0.0.1. ``pg_stat_statements`` is installed in ``postgres`` and
    ``app``.
    """
    bindir = bindir or find_pg_bindir()
    os_user = server_os_user()
    _check_writable_by(base_dir, os_user)
    datadir = _make_private_dir(base_dir / name, os_user)
    socket_dir = _make_private_dir(base_dir / f"{name}.sock", os_user)
    _run(
        [
            bindir / "initdb",
            "-D", datadir,
            "-U", SUPERUSER,
            "--auth-local=trust",
            "--auth-host=trust",
            "--encoding=UTF8",
            "--locale=C",
            "--no-sync",
            "--no-instructions",
        ],
        os_user=os_user,
        cwd=base_dir,
    )  # fmt: skip
    with (datadir / "postgresql.conf").open("a") as conf:
        conf.write(f"\n# Test settings (port, sockets, speed) live here:\ninclude '{_CONF_NAME}'\n")
    _write_owned(datadir / "pg_hba.conf", _hba_conf(), os_user)

    cluster = PgCluster(
        name=name,
        host=LOOPBACK,
        port=free_port(),
        datadir=datadir,
        bindir=bindir,
        os_user=os_user,
        socket_dir=socket_dir,
        settings=dict(_BASE_SETTINGS),
    )
    _start_on_free_port(cluster)
    try:
        cluster.psql(
            "CREATE EXTENSION IF NOT EXISTS pg_stat_statements;\n"
            f"CREATE TABLE {_MARKER_TABLE} (n bigint NOT NULL);\n"
            f"INSERT INTO {_MARKER_TABLE} VALUES (0);\n" + _roles_sql()
        )
        cluster.psql("CREATE EXTENSION IF NOT EXISTS pg_stat_statements;", dbname=APP_DATABASE)
    except BaseException:
        cluster.stop("immediate")
        raise
    return cluster


def start_replica(
    primary: PgCluster, base_dir: Path, name: str = "replica", *, timeout: float = START_TIMEOUT
) -> PgCluster:
    """Clone ``primary`` with pg_basebackup and start it as a hot, streaming standby.

    Returns once the replica is in recovery and has replayed everything the primary had
    committed when this was called.
    """
    os_user = primary.os_user
    _check_writable_by(base_dir, os_user)
    datadir = _make_private_dir(base_dir / name, os_user)
    socket_dir = _make_private_dir(base_dir / f"{name}.sock", os_user)
    _run(
        [
            primary.bindir / "pg_basebackup",
            "-h", primary.host,
            "-p", str(primary.port),
            "-U", SUPERUSER,
            "-D", datadir,
            "-R",  # standby.signal + primary_conninfo
            "-X", "stream",
            "-c", "fast",
            "--no-sync",
            "-w",
        ],
        os_user=os_user,
        cwd=base_dir,
    )  # fmt: skip
    # The primary's log came along with the copy; start this cluster's own.
    (datadir / _LOG_NAME).unlink(missing_ok=True)

    cluster = PgCluster(
        name=name,
        host=primary.host,
        port=free_port(),
        datadir=datadir,
        bindir=primary.bindir,
        os_user=os_user,
        socket_dir=socket_dir,
        primary=primary,
        settings={
            **primary.settings,
            "hot_standby": True,
            "hot_standby_feedback": True,
            # Reconnect quickly after the primary restarts (default 5s).
            "wal_retrieve_retry_interval": "200ms",
        },
    )
    _start_on_free_port(cluster)
    try:
        if not cluster.is_in_recovery():
            raise PgHarnessError(
                f"replica {name} is not in recovery after start\n{cluster.log_tail()}"
            )
        cluster.wait_for_replay(timeout)
    except BaseException:
        cluster.stop("immediate")
        raise
    return cluster


@atexit.register
def _cleanup_at_exit() -> None:
    # Replicas were started after their primaries; stop them first.
    for cluster in reversed(list(_LIVE)):
        with contextlib.suppress(Exception):
            cluster.stop("immediate", timeout=10)
    for path in list(_BASE_DIRS):
        shutil.rmtree(path, ignore_errors=True)
