"""A TCP tee between a client and the proxy that records what the client is sent."""

from __future__ import annotations

import contextlib
import socket
import struct
import threading

__all__ = ["Tap", "after_startup"]


class Tap:
    def __init__(self, port: int) -> None:
        self.target = port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        self.streams: list[bytearray] = []
        self._threads: list[threading.Thread] = []
        self._socks: list[socket.socket] = []
        self._closed = False
        t = threading.Thread(target=self._accept, daemon=True)
        t.start()
        self._threads.append(t)

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.target))
            self._socks += [client, server]
            received = bytearray()
            self.streams.append(received)
            for src, dst, rec in ((client, server, None), (server, client, received)):
                t = threading.Thread(target=self._pump, args=(src, dst, rec), daemon=True)
                t.start()
                self._threads.append(t)

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket, rec: bytearray | None) -> None:
        try:
            while data := src.recv(65536):
                if rec is not None:
                    rec += data
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._closed = True
        self.listener.close()
        for s in self._socks:
            s.close()
        for t in self._threads:
            t.join(5)


def after_startup(stream: bytes | bytearray) -> bytes:
    """The bytes after the first ReadyForQuery (startup answers carry the backend's key)."""
    pos = 0
    if stream[:1] == b"N":  # the answer to an SSLRequest
        pos = 1
    while pos + 5 <= len(stream):
        (length,) = struct.unpack_from("!I", stream, pos + 1)
        end = pos + 1 + length
        if stream[pos] == ord("Z"):
            return bytes(stream[end:])
        pos = end
    raise AssertionError("no ReadyForQuery in the stream")
