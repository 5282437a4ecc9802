"""The pure parts of the workers: cancel secrets name their worker; shared limits count for
the machine and forget a dead worker."""

from __future__ import annotations

import pytest

from sqlproxy.config import load_config
from sqlproxy.errors import ConfigError
from sqlproxy.workers.keys import secret_for, worker_of
from sqlproxy.workers.limits import SLOTS, SharedLimits


def test_secret_names_its_worker() -> None:
    for worker in (0, 1, 7, 63):
        for length in (0, 4, 32, 256):
            s = secret_for(worker, length)
            assert len(s) == max(4, length)
            assert worker_of(s) == worker
    assert worker_of(b"") is None
    assert len({secret_for(1, 4) for _ in range(100)}) > 90  # 3 random bytes


def test_shared_limits_hold_across_workers() -> None:
    limits = SharedLimits(2)
    a, b = SharedLimits.__new__(SharedLimits), SharedLimits.__new__(SharedLimits)
    for view, index in ((a, 0), (b, 1)):
        view.__dict__.update(limits.__dict__)
        view.bind(index)
    assert a.admit("u", "d", 3, 0, 0) is None
    assert b.admit("u", "d", 3, 0, 0) is None
    assert b.admit("v", "d", 3, 0, 0) is None
    assert a.admit("w", "e", 3, 0, 0) == "max_client_connections"
    assert limits.count(user="u") == 2 and limits.count(database="d") == 3
    assert a.admit("u", "e", 10, 2, 0) == "max_connections_per_user"
    assert a.admit("x", "d", 10, 0, 3) == "max_connections_per_database"
    b.release("u", "d")
    assert limits.total() == 2 and limits.count(user="u") == 1
    limits.clear(1)  # worker 1 died: its sessions with it
    assert limits.total() == 1 and limits.count(database="d") == 1


def test_shared_limits_many_names_compact() -> None:
    limits = SharedLimits(1)
    limits.bind(0)
    for round_ in range(3):  # more distinct names over time than a table has slots
        names = [f"user{round_}_{i}" for i in range(SLOTS // 2 + 10)]
        for n in names:
            assert limits.admit(n, "d", 10**6, 1, 0) is None
        assert limits.admit(names[0], "d", 10**6, 1, 0) == "max_connections_per_user"
        for n in names:
            limits.release(n, "d")
    assert limits.total() == 0


def test_workers_key() -> None:
    assert load_config(None, {}, {}).proxy.workers == 1
    assert load_config(None, {}, {}).proxy.worker_count == 1
    cfg = load_config(None, None, {"SQLPROXY_PROXY__WORKERS": "3"})
    assert cfg.proxy.worker_count == 3
    assert load_config(None, None, {"SQLPROXY_PROXY__WORKERS": '"auto"'}).proxy.worker_count >= 1
    for bad in ("0", '"many"', "65"):
        with pytest.raises(ConfigError, match=r"proxy\.workers"):
            load_config(None, None, {"SQLPROXY_PROXY__WORKERS": bad})


def test_pool_size_is_shared_between_workers() -> None:
    from sqlproxy.config import Config
    from sqlproxy.workers.worker import share_pool

    cfg = Config.model_validate({"pool": {"mode": "transaction", "size": 10, "min_idle": 3}})
    parts = [share_pool(cfg, i, 3).pool for i in range(3)]
    assert [p.size for p in parts] == [4, 3, 3]
    assert [p.min_idle for p in parts] == [1, 1, 1]
    small = Config.model_validate({"pool": {"size": 1}})
    assert [share_pool(small, i, 2).pool.size for i in range(2)] == [1, 1]


def test_pools_merge_over_workers() -> None:
    from sqlproxy.workers.merged import merge_pools

    a = {"database": "d", "user": "u", "size": 2, "servers": 2, "active": 1, "checkouts": 10,
         "wait_ms": {"max": 5.0, "p50": 1.0, "p99": 4.0}, "all_busy_share": 0.2,
         "servers_closed": {"lifetime": 1}, "pinned_clients": [{"id": 1}],
         "max_active_by_application": {"web": 2}}
    b = {"database": "d", "user": "u", "size": 2, "servers": 1, "active": 0, "checkouts": 5,
         "wait_ms": {"max": 9.0, "p50": 0.5, "p99": 8.0}, "all_busy_share": 0.1,
         "servers_closed": {"lifetime": 2, "idle_timeout": 1}, "pinned_clients": [],
         "max_active_by_application": {"web": 1, "jobs": 1}}
    other = dict(a, user="v")
    replica = dict(a, backend="replica1")
    merged = merge_pools([[a, other, replica], [b]])
    assert [(p["database"], p["user"], p.get("backend")) for p in merged] == [
        ("d", "u", None), ("d", "v", None), ("d", "u", "replica1")]
    m = merged[0]
    assert m["workers"] == 2 and m["size"] == 4 and m["servers"] == 3 and m["checkouts"] == 15
    assert m["wait_ms"] == {"max": 9.0, "p50": 1.0, "p99": 8.0}
    assert m["all_busy_share"] == 0.2
    assert m["servers_closed"] == {"lifetime": 3, "idle_timeout": 1}
    assert m["pinned_clients"] == [{"id": 1}]
    assert m["max_active_by_application"] == {"web": 3, "jobs": 1}
    assert merged[1]["workers"] == 1
