"""The one typed configuration object.

Precedence: defaults < TOML file (``--config``) < ``SQLPROXY_<SECTION>__<KEY>`` environment
variables < command-line flags. Every validation error names the offending key.
"""

from __future__ import annotations

import os
import re
import socket
import tomllib
from pathlib import Path
from typing import Any, Literal
from urllib.parse import unquote, urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from sqlproxy.errors import ConfigError


def parse_hostport(value: str, key: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not (0 <= int(port) <= 65535):
        raise ValueError(f"{key} must be HOST:PORT, got {value!r}")
    host = host.strip("[]") or "127.0.0.1"
    return host, int(port)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class BackendURL(BaseModel):
    """A parsed ``postgresql://user:pass@host:port/db`` URL."""

    model_config = ConfigDict(frozen=True)

    host: str
    port: int
    user: str | None
    password: str | None
    database: str | None
    sslmode: str | None = None

    @classmethod
    def parse(cls, url: str) -> BackendURL:
        parts = urlsplit(url)
        if parts.scheme not in ("postgresql", "postgres"):
            raise ValueError(f"expected a postgresql:// URL, got {url!r}")
        query = dict(p.split("=", 1) for p in parts.query.split("&") if "=" in p)
        try:
            port = parts.port or 5432
        except ValueError as exc:
            raise ValueError(f"invalid port in {url!r}") from exc
        return cls(
            host=parts.hostname or "127.0.0.1",
            port=port,
            user=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password else None,
            database=unquote(parts.path.lstrip("/")) or None,
            sslmode=query.get("sslmode"),
        )

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def dsn(self, *, database: str | None = None, user: str | None = None) -> str:
        """A URL for asyncpg with the proxy's own credentials."""
        from urllib.parse import quote

        u = user or self.user or "postgres"
        auth = quote(u, safe="")
        if self.password and (user is None or user == self.user):
            auth += ":" + quote(self.password, safe="")
        db = database or self.database or u
        return f"postgresql://{auth}@{self.host}:{self.port}/{quote(db, safe='')}"


def _check_url(value: str) -> str:
    BackendURL.parse(value)
    return value


def _check_listen(value: str) -> str:
    parse_hostport(value, "listen")
    return value


# A worker's index is the first byte of the cancel secrets it hands out (sqlproxy.workers).
MAX_WORKERS = 64


class ProxySection(_Section):
    listen: str = "127.0.0.1:6432"
    primary: str = "postgresql://postgres@127.0.0.1:5432/postgres"
    max_client_connections: int = Field(2000, ge=1)
    max_connections_per_user: int = Field(0, ge=0)
    max_connections_per_database: int = Field(0, ge=0)
    startup_timeout: float = Field(15.0, gt=0)
    connect_timeout: float = Field(5.0, gt=0)
    idle_client_timeout: float = Field(0.0, ge=0)
    idle_in_transaction_timeout: float = Field(0.0, ge=0)
    max_message_bytes: int = Field(256 * 1024 * 1024, ge=1024, le=1024 * 1024 * 1024)
    shutdown_grace_seconds: float = Field(10.0, ge=0)
    direct_relay: bool = True
    # Worker processes sharing the listen address (SO_REUSEPORT); "auto" = usable CPUs.
    workers: int | Literal["auto"] = 1

    _v_primary = field_validator("primary")(_check_url)
    _v_listen = field_validator("listen")(_check_listen)

    @field_validator("workers")
    @classmethod
    def _v_workers(cls, value: int | str) -> int | str:
        if isinstance(value, int) and not 1 <= value <= MAX_WORKERS:
            raise ValueError(f"must be between 1 and {MAX_WORKERS} or \"auto\"")
        return value

    @property
    def worker_count(self) -> int:
        """``workers`` as a number: "auto" is the CPUs this process may run on."""
        if self.workers == "auto":
            return max(1, min(MAX_WORKERS, len(os.sched_getaffinity(0))))
        return int(self.workers)

    @property
    def primary_url(self) -> BackendURL:
        return BackendURL.parse(self.primary)


class ApplicationThresholds(_Section):
    slow_query_ms: float | None = Field(None, ge=0)
    burst_gap_ms: float | None = Field(None, gt=0)
    n_plus_one_threshold: int | None = Field(None, ge=2)
    large_result_rows: int | None = Field(None, ge=1)
    deep_offset: int | None = Field(None, ge=1)


class AnalysisSection(_Section):
    enabled: bool = True
    slow_query_ms: float = Field(100.0, ge=0)
    max_fingerprints: int = Field(5000, ge=10)
    capture_parameters: bool = False
    burst_gap_ms: float = Field(100.0, gt=0)
    n_plus_one_threshold: int = Field(5, ge=2)
    large_result_rows: int = Field(10_000, ge=1)
    deep_offset: int = Field(1000, ge=1)
    slow_log_size: int = Field(1000, ge=1)
    max_findings: int = Field(2000, ge=10)
    applications: dict[str, ApplicationThresholds] = Field(default_factory=dict)
    # Request attribution (sqlcommenter / query log tags): see docs/attribution.md.
    max_routes: int = Field(5000, ge=10)
    tag_keys: list[str] = Field(default_factory=list)
    trace_idle_ms: float = Field(2000.0, gt=0)
    # Regressions: per-fingerprint time windows.
    window_s: float = Field(300.0, ge=0.1)
    max_windows: int = Field(24, ge=2, le=10_000)
    regression_factor: float = Field(3.0, gt=1)
    regression_min_calls: int = Field(20, ge=1)
    regression_min_ms: float = Field(1.0, ge=0)
    new_hot_share: float = Field(0.25, gt=0, le=1)


class RoutingSection(_Section):
    enabled: bool = False
    read_your_writes: Literal["session", "table"] = "session"
    max_replica_lag_ms: float = Field(1000.0, ge=0)
    balance: Literal["least_outstanding", "round_robin"] = "least_outstanding"
    read_only_functions: list[str] = Field(default_factory=list)
    write_functions: list[str] = Field(default_factory=list)
    health_interval_ms: float = Field(200.0, gt=0)
    passwords: dict[str, str] = Field(default_factory=dict)


class ReplicaSection(_Section):
    url: str
    name: str | None = None

    _v_url = field_validator("url")(_check_url)


class AdminSection(_Section):
    enabled: bool = True
    listen: str = "127.0.0.1:8080"
    token: str | None = None
    auto_explain: bool = False
    allow_analyze_writes: bool = False
    metrics_top_n: int = Field(50, ge=0)

    _v_listen = field_validator("listen")(_check_listen)


class TLSSection(_Section):
    cert_file: str | None = None
    key_file: str | None = None
    client_mode: Literal["disable", "allow", "require"] = "allow"
    server_sslmode: Literal["disable", "prefer", "require", "verify-ca", "verify-full"] = "prefer"
    ca_file: str | None = None

    @model_validator(mode="after")
    def _check_files(self) -> TLSSection:
        if bool(self.cert_file) != bool(self.key_file):
            missing = "key_file" if self.cert_file else "cert_file"
            raise ValueError(f"tls.{missing} is required when the other is set")
        if self.client_mode == "require" and not self.cert_file:
            raise ValueError('tls.client_mode "require" needs tls.cert_file and tls.key_file')
        if self.server_sslmode in ("verify-ca", "verify-full") and not self.ca_file:
            raise ValueError(f"tls.ca_file is required for tls.server_sslmode "
                             f"{self.server_sslmode!r}")
        return self


class StateSection(_Section):
    enabled: bool = True
    path: str = "sqlproxy-state.sqlite"
    snapshot_seconds: float = Field(30.0, gt=0)
    # A fleet: the state in a PostgreSQL database shared by every instance (None: the file).
    url: str | None = None
    instance: str | None = Field(None, min_length=1, max_length=200)  # None: the host name
    fleet_window: int = Field(3, ge=1)  # snapshot periods an instance stays in the fleet view
    timeout: float = Field(5.0, gt=0)  # connect and statement timeout on the state database

    @field_validator("url")
    @classmethod
    def _v_url(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                BackendURL.parse(value)
            except ValueError:
                # Not the parser's message: it would repeat the URL, password included.
                raise ValueError("expected a postgresql://user:password@host:port/database "
                                 "URL") from None
        return value

    @property
    def instance_id(self) -> str:
        return self.instance or socket.gethostname()


class OtelSection(_Section):
    endpoint: str | None = None
    sample_ratio: float = Field(1.0, ge=0, le=1)
    service_name: str = "sqlproxy"


class PoolSection(_Section):
    """Server-connection pooling (docs/pooling.md). ``session``: a client keeps the server
    connection it logged in on (no pooling: the direct relay). ``transaction``: server
    connections are lent per transaction, per (database, user) pair."""

    mode: Literal["session", "transaction"] = "session"
    size: int = Field(20, ge=1, le=10_000)
    min_idle: int = Field(0, ge=0)
    max_wait_ms: float = Field(5000.0, gt=0)
    server_idle_timeout_s: float = Field(600.0, ge=0)  # 0: never closed for idleness
    server_lifetime_s: float = Field(3600.0, ge=0)  # 0: no lifetime limit
    max_prepared_per_server: int = Field(200, ge=1)  # named statements kept (LRU)
    # Transaction mode: the role whose connection reads the users' password verifiers with
    # auth_query, so that the proxy checks SCRAM/MD5 logins itself ("": logins go through).
    auth_user: str = ""
    auth_query: str = ("SELECT passwd FROM pg_catalog.pg_shadow WHERE usename = $1 "
                       "AND (valuntil IS NULL OR valuntil > now())")
    auth_dbname: str = ""  # "": the database of proxy.primary (else "postgres")

    @field_validator("auth_query")
    @classmethod
    def _check_auth_query(cls, v: str) -> str:
        if "$1" not in v:
            raise ValueError("must take the user name as $1 and return its password verifier")
        return v

    @model_validator(mode="after")
    def _check_min_idle(self) -> PoolSection:
        if self.min_idle > self.size:
            raise ValueError(f"pool.min_idle ({self.min_idle}) exceeds pool.size ({self.size})")
        return self


class CacheRule(_Section):
    """One ``[[cache.rules]]`` entry: the statements it covers and how long their results live."""

    fingerprint: str | None = Field(None, min_length=1)  # a statement id, as the admin API shows
    table: str | None = Field(None, min_length=1)  # every cacheable read of this table
    ttl_s: float = Field(..., gt=0, le=86_400 * 30)
    name: str | None = Field(None, min_length=1, max_length=200)  # in the admin view

    @model_validator(mode="after")
    def _check_target(self) -> CacheRule:
        if (self.fingerprint is None) == (self.table is None):
            raise ValueError("give exactly one of fingerprint or table")
        return self

    @field_validator("table")
    @classmethod
    def _v_table(cls, value: str | None) -> str | None:
        return value.strip().strip('"').lower() if value is not None else None

    @property
    def label(self) -> str:
        """How the rule is named in statistics."""
        if self.name:
            return self.name
        if self.table is not None:
            return f"table:{self.table}"
        return f"fingerprint:{self.fingerprint}"


class CacheSection(_Section):
    """The result cache (docs/cache.md). On when a rule exists, or ``enabled = true`` (for
    ``/* sqlproxy:cache ttl=N */`` hints alone); turning it on or off needs a restart, the
    rest is reloadable (SIGHUP)."""

    enabled: bool = False
    max_bytes: int = Field(64 * 1024 * 1024, ge=1024)
    max_entry_bytes: int = Field(1024 * 1024, ge=64)
    # A hint without ttl=, and the upper bound of any hint's ttl.
    hint_ttl_s: float = Field(60.0, gt=0)
    max_hint_ttl_s: float = Field(3600.0, gt=0)
    rules: list[CacheRule] = Field(default_factory=list)
    # Shared store for a fleet: "redis://host:port/db". None: in-process LRU only.
    url: str | None = None
    # A Redis call slower than this falls through to the server (counted).
    redis_timeout_ms: float = Field(50.0, gt=0, le=10_000)
    # After a Redis failure, the store is not tried again for this long.
    redis_retry_s: float = Field(1.0, gt=0)
    key_prefix: str = Field("sqlproxy:cache:", min_length=1, max_length=100)

    @field_validator("url")
    @classmethod
    def _v_url(cls, value: str | None) -> str | None:
        if value is not None and urlsplit(value).scheme not in ("redis", "rediss", "unix"):
            raise ValueError("expected a redis://host:port/db URL")
        return value

    @model_validator(mode="after")
    def _check_sizes(self) -> CacheSection:
        if self.max_entry_bytes > self.max_bytes:
            raise ValueError(f"cache.max_entry_bytes ({self.max_entry_bytes}) exceeds "
                             f"cache.max_bytes ({self.max_bytes})")
        return self

    @property
    def active(self) -> bool:
        return self.enabled or bool(self.rules)


class LogSection(_Section):
    format: Literal["auto", "console", "json"] = "auto"
    level: Literal["debug", "info", "warning", "error"] = "info"
    # client_connected / client_disconnected for every client (PgBouncer's log_connections
    # and log_disconnections): off for applications that connect per request.
    connections: bool = True


class Config(BaseModel):
    """Everything sqlproxy can be told."""

    model_config = ConfigDict(extra="forbid")

    proxy: ProxySection = Field(default_factory=ProxySection)
    analysis: AnalysisSection = Field(default_factory=AnalysisSection)
    routing: RoutingSection = Field(default_factory=RoutingSection)
    replicas: list[ReplicaSection] = Field(default_factory=list)
    admin: AdminSection = Field(default_factory=AdminSection)
    tls: TLSSection = Field(default_factory=TLSSection)
    state: StateSection = Field(default_factory=StateSection)
    otel: OtelSection = Field(default_factory=OtelSection)
    pool: PoolSection = Field(default_factory=PoolSection)
    cache: CacheSection = Field(default_factory=CacheSection)
    log: LogSection = Field(default_factory=LogSection)

    @model_validator(mode="after")
    def _check_cache(self) -> Config:
        if not self.cache.active:
            return self
        if self.routing.enabled and self.replicas:
            raise ValueError("cache: not supported together with routing (routing.enabled "
                             "with replicas) in this version; turn one of them off")
        if self.pool.mode == "transaction":
            raise ValueError('cache: not supported together with pool.mode = "transaction" '
                             "in this version")
        if self.cache.url is None and self.proxy.workers != 1:
            raise ValueError("cache: proxy.workers > 1 needs cache.url (a shared Redis): "
                             "an in-process cache would not see the other workers' writes")
        return self

    def replica_name(self, index: int) -> str:
        rep = self.replicas[index]
        return rep.name or f"replica{index + 1}"


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


_URL_PASSWORD = re.compile(r"(://[^:/@\s]*:)[^@\s]*@")


def redact_url(text: str) -> str:
    """``text`` with the password of any ``scheme://user:password@`` in it replaced by ***."""
    return _URL_PASSWORD.sub(r"\1***@", text)


def _format_error(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(root)"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        elif "input" in err and not isinstance(err["input"], dict | list):
            msg += f" (got {err['input']!r})"
        lines.append(f"{key}: {redact_url(msg)}")
    return "invalid configuration: " + "; ".join(lines)


#: SQLPROXY_* variables that are not configuration keys: the config file's path, and the
#: build's, test harness's and docs' own switches.
NOT_CONFIG_VARIABLES = frozenset({"", "config", "no_mypyc", "test_pg_bindir", "docs_screenshot"})


def _env_keys_check(environ: dict[str, str]) -> None:
    """Reject SQLPROXY_* variables that name no key (pydantic-settings would ignore them)."""
    sections = set(Config.model_fields)
    for name in environ:
        if not name.upper().startswith("SQLPROXY_"):
            continue
        rest = name[len("SQLPROXY_") :].lower()
        if rest in NOT_CONFIG_VARIABLES:
            continue
        section, sep, key = rest.partition("__")
        if section not in sections:
            raise ConfigError(f"invalid configuration: {name}: unknown section {section!r}")
        if not sep:
            continue
        field = Config.model_fields[section]
        model = field.annotation
        top_key = key.split("__", 1)[0]
        fields = getattr(model, "model_fields", None)
        if fields is not None and top_key not in fields:
            raise ConfigError(f"invalid configuration: {name}: unknown key {section}.{top_key}")


def load_config(
    path: str | os.PathLike[str] | None = None,
    overrides: dict[str, Any] | None = None,
    environ: dict[str, str] | None = None,
) -> Config:
    """Build the config from file, environment and CLI flags; ConfigError names a bad key."""
    env = dict(os.environ if environ is None else environ)
    if path is None and env.get("SQLPROXY_CONFIG"):
        path = env["SQLPROXY_CONFIG"]
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        try:
            data = tomllib.loads(p.read_text())
        except FileNotFoundError as exc:
            raise ConfigError(f"config file not found: {p}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {p} is not valid TOML: {exc}") from exc
    _env_keys_check(env)
    try:
        env_only = _env_values(env)
        merged = _deep_merge(data, env_only)
        if overrides:
            merged = _deep_merge(merged, overrides)
        return Config.model_validate(merged)
    except ValidationError as exc:
        raise ConfigError(_format_error(exc)) from exc


def _env_values(environ: dict[str, str]) -> dict[str, Any]:
    """SQLPROXY_<SECTION>__<KEY>[__<SUBKEY>] variables as nested dicts (values parsed as TOML
    scalars where possible, so ``true``, ``5``, ``["a","b"]`` work as expected)."""
    out: dict[str, Any] = {}
    for name, raw in environ.items():
        if (not name.upper().startswith("SQLPROXY_")
                or name[len("SQLPROXY_") :].lower() in NOT_CONFIG_VARIABLES):
            continue
        path = name[len("SQLPROXY_") :].lower().split("__")
        value: Any
        try:
            value = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    if isinstance(out.get("replicas"), str | dict):
        # SQLPROXY_REPLICAS='["postgresql://..."]' or a single URL
        reps = out["replicas"]
        out["replicas"] = [reps]
    if isinstance(out.get("replicas"), list):
        out["replicas"] = [{"url": r} if isinstance(r, str) else r for r in out["replicas"]]
    return out
