"""Timestamps as the API shows them."""

from __future__ import annotations

from datetime import UTC, datetime


def iso(ts: float) -> str:
    """ISO 8601 UTC with milliseconds, e.g. 2026-11-26T18:00:00.123Z."""
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace(
        "+00:00", "Z"
    )
