"""Packaging without a Docker engine: the Dockerfile, docker-compose.yml and the config/ files
are checked for structure and for agreement with the real configuration model."""

from __future__ import annotations

import json
import os
import re
import shlex
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from sqlproxy.admin.server import is_loopback
from sqlproxy.config import Config, load_config, parse_hostport

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = ROOT / "docker-compose.yml"
IMAGE_CONFIG = ROOT / "docker" / "sqlproxy.toml"
DEV = ROOT / "config" / "sqlproxy.dev.toml"
PRODUCTION = ROOT / "config" / "sqlproxy.production.toml"


# ------------------------------------------------------------------------------ Dockerfile
def _instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        word, _, args = line.partition(" ")
        out.append((word.upper(), args.strip()))
    assert not pending, "Dockerfile ends inside a continued line"
    return out


def _stages(text: str) -> list[list[tuple[str, str]]]:
    stages: list[list[tuple[str, str]]] = []
    for ins in _instructions(text):
        if ins[0] == "FROM":
            stages.append([])
        if stages:
            stages[-1].append(ins)
    return stages


def _exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list), f"not exec form: {args}"
    return [str(v) for v in value]


def test_dockerfile_is_multi_stage_slim_and_non_root() -> None:
    stages = _stages(DOCKERFILE.read_text())
    assert len(stages) >= 2, "a build stage and a runtime stage"
    build, final = stages[0], stages[-1]
    build_runs = " ".join(a for i, a in build if i == "RUN")
    # The mypyc compile needs a C compiler in the build stage, and only there.
    assert "gcc" in build_runs and "--no-build-isolation" in build_runs
    assert all("gcc" not in a for i, a in final if i == "RUN")
    args = dict(a.split("=", 1) for i, a in _instructions(DOCKERFILE.read_text())
                if i == "ARG" and "=" in a)
    assert "slim" in args.get("PYTHON_IMAGE", ""), "a slim base image"
    users = [a for i, a in final if i == "USER"]
    assert users, "the runtime stage sets USER"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), users
    copies = " ".join(a for i, a in final if i == "COPY")
    assert "--from=" in copies, "the runtime stage copies the build stage's result"


def test_dockerfile_entrypoint_is_sqlproxy_serve_with_a_health_check() -> None:
    final = _stages(DOCKERFILE.read_text())[-1]
    entry = [_exec_form(a) for i, a in final if i == "ENTRYPOINT"]
    cmd = [_exec_form(a) for i, a in final if i == "CMD"]
    assert entry, "ENTRYPOINT in exec form"
    command = entry[-1] + (cmd[-1] if cmd else [])
    assert command[:2] == ["sqlproxy", "serve"], command
    checks = [a for i, a in final if i == "HEALTHCHECK"]
    assert checks, "HEALTHCHECK"
    probe = _exec_form(checks[-1][checks[-1].index("CMD") + 3 :].strip())
    assert probe[:2] == ["sqlproxy", "healthcheck"], probe  # GET /healthz at admin.listen
    from sqlproxy.cli import build_parser

    build_parser().parse_args(probe[1:])  # the options it passes exist


def test_dockerfile_sources_and_image_config_agree() -> None:
    text = DOCKERFILE.read_text()
    ins = _instructions(text)
    ignored = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    for i, args in ins:
        if i != "COPY" or "--from=" in args:
            continue
        *sources, _dest = shlex.split(args)
        for src in sources:
            assert (ROOT / src).exists(), f"COPY {src}: no such file in the repository"
            assert src.rstrip("/") not in ignored, f"COPY {src} but .dockerignore drops it"
    env = " ".join(a for i, a in ins if i == "ENV")
    m = re.search(r"SQLPROXY_CONFIG=(\S+)", env)
    assert m, "the image points SQLPROXY_CONFIG at its config file"
    copy_dest = {shlex.split(a)[-1]: shlex.split(a)[0] for i, a in ins
                 if i == "COPY" and "--from=" not in a}
    assert copy_dest.get(m.group(1)) == "docker/sqlproxy.toml"
    # SQLPROXY_CONFIG is the only SQLPROXY_* variable the image sets: anything else would
    # override a mounted file (the environment wins over the file).
    assert set(re.findall(r"\b(SQLPROXY_\w+)=", env)) == {"SQLPROXY_CONFIG"}
    cfg = load_config(IMAGE_CONFIG, environ={})
    exposed = {int(p) for i, a in ins if i == "EXPOSE" for p in a.split()}
    assert parse_hostport(cfg.proxy.listen, "proxy.listen") == ("0.0.0.0", 6432)
    assert parse_hostport(cfg.admin.listen, "admin.listen") == ("0.0.0.0", 8080)
    assert exposed == {6432, 8080}
    volumes = " ".join(a for i, a in ins if i == "VOLUME")
    assert str(Path(cfg.state.path).parent) in volumes, "state.path on the image's volume"


