"""Process runtime: the event loop, signals, the proxy and its companions, shutdown."""

from __future__ import annotations

import asyncio
import signal

from sqlproxy.analysis.profiler import Profiler
from sqlproxy.config import Config
from sqlproxy.logs import get_logger
from sqlproxy.proxy.server import ProxyServer

log = get_logger("sqlproxy.runtime")


class Runtime:
    """Everything one sqlproxy process runs, started and stopped together."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.profiler: Profiler | None = (
            Profiler(config.analysis, get_logger("sqlproxy.analysis"))
            if config.analysis.enabled else None
        )
        self.proxy = ProxyServer(config, self.profiler)
        self._stop = asyncio.Event()
        self._started = False

    async def start(self) -> None:
        await self.proxy.start()
        self._started = True
        log.info("started", listen=f"{self.proxy.host}:{self.proxy.port}")

    async def stop(self) -> None:
        if not self._started:
            return
        self._started = False
        await self.proxy.stop(self.config.proxy.shutdown_grace_seconds)
        log.info("stopped")

    def request_stop(self) -> None:
        self._stop.set()

    async def serve_forever(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        await self.start()
        try:
            await self._stop.wait()
        finally:
            log.info("stopping")
            await self.stop()


def install_uvloop() -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def run(config: Config) -> None:
    install_uvloop()
    runtime_holder: list[Runtime] = []

    async def main() -> None:
        rt = Runtime(config)
        runtime_holder.append(rt)
        await rt.serve_forever()

    asyncio.run(main())
