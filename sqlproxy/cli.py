"""Command line: ``sqlproxy serve``, ``sqlproxy check-config``, ``sqlproxy demo``."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from sqlproxy import __version__
from sqlproxy.config import Config, load_config
from sqlproxy.errors import ConfigError


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="TOML configuration file")
    p.add_argument("--listen", metavar="HOST:PORT",
                   help="where clients connect (proxy.listen, default 127.0.0.1:6432)")
    p.add_argument("--primary", metavar="URL",
                   help="primary server, postgresql://user:pass@host:port/db (proxy.primary)")
    p.add_argument("--replica", metavar="URL", action="append", default=None,
                   help="read replica URL (repeatable; adds [[replicas]])")
    p.add_argument("--admin", metavar="HOST:PORT",
                   help="admin API and dashboard address (admin.listen, default 127.0.0.1:8080)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sqlproxy",
        description="A transparent PostgreSQL proxy that profiles the traffic of any application.",
    )
    parser.add_argument("--version", action="version", version=f"sqlproxy {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    serve = sub.add_parser("serve", help="run the proxy",
                           description="Run the proxy in front of a PostgreSQL primary.")
    _add_common(serve)
    check = sub.add_parser(
        "check-config", help="validate a configuration and print the effective settings",
        description="Validate FILE (plus SQLPROXY_* environment overrides) and print the "
        "effective settings as JSON. Exit status 2 when invalid.",
    )
    check.add_argument("file", metavar="FILE", nargs="?", help="TOML configuration file")
    demo = sub.add_parser(
        "demo", help="see it work: throwaway servers, a sample app, a report",
        description="Start a throwaway PostgreSQL primary and streaming replica (from the "
        "installed server binaries), sqlproxy in front of them with replica routing and the "
        "admin API, run a small SQLAlchemy application with typical ORM anti-patterns through "
        "it, and print what sqlproxy found. Then keep serving (dashboard, psql) until Ctrl-C. "
        "Everything it starts is removed on exit.",
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
    from sqlproxy.logs import configure_logging

    configure_logging(cfg.log.format, cfg.log.level)
    if args.command == "serve":
        from sqlproxy.runtime import run

        run(cfg, config_path=getattr(args, "config", None), overrides=overrides_from_args(args))
        return 0
    return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
