"""The JSON API. Every list endpoint takes ``limit`` and ``offset`` and answers
``{"items": [...], "total": n}``; every error is ``{"error": message, ...}``."""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ConfigDict, StrictBool, ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from sqlproxy.admin.findings import Findings
from sqlproxy.admin.params import (
    APIError,
    choice_param,
    float_param,
    page,
    str_param,
    time_param,
)
from sqlproxy.admin.state import AdminState
from sqlproxy.analysis.endpoints import ENDPOINT_SORT_KEYS
from sqlproxy.analysis.profiler import Profiler
from sqlproxy.analysis.stats import SORT_KEYS
from sqlproxy.analysis.timefmt import iso
from sqlproxy.pool import advice as pool_advice

RESET_TARGETS = ("all", "statistics", "slow", "findings")
# "local": this instance's statistics; "fleet": every instance sharing its state database
# ([state] url), merged.
SCOPES = ("local", "fleet")


def state_of(request: Request) -> AdminState:
    st: AdminState = request.app.state.admin
    return st


def listing(items: list[dict[str, Any]], total: int) -> JSONResponse:
    return JSONResponse({"items": items, "total": total})


async def _profiler(request: Request) -> Profiler | None:
    """This instance's profiler, or the fleet's merged view with ``scope=fleet``."""
    source = state_of(request).source
    if choice_param(request.query_params, "scope", SCOPES, "local") == "fleet":
        return await source.fleet_profiler()
    return source.profiler


async def _findings(request: Request) -> Findings:
    st = state_of(request)
    profiler = await _profiler(request)
    return st.findings if profiler is st.source.profiler else Findings(profiler)


def _where(q: Any) -> dict[str, str | None]:
    """The attribution filters: route (or endpoint name), controller, action."""
    return {"route": str_param(q, "route"), "controller": str_param(q, "controller"),
            "action": str_param(q, "action")}


class ExplainRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    analyze: StrictBool = False
    insist: StrictBool = False  # ANALYZE even a statement that may write (if config allows)


class ResetRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    what: str = "all"


async def _body(request: Request, model: type[BaseModel]) -> Any:
    raw = await request.body()
    if not raw.strip():
        return model()
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise APIError(422, f"invalid JSON body: {exc}") from None
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in exc.errors()
        )
        raise APIError(422, f"invalid body: {problems}") from None


# ---------------------------------------------------------------------------- health
async def healthz(request: Request) -> Response:
    st = state_of(request)
    accepting = bool(st.source.proxy.accepting)
    probe = await st.probe.check(max_age=1.0)
    checks = {
        "proxy": {"ok": accepting,
                  "detail": "accepting connections" if accepting else "not accepting"},
        "primary": {"ok": bool(probe.healthy), **probe.to_dict()},
    }
    failed = [name for name, c in checks.items() if not c["ok"]]
    body: dict[str, Any] = {"status": "ok" if not failed else "unavailable", "failed": failed,
                            "checks": checks}
    # Details that do not make the instance unhealthy: an unreachable state database never
    # keeps the proxy from serving, so it must not take it out of a load balancer either.
    store = st.source.state_status()
    details: dict[str, Any] = {}
    if store is not None:
        details["state_store"] = store.to_dict()
    cache = getattr(st.source.proxy, "cache", None)
    if cache is not None and cache.remote is not None:
        details["cache_redis"] = cache.remote.describe()
    if details:
        body["details"] = details
    return JSONResponse(body, status_code=200 if not failed else 503)


# ---------------------------------------------------------------------------- statistics
async def queries(request: Request) -> Response:
    q = request.query_params
    limit, offset = page(q)
    sort = choice_param(q, "sort", SORT_KEYS, "total_ms")
    database, user = str_param(q, "database"), str_param(q, "user")
    application = str_param(q, "application")
    profiler = await _profiler(request)
    if profiler is None:
        return listing([], 0)
    items, total = profiler.top(sort, limit, offset, database, user, application, **_where(q))
    return listing(items, total)


async def endpoints(request: Request) -> Response:
    q = request.query_params
    limit, offset = page(q)
    sort = choice_param(q, "sort", ENDPOINT_SORT_KEYS, "total_ms")
    profiler = await _profiler(request)
    if profiler is None:
        return listing([], 0)
    items, total = profiler.endpoint_summary(sort, limit, offset, **_where(q))
    return listing(items, total)


async def query_detail(request: Request) -> Response:
    fp = request.path_params["fingerprint"]
    st = state_of(request)
    profiler = await _profiler(request)
    detail = profiler.detail(fp) if profiler is not None else None
    if detail is None:
        raise APIError(404, f"unknown fingerprint {fp!r}", fingerprint=fp)
    detail["findings"] = (await _findings(request)).for_fingerprint(fp)
    detail["explain"] = st.explainer.latest(fp)
    detail["windows"] = profiler.windows.timeline(fp) if profiler is not None else []
    cache = getattr(st.source.proxy, "cache", None)
    if cache is not None:
        counters = cache.stats.fingerprints.get(fp)
        detail["cache"] = counters.as_dict() if counters is not None else None
    st.history.watch(fp)
    return JSONResponse(detail)


