"""Session-wide fixtures.

PostgreSQL clusters are real servers built once per test session by tests/support/pg.py; the
replica only exists if some test asks for it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support import pg
from tests.support.proxy import ProxyThread

# --------------------------------------------------------------------------------------------
# PostgreSQL
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def pg_bindir() -> Path:
    return pg.find_pg_bindir()


@pytest.fixture(scope="session")
def pg_base_dir() -> Iterator[Path]:
    """Temp dir holding every cluster of the session; removed at the end."""
    path = pg.make_base_dir()
    yield path
    pg.remove_base_dir(path)


@pytest.fixture(scope="session")
def pg_primary(pg_bindir: Path, pg_base_dir: Path) -> Iterator[pg.PgCluster]:
    cluster = pg.start_primary(pg_base_dir, bindir=pg_bindir)
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session")
def pg_replica(pg_primary: pg.PgCluster, pg_base_dir: Path) -> Iterator[pg.PgCluster]:
    cluster = pg.start_replica(pg_primary, pg_base_dir)
    yield cluster
    cluster.stop()


# --------------------------------------------------------------------------------------------
# Proxy
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def proxy(pg_primary: pg.PgCluster) -> Iterator[ProxyThread]:
    """One proxy in front of the primary, shared by the whole session (default config)."""
    p = ProxyThread.for_primary(pg_primary.dsn()).start()
    yield p
    p.stop()


@pytest.fixture
def make_proxy(pg_primary: pg.PgCluster) -> Iterator[Callable[..., ProxyThread]]:
    """A factory for proxies with their own config sections; each is stopped after the test."""
    started: list[ProxyThread] = []

    def make(primary_dsn: str | None = None, **sections: dict[str, Any]) -> ProxyThread:
        p = ProxyThread.for_primary(primary_dsn or pg_primary.dsn(), **sections).start()
        started.append(p)
        return p

    yield make
    for p in started:
        p.stop()


def pytest_sessionstart(session: pytest.Session) -> None:
    """Refuse to test a stale mypyc build: the compiled module would shadow edited source."""
    import importlib
    import re

    setup_py = (Path(__file__).resolve().parent.parent / "setup.py").read_text()
    # The modules mypyc compiles, and the C extension(s).
    hot = re.findall(r"sqlproxy/[a-z_/]*\.(?:py|c)\b", setup_py)
    for path in hot:
        name, ext = path.rsplit(".", 1)
        mod = importlib.import_module(name.replace("/", "."))
        compiled = Path(mod.__file__ or "")
        source = compiled.with_name(name.rsplit("/", 1)[1] + "." + ext)
        if compiled.suffix == ".so" and source.stat().st_mtime > compiled.stat().st_mtime:
            pytest.exit(f"{compiled.name} is older than {source.name}: rebuild with "
                        "`bash scripts/test` (or `pip install --no-build-isolation -e .`)", 2)
