"""Retry delays for an unreachable state database. Pure: the caller keeps the count and
supplies the randomness."""

from __future__ import annotations

INITIAL_SECONDS = 0.5
CAP_SECONDS = 30.0


def retry_delay(failures: int, jitter: float = 1.0, *, initial: float = INITIAL_SECONDS,
                cap: float = CAP_SECONDS) -> float:
    """Seconds to wait after the ``failures``-th failure in a row (1, 2, ...): doubling from
    ``initial`` up to ``cap``, times ``jitter`` (e.g. uniform in 0.8..1.2, so that a fleet
    that lost its database together does not come back in lockstep)."""
    if failures < 1:
        return 0.0
    return min(cap, initial * 2.0 ** min(failures - 1, 62)) * jitter
