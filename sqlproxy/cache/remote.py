"""The Redis store (``[cache] url = "redis://..."``): entries shared by a fleet of proxies.

Every call is bounded by ``cache.redis_timeout_ms``; a failure or a timeout marks Redis down for
``cache.redis_retry_s`` during which lookups are misses (the statement goes to the server),
stores are skipped and invalidations are kept to be replayed first when Redis answers again.
So a Redis that is down or slow costs a query at most one timeout, once per retry period, and
never an error. Everything is counted (``describe``, in ``/api/cache`` and ``/healthz``).

Consistency between instances: each (database, table) has a generation counter in Redis. A
lookup reads the entry and the generations of the tables it depends on in one script; a miss's
answer is stored by a script that checks those generations have not moved (a write committed
meanwhile, through any instance, would otherwise let a stale answer in); an invalidation bumps
the generations, deletes the entries indexed under the tables and publishes the tables on a
channel every instance listens to (they count it, and refuse their own in-flight stores).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections.abc import Callable, Iterable
from typing import Any

from sqlproxy.cache.store import ALL, Stats
from sqlproxy.config import CacheSection, redact_url
from sqlproxy.extras import require
from sqlproxy.logs import get_logger

__all__ = ["RedisStore"]

log = get_logger("sqlproxy.cache")

_LOOKUP = """
local v = redis.call('GET', KEYS[1])
if not v then v = '' end
local out = {v}
for i = 2, #KEYS do out[i] = redis.call('GET', KEYS[i]) or '0' end
return out
"""
_STORE = """
local n = (#KEYS - 1) / 2
for i = 1, n do
  if (redis.call('GET', KEYS[1 + i]) or '0') ~= ARGV[2 + i] then return 0 end
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
local ttl = tonumber(ARGV[2])
for i = 1, n do
  local k = KEYS[1 + n + i]
  redis.call('SADD', k, KEYS[1])
  if redis.call('PTTL', k) < ttl then redis.call('PEXPIRE', k, ttl) end
end
return 1
"""
_INVALIDATE = """
local dropped = 0
for i = 1, #KEYS, 2 do
  redis.call('INCR', KEYS[i])
  local members = redis.call('SMEMBERS', KEYS[i + 1])
  for j = 1, #members, 500 do
    dropped = dropped + redis.call('DEL', unpack(members, j, math.min(j + 499, #members)))
  end
  redis.call('DEL', KEYS[i + 1])
end
redis.call('PUBLISH', ARGV[1], ARGV[2])
return dropped
"""

Invalidated = Callable[[str, frozenset[str]], None]


class RedisStore:
    """See the module docstring."""

    def __init__(self, config: CacheSection, stats: Stats) -> None:
        require("redis", "cache.url (the Redis store of the result cache)")
        import redis.asyncio as aioredis

        self.config = config
        self.stats = stats
        url = config.url
        assert url is not None
        timeout = config.redis_timeout_ms / 1000.0
        self.client: Any = aioredis.Redis.from_url(
            url, socket_timeout=max(timeout, 0.05), socket_connect_timeout=max(timeout, 0.05),
            retry_on_timeout=False, health_check_interval=0)
        self.instance = f"{os.getpid()}-{id(self):x}"
        self.channel = config.key_prefix + "invalidations"
        self.down_until = 0.0
        self.errors = 0
        self.timeouts = 0
        self.skipped = 0  # lookups not tried: Redis was down
        self.remote_invalidations = 0  # published by other instances
        self.dropped_remotely = 0
        self.last_error: str | None = None
        self.pending: list[tuple[str, frozenset[str]]] = []  # invalidations to replay
        self._replaying = False
        self._listener: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._lookup = self.client.register_script(_LOOKUP)
        self._store = self.client.register_script(_STORE)
        self._invalidate = self.client.register_script(_INVALIDATE)
        self._on_invalidation: Invalidated | None = None

    # ------------------------------------------------------------------ lifecycle
    async def start(self, on_invalidation: Invalidated) -> None:
        self._on_invalidation = on_invalidation
        self._listener = asyncio.get_running_loop().create_task(self._listen())

    async def stop(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            await asyncio.gather(self._listener, return_exceptions=True)
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        with contextlib.suppress(Exception):
            await self.client.aclose()

    async def _listen(self) -> None:
        while True:
            pubsub = self.client.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self.channel)
                while True:
                    msg = await pubsub.get_message(timeout=1.0)
                    if msg is not None and msg.get("type") == "message":
                        self._message(msg["data"])
            except asyncio.CancelledError:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()
                raise
            except Exception as exc:
                self._failed(exc)
                with contextlib.suppress(Exception):
                    await pubsub.aclose()
                await asyncio.sleep(self.config.redis_retry_s)

    def _message(self, data: bytes | str) -> None:
        try:
            msg = json.loads(data)
            if msg.get("from") == self.instance:
                return
            db, tables = str(msg["db"]), frozenset(str(t) for t in msg["tables"])
        except (ValueError, KeyError, TypeError):
            return
        self.remote_invalidations += 1
        if self._on_invalidation is not None:
            self._on_invalidation(db, tables)

    # ------------------------------------------------------------------ availability
    def available(self) -> bool:
        if time.monotonic() < self.down_until:
            return False
        if self.pending:
            if not self._replaying:
                self._spawn(self._replay())
            return False
        return True

    def _failed(self, exc: BaseException) -> None:
        if isinstance(exc, asyncio.TimeoutError | TimeoutError):
            self.timeouts += 1
        else:
            self.errors += 1
        was_up = time.monotonic() >= self.down_until
        self.down_until = time.monotonic() + self.config.redis_retry_s
        self.last_error = f"{type(exc).__name__}: {exc}"[:300]
        if was_up:
            log.warning("cache_redis_unavailable", error=redact_url(self.last_error),
                        retry_s=self.config.redis_retry_s,
                        consequence="statements go to the server until Redis answers")

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _call(self, coro: Any) -> Any:
        return await asyncio.wait_for(coro, self.config.redis_timeout_ms / 1000.0)

    # ------------------------------------------------------------------ keys
    def _entry(self, key: bytes) -> str:
        return f"{self.config.key_prefix}e:{key.hex()}"

    def _gen(self, database: str, table: str) -> str:
        return f"{self.config.key_prefix}g:{database}:{table}"

    def _index(self, database: str, table: str) -> str:
        return f"{self.config.key_prefix}i:{database}:{table}"

    @staticmethod
    def _depends(tables: Iterable[str]) -> list[str]:
        return sorted(set(tables) | {ALL})

    # ------------------------------------------------------------------ operations
    async def get(self, key: bytes, database: str,
                  tables: frozenset[str]) -> tuple[bytes | None, list[bytes] | None]:
        """(the answer or None, the generations to store a miss with)."""
        deps = self._depends(tables)
        keys = [self._entry(key)] + [self._gen(database, t) for t in deps]
        try:
            out = await self._call(self._lookup(keys=keys))
        except Exception as exc:
            self._failed(exc)
            return None, None
        value = out[0]
        return (bytes(value) if value else None), [bytes(g) if isinstance(g, bytes)
                                                    else str(g).encode() for g in out[1:]]

    def put(self, key: bytes, value: bytes, database: str, tables: frozenset[str],
            ttl_s: float, gens: Any, rule: str, fingerprint: str) -> None:
        """Store a miss's answer in the background (skipped if Redis is down, or if the
        lookup did not read the generations)."""
        if gens is None or not self.available():
            return
        deps = self._depends(tables)
        keys = ([self._entry(key)] + [self._gen(database, t) for t in deps]
                + [self._index(database, t) for t in deps])
        args: list[bytes | int] = [value, int(ttl_s * 1000), *gens]

        async def run() -> None:
            try:
                stored = await self._call(self._store(keys=keys, args=args))
            except Exception as exc:
                self._failed(exc)
                return
            if stored:
                for c in self.stats.of(rule, fingerprint):
                    c.stores += 1

        self._spawn(run())

    async def invalidate(self, database: str, tables: frozenset[str]) -> None:
        """Drop the entries reading ``tables`` in Redis and tell the other instances; bounded
        by the timeout (kept for replay when Redis is down)."""
        if time.monotonic() < self.down_until or self.pending:
            self.pending.append((database, tables))
            return
        try:
            await self._send_invalidation(database, tables)
        except Exception as exc:
            self._failed(exc)
            self.pending.append((database, tables))

    async def _send_invalidation(self, database: str, tables: frozenset[str]) -> None:
        keys: list[str] = []
        for t in sorted(tables):
            keys += [self._gen(database, t), self._index(database, t)]
        msg = json.dumps({"db": database, "tables": sorted(tables), "from": self.instance})
        dropped = await self._call(self._invalidate(keys=keys, args=[self.channel, msg]))
        self.dropped_remotely += int(dropped or 0)

    async def _replay(self) -> None:
        """Send the invalidations kept while Redis was down (before any lookup again)."""
        self._replaying = True
        try:
            while self.pending:
                database, tables = self.pending[0]
                try:
                    await self._send_invalidation(database, tables)
                except Exception as exc:
                    self._failed(exc)
                    return
                self.pending.pop(0)
        finally:
            self._replaying = False

    def describe(self) -> dict[str, Any]:
        up = time.monotonic() >= self.down_until and not self.pending
        return {
            "url": redact_url(self.config.url or ""),
            "up": up,
            "errors": self.errors,
            "timeouts": self.timeouts,
            "skipped_lookups": self.skipped,
            "last_error": self.last_error,
            "pending_invalidations": len(self.pending),
            "invalidations_from_other_instances": self.remote_invalidations,
            "entries_dropped_in_redis": self.dropped_remotely,
            "timeout_ms": self.config.redis_timeout_ms,
        }
