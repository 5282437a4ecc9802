"""Command line: ``sqlproxy serve``, ``sqlproxy check-config``, ``sqlproxy demo``,
``sqlproxy healthcheck``."""

from __future__ import annotations

import argparse
import errno
import json
import sys
from typing import Any

from sqlproxy import __version__
from sqlproxy.config import Config, load_config
from sqlproxy.errors import ConfigError, MissingExtra
from sqlproxy.extras import EXTRAS

_LISTEN_ERRORS = frozenset({errno.EADDRINUSE, errno.EADDRNOTAVAIL, errno.EACCES})

CONFIG_HELP = (
    "Settings come from, lowest to highest precedence: the defaults, a TOML file (--config "
    "FILE, or $SQLPROXY_CONFIG), SQLPROXY_<SECTION>__<KEY> environment variables (values "
    "written as in TOML, e.g. SQLPROXY_ROUTING__ENABLED=true), then the flags above. "
    "The repository's config/sqlproxy.example.toml documents every key."
)


def _add_config(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE",
                   help="TOML configuration file (default: $SQLPROXY_CONFIG if set)")


def _add_common(p: argparse.ArgumentParser) -> None:
    _add_config(p)
    p.add_argument("--listen", metavar="HOST:PORT",
                   help="where clients connect (proxy.listen, default 127.0.0.1:6432)")
    p.add_argument("--primary", metavar="URL",
                   help="primary server, postgresql://user:pass@host:port/db (proxy.primary); "
                   "the credentials are the proxy's own, for health checks and EXPLAIN")
    p.add_argument("--replica", metavar="URL", action="append", default=None,
                   help="read replica URL (repeatable; replaces the file's [[replicas]]); "
                   "reads go to replicas only with routing.enabled = true")
    p.add_argument("--admin", metavar="HOST:PORT",
                   help="admin API and dashboard address (admin.listen, default "
                   "127.0.0.1:8080; a non-loopback address needs admin.token)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sqlproxy",
        description="A transparent PostgreSQL proxy that profiles the traffic of any application.",
    )
    parser.add_argument("--version", action="version", version=f"sqlproxy {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    serve = sub.add_parser(
        "serve", help="run the proxy",
        description="Run the proxy in front of a PostgreSQL primary (and, with routing "
        "enabled, its read replicas), with the admin API and dashboard. SIGTERM or SIGINT "
        "stops it cleanly (sessions drain for up to proxy.shutdown_grace_seconds); SIGHUP "
        "reloads the configuration. Exit status 2 for an invalid configuration.",
        epilog=CONFIG_HELP,
    )
    _add_common(serve)
    check = sub.add_parser(
        "check-config", help="validate a configuration and print the effective settings",
        description="Validate FILE (or $SQLPROXY_CONFIG; none: the defaults) together with "
        "the SQLPROXY_* environment variables, and print the effective settings as JSON. "
        "Exit status 2 when invalid, with a message naming the bad key.",
    )
    check.add_argument("file", metavar="FILE", nargs="?", help="TOML configuration file")
    health = sub.add_parser(
        "healthcheck", help="ask a running sqlproxy's /healthz (for container health checks)",
        description="GET /healthz from the admin API of a running sqlproxy, at the address "
        "the configuration gives (admin.listen; a wildcard address is asked on loopback), "
        "and print the answer. Exit status 0 when healthy, 1 otherwise, 2 for an invalid "
        "configuration.",
        epilog=CONFIG_HELP,
    )
    _add_config(health)
    health.add_argument("--admin", metavar="HOST:PORT",
                        help="admin API address (admin.listen, default 127.0.0.1:8080)")
    health.add_argument("--timeout", type=float, default=5.0, metavar="SECONDS",
                        help="give up after SECONDS (default 5)")
    demo = sub.add_parser(
        "demo", help="see it work: throwaway servers, a sample app, a report",
        description="Start a throwaway PostgreSQL primary and streaming replica (from the "
        "installed server binaries), sqlproxy in front of them with replica routing and the "
        "admin API, run a small SQLAlchemy application with typical ORM anti-patterns through "
        "it, and print what sqlproxy found. Then keep serving (dashboard, psql) until Ctrl-C. "
        "Everything it starts is removed on exit.",
        epilog=f"Installed with pip, the demo needs its extra: {EXTRAS['demo'].install} "
        f"({EXTRAS['demo'].packages}, for the application); bash scripts/demo sets that up "
        "itself. Exit status 2 when they are missing.",
    )
    demo.add_argument("--exit", action="store_true",
                      help="stop after the report instead of serving until Ctrl-C")
    demo.add_argument("--listen", metavar="HOST:PORT",
                      help="proxy address (default 127.0.0.1:6432, or a free port if taken)")
    demo.add_argument("--admin", metavar="HOST:PORT",
                      help="admin/dashboard address (default 127.0.0.1:8080, or a free port)")
    demo.add_argument("--no-replica", action="store_true",
                      help="no replica: everything runs on the primary")
    return parser