async def query_history(request: Request) -> Response:
    fp = request.path_params["fingerprint"]
    limit, offset = page(request.query_params)
    st = state_of(request)
    profiler = st.source.profiler
    if profiler is None or not profiler.stats.by_fingerprint(fp):
        raise APIError(404, f"unknown fingerprint {fp!r}", fingerprint=fp)
    st.history.watch(fp)
    points = st.history.points(fp)
    return listing([p.to_dict() for p in points[offset : offset + limit]], len(points))


async def explain(request: Request) -> Response:
    fp = request.path_params["fingerprint"]
    body: ExplainRequest = await _body(request, ExplainRequest)
    result = await state_of(request).explainer.explain(fp, body.analyze, body.insist)
    return JSONResponse(result)


async def slow(request: Request) -> Response:
    q = request.query_params
    limit, offset = page(q)
    since = time_param(q, "since")
    min_ms = float_param(q, "min_ms")
    profiler = await _profiler(request)
    if profiler is None:
        return listing([], 0)
    items, total = profiler.slow_log(since, min_ms, limit, offset)
    return listing(items, total)


async def transactions(request: Request) -> Response:
    limit, offset = page(request.query_params)
    profiler = await _profiler(request)
    items = profiler.transaction_summary() if profiler is not None else []
    return listing(items[offset : offset + limit], len(items))


# ---------------------------------------------------------------------------- findings
async def n_plus_one(request: Request) -> Response:
    q = request.query_params
    limit, offset = page(q)
    items, total = (await _findings(request)).n_plus_one(
        application=str_param(q, "application"), limit=limit, offset=offset,
        database=str_param(q, "database"))
    return listing(items, total)


async def findings(request: Request) -> Response:
    q = request.query_params
    manager = getattr(state_of(request).source.proxy, "pools", None)
    if manager is not None:
        manager.report_findings()  # the pools' findings up to now (sqlproxy.pool.report)
    limit, offset = page(q)
    items, total = (await _findings(request)).select(
        kind=str_param(q, "kind"), application=str_param(q, "application"),
        limit=limit, offset=offset, database=str_param(q, "database"),
        sort=str_param(q, "sort") or "total_ms", **_where(q))
    return listing(items, total)


async def finding_detail(request: Request) -> Response:
    fid = request.path_params["finding_id"]
    item = (await _findings(request)).detail(fid)
    if item is None:
        raise APIError(404, f"unknown finding {fid!r}", finding=fid)
    return JSONResponse(item)


# ---------------------------------------------------------------------------- fleet
async def fleet(request: Request) -> Response:
    limit, offset = page(request.query_params)
    items = state_of(request).source.fleet_instances()
    return listing(items[offset : offset + limit], len(items))


async def workers(request: Request) -> Response:
    limit, offset = page(request.query_params)
    items = state_of(request).source.workers()
    for w in items:
        if isinstance(w.get("started_at"), float):
            w["started_at"] = iso(w["started_at"])
    return listing(items[offset : offset + limit], len(items))


# ---------------------------------------------------------------------------- live state
async def connections(request: Request) -> Response:
    q = request.query_params
    limit, offset = page(q)
    database, user = str_param(q, "database"), str_param(q, "user")
    application = str_param(q, "application")
    sessions = state_of(request).source.proxy.sessions
    items = []
    for sid in sorted(sessions):
        d = dict(sessions[sid].describe())
        if database and d.get("database") != database:
            continue
        if user and d.get("user") != user:
            continue
        if application and d.get("application_name") != application:
            continue
        if isinstance(d.get("connected_at"), float):
            d["connected_at"] = iso(d["connected_at"])
        items.append(d)
    return listing(items[offset : offset + limit], len(items))


async def backends(request: Request) -> Response:
    limit, offset = page(request.query_params)
    items = state_of(request).backends()
    return listing(items[offset : offset + limit], len(items))


async def pools(request: Request) -> Response:
    """The transaction pools (empty in session mode), each with its sizing advice and
    findings (``sqlproxy.pool.advice``)."""
    limit, offset = page(request.query_params)
    manager = getattr(state_of(request).source.proxy, "pools", None)
    items = []
    if manager is not None:
        for pool in manager.describe():
            pool["advice"] = pool_advice.sizing(pool)
            pool["findings"] = pool_advice.findings(pool)
            items.append(pool)
    return listing(items[offset : offset + limit], len(items))


async def cache(request: Request) -> Response:
    """The result cache (docs/cache.md); ``{"enabled": false}`` when off."""
    manager = getattr(state_of(request).source.proxy, "cache", None)
    if manager is None:
        return JSONResponse({"enabled": False})
    return JSONResponse(manager.describe())


# ---------------------------------------------------------------------------- reset
async def reset(request: Request) -> Response:
    body: ResetRequest = await _body(request, ResetRequest)
    what = request.query_params.get("what") or body.what
    if what not in RESET_TARGETS:
        raise APIError(422, f"what: expected one of {', '.join(RESET_TARGETS)}; got {what!r}",
                       parameter="what")
    st = state_of(request)
    profiler = st.source.profiler
    if profiler is not None:
        profiler.reset(what)
    if what in ("all", "statistics"):
        st.history.reset()
    return JSONResponse({"reset": what})
