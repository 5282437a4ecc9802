"""The result cache (docs/cache.md): which reads may be served from the proxy, their keys,
the stores (in-process LRU by bytes, or Redis for a fleet) and invalidation at commit.

``policy``, ``keys`` and ``store`` are sans-IO and unit-tested; ``manager`` ties them to the
event loop (catalog loading, Redis); ``proxy/cached.py`` is the session that uses them.
"""
