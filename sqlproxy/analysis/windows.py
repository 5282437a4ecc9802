"""What got slower: per-fingerprint time windows, latency regressions and new hot statements.

Every ``analysis.window_s`` seconds (default 300) a background task (never the hot path:
``Windows.tick``) closes a window: for each fingerprint, the calls, the time and the latency
distribution *of that window* are the difference between the statistics' cumulative figures
now and at the previous tick. The latency sketches count in logarithmic buckets, so a
window's distribution is the bucket-wise difference of two snapshots and its p95 is as
accurate as the sketch (1 %). Nothing is added per statement.

At most ``analysis.max_windows`` windows are kept per fingerprint (also in the state file).
When a window closes:

- ``latency_regression``: its p95 exceeds the p95 of the earlier windows taken together (the
  baseline) by ``analysis.regression_factor``, by at least ``analysis.regression_min_ms``, and
  both the window and the baseline have ``analysis.regression_min_calls`` calls — enough for a
  p95 to mean something.
- ``new_hot_statement``: a fingerprint first seen in this window (by the statistics, which
  survive restarts) takes at least ``analysis.new_hot_share`` of the window's database time,
  with ``regression_min_calls`` calls, when earlier windows exist (at start everything is new).

Both become findings (``findings.py``), with the window's figures against the baseline's.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

from sqlproxy.analysis.findings import LATENCY_REGRESSION, NEW_HOT_STATEMENT, suggest
from sqlproxy.analysis.stats import StatEntry
from sqlproxy.analysis.timefmt import iso

__all__ = ["Window", "Windows", "quantile"]


def quantile(gamma: float, bins: dict[int, int], q: float) -> float:
    """The value (seconds) at quantile ``q`` of a bucket histogram, as LogSketch computes it."""
    count = sum(bins.values())
    if count <= 0:
        return 0.0
    rank = q * (count - 1)
    seen = 0
    keys = sorted(k for k, n in bins.items() if n > 0)
    key = keys[-1]
    for k in keys:
        seen += bins[k]
        if seen > rank:
            key = k
            break
    return 2.0 * gamma**key / (gamma + 1.0)


@dataclass(slots=True)
class Window:
    """One fingerprint's executions in one window."""

    start: float
    end: float
    calls: int
    total: float  # seconds
    bins: dict[int, int] = field(default_factory=dict)

    def to_state(self) -> list[Any]:
        return [self.start, self.end, self.calls, self.total,
                [[k, n] for k, n in sorted(self.bins.items())]]

    @classmethod
    def from_state(cls, d: list[Any]) -> Window:
        start, end, calls, total, bins = d
        return cls(float(start), float(end), int(calls), float(total),
                   {int(k): int(n) for k, n in bins})


@dataclass(slots=True)
class _Seen:
    calls: int
    total: float
    bins: dict[int, int]


