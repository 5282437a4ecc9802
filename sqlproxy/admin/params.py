"""Query-string parameters of the JSON API, validated with messages that name the parameter."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from starlette.datastructures import QueryParams

DEFAULT_LIMIT = 50
MAX_LIMIT = 1000


class APIError(Exception):
    """An error the API answers with ``{"error": message, ...}`` and an HTTP status."""

    def __init__(self, status: int, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.extra = extra

    def body(self) -> dict[str, Any]:
        return {"error": self.message, **self.extra}


def bad_parameter(name: str, message: str) -> APIError:
    return APIError(400, f"{name}: {message}", parameter=name)


def _raw(params: QueryParams, name: str) -> str | None:
    value = params.get(name)
    if value is None or value.strip() == "":
        return None
    return value.strip()


def int_param(params: QueryParams, name: str, default: int, minimum: int = 0,
              maximum: int | None = None) -> int:
    raw = _raw(params, name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise bad_parameter(name, f"expected an integer, got {raw!r}") from None
    if value < minimum:
        raise bad_parameter(name, f"must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise bad_parameter(name, f"must be <= {maximum}, got {value}")
    return value


def float_param(params: QueryParams, name: str, minimum: float = 0.0) -> float | None:
    raw = _raw(params, name)
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        raise bad_parameter(name, f"expected a number, got {raw!r}") from None
    if value != value or value < minimum:  # NaN or too small
        raise bad_parameter(name, f"must be a number >= {minimum}, got {raw!r}")
    return value


def str_param(params: QueryParams, name: str) -> str | None:
    return _raw(params, name)


def choice_param(params: QueryParams, name: str, choices: Sequence[str], default: str) -> str:
    raw = _raw(params, name)
    if raw is None:
        return default
    if raw not in choices:
        raise bad_parameter(name, f"expected one of {', '.join(choices)}; got {raw!r}")
    return raw


def time_param(params: QueryParams, name: str) -> float | None:
    """A point in time: ISO 8601 (``2026-01-02T03:04:05Z``; naive means UTC) or Unix seconds."""
    raw = _raw(params, name)
    if raw is None:
        return None
    try:
        return float(raw)
    except ValueError:
        pass
    try:
        dt = datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except ValueError:
        raise bad_parameter(
            name, f"expected ISO 8601 (e.g. 2026-01-02T03:04:05Z) or Unix seconds, got {raw!r}"
        ) from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.timestamp()


def page(params: QueryParams) -> tuple[int, int]:
    """(limit, offset) of a list endpoint."""
    limit = int_param(params, "limit", DEFAULT_LIMIT, minimum=1, maximum=MAX_LIMIT)
    offset = int_param(params, "offset", 0, minimum=0)
    return limit, offset