# ------------------------------------------------------------------------- docker-compose
@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return data


def _env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {str(k): str(v) for k, v in env.items()}


def _depends(service: dict[str, Any]) -> dict[str, str]:
    dep = service.get("depends_on", {})
    if isinstance(dep, list):
        return {name: "service_started" for name in dep}
    return {name: spec.get("condition", "service_started") for name, spec in dep.items()}


PROXIES = ("sqlproxy", "sqlproxy-2")  # the fleet's instances, and the app going through each
APPS = {"sqlproxy": "app", "sqlproxy-2": "app-2"}


def _proxy_config(compose: dict[str, Any], service: str = "sqlproxy") -> Config:
    """What sqlproxy runs with in the compose file: the image's file plus the service's
    environment (load_config raises ConfigError on any SQLPROXY_* key that is not a key)."""
    env = _env(compose["services"][service])
    return load_config(IMAGE_CONFIG, environ=env)


def test_compose_services_and_dependencies(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == {"primary", "replica", "state-db", *PROXIES, *APPS.values()}
    for name in ("primary", "replica", "state-db"):
        assert services[name]["image"].split(":")[0] == "postgres"
        assert services[name]["image"].split(":")[1].startswith("15")
    assert _depends(services["replica"]) == {"primary": "service_healthy"}
    for proxy in PROXIES:
        # The state database is not waited for: the proxy runs without it (and retries).
        assert _depends(services[proxy]) == {"primary": "service_healthy",
                                             "replica": "service_healthy",
                                             "state-db": "service_started"}
        probe = services[proxy]["healthcheck"]["test"]
        assert probe[0] == "CMD" and probe[1:3] == ["sqlproxy", "healthcheck"]
        assert services[proxy]["build"] in (".", {"context": "."})
    assert _depends(services["app"]) == {"sqlproxy": "service_healthy"}
    assert _depends(services["app-2"]) == {"app": "service_started",
                                           "sqlproxy-2": "service_healthy"}
    for name in ("primary", "replica", "state-db", *PROXIES):
        assert "test" in services[name].get("healthcheck", {}), f"{name} has no healthcheck"


def test_compose_replica_is_a_streaming_clone_of_the_primary(compose: dict[str, Any]) -> None:
    services = compose["services"]
    primary, replica = services["primary"], services["replica"]
    command = " ".join(primary["command"])
    assert "wal_level=replica" in command and "max_wal_senders" in command
    mounts = {v.split(":")[1]: v.split(":")[0] for v in primary["volumes"] if v.startswith(".")}
    init = [src for dst, src in mounts.items() if dst.startswith("/docker-entrypoint-initdb.d/")]
    assert init and "REPLICATION" in (ROOT / init[0]).read_text()
    entry = replica["entrypoint"][0]
    script = {v.split(":")[1]: v.split(":")[0] for v in replica["volumes"]
              if v.startswith(".")}[entry]
    text = (ROOT / script).read_text()
    assert "pg_basebackup" in text and "--write-recovery-conf" in text
    for src in (init[0], script):
        assert os.access(ROOT / src, os.X_OK), f"{src} must be executable"
    penv, renv = _env(primary), _env(replica)
    assert renv["PRIMARY_HOST"] == "primary"
    for key in ("REPLICATION_USER", "REPLICATION_PASSWORD"):
        assert penv[key] == renv[key]


@pytest.mark.parametrize("service", PROXIES)
def test_compose_proxy_env_keys_are_real_config_keys(compose: dict[str, Any],
                                                     service: str) -> None:
    env = _env(compose["services"][service])
    assert env and all(k.startswith("SQLPROXY_") for k in env)
    load_config(None, environ=env)  # every key exists, every value is valid
    cfg = _proxy_config(compose, service)
    assert cfg.routing.enabled
    assert cfg.replicas, "routing needs at least one replica"
    primary = cfg.proxy.primary_url
    assert primary.host == "primary" and primary.port == 5432
    assert [urlsplit(r.url).hostname for r in cfg.replicas] == ["replica"]
    # The proxy logs in as the image's superuser (it reads pg_authid for SCRAM pass-through
    # to the replica), and the app as the same user.
    penv = _env(compose["services"]["primary"])
    assert primary.user == penv["POSTGRES_USER"]
    assert primary.password == penv["POSTGRES_PASSWORD"]
    assert urlsplit(_env(compose["services"][APPS[service]])["DATABASE_URL"]).username in (
        primary.user, *cfg.routing.passwords)
    host, _ = parse_hostport(cfg.admin.listen, "admin.listen")
    if not is_loopback(host):
        assert cfg.admin.token, "an admin API on a non-loopback address needs admin.token"


@pytest.mark.parametrize("service", PROXIES)
def test_compose_proxy_ports_and_app_url(compose: dict[str, Any], service: str) -> None:
    services = compose["services"]
    cfg = _proxy_config(compose, service)
    _, proxy_port = parse_hostport(cfg.proxy.listen, "proxy.listen")
    _, admin_port = parse_hostport(cfg.admin.listen, "admin.listen")
    published = {int(str(p).rsplit(":", 1)[1]) for p in services[service]["ports"]}
    assert published == {proxy_port, admin_port}
    app = services[APPS[service]]
    url = urlsplit(_env(app)["DATABASE_URL"])
    assert url.scheme == "postgresql"
    assert (url.hostname, url.port) == (service, proxy_port), "the app goes through sqlproxy"
    entry = app["entrypoint"]
    assert entry[:3] == ["python", "-m", "sqlproxy.demo.app"]
    from sqlproxy.demo.app import build_parser

    build_parser().parse_args(app.get("command", []))


def test_compose_fleet_shares_one_state_database(compose: dict[str, Any]) -> None:
    services = compose["services"]
    configs = [_proxy_config(compose, p) for p in PROXIES]
    urls = {c.state.url for c in configs}
    assert len(urls) == 1 and None not in urls, "one state database for the whole fleet"
    state = urlsplit(urls.pop() or "")
    senv = _env(services["state-db"])
    assert (state.hostname, state.port or 5432) == ("state-db", 5432)
    assert (state.username, state.password, state.path.lstrip("/")) == (
        senv["POSTGRES_USER"], senv["POSTGRES_PASSWORD"], senv["POSTGRES_DB"])
    instances = [c.state.instance for c in configs]
    assert None not in instances and len(set(instances)) == len(PROXIES), instances
    published = [str(p).rsplit(":", 1)[0] for p in (*services["sqlproxy"]["ports"],
                                                     *services["sqlproxy-2"]["ports"])]
    assert len(set(published)) == len(published), "each instance on its own host ports"
    assert "--skip-setup" in services["app-2"]["command"], "one app creates the tables"


# -------------------------------------------------------------------------------- config/
def _key_lines(text: str) -> list[tuple[int, str]]:
    lines = text.splitlines()
    return [(n, line) for n, line in enumerate(lines)
            if line.strip() and not line.lstrip().startswith(("#", "["))]


@pytest.mark.parametrize("path", [DEV, PRODUCTION], ids=lambda p: p.name)
def test_config_examples_load_and_every_key_is_commented(path: Path) -> None:
    load_config(path, environ={})
    lines = path.read_text().splitlines()
    for n, line in _key_lines(path.read_text()):
        above = lines[n - 1].lstrip() if n else ""
        assert above.startswith("#") or "#" in line.split("=", 1)[1], \
            f"{path.name}:{n + 1}: {line.strip()!r} has no comment"


def test_production_config_is_production_grade() -> None:
    cfg = load_config(PRODUCTION, environ={})
    assert cfg.tls.cert_file and cfg.tls.key_file
    assert cfg.tls.client_mode == "require"
    assert cfg.tls.server_sslmode == "verify-full" and cfg.tls.ca_file
    assert cfg.admin.token
    assert cfg.routing.enabled and len(cfg.replicas) >= 2
    assert not cfg.analysis.capture_parameters
    defaults = Config().proxy
    assert cfg.proxy.idle_in_transaction_timeout > 0
    assert cfg.proxy.max_client_connections < defaults.max_client_connections
    assert cfg.proxy.max_connections_per_user > 0
    assert cfg.proxy.primary_url.password is None, "no password in the file"
    # The secrets it tells to give by environment do override it.
    env = {"SQLPROXY_ADMIN__TOKEN": "s3cret",
           "SQLPROXY_PROXY__PRIMARY": "postgresql://sqlproxy:pw@db-primary.internal:5432/postgres",
           "SQLPROXY_ROUTING__PASSWORDS": '{ app = "pw" }'}
    over = load_config(PRODUCTION, environ=env)
    assert over.admin.token == "s3cret"
    assert over.proxy.primary_url.password == "pw"
    assert over.routing.passwords == {"app": "pw"}


def test_dev_config_is_local() -> None:
    cfg = load_config(DEV, environ={})
    for listen in (cfg.proxy.listen, cfg.admin.listen):
        assert is_loopback(parse_hostport(listen, "listen")[0])
    assert cfg.admin.token is None
