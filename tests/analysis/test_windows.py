"""Regression windows driven by an injected clock: ``Profiler.tick_windows(now)`` closes a
window; executions are fed with made-up durations (nothing is timed)."""

from __future__ import annotations

import random
from typing import Any

from sqlproxy.analysis.profiler import Profiler, SessionInfo
from sqlproxy.config import AnalysisSection

LOOKUP = "select * from accounts where id = $1"
OTHER = "select * from branches where id = $1"
NEW = "select * from history where account_id = $1"


class Load:
    def __init__(self, **analysis: Any) -> None:
        self.prof = Profiler(AnalysisSection(window_s=60, **analysis))
        self.ctx = SessionInfo(1, "peer", "db", "u", "app")
        self.t = 0.0  # perf_counter seconds
        self.now = 1_000_000.0  # wall clock of the window ticks
        self.rng = random.Random(7)
        self.prof.tick_windows(self.now)

    def run(self, sql: str, ms: float, calls: int = 100, jitter: float = 0.3) -> None:
        for i in range(calls):
            d = ms * (1 + self.rng.uniform(-jitter, jitter)) / 1000
            start = self.t + 0.001
            self.t = start + d
            self.prof.record(self.ctx, sql, 0, (i + 1).to_bytes(4, "big"), 1, None, start,
                             self.t)

    def window(self) -> None:
        self.now += 60
        self.prof.tick_windows(self.now)

    def found(self, kind: str) -> list[dict[str, Any]]:
        return self.prof.findings(kind, limit=100)[0]


def test_steady_load_raises_nothing_over_twenty_windows() -> None:
    load = Load()
    for _ in range(20):
        load.run(LOOKUP, 0.3)
        load.run(OTHER, 2.0, calls=30)
        load.window()
    assert load.found("latency_regression") == []
    assert load.found("new_hot_statement") == []
    timeline = load.prof.windows.timeline(load.prof.statements(load.ctx, LOOKUP)[0].fingerprint)
    assert len(timeline) == 20 and all(w["calls"] == 100 for w in timeline)


def test_five_times_slower_is_a_regression_within_two_windows() -> None:
    load = Load()
    for _ in range(5):
        load.run(LOOKUP, 0.3)
        load.window()
    load.run(LOOKUP, 1.5)  # an index dropped: 5x slower
    load.window()
    (f,) = load.found("latency_regression")
    assert f["query"] == "select * from accounts where id = $1"
    w = f["window"]
    assert w["calls"] == 100 and w["baseline_windows"] == 5
    assert 4 < w["factor"] < 6.5
    assert "EXPLAIN" in f["suggestion"]


def test_too_few_calls_or_too_small_a_change_is_no_regression() -> None:
    load = Load(regression_min_calls=50)
    for _ in range(3):
        load.run(LOOKUP, 0.3)
        load.window()
    load.run(LOOKUP, 3.0, calls=10)  # slow, but too few calls to be significant
    load.window()
    assert load.found("latency_regression") == []
    load = Load(regression_min_ms=5.0)
    for _ in range(3):
        load.run(LOOKUP, 0.3)
        load.window()
    load.run(LOOKUP, 3.0)  # 10x, but 2.7 ms: under regression_min_ms
    load.window()
    assert load.found("latency_regression") == []


def test_new_hot_statement() -> None:
    load = Load()
    for _ in range(3):
        load.run(LOOKUP, 0.3)
        load.window()
    load.run(LOOKUP, 0.3)
    load.run(NEW, 5.0, calls=40)  # never seen before, most of the window's time
    load.window()
    (f,) = load.found("new_hot_statement")
    assert f["query"] == "select * from history where account_id = $1"
    assert f["window"]["share"] > 0.8
    load.run(NEW, 5.0, calls=40)
    load.window()  # not new any more
    assert load.found("new_hot_statement")[0]["occurrences"] == 1


def test_nothing_is_new_at_the_first_window() -> None:
    load = Load()
    load.run(NEW, 5.0, calls=40)
    load.window()
    assert load.found("new_hot_statement") == []


def test_windows_are_bounded_and_survive_a_restart(tmp_path: Any) -> None:
    from sqlproxy.state import StateFile, profiler_contributors

    load = Load(max_windows=4)
    for _ in range(6):
        load.run(LOOKUP, 0.3)
        load.window()
    fp = load.prof.statements(load.ctx, LOOKUP)[0].fingerprint
    assert len(load.prof.windows.timeline(fp)) == 4
    path = tmp_path / "state.sqlite"
    StateFile(path).save(profiler_contributors(load.prof))
    after = Profiler(AnalysisSection(window_s=60, max_windows=4))
    assert StateFile(path).load(profiler_contributors(after))
    assert after.windows.timeline(fp) == load.prof.windows.timeline(fp)
