"""uvicorn inside the proxy's own event loop, and the admin side's background tasks.

The proxy owns the process's signals: uvicorn's own handlers are switched off, and the runtime
stops this server as part of its shutdown. The listening socket is bound here, before uvicorn
starts, so that a busy port fails ``Runtime.start`` at once and port 0 (tests) is known.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import uvicorn

from sqlproxy.admin.app import create_app
from sqlproxy.admin.source import AdminSource
from sqlproxy.admin.state import AdminState
from sqlproxy.config import parse_hostport
from sqlproxy.errors import ConfigError
from sqlproxy.logs import get_logger

log = get_logger("sqlproxy.admin")

SHUTDOWN_TIMEOUT = 5


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name that could resolve anywhere


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield  # the proxy's runtime owns SIGTERM/SIGINT


class AdminServer:
    def __init__(self, source: AdminSource) -> None:
        self.source = source
        self.host, self.port = parse_hostport(source.config.admin.listen, "admin.listen")
        self.state = AdminState(source)
        self.app = create_app(self.state)
        self._server: _Server | None = None
        self._serve_task: asyncio.Task[None] | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._socket: socket.socket | None = None

    def check(self) -> None:
        """Refuse an admin API reachable from elsewhere without a token."""
        if not is_loopback(self.host) and not self.source.config.admin.token:
            raise ConfigError(
                f"admin.listen: {self.host} is not a loopback address and admin.token is not "
                "set; set a token (SQLPROXY_ADMIN__TOKEN) or listen on 127.0.0.1"
            )

    async def start(self) -> None:
        self.check()
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.host, self.port))
        except OSError as exc:
            sock.close()
            raise ConfigError(f"admin.listen: cannot listen on {self.host}:{self.port}: "
                              f"{exc.strerror or exc}") from exc
        sock.set_inheritable(True)
        self._socket = sock
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(self.app, lifespan="off", log_config=None, access_log=False,
                                timeout_graceful_shutdown=SHUTDOWN_TIMEOUT,
                                proxy_headers=False, server_header=False)
        self._server = _Server(config)
        loop = asyncio.get_running_loop()
        self._serve_task = loop.create_task(self._server.serve(sockets=[sock]))
        for _ in range(200):  # uvicorn's startup is a few loop iterations
            if self._server.started or self._serve_task.done():
                break
            await asyncio.sleep(0.01)
        if self._serve_task.done():
            self._serve_task.result()  # raises what stopped it
        st = self.state
        self._spawn(st.probe.run)
        self._spawn(self._history_loop)
        self._spawn(st.auto_explainer.run)
        log.info("admin_listening", listen=f"{self.host}:{self.port}",
                 auth="token" if self.source.config.admin.token else "none")

    def _spawn(self, fn: Callable[[], Awaitable[Any]]) -> None:
        async def guarded() -> None:
            try:
                await fn()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a background helper must never take the proxy down
                log.error("admin_task_failed", task=getattr(fn, "__qualname__", "?"),
                          error=f"{type(exc).__name__}: {exc}")

        self._tasks.append(asyncio.get_running_loop().create_task(guarded()))

    async def _history_loop(self) -> None:
        while True:
            await asyncio.sleep(self.state.history.interval)
            self.state.sample_history()

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        if self._server is not None and self._serve_task is not None:
            self._server.should_exit = True
            try:
                await asyncio.wait_for(asyncio.shield(self._serve_task), SHUTDOWN_TIMEOUT + 2)
            except TimeoutError:
                self._server.force_exit = True
                self._serve_task.cancel()
                await asyncio.gather(self._serve_task, return_exceptions=True)
            except Exception as exc:
                log.error("admin_stop_failed", error=f"{type(exc).__name__}: {exc}")
        if self._socket is not None:
            self._socket.close()
            self._socket = None
        await self.state.probe.close()
