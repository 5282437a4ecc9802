"""The latency sketch answers quantiles within its relative accuracy."""

from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st

from sqlproxy.analysis.sketch import LogSketch


def exact(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[math.floor(q * (len(ordered) - 1))]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(min_value=1e-6, max_value=1e4), min_size=1, max_size=300),
       st.sampled_from([0.0, 0.5, 0.9, 0.95, 0.99, 1.0]))
def test_quantiles_within_relative_accuracy(values: list[float], q: float) -> None:
    sketch = LogSketch(0.01)
    for v in values:
        sketch.add(v)
    assert sketch.count == len(values)
    want = exact(values, q)
    assert abs(sketch.quantile(q) - want) <= 0.01 * want * 1.0000001


def test_empty_zero_merge_and_state() -> None:
    a, b = LogSketch(), LogSketch()
    assert a.quantile(0.99) == 0.0
    a.add(0.0)  # clock quirks: counted as the smallest value
    a.add(-1.0)
    for v in (0.001, 0.002, 0.003):
        b.add(v)
    a.merge(b)
    assert a.count == 5
    restored = LogSketch.from_state(a.to_state())
    assert restored.bins == a.bins and restored.count == 5
    assert abs(restored.quantile(1.0) - 0.003) <= 0.003 * 0.01


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(min_value=1e-9, max_value=1e7), max_size=300))
def test_buckets_count_every_value_once(values: list[float]) -> None:
    """Each value lands in bucket ``ceil(log(v) / log(gamma))``, counted in place (native
    64-bit counts, in C) however the span of buckets grows on either side."""
    sketch = LogSketch(0.01)
    want: dict[int, int] = {}
    for v in values:
        sketch.add(v)
        key = math.ceil(math.log(v) / math.log(sketch.gamma))
        want[key] = want.get(key, 0) + 1
    assert sketch.bins == want
    assert sketch.count == len(values) == sum(sketch.bins.values())


def test_native_bump_is_the_definition() -> None:
    from sqlproxy.analysis import sketch
    from sqlproxy.proxy import _sockio

    assert sketch.bump is _sockio.sketch_bump
    for bump in (sketch.bump, sketch._bump):
        counts = bytearray(8 * 3)
        assert bump(counts, 1) and bump(counts, 1) and bump(counts, 2)
        assert not bump(counts, 3) and not bump(counts, -1)
        with memoryview(counts) as raw, raw.cast("q") as cells:
            assert cells.tolist() == [0, 2, 1]
