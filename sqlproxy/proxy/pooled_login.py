"""Logins checked by the proxy in transaction mode (``pool.auth_user``, as PgBouncer's
``auth_query``).

Without it, a client whose user needs a password (SCRAM, MD5) authenticates against the server
itself, on a fresh server connection: every client connection opens (and, the pool being full,
closes) one, and `-C` workloads churn server connections. With it, the pooled session reads the
user's verifier (``proxy/authquery.py``), plays the server's part of the exchange
(``pool/auth.py``), and keeps what the login proved (SCRAM ClientKey, or the MD5 hash) on the
pool, which then opens its server connections as that user on its own. The client is answered
like a trusted one: AuthenticationOk, the server's ParameterStatus (learnt from the pool's first
server login: one is opened if the pool has none yet), a proxy BackendKeyData, ReadyForQuery.

A user without a verifier the proxy can check (no row, NULL, or the lookup failed) logs in
through to the server as before.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from sqlproxy.errors import ProxyError, TooManyConnections
from sqlproxy.pool.auth import LoginServer
from sqlproxy.proxy.session import SessionState
from sqlproxy.wire.messages import backend_key_data, build, cstr, ready_for_query

if TYPE_CHECKING:
    from sqlproxy.proxy.pooled import PooledSession
    from sqlproxy.proxy.poolservers import PoolIO
    from sqlproxy.routing.scram import ScramCapture
    from sqlproxy.wire.messages import StartupMessage

__all__ = ["answer_login", "client_auth_message", "proxy_login", "recover_scram_keys"]

_AUTH_OK = build(b"R", b"\x00\x00\x00\x00")


def answer_login(session: PooledSession, pool: PoolIO) -> None:
    """Answer ``session``'s login without a server: the pair's logins need no password
    (learnt from a login), or the proxy checked this one. AuthenticationOk, the server's
    ParameterStatus (the client's own where it set them), a proxy BackendKeyData,
    ReadyForQuery; then the session starts."""
    out = bytearray(_AUTH_OK)
    settings = session.settings
    app = settings.get("application_name", "")
    for k, v in pool.parameters:
        if k == "application_name":
            v = app
        elif k in settings and k in ("client_encoding", "DateStyle", "TimeZone"):
            v = settings[k]
        out += build(b"S", cstr(k) + cstr(v))
        session.parameters[k] = v
    key = session.proxy_key = session.server.register_cancel_key(
        session, session.manager.next_pid(), 4)
    out += backend_key_data(key[0], key[1])
    out += ready_for_query()
    t = session.client_transport
    if t is not None:
        t.write(bytes(out))
    session.start(b"")


async def recover_scram_keys(session: PooledSession, capture: ScramCapture) -> None:
    """The keys of a SCRAM login that went through to the primary, recovered from the
    exchange (routing.scram): the replica pools' servers log in with them."""
    router = session.router
    try:
        if router is not None:
            keys = await router.scram_keys(session.user, capture)
            if keys is not None and session.scram_keys is None:
                session.scram_keys = keys
    finally:
        session.scram_pending = False


async def proxy_login(session: PooledSession, pool: PoolIO, msg: StartupMessage) -> bool:
    """Check ``session``'s login with the user's verifier. True: handled (the client is logged
    in, or was refused); False: no verifier to check it with, log in through the server."""
    verifier = await session.manager.auth.verifier(msg.user)
    if _closed(session):
        return True
    if verifier is None or not LoginServer.usable(verifier):
        return False
    login = session.login_server = LoginServer(msg.user, verifier)
    checked = session.login_checked = asyncio.get_running_loop().create_future()
    session.state = SessionState.AUTHENTICATING
    t = session.client_transport
    if t is None or t.is_closing():
        return True
    t.write(login.start())
    if session._pending_to_backend:  # the client's answer may already be here
        early = bytes(session._pending_to_backend)
        session._pending_to_backend.clear()
        try:
            session._startup_data(early)
        except ProxyError as exc:
            session.fail(exc)
    await checked  # resolved by client_auth_message, or when the session ends
    session.login_server = None
    if _closed(session) or not login.done:
        return True
    if login.scram_keys is not None:
        pool.scram_keys = session.scram_keys = login.scram_keys
    if login.md5_hash is not None:
        pool.md5_hash = login.md5_hash
    if not pool.parameters:
        problem = await _prime(pool)
        if _closed(session):
            return True
        if problem is not None:
            session.fail(problem)
            return True
    answer_login(session, pool)
    return True


def _closed(session: PooledSession) -> bool:
    return session.state is SessionState.CLOSED


def client_auth_message(session: PooledSession, body: bytes) -> None:
    """A PasswordMessage (SASL) body from the client during a login the proxy checks."""
    login = session.login_server
    assert login is not None
    try:
        reply = login.receive(body)
    except ProxyError:
        _resolve(session)
        raise  # the session sends the ErrorResponse (28P01, 08P01) and closes
    t = session.client_transport
    if reply and t is not None and not t.is_closing():
        t.write(reply)
    if login.done:
        _resolve(session)


def session_ended(session: PooledSession) -> None:
    """The session closed during its login: the waiting ``proxy_login`` returns."""
    _resolve(session)


def _resolve(session: PooledSession) -> None:
    fut = session.login_checked
    if fut is not None and not fut.done():
        fut.set_result(None)


async def _prime(pool: PoolIO) -> ProxyError | None:
    """Open one server connection for the pool (it joins it idle), to learn the server's
    ParameterStatus; one at a time per pool."""
    task = pool.priming
    if task is None:
        task = pool.priming = asyncio.get_running_loop().create_task(_open_one(pool))
        task.add_done_callback(lambda _: setattr(pool, "priming", None))
    problem = await asyncio.shield(task)
    if problem is None and pool.parameters:
        return None
    return problem_error(problem or "no parameters from the server")


async def _open_one(pool: PoolIO) -> str | None:
    state = pool.state
    if state.total >= state.limits.size:
        return f"the pool is full (pool.size is {state.limits.size})"
    state.open_spare()
    await pool._open(None)
    return None if pool.parameters else "the server connection could not be opened"


def problem_error(problem: str) -> ProxyError:
    if problem.startswith("the pool is full"):
        return TooManyConnections(f"sorry, too many clients already: {problem}")
    return ProxyError(f"could not log in to the server for this user: {problem}",
                      sqlstate="08006")

