"""A relative-error quantile sketch for latencies (the DDSketch algorithm).

Values are counted in logarithmic buckets: bucket ``k`` holds the values in
``(gamma**(k-1), gamma**k]`` with ``gamma = (1 + a) / (1 - a)``, so any quantile is answered
within relative error ``a`` (1 % by default), whatever the distribution. Sketches merge by adding
bucket counts, and their state is a plain ``{bucket: count}`` mapping.

Why not the ``ddsketch`` package: it implements the same algorithm, but its ``add`` costs about
1.4 µs here (mapping object, dense store growth checks), and the profiler calls ``add`` once per
executed statement on the proxy's hot path. This ``add`` is one ``log`` and one dict increment.
The number of buckets is bounded by the value range: latencies from 1 µs to one day at 1 %
are under 1,300 buckets.
"""

from __future__ import annotations

import math

__all__ = ["LogSketch"]

_MIN_VALUE = 1e-9  # zero and negative durations (clock quirks) count as 1 ns


class LogSketch:
    __slots__ = ("_inv_log_gamma", "bins", "count", "gamma", "relative_accuracy")

    def __init__(self, relative_accuracy: float = 0.01) -> None:
        if not 0 < relative_accuracy < 1:
            raise ValueError("relative_accuracy must be between 0 and 1")
        self.relative_accuracy = relative_accuracy
        self.gamma = (1 + relative_accuracy) / (1 - relative_accuracy)
        self._inv_log_gamma = 1.0 / math.log(self.gamma)
        self.bins: dict[int, int] = {}
        self.count = 0

    def add(self, value: float) -> None:
        key = math.ceil(math.log(value if value > _MIN_VALUE else _MIN_VALUE)
                        * self._inv_log_gamma)
        bins = self.bins
        bins[key] = bins.get(key, 0) + 1
        self.count += 1

    def quantile(self, q: float) -> float:
        """The value at quantile ``q`` (0..1), within the relative accuracy; 0.0 when empty."""
        if self.count == 0:
            return 0.0
        rank = q * (self.count - 1)
        seen = 0
        key = 0
        for key in sorted(self.bins):
            seen += self.bins[key]
            if seen > rank:
                break
        # The bucket's representative value: relative error at most `relative_accuracy`.
        return 2.0 * self.gamma**key / (self.gamma + 1.0)

    def merge(self, other: LogSketch) -> None:
        if other.gamma != self.gamma:
            raise ValueError("cannot merge sketches of different accuracy")
        bins = self.bins
        for key, n in other.bins.items():
            bins[key] = bins.get(key, 0) + n
        self.count += other.count

    def to_state(self) -> dict[str, object]:
        return {"relative_accuracy": self.relative_accuracy,
                "bins": [[k, n] for k, n in sorted(self.bins.items())]}

    @classmethod
    def from_state(cls, state: dict[str, object]) -> LogSketch:
        accuracy = state["relative_accuracy"]
        bins = state["bins"]
        if not isinstance(accuracy, float) or not isinstance(bins, list):
            raise ValueError("invalid sketch state")
        sketch = cls(accuracy)
        for k, n in bins:
            sketch.bins[int(k)] = int(n)
        sketch.count = sum(sketch.bins.values())
        return sketch
