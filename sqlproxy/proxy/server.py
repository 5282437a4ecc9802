"""The listener: accepts clients, owns the cancel-key map and connection limits."""

from __future__ import annotations

import asyncio
import os
import random

from sqlproxy.analysis.profiler import Profiler
from sqlproxy.config import Config, parse_hostport
from sqlproxy.errors import ProxyError, TooManyConnections
from sqlproxy.logs import get_logger
from sqlproxy.proxy.session import ClientSession
from sqlproxy.wire.messages import cancel_request

log = get_logger("sqlproxy.server")


class ProxyServer:
    def __init__(self, config: Config, profiler: Profiler | None = None) -> None:
        self.config = config
        self.profiler = profiler
        self.sessions: dict[int, ClientSession] = {}
        self.cancel_keys: dict[tuple[int, bytes], ClientSession] = {}
        self._next_id = 0
        self._server: asyncio.AbstractServer | None = None
        self.accepting = False
        self.host, self.port = parse_hostport(config.proxy.listen, "proxy.listen")
        self._tasks: set[asyncio.Task[None]] = set()

    def next_session_id(self) -> int:
        self._next_id += 1
        return self._next_id

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: ClientSession(self), self.host, self.port, backlog=4096, reuse_address=True
        )
        sock = self._server.sockets[0]
        self.port = sock.getsockname()[1]
        self.accepting = True
        log.info("proxy_listening", listen=f"{self.host}:{self.port}",
                 primary=self.config.proxy.primary_url.address)

    async def stop(self, grace: float = 0.0) -> None:
        self.accepting = False
        if self._server is not None:
            self._server.close()
        if grace > 0:
            deadline = asyncio.get_running_loop().time() + grace
            while self.sessions and asyncio.get_running_loop().time() < deadline:
                await asyncio.sleep(0.05)
        for s in list(self.sessions.values()):
            if s.client_transport is not None:
                s.client_transport.close()
            if s.backend is not None and s.backend.transport is not None:
                s.backend.transport.close()
        if self._server is not None:
            await self._server.wait_closed()
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    # ------------------------------------------------------------------ limits
    def admit(self, session: ClientSession) -> ProxyError | None:
        cfg = self.config.proxy
        active = sum(1 for s in self.sessions.values() if s.startup is not None)
        if active > cfg.max_client_connections:
            return TooManyConnections(
                "sorry, too many clients already",
                detail=f"proxy.max_client_connections is {cfg.max_client_connections}",
            )
        st = session.startup
        assert st is not None
        if cfg.max_connections_per_user:
            n = sum(1 for s in self.sessions.values() if s.startup and s.startup.user == st.user)
            if n > cfg.max_connections_per_user:
                return TooManyConnections(
                    f'too many connections for role "{st.user}"',
                    detail=f"proxy.max_connections_per_user is {cfg.max_connections_per_user}",
                )
        if cfg.max_connections_per_database:
            n = sum(1 for s in self.sessions.values()
                    if s.startup and s.startup.database == st.database)
            if n > cfg.max_connections_per_database:
                return TooManyConnections(
                    f'too many connections for database "{st.database}"',
                    detail="proxy.max_connections_per_database is "
                    f"{cfg.max_connections_per_database}",
                )
        return None

    def session_closed(self, session: ClientSession) -> None:
        self.sessions.pop(session.id, None)
        if session.proxy_key is not None:
            self.cancel_keys.pop(session.proxy_key, None)

    # ------------------------------------------------------------------ cancellation
    def register_cancel_key(self, session: ClientSession, secret_len: int) -> tuple[int, bytes]:
        while True:
            key = (random.randint(1, 2**31 - 1), os.urandom(max(4, secret_len)))
            if key not in self.cancel_keys:
                self.cancel_keys[key] = session
                return key

    def forward_cancel(self, pid: int, secret: bytes) -> None:
        session = self.cancel_keys.get((pid, secret))
        if session is None:
            log.info("cancel_request_unknown_key", pid=pid)
            return
        log.info("cancel_request", session=session.id)
        session.cancel_backend_query()

    def send_cancel(self, address: tuple[str, int], key: tuple[int, bytes]) -> None:
        task = asyncio.get_running_loop().create_task(self._send_cancel(address, key))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send_cancel(self, address: tuple[str, int], key: tuple[int, bytes]) -> None:
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(address[0], address[1]),
                timeout=self.config.proxy.connect_timeout,
            )
            writer.write(cancel_request(key[0], key[1]))
            await writer.drain()
            # The server closes the connection once it has processed the request.
            await asyncio.wait_for(reader.read(), timeout=self.config.proxy.connect_timeout)
            writer.close()
        except (TimeoutError, OSError) as exc:
            log.warning("cancel_failed", backend=f"{address[0]}:{address[1]}", error=str(exc))
