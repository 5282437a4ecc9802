"""A worker's control channel: a Unix socket in the supervisor's run directory.

Requests and answers are JSON objects, each behind a 4-byte big-endian length. A connection
carries one request and its answer. Nothing here is on the per-statement path: a cancel
request owned by another worker, and the supervisor's questions (a few per second at most).

Requests: ``{"op": "ping"}``; ``{"op": "cancel", "pid": P, "secret": HEX}`` — answered once
the owner's cancel has been processed by the server (the client's cancel connection is
closed only then, as PostgreSQL does); ``{"op": "state"}`` — what ``Worker.state`` returns;
``{"op": "reset", "what": ...}`` — ``POST /api/reset`` passed on by the supervisor.
"""

from __future__ import annotations

import asyncio
import json
import os
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from sqlproxy.logs import get_logger

__all__ = ["ControlServer", "request", "socket_path"]

log = get_logger("sqlproxy.workers")

MAX_MESSAGE = 256 * 1024 * 1024  # a state answer holds all of a worker's statistics
# An answer is an object, or one already encoded (a worker's state: see ``Worker.state``).
Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any] | bytes]]


def socket_path(rundir: str, worker: int) -> str:
    return os.path.join(rundir, f"w{worker}.sock")


async def _read(reader: asyncio.StreamReader) -> dict[str, Any]:
    (n,) = struct.unpack("!I", await reader.readexactly(4))
    if n > MAX_MESSAGE:
        raise ValueError(f"control message of {n} bytes")
    out = json.loads(await reader.readexactly(n))
    if not isinstance(out, dict):
        raise ValueError("control message is not an object")
    return out


def _frame(obj: dict[str, Any] | bytes) -> bytes:
    body = obj if isinstance(obj, bytes) else json.dumps(obj, separators=(",", ":")).encode()
    return struct.pack("!I", len(body)) + body


async def request(path: str, obj: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Send one request to the worker listening at ``path``; its answer."""
    async def go() -> dict[str, Any]:
        reader, writer = await asyncio.open_unix_connection(path, limit=MAX_MESSAGE)
        try:
            writer.write(_frame(obj))
            await writer.drain()
            return await _read(reader)
        finally:
            writer.close()

    return await asyncio.wait_for(go(), timeout)


class ControlServer:
    """Answers requests on ``path`` with ``handler``."""

    def __init__(self, path: str, handler: Handler) -> None:
        self.path = path
        self.handler = handler
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        Path(self.path).unlink(missing_ok=True)  # a previous incarnation's
        self._server = await asyncio.start_unix_server(self._serve, self.path,
                                                       limit=MAX_MESSAGE)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        Path(self.path).unlink(missing_ok=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            req = await _read(reader)
            answer = await self.handler(req)
            writer.write(_frame(answer))
            await writer.drain()
        except (OSError, ValueError, asyncio.IncompleteReadError) as exc:
            log.info("control_request_failed", error=f"{type(exc).__name__}: {exc}")
        except Exception as exc:  # a bug answering must not take the worker down
            log.error("control_request_failed", error=f"{type(exc).__name__}: {exc}")
        finally:
            writer.close()