def overrides_from_args(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if getattr(args, "listen", None):
        out.setdefault("proxy", {})["listen"] = args.listen
    if getattr(args, "primary", None):
        out.setdefault("proxy", {})["primary"] = args.primary
    if getattr(args, "admin", None):
        out.setdefault("admin", {})["listen"] = args.admin
    if getattr(args, "replica", None):
        out["replicas"] = [{"url": u} for u in args.replica]
    return out


def config_from_args(args: argparse.Namespace) -> Config:
    return load_config(getattr(args, "config", None), overrides_from_args(args))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return _command(args)
    except MissingExtra as exc:  # an optional feature installed without its extra
        print(f"sqlproxy: {exc}", file=sys.stderr)
        return 2


def _command(args: argparse.Namespace) -> int:
    if args.command == "demo":
        from sqlproxy.demo import run_demo

        return run_demo(args)
    if args.command == "check-config":
        try:
            cfg = load_config(args.file)
        except ConfigError as exc:
            print(f"sqlproxy: {exc}", file=sys.stderr)
            return 2
        print(json.dumps(cfg.model_dump(mode="json"), indent=2))
        return 0
    try:
        cfg = config_from_args(args)
    except ConfigError as exc:
        print(f"sqlproxy: {exc}", file=sys.stderr)
        return 2
    if args.command == "healthcheck":
        return healthcheck(cfg, args.timeout)
    from sqlproxy.logs import configure_logging

    configure_logging(cfg.log.format, cfg.log.level)
    if args.command == "serve":
        from sqlproxy.runtime import run

        runner = run
        if cfg.proxy.worker_count > 1:  # a supervisor and its worker processes
            from sqlproxy.workers.supervisor import run_workers

            runner = run_workers
        try:
            runner(cfg, config_path=getattr(args, "config", None),
                overrides=overrides_from_args(args))
        except ConfigError as exc:  # found at start: an admin address without a token, ...
            print(f"sqlproxy: {exc}", file=sys.stderr)
            return 2
        except OSError as exc:
            if exc.errno not in _LISTEN_ERRORS:
                raise
            print(f"sqlproxy: cannot listen: {exc.strerror or exc}", file=sys.stderr)
            return 1
        return 0
    return 2


def healthcheck(cfg: Config, timeout: float) -> int:
    """GET /healthz on the configured admin address: 0 healthy, 1 not (or unreachable)."""
    import urllib.error
    import urllib.request

    from sqlproxy.config import parse_hostport

    if not cfg.admin.enabled:
        print("sqlproxy: admin.enabled is false: no /healthz to ask", file=sys.stderr)
        return 1
    host, port = parse_hostport(cfg.admin.listen, "admin.listen")
    if host in ("0.0.0.0", ""):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    if ":" in host:
        host = f"[{host}]"
    url = f"http://{host}:{port}/healthz"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            print(resp.read().decode("utf-8", "replace"))
            return 0 if resp.status == 200 else 1
    except urllib.error.HTTPError as exc:  # 503: running but unhealthy
        print(exc.read().decode("utf-8", "replace"))
        return 1
    except (OSError, ValueError) as exc:
        print(f"sqlproxy: {url}: {getattr(exc, 'reason', exc)}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
