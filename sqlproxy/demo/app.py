"""The demo's league application on its own, against any database: ``python -m
sqlproxy.demo.app`` (the example app container of ``docker-compose.yml``).

It creates the demo's tables in the database ``DATABASE_URL`` names (dropping them first if
present: point it at a scratch database, never at one you care about), seeds them, then runs the
scenes of ``sqlproxy.demo.workload`` — the same code ``sqlproxy demo`` runs — once, or every
``--interval`` seconds, so that sqlproxy's dashboard has something to show.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from typing import TYPE_CHECKING

from sqlproxy import extras

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine

APPLICATION_NAME = "league-site"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m sqlproxy.demo.app",
        description="Run the sqlproxy demo's league application (SQLAlchemy, asyncpg) against "
        "a PostgreSQL URL, normally sqlproxy's. It DROPS and recreates its own tables (teams, "
        "players, coaches, users, page_views) in that database.",
    )
    parser.add_argument("--url", default=os.environ.get("DATABASE_URL"),
                        help="postgresql://user:password@host:port/database "
                        "(default: $DATABASE_URL)")
    parser.add_argument("--interval", type=float, default=0.0, metavar="SECONDS",
                        help="run the scenes again every SECONDS (default: once, then exit)")
    parser.add_argument("--connect-timeout", type=float, default=60.0, metavar="SECONDS",
                        help="keep retrying the first connection this long (default 60)")
    parser.add_argument("--skip-setup", action="store_true",
                        help="use the tables as they are (they must exist)")
    return parser


async def _wait_for_database(engine: AsyncEngine, timeout: float) -> None:
    from sqlalchemy import text

    deadline = time.monotonic() + timeout
    while True:
        try:
            async with engine.connect() as conn:
                await conn.execute(text("SELECT 1"))
            return
        except Exception as exc:  # any connection failure: the server may still be starting
            if time.monotonic() >= deadline:
                raise SystemExit(f"league app: cannot connect: {exc}") from exc
            await asyncio.sleep(1.0)


async def run(engine: AsyncEngine, interval: float = 0.0, connect_timeout: float = 60.0,
              skip_setup: bool = False) -> None:
    """Seed (unless ``skip_setup``), then run the scenes once or every ``interval`` s."""
    from sqlproxy.demo import workload

    try:
        await _wait_for_database(engine, connect_timeout)
        if not skip_setup:
            print("league app: creating and seeding the tables", flush=True)
            await workload.setup_schema(engine)
            await asyncio.sleep(1.0)  # let replicas replay the seed before the first reads
        rounds = 0
        while True:
            rounds += 1
            started = time.monotonic()
            await workload.run_scenes(
                engine, on_scene=lambda s: print(f"league app: {s.title}", flush=True))
            print(f"league app: round {rounds} done in {time.monotonic() - started:.1f} s",
                  flush=True)
            if interval <= 0:
                return
            await asyncio.sleep(interval)
    finally:
        await engine.dispose()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.url:
        print("league app: no database URL: pass --url or set DATABASE_URL", file=sys.stderr)
        return 2
    try:
        extras.require("demo", "the league app")
    except extras.MissingExtra as exc:
        print(exc, file=sys.stderr)
        return 2
    from sqlproxy.demo import workload  # after the check: it imports SQLAlchemy

    try:
        engine = workload.make_engine(args.url, APPLICATION_NAME)
    except ValueError as exc:
        print(f"league app: {exc}", file=sys.stderr)
        return 2
    try:
        asyncio.run(run(engine, args.interval, args.connect_timeout, args.skip_setup))
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
