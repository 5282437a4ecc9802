"""Fixtures for the admin API tests: a proxy with its admin API on a free port, a client."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import psycopg
import pytest

from tests.support import pg
from tests.support.proxy import ProxyThread


class Admin:
    """An HTTP client for one proxy's admin API."""

    def __init__(self, proxy: ProxyThread, token: str | None = None) -> None:
        assert proxy.runtime is not None and proxy.runtime.admin_port
        self.proxy = proxy
        self.base = f"http://127.0.0.1:{proxy.runtime.admin_port}"
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(base_url=self.base, headers=headers, timeout=30)

    def get(self, path: str, **params: Any) -> httpx.Response:
        return self.http.get(path, params=params)

    def json(self, path: str, **params: Any) -> Any:
        r = self.get(path, **params)
        assert r.status_code == 200, (r.status_code, r.text)
        return r.json()

    def post(self, path: str, body: Any = None, **params: Any) -> httpx.Response:
        return self.http.post(path, json=body, params=params)

    def close(self) -> None:
        self.http.close()


@pytest.fixture
def db(pg_primary: pg.PgCluster) -> Iterator[str]:
    """A fresh database per test, so that statistics are easy to attribute."""
    name = f"adm_{uuid.uuid4().hex[:10]}"
    pg_primary.psql(f"create database {name}")
    yield name
    pg_primary.psql(f"drop database {name} with (force)")


@pytest.fixture
def admin_proxy(
    make_proxy: Callable[..., ProxyThread],
) -> Iterator[Callable[..., tuple[ProxyThread, Admin]]]:
    clients: list[Admin] = []

    def make(**sections: dict[str, Any]) -> tuple[ProxyThread, Admin]:
        token = sections.get("admin", {}).get("token")
        admin_section = {"listen": "127.0.0.1:0", **sections.pop("admin", {})}
        proxy = make_proxy(admin=admin_section, **sections)
        client = Admin(proxy, token)
        clients.append(client)
        return proxy, client

    yield make
    for c in clients:
        c.close()


def run(proxy: ProxyThread, db: str, *statements: str, app: str = "tests",
        user: str = "postgres") -> None:
    """Run statements through the proxy, one connection, autocommit."""
    with psycopg.connect(proxy.dsn(dbname=db, user=user), application_name=app,
                         autocommit=True) as conn:
        for sql in statements:
            conn.execute(sql)
