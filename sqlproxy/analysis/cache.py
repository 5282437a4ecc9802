"""Bounded LRU caches in front of the scanner and the classifier.

Two levels, because the hot path sees two kinds of repetition: the same raw text again
(extended-protocol clients re-parsing, ORMs with bound parameters, simple-protocol clients
repeating a query exactly) and the same shape with other literals (simple-protocol clients that
inline them). The first is answered by one dict lookup on the raw text; the second still pays
the scanner, but never sqlglot, which runs once per fingerprint.
"""

from __future__ import annotations

from collections import OrderedDict

from sqlproxy.analysis.classify import Shape, classify
from sqlproxy.analysis.normalize import Normalized, scan

__all__ = ["StatementCache"]


class StatementCache:
    """Raw text -> statements (LRU), and fingerprint -> shape (LRU).

    ``max_text_length`` keeps very long texts (bulk INSERTs that will not repeat) out of the
    raw-text cache: they are scanned every time, and do not evict the useful entries.
    Not thread-safe; meant for the single event loop.
    """

    __slots__ = (
        "_raw",
        "_shapes",
        "max_raw",
        "max_shapes",
        "max_text_length",
        "raw_hits",
        "raw_misses",
        "shape_hits",
        "shape_misses",
    )

    def __init__(
        self, max_raw: int = 10000, max_shapes: int = 5000, max_text_length: int = 16384
    ) -> None:
        if max_raw < 1 or max_shapes < 1:
            raise ValueError("cache sizes must be at least 1")
        self.max_raw = max_raw
        self.max_shapes = max_shapes
        self.max_text_length = max_text_length
        self._raw: OrderedDict[str, list[Normalized]] = OrderedDict()
        self._shapes: OrderedDict[str, Shape] = OrderedDict()
        self.raw_hits = 0
        self.raw_misses = 0
        self.shape_hits = 0
        self.shape_misses = 0

    def scan(self, sql: str) -> list[Normalized]:
        """`normalize.scan`, cached by raw text. The list is shared: do not mutate it."""
        raw = self._raw
        hit = raw.get(sql)
        if hit is not None:
            raw.move_to_end(sql)
            self.raw_hits += 1
            return hit
        self.raw_misses += 1
        statements = scan(sql)
        if len(sql) <= self.max_text_length:
            raw[sql] = statements
            if len(raw) > self.max_raw:
                raw.popitem(last=False)
        return statements

    def shape(self, n: Normalized) -> Shape:
        """`classify.classify` of the statement's normalized text, cached by fingerprint."""
        shapes = self._shapes
        fp = n.fingerprint
        hit = shapes.get(fp)
        if hit is not None:
            shapes.move_to_end(fp)
            self.shape_hits += 1
            return hit
        self.shape_misses += 1
        shape = classify(n.text)
        shapes[fp] = shape
        if len(shapes) > self.max_shapes:
            shapes.popitem(last=False)
        return shape

    def clear(self) -> None:
        self._raw.clear()
        self._shapes.clear()

    def __len__(self) -> int:
        return len(self._raw)

    @property
    def shape_count(self) -> int:
        return len(self._shapes)
