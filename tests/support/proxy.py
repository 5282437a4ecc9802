"""Run sqlproxy inside the test process, in its own thread and uvloop event loop.

Tests talk to it over TCP like any client, and can inspect its state with ``call`` (which runs a
function on the proxy's loop, so nothing is read while the loop mutates it).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
from collections.abc import Callable
from typing import Any, TypeVar
from urllib.parse import quote

import uvloop

from sqlproxy.config import Config, load_config
from sqlproxy.runtime import Runtime

T = TypeVar("T")


class ProxyThread:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.loop: asyncio.AbstractEventLoop | None = None
        self.runtime: Runtime | None = None
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None

    @classmethod
    def for_primary(cls, primary_dsn: str, **sections: dict[str, Any]) -> ProxyThread:
        overrides: dict[str, Any] = {"proxy": {"listen": "127.0.0.1:0", "primary": primary_dsn},
                                     "admin": {"listen": "127.0.0.1:0"},
                                     "state": {"enabled": False}}
        for name, values in sections.items():
            if isinstance(values, dict) and isinstance(overrides.get(name), dict):
                overrides[name] = {**overrides[name], **values}
            else:
                overrides[name] = values
        return cls(load_config(None, overrides, environ={}))

    def start(self) -> ProxyThread:
        self._thread = threading.Thread(target=self._run, name="sqlproxy", daemon=True)
        self._thread.start()
        if not self._started.wait(30):
            raise RuntimeError("proxy did not start within 30 s")
        if self._error is not None:
            raise RuntimeError("proxy failed to start") from self._error
        return self

    def _run(self) -> None:
        loop = uvloop.new_event_loop()
        self.loop = loop
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._main())
        except BaseException as exc:  # surfaced to start()
            self._error = exc
            self._started.set()
        finally:
            loop.close()

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        self.runtime = Runtime(self.config)
        try:
            await self.runtime.start()
        except BaseException as exc:
            self._error = exc
            self._started.set()
            return
        self._started.set()
        await self._stop.wait()
        await self.runtime.stop()

    def stop(self) -> None:
        if self.loop is not None and self._stop is not None and self._thread is not None:
            if self._thread.is_alive():
                # The thread may close its loop between the check and the call (a proxy that
                # failed to start is on its way out): then there is nothing left to stop.
                with contextlib.suppress(RuntimeError):
                    self.loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(30)

    def call(self, fn: Callable[[], T], timeout: float = 10.0) -> T:
        """Run ``fn`` on the proxy's event loop and return its result."""
        assert self.loop is not None
        fut: concurrent.futures.Future[T] = concurrent.futures.Future()

        def run() -> None:
            try:
                fut.set_result(fn())
            except BaseException as exc:
                fut.set_exception(exc)

        self.loop.call_soon_threadsafe(run)
        return fut.result(timeout)

    @property
    def port(self) -> int:
        assert self.runtime is not None
        return self.runtime.proxy.port

    @property
    def host(self) -> str:
        return "127.0.0.1"

    def dsn(self, user: str = "postgres", password: str | None = None,
            dbname: str = "postgres", **params: str) -> str:
        auth = quote(user, safe="")
        if password is not None:
            auth += ":" + quote(password, safe="")
        url = f"postgresql://{auth}@{self.host}:{self.port}/{quote(dbname, safe='')}"
        if params:
            url += "?" + "&".join(f"{k}={v}" for k, v in params.items())
        return url

    def __enter__(self) -> ProxyThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
