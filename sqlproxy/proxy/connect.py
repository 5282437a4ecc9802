"""Opening a connection to a PostgreSQL server (primary or replica), with TLS as configured.

One helper for every backend connection a session opens: the URL's ``sslmode`` (or
``tls.server_sslmode``) decides between clear text and an SSLRequest answered with TLS (see
``tls.py``); the caller's protocol then speaks the startup exchange. The whole connect, TLS
handshake included, is bounded by ``timeout``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from sqlproxy.proxy.tls import backend_sslmode, open_backend_socket

if TYPE_CHECKING:
    from sqlproxy.config import BackendURL
    from sqlproxy.proxy.server import ProxyServer

__all__ = ["connect_backend"]

P = TypeVar("P", bound=asyncio.BaseProtocol)


async def connect_backend(server: ProxyServer, url: BackendURL, factory: Callable[[], P],
                          timeout: float) -> tuple[asyncio.Transport, P]:
    """Connect ``factory()``'s protocol to the server at ``url``. Raises TimeoutError, OSError
    or a ProxyError (TLS refused while required, a bad certificate)."""
    return await asyncio.wait_for(_connect(server, url, factory), timeout=timeout)


async def _connect(server: ProxyServer, url: BackendURL,
                   factory: Callable[[], P]) -> tuple[asyncio.Transport, P]:
    loop = asyncio.get_running_loop()
    mode = backend_sslmode(server.config, url)
    if mode == "disable":
        transport, proto = await loop.create_connection(factory, url.host, url.port)
        return transport, proto
    sock, use_tls = await open_backend_socket(url.host, url.port, mode)
    ctx = server.backend_tls_context(mode) if use_tls else None
    try:
        transport, proto = await loop.create_connection(
            factory, sock=sock, ssl=ctx, server_hostname=url.host if ctx is not None else None)
    except BaseException:
        sock.close()
        raise
    return transport, proto