class Windows:
    """The windows of every fingerprint, and the findings they raise."""

    state_section = "windows"
    state_version = 1

    def __init__(self, config: Any, findings: Any, log: Any = None) -> None:
        self.config = config
        self.findings = findings  # a FindingsStore
        self.log = log
        self.series: dict[str, deque[Window]] = {}
        self.gamma = 0.0
        self._last: dict[tuple[str, str, str], _Seen] = {}
        self.started: float | None = None  # the current window's start
        self.closed = 0  # windows closed (ticks that found a previous one)

    def configure(self, config: Any) -> None:
        self.config = config
        for fp, s in list(self.series.items()):
            if s.maxlen != config.max_windows:
                self.series[fp] = deque(s, maxlen=config.max_windows)

    def tick(self, entries: list[StatEntry], now: float) -> None:
        """Close the window that began at the previous tick (the first tick only begins one),
        judge it, and begin the next."""
        start = self.started
        self.started = now
        current: dict[tuple[str, str, str], _Seen] = {}
        per_fp: dict[str, Window] = {}
        for e in entries:
            bins = e.sketch.bins
            self.gamma = e.sketch.gamma
            key = (e.fingerprint, e.database, e.user)
            seen = _Seen(e.calls, e.total, bins)
            current[key] = seen
            if start is None:
                continue
            prev = self._last.get(key)
            if prev is None or prev.calls > e.calls:  # new since the last tick, or reset
                prev = _Seen(0, 0.0, {})
            calls = e.calls - prev.calls
            if calls <= 0:
                continue
            w = per_fp.get(e.fingerprint)
            if w is None:
                w = per_fp[e.fingerprint] = Window(start, now, 0, 0.0)
            w.calls += calls
            w.total += e.total - prev.total
            for k, n in bins.items():
                d = n - prev.bins.get(k, 0)
                if d > 0:
                    w.bins[k] = w.bins.get(k, 0) + d
        self._last = current
        if start is None:
            return
        self.closed += 1
        had_history = bool(self.series)
        first_seen = {e.fingerprint: e.first_seen for e in entries}
        queries = {e.fingerprint: e for e in entries}
        window_total = sum(w.total for w in per_fp.values())
        for fp, w in per_fp.items():
            series = self.series.get(fp)
            baseline = list(series) if series is not None else []
            self._judge(fp, w, baseline, queries[fp], first_seen.get(fp, now) >= start,
                        had_history, window_total)
            if series is None:
                series = self.series[fp] = deque(maxlen=self.config.max_windows)
            series.append(w)
        # Forget fingerprints with no window left in the horizon.
        horizon = now - self.config.window_s * self.config.max_windows
        for fp in [fp for fp, s in self.series.items() if not s or s[-1].end < horizon]:
            del self.series[fp]

    def _judge(self, fp: str, w: Window, baseline: list[Window], entry: StatEntry, new: bool,
               had_history: bool, window_total: float) -> None:
        cfg = self.config
        gamma = self.gamma
        if not gamma:
            return
        p95 = quantile(gamma, w.bins, 0.95)
        base_calls = sum(b.calls for b in baseline)
        if baseline and w.calls >= cfg.regression_min_calls \
                and base_calls >= cfg.regression_min_calls:
            merged: dict[int, int] = {}
            for b in baseline:
                for k, n in b.bins.items():
                    merged[k] = merged.get(k, 0) + n
            base_p95 = quantile(gamma, merged, 0.95)
            if p95 > base_p95 * cfg.regression_factor \
                    and (p95 - base_p95) * 1000 >= cfg.regression_min_ms:
                self._report(LATENCY_REGRESSION, entry, w, {
                    "start": iso(w.start), "end": iso(w.end), "calls": w.calls,
                    "p95_ms": p95 * 1000, "baseline_p95_ms": base_p95 * 1000,
                    "baseline_calls": base_calls, "baseline_windows": len(baseline),
                    "factor": p95 / base_p95 if base_p95 > 0 else None,
                })
        if new and had_history and not baseline and window_total > 0 \
                and w.calls >= cfg.regression_min_calls \
                and w.total / window_total >= cfg.new_hot_share:
            self._report(NEW_HOT_STATEMENT, entry, w, {
                "start": iso(w.start), "end": iso(w.end), "calls": w.calls, "p95_ms": p95 * 1000,
                "total_ms": w.total * 1000, "share": w.total / window_total,
            })

    def _report(self, kind: str, entry: StatEntry, w: Window, figures: dict[str, Any]) -> None:
        if kind == LATENCY_REGRESSION:
            example = (f"{entry.query}  -- p95 {figures['p95_ms']:.3f} ms over {w.calls} calls, "
                       f"baseline {figures['baseline_p95_ms']:.3f} ms")
        else:
            example = (f"{entry.query}  -- {figures['share']:.0%} of the database time, "
                       f"{w.calls} calls")
        f = self.findings.add(
            kind, entry.fingerprint, entry.query, None, None, "", entry.database, w.calls,
            w.total, w.end, example=example, suggestion=suggest(kind),
            statement_kind=entry.kind, tables=entry.tables,
        )
        f.window = figures

    def timeline(self, fingerprint: str) -> list[dict[str, Any]]:
        """The fingerprint's windows, oldest first."""
        out = []
        for w in self.series.get(fingerprint, ()):
            p50, p95, p99 = (quantile(self.gamma, w.bins, q) * 1000 if self.gamma else None
                             for q in (0.5, 0.95, 0.99))
            out.append({"start": iso(w.start), "end": iso(w.end), "calls": w.calls,
                        "total_ms": w.total * 1000,
                        "mean_ms": w.total / w.calls * 1000 if w.calls else None,
                        "p50_ms": p50, "p95_ms": p95, "p99_ms": p99})
        return out

    def latest(self) -> dict[str, Window]:
        """Each fingerprint's last window."""
        return {fp: s[-1] for fp, s in self.series.items() if s}

    def baseline_p95(self, fingerprint: str) -> float | None:
        """p95 (seconds) of a fingerprint's windows before its last one."""
        s = self.series.get(fingerprint)
        if not s or len(s) < 2 or not self.gamma:
            return None
        merged: dict[int, int] = {}
        for b in list(s)[:-1]:
            for k, n in b.bins.items():
                merged[k] = merged.get(k, 0) + n
        return quantile(self.gamma, merged, 0.95)

    def reset(self) -> None:
        self.series.clear()
        self._last.clear()
        self.started = None

    # -- persistence (sqlproxy.state.StateContributor) -----------------------------------
    def to_state(self) -> Any:
        return {"gamma": self.gamma, "window_s": self.config.window_s,
                "series": {fp: [w.to_state() for w in s] for fp, s in self.series.items()}}

    def from_state(self, data: Any, version: int) -> None:
        if version != self.state_version:
            raise ValueError(f"windows state version {version} is not supported")
        gamma = float(data["gamma"])
        if self.gamma and gamma and abs(gamma - self.gamma) > 1e-12:
            raise ValueError("windows were kept at another sketch accuracy")
        self.gamma = self.gamma or gamma
        for fp, ws in dict(data["series"]).items():
            restored = [Window.from_state(w) for w in ws]
            mine = self.series.get(str(fp))
            merged = restored + (list(mine) if mine is not None else [])
            self.series[str(fp)] = deque(merged, maxlen=self.config.max_windows)
