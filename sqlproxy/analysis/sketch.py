"""A relative-error quantile sketch for latencies (the DDSketch algorithm).

Values are counted in logarithmic buckets: bucket ``k`` holds the values in
``(gamma**(k-1), gamma**k]`` with ``gamma = (1 + a) / (1 - a)``, so any quantile is answered
within relative error ``a`` (1 % by default), whatever the distribution. Sketches merge by adding
bucket counts, and their state is a plain ``{bucket: count}`` mapping.

Why not the ``ddsketch`` package: it implements the same algorithm, but its ``add`` costs about
1.4 µs here (mapping object, dense store growth checks), and the profiler calls ``add`` once per
executed statement on the proxy's hot path. This ``add`` is one ``log`` and one increment of a
64-bit count in place (``_sockio.sketch_bump``: a count in a list would be a new Python integer
object at every increment past 256). The number of buckets is bounded by the value range:
latencies from 1 µs to one day at 1 % are under 1,300 buckets.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Final

try:
    from sqlproxy.proxy import _sockio
except ImportError:  # pragma: no cover - built with the package
    _sockio = None  # type: ignore[assignment]

__all__ = ["LogSketch"]


def _add_at(counts: bytearray, i: int, n: int) -> bool:
    """Add ``n`` to the ``i``-th native 64-bit count of ``counts``; False when out of range."""
    if i < 0 or 8 * i + 8 > len(counts):
        return False
    with memoryview(counts) as raw, raw.cast("q") as cells:
        cells[i] += n
    return True


def _bump(counts: bytearray, i: int) -> bool:
    """Add one to the ``i``-th native 64-bit count of ``counts``; False when out of range."""
    return _add_at(counts, i, 1)


# ``_bump`` in C (``_sockio.sketch_bump``), tested to agree; a module-level Final, so compiled
# code calls it without a lookup by name.
bump: Final[Callable[[bytearray, int], bool]] = (
    _sockio.sketch_bump if _sockio is not None else _bump)


def _cells(n: int) -> bytearray:
    return bytearray(8 * n)

_MIN_VALUE: Final = 1e-9  # zero and negative durations (clock quirks) count as 1 ns
_MAX_VALUE: Final = 1e7  # longer durations (115 days) count as that: the span stays bounded
_MAX_KEY: Final = 4000  # |bucket| of any value in range at accuracies down to 0.5 %


class LogSketch:
    __slots__ = ("_inv_log_gamma", "count", "counts", "gamma", "low", "relative_accuracy")

    def __init__(self, relative_accuracy: float = 0.01) -> None:
        if not 0 < relative_accuracy < 1:
            raise ValueError("relative_accuracy must be between 0 and 1")
        self.relative_accuracy = relative_accuracy
        self.gamma = (1 + relative_accuracy) / (1 - relative_accuracy)
        self._inv_log_gamma = 1.0 / math.log(self.gamma)
        # Dense buckets: the i-th native 64-bit count of ``counts`` is bucket ``low + i``. An
        # index instead of a dict lookup per value; they span the buckets seen so far (a
        # statement's latencies rarely span more than a few hundred).
        self.counts = bytearray()
        self.low = 0
        self.count = 0

    def add(self, value: float) -> None:
        if value < _MIN_VALUE:
            value = _MIN_VALUE
        elif value > _MAX_VALUE:
            value = _MAX_VALUE
        key = math.ceil(math.log(value) * self._inv_log_gamma)
        if not bump(self.counts, key - self.low):
            self._add_count(key, 1)
        self.count += 1

    def _values(self) -> list[int]:
        """The counts of buckets ``low``, ``low + 1``, ..."""
        with memoryview(self.counts) as raw, raw.cast("q") as cells:
            return cells.tolist()

    def _add_outside(self, key: int, n: int) -> None:
        """Count ``n`` in bucket ``key``, outside the span of ``counts`` so far."""
        counts = self.counts
        size = len(counts) // 8
        if size == 0:
            self.low = key
            self.counts = _cells(1)
        elif key < self.low:
            self.counts = _cells(self.low - key) + counts
            self.low = key
        else:
            counts.extend(_cells(key - self.low + 1 - size))
        self._add_count(key, n)

    @property
    def bins(self) -> dict[int, int]:
        """The non-empty buckets: ``{bucket: count}``."""
        low = self.low
        return {low + i: n for i, n in enumerate(self._values()) if n}

    def quantile(self, q: float) -> float:
        """The value at quantile ``q`` (0..1), within the relative accuracy; 0.0 when empty."""
        if self.count == 0:
            return 0.0
        rank = q * (self.count - 1)
        seen = 0
        key = self.low
        for i, n in enumerate(self._values()):
            seen += n
            if n and seen > rank:
                key = self.low + i
                break
        # The bucket's representative value: relative error at most `relative_accuracy`.
        return 2.0 * self.gamma**key / (self.gamma + 1.0)

    def merge(self, other: LogSketch) -> None:
        if other.gamma != self.gamma:
            raise ValueError("cannot merge sketches of different accuracy")
        for key, n in other.bins.items():
            self._add_count(key, n)
        self.count += other.count

    def _add_count(self, key: int, n: int) -> None:
        if not _add_at(self.counts, key - self.low, n):
            self._add_outside(key, n)

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
            if abs(int(k)) > _MAX_KEY:
                raise ValueError(f"invalid sketch state: bucket {k} out of range")
            if int(n) > 0:
                sketch._add_count(int(k), int(n))
        sketch.count = sum(sketch._values())
        return sketch
