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
