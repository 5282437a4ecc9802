"""The Starlette application: routes, bearer-token auth, JSON errors."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable
from importlib import resources
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from sqlproxy.admin import api
from sqlproxy.admin.openapi import openapi_spec
from sqlproxy.admin.params import APIError
from sqlproxy.admin.state import AdminState
from sqlproxy.logs import get_logger

log = get_logger("sqlproxy.admin")

# Reachable without the token: the health check (for load balancers and orchestrators) and the
# dashboard's static page, which holds no data — it asks for the token and sends it itself.
PUBLIC_PATHS = frozenset({"/healthz", "/"})


def _digest(value: bytes) -> bytes:
    return hashlib.sha256(value).digest()


def token_matches(header: bytes, token: str) -> bool:
    """``Authorization: Bearer <token>``, compared in constant time (digests of equal length,
    so not even the token's length leaks)."""
    scheme, _, credentials = header.strip().partition(b" ")
    ok_scheme = scheme.lower() == b"bearer"
    ok_token = hmac.compare_digest(_digest(credentials.strip()), _digest(token.encode()))
    return ok_scheme and ok_token


class BearerAuth:
    """ASGI middleware: every path but PUBLIC_PATHS needs the bearer token, when one is set."""

    def __init__(self, app: ASGIApp, token: Callable[[], str | None]) -> None:
        self.app = app
        self.token = token

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        token = self.token()
        if scope["type"] != "http" or not token or scope["path"] in PUBLIC_PATHS:
            await self.app(scope, receive, send)
            return
        header = b""
        for name, value in scope["headers"]:
            if name == b"authorization":
                header = value
                break
        if token_matches(header, token):
            await self.app(scope, receive, send)
            return
        message = "missing bearer token" if not header else "invalid bearer token"
        response = JSONResponse({"error": message}, status_code=401,
                                headers={"WWW-Authenticate": 'Bearer realm="sqlproxy"'})
        await response(scope, receive, send)


async def metrics(request: Request) -> Response:
    # Collected on the event loop (an async endpoint; Starlette would run a sync one in a
    # thread), so the statistics are never read while the proxy mutates them.
    registry = api.state_of(request).registry
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


async def openapi(request: Request) -> Response:
    return JSONResponse(openapi_spec())


_DASHBOARD: bytes | None = None


def dashboard_html() -> bytes:
    global _DASHBOARD
    if _DASHBOARD is None:
        _DASHBOARD = resources.files("sqlproxy.admin").joinpath(
            "static/dashboard.html").read_bytes()
    return _DASHBOARD


async def dashboard(request: Request) -> Response:
    return HTMLResponse(dashboard_html(), headers={
        "Cache-Control": "no-store",
        "Content-Security-Policy": "default-src 'self'; script-src 'unsafe-inline'; "
                                   "style-src 'unsafe-inline'; img-src 'self' data:",
        "X-Content-Type-Options": "nosniff",
    })


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, APIError)
    return JSONResponse(exc.body(), status_code=exc.status)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return JSONResponse({"error": exc.detail}, status_code=exc.status_code,
                        headers=exc.headers)


async def _server_error(request: Request, exc: Exception) -> Response:
    log.error("admin_request_failed", path=request.url.path,
              error=f"{type(exc).__name__}: {exc}")
    return JSONResponse({"error": f"internal error: {type(exc).__name__}: {exc}"},
                        status_code=500)


ROUTES = [
    Route("/", dashboard, methods=["GET"]),
    Route("/healthz", api.healthz, methods=["GET"]),
    Route("/api/queries", api.queries, methods=["GET"]),
    Route("/api/queries/{fingerprint}", api.query_detail, methods=["GET"]),
    Route("/api/queries/{fingerprint}/history", api.query_history, methods=["GET"]),
    Route("/api/queries/{fingerprint}/explain", api.explain, methods=["POST"]),
    Route("/api/slow", api.slow, methods=["GET"]),
    Route("/api/transactions", api.transactions, methods=["GET"]),
    Route("/api/endpoints", api.endpoints, methods=["GET"]),
    Route("/api/n-plus-one", api.n_plus_one, methods=["GET"]),
    Route("/api/findings", api.findings, methods=["GET"]),
    Route("/api/findings/{finding_id}", api.finding_detail, methods=["GET"]),
    Route("/api/fleet", api.fleet, methods=["GET"]),
    Route("/api/workers", api.workers, methods=["GET"]),
    Route("/api/connections", api.connections, methods=["GET"]),
    Route("/api/backends", api.backends, methods=["GET"]),
    Route("/api/pools", api.pools, methods=["GET"]),
    Route("/api/cache", api.cache, methods=["GET"]),
    Route("/api/reset", api.reset, methods=["POST"]),
    Route("/metrics", metrics, methods=["GET"]),
    Route("/openapi.json", openapi, methods=["GET"]),
]


def create_app(state: AdminState) -> ASGIApp:
    """The admin ASGI app over ``state``; the token is read from the live config per request
    (a SIGHUP reload that changes ``admin.token`` takes effect at once)."""
    handlers: dict[Any, Any] = {
        APIError: _api_error,
        HTTPException: _http_error,
        Exception: _server_error,
    }
    app = Starlette(routes=ROUTES, exception_handlers=handlers)
    app.state.admin = state
    return BearerAuth(app, lambda: state.source.config.admin.token)
