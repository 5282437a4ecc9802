"""Latency over time, per fingerprint, for the dashboard's chart.

The statistics are cumulative; a chart wants intervals. Every ``interval`` seconds a background
task (never the hot path) takes a snapshot of the busiest fingerprints — the top ``top_n`` by
total time, plus any fingerprint someone asked the history of recently — and stores the
difference from the previous snapshot: calls, mean, and p50/p95/p99 *of that interval*. The
sketches count values in logarithmic buckets, so the interval's distribution is the
bucket-wise difference of two snapshots, and its quantiles are as accurate as the sketch.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from sqlproxy.analysis.stats import StatEntry
from sqlproxy.analysis.timefmt import iso

WATCH_SECONDS = 600.0  # a fingerprint whose history was asked for is sampled this long


@dataclass(frozen=True, slots=True)
class Point:
    at: float
    calls: int
    errors: int
    mean_ms: float | None
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None

    def to_dict(self) -> dict[str, Any]:
        return {"at": iso(self.at), "calls": self.calls, "errors": self.errors,
                "mean_ms": self.mean_ms, "p50_ms": self.p50_ms, "p95_ms": self.p95_ms,
                "p99_ms": self.p99_ms}


@dataclass(slots=True)
class _Snapshot:
    calls: int
    errors: int
    total: float
    bins: dict[int, int]


def sketch_bins(entry: StatEntry) -> tuple[float, dict[int, int]] | None:
    """(gamma, {bucket: count}) of an entry's latency sketch; bucket k holds the values in
    (gamma**(k-1), gamma**k] seconds."""
    sketch = entry.sketch
    bins = getattr(sketch, "bins", None)
    gamma = getattr(sketch, "gamma", None)
    if not isinstance(bins, dict) or not isinstance(gamma, float):
        return None
    return gamma, bins


def bins_quantiles(gamma: float, bins: dict[int, int],
                   qs: tuple[float, ...]) -> list[float | None]:
    """Quantiles (milliseconds) of a bucket histogram, as LogSketch.quantile computes them."""
    count = sum(bins.values())
    if count <= 0:
        return [None for _ in qs]
    keys = sorted(k for k, n in bins.items() if n > 0)
    out: list[float | None] = []
    for q in qs:
        rank = q * (count - 1)
        seen = 0
        key = keys[-1]
        for k in keys:
            seen += bins[k]
            if seen > rank:
                key = k
                break
        out.append(2.0 * gamma**key / (gamma + 1.0) * 1000)
    return out


class History:
    def __init__(self, interval: float = 5.0, size: int = 360, top_n: int = 50) -> None:
        self.interval = interval
        self.size = size
        self.top_n = top_n
        self.series: dict[str, deque[Point]] = {}
        self.watched: dict[str, float] = {}
        self._last: dict[str, _Snapshot] = {}
        self._gamma = 0.0

    def watch(self, fingerprint: str, now: float | None = None) -> None:
        self.watched[fingerprint] = now if now is not None else time.time()

    def tick(self, entries: list[StatEntry], now: float | None = None) -> None:
        """Sample ``entries`` (all of them: the profiler's store) once."""
        now = now if now is not None else time.time()
        for fp, seen in list(self.watched.items()):
            if now - seen > WATCH_SECONDS:
                del self.watched[fp]
        by_fp: dict[str, list[StatEntry]] = {}
        for e in entries:
            by_fp.setdefault(e.fingerprint, []).append(e)
        ranked = sorted(by_fp, key=lambda f: sum(e.total for e in by_fp[f]), reverse=True)
        chosen = set(ranked[: self.top_n]) | (set(self.watched) & set(by_fp))
        for fp in chosen:
            self._sample(fp, by_fp[fp], now)
        # Forget series that have not been sampled for a whole window.
        horizon = now - self.interval * self.size
        for fp in list(self.series):
            if fp not in chosen and (not self.series[fp] or self.series[fp][-1].at < horizon):
                del self.series[fp]
                self._last.pop(fp, None)

    def _sample(self, fp: str, entries: list[StatEntry], now: float) -> None:
        calls = sum(e.calls for e in entries)
        errors = sum(e.error_count for e in entries)
        total = sum(e.total for e in entries)
        bins: dict[int, int] = {}
        for e in entries:
            sb = sketch_bins(e)
            if sb is None:
                continue
            self._gamma = sb[0]
            for k, n in sb[1].items():
                bins[k] = bins.get(k, 0) + n
        cur = _Snapshot(calls, errors, total, bins)
        prev = self._last.get(fp)
        self._last[fp] = cur
        if prev is None or prev.calls > calls:  # first sample, or the statistics were reset
            prev = _Snapshot(0, 0, 0.0, {})
        d_calls = calls - prev.calls
        series = self.series.get(fp)
        if series is None:
            series = self.series[fp] = deque(maxlen=self.size)
        if d_calls <= 0:
            series.append(Point(now, 0, 0, None, None, None, None))
            return
        d_bins = {k: n - prev.bins.get(k, 0) for k, n in bins.items()}
        p50, p95, p99 = (bins_quantiles(self._gamma, d_bins, (0.5, 0.95, 0.99))
                         if self._gamma else (None, None, None))
        series.append(Point(now, d_calls, max(0, errors - prev.errors),
                            (total - prev.total) / d_calls * 1000, p50, p95, p99))

    def points(self, fingerprint: str) -> list[Point]:
        """Newest first."""
        return list(reversed(self.series.get(fingerprint, ())))

    def reset(self) -> None:
        self.series.clear()
        self._last.clear()
