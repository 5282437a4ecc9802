"""TLS on both sides of the proxy.

Client side: sqlproxy terminates TLS. A client's SSLRequest is answered ``S`` when a certificate
is configured (and ``tls.client_mode`` is not ``disable``), then the client transport is
upgraded in place with ``loop.start_tls``; the session protocol and its hot path do not change.

Server side: PostgreSQL's own negotiation (SSLRequest, one byte ``S``/``N``, then the
handshake) is done on a plain socket before the backend protocol exists, and the TLS handshake
is then run by ``loop.create_connection(sock=..., ssl=...)``. The ``sslmode`` values mean what
they mean to libpq: ``disable`` never, ``prefer`` if the server accepts, ``require`` always but
without checking the certificate, ``verify-ca`` checks the chain against ``tls.ca_file``,
``verify-full`` also the host name.

Channel binding (``SCRAM-SHA-256-PLUS``) binds the SCRAM exchange to the TLS channel the server
sees. Through a TLS-terminating proxy the client's channel is never the server's, so the
mechanism is removed from the AuthenticationSASL list relayed to the client; plain
``SCRAM-SHA-256`` keeps working end to end.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import struct

from sqlproxy.config import BackendURL, Config, TLSSection
from sqlproxy.errors import ConfigError, ConnectionFailure
from sqlproxy.wire.messages import SSL_REQUEST_CODE

__all__ = [
    "SSLMODES",
    "backend_sslmode",
    "client_context",
    "open_backend_socket",
    "server_context",
    "strip_channel_binding",
]

SSLMODES = ("disable", "prefer", "require", "verify-ca", "verify-full")
_SSL_REQUEST = struct.pack("!II", 8, SSL_REQUEST_CODE)
PLUS = b"SCRAM-SHA-256-PLUS"


def client_context(cfg: TLSSection) -> ssl.SSLContext | None:
    """The server-side context presented to clients, or None when TLS is not offered."""
    if cfg.client_mode == "disable" or not cfg.cert_file:
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(cfg.cert_file, cfg.key_file)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"invalid configuration: tls.cert_file/tls.key_file: cannot load "
            f"{cfg.cert_file!r}: {exc}"
        ) from exc
    ctx.set_alpn_protocols(["postgresql"])
    return ctx


def backend_sslmode(config: Config, url: BackendURL) -> str:
    """A backend URL's own ``?sslmode=`` wins over ``tls.server_sslmode``."""
    mode = url.sslmode or config.tls.server_sslmode
    if mode == "allow":  # libpq's "allow": plain first; a proxy has no reason to prefer it
        mode = "prefer"
    if mode not in SSLMODES:
        raise ConfigError(f"invalid configuration: sslmode {mode!r} for backend "
                          f"{url.address}; expected one of {', '.join(SSLMODES)}")
    return mode


def server_context(mode: str, ca_file: str | None) -> ssl.SSLContext | None:
    """The client-side context for connecting to a backend with ``mode``."""
    if mode == "disable":
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if mode in ("prefer", "require"):
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        return ctx
    if not ca_file:
        raise ConfigError(f"invalid configuration: tls.ca_file is required for sslmode {mode}")
    try:
        ctx.load_verify_locations(ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"invalid configuration: tls.ca_file: cannot load {ca_file!r}: "
                          f"{exc}") from exc
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.check_hostname = mode == "verify-full"
    return ctx


async def open_backend_socket(host: str, port: int, mode: str) -> tuple[socket.socket, bool]:
    """Connect to ``host:port`` and, unless ``mode`` is disable, negotiate TLS as PostgreSQL
    does. Returns the socket (not yet wrapped) and whether the server agreed to TLS."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    last: OSError | None = None
    for family, type_, proto, _, addr in infos:
        sock = socket.socket(family, type_, proto)
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, addr)
        except OSError as exc:
            sock.close()
            last = exc
            continue
        try:
            if family in (socket.AF_INET, socket.AF_INET6):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if mode == "disable":
                return sock, False
            await loop.sock_sendall(sock, _SSL_REQUEST)
            answer = await loop.sock_recv(sock, 1)
        except BaseException:
            sock.close()
            raise
        if answer == b"S":
            return sock, True
        if answer == b"N" and mode == "prefer":
            return sock, False
        sock.close()
        if answer == b"N":
            raise ConnectionFailure(
                f'connection to server at "{host}", port {port} failed: server does not '
                f"support SSL, but sslmode is {mode} (tls.server_sslmode)")
        raise ConnectionFailure(
            f'connection to server at "{host}", port {port} failed: unexpected answer '
            f"{answer!r} to SSLRequest")
    raise last or OSError(f"cannot resolve {host}")


def strip_channel_binding(message: bytes) -> bytes:
    """An AuthenticationSASL message without ``SCRAM-SHA-256-PLUS`` (unchanged if absent)."""
    body = message[9:]  # type, length, auth code
    mechanisms = [m for m in body.split(b"\x00") if m]
    if PLUS not in mechanisms:
        return message
    kept = b"".join(m + b"\x00" for m in mechanisms if m != PLUS) + b"\x00"
    return b"R" + struct.pack("!II", 8 + len(kept), 10) + kept
