"""The pool's lending rules, without a server (sqlproxy/pool/state.py)."""

from __future__ import annotations

from sqlproxy.pool.state import OPEN, Handoff, Limits, Pool, Waiter


def make(size: int = 2, **kw: float) -> Pool[str, str]:
    return Pool(Limits(size=size, **kw), now=0.0)  # type: ignore[arg-type]


def test_opens_up_to_size_then_queues() -> None:
    p = make(2)
    assert p.checkout("a", 0.0) is OPEN
    p.opened("s1", 0.1)
    assert p.checkout("b", 0.1) is OPEN
    p.opened("s2", 0.2)
    assert p.checkout("c", 0.2) is None  # waits
    assert p.total == 2 and p.active == 2 and len(p.waiters) == 1
    handoffs, close = p.checkin("s1", 0.5, "a")
    assert not close
    assert [(h.client, h.server) for h in handoffs] == [("c", "s1")]
    assert abs(handoffs[0].waited_s - 0.3) < 1e-9
    assert p.active == 2 and not p.idle


def test_idle_server_is_reused_most_recent_first() -> None:
    p = make(3)
    for c, s in (("a", "s1"), ("b", "s2")):
        assert p.checkout(c, 0.0) is OPEN
        p.opened(s, 0.0)
    p.checkin("s1", 1.0, "a")
    p.checkin("s2", 2.0, "b")
    assert p.checkout("c", 3.0) == "s2"
    assert p.stats.checkouts == 3 and p.stats.opened == 2


def test_dirty_server_is_closed_and_its_slot_goes_to_a_waiter() -> None:
    p = make(1)
    assert p.checkout("a", 0.0) is OPEN
    p.opened("s1", 0.0)
    assert p.checkout("b", 0.0) is None
    handoffs, close = p.checkin("s1", 1.0, "a", clean=False, reason="client_gone_in_transaction")
    assert close
    assert [(h.client, h.server) for h in handoffs] == [("b", OPEN)]
    assert p.stats.closed == {"client_gone_in_transaction": 1}
    assert p.total == 1  # the slot is b's


def test_lifetime_closes_on_return() -> None:
    p = make(1, lifetime_s=10.0)
    assert p.checkout("a", 0.0) is OPEN
    p.opened("s1", 0.0)
    _, close = p.checkin("s1", 11.0, "a")
    assert close and p.stats.closed == {"lifetime": 1} and p.total == 0


def test_waiters_time_out_in_order() -> None:
    p = make(1, max_wait_s=1.0)
    assert p.checkout("a", 0.0) is OPEN
    p.opened("s1", 0.0)
    assert p.checkout("b", 0.0) is None
    assert p.checkout("c", 0.5) is None
    late, closing = p.expire(1.2)
    assert late == ["b"] and closing == []
    assert p.stats.wait_timeouts == 1
    handoffs, _ = p.checkin("s1", 1.3, "a")
    assert [h.client for h in handoffs] == ["c"]


def test_idle_timeout_keeps_min_idle() -> None:
    p = make(3, idle_timeout_s=5.0, min_idle=1)
    for c, s in (("a", "s1"), ("b", "s2")):
        assert p.checkout(c, 0.0) is OPEN
        p.opened(s, 0.0)
    p.checkin("s1", 1.0, "a")
    p.checkin("s2", 2.0, "b")
    late, closing = p.expire(10.0)
    assert late == [] and closing == ["s1"]  # the least recently used; s2 stays (min_idle)
    assert p.stats.closed == {"idle_timeout": 1}


def test_login_evicts_an_idle_server_but_never_exceeds_size() -> None:
    p = make(1)
    assert p.checkout("a", 0.0) is OPEN
    p.opened("s1", 0.0)
    granted, victim = p.login("b", 0.1)
    assert not granted and victim is None  # s1 is busy: the login waits
    handoffs, close = p.checkin("s1", 0.2, "a")
    assert not close
    assert [(h.client, h.server, h.evict) for h in handoffs] == [("b", OPEN, "s1")]
    assert p.total == 1
    p.opened("s2", 0.3)
    handoffs, _ = p.checkin("s2", 0.4, "b")
    assert p.idle == ["s2"]
    granted, victim = p.login("c", 0.5)
    assert granted and victim == "s2" and p.total == 1


def test_open_failure_frees_the_slot() -> None:
    p = make(1)
    assert p.checkout("a", 0.0) is OPEN
    assert p.checkout("b", 0.0) is None
    handoffs = p.open_failed("a", 0.1)
    assert [(h.client, h.server) for h in handoffs] == [("b", OPEN)]
    assert p.stats.open_failures == 1


def test_cancel_wait_and_remove() -> None:
    p = make(1)
    assert p.checkout("a", 0.0) is OPEN
    p.opened("s1", 0.0)
    assert p.checkout("b", 0.0) is None
    p.cancel_wait("b")
    assert not p.waiters
    assert p.remove("s1", 1.0, "server_closed") == []
    assert p.total == 0 and p.stats.closed == {"server_closed": 1}


def test_busy_share_and_per_application_peak() -> None:
    p = make(2)
    assert p.checkout("a", 0.0, app="web") is OPEN
    p.opened("s1", 0.0)
    assert p.checkout("b", 0.0, app="web") is OPEN
    p.opened("s2", 0.0)
    p.checkin("s1", 5.0, "a")  # all busy from 0 to 5
    p.checkin("s2", 6.0, "b")
    assert abs(p.busy_share(10.0) - 0.5) < 1e-9
    assert p.stats.max_active_by_app == {"web": 2}
    assert p.stats.max_active == 2


def test_min_idle_spares() -> None:
    p = make(3, min_idle=2)
    assert p.spares_wanted() == 2
    p.open_spare()
    p.open_spare()
    assert p.spares_wanted() == 0
    p.spare_opened("s1", 0.0)
    p.spare_opened("s2", 0.0)
    assert p.checkout("a", 1.0) == "s2"


def _figures(**kw: object) -> dict[str, object]:
    base: dict[str, object] = {
        "database": "app", "user": "web", "size": 20, "all_busy_share": 0.0,
        "wait_ms": {"p50": 0.0, "p99": 0.0, "max": 0.0}, "max_active": 20, "wait_timeouts": 0,
        "checkouts": 1000, "servers_opened": 20, "servers_closed": {}, "pinned_clients": [],
        "max_active_by_application": {}, "max_clients_by_application": {}}
    base.update(kw)
    return base


def test_advice_for_a_saturated_pool() -> None:
    from sqlproxy.pool.advice import findings, sizing

    pool = _figures(all_busy_share=0.14, wait_ms={"p50": 1.0, "p99": 38.0, "max": 50.0})
    (advice,) = sizing(pool)
    assert advice.startswith("pool.size 20: all 20 busy 14 % of the time, clients waited p99 "
                             "38 ms → 26")
    assert [f["kind"] for f in findings(pool)] == ["pool_saturated"]


def test_advice_for_an_oversized_pool_and_an_application_pool() -> None:
    from sqlproxy.pool.advice import sizing

    pool = _figures(max_active=6, max_active_by_application={"web": 6},
                    max_clients_by_application={"web": 40})
    assert sizing(pool) == [
        "pool.size 20: at most 6 server connections ever busy → 8 is enough",
        "application web: at most 6 connections ever busy of 40 opened → SQLAlchemy "
        "pool_size=6, max_overflow=4 (or the same in its own pool)"]


def test_churn_and_pinned_findings() -> None:
    from sqlproxy.pool.advice import findings

    pool = _figures(servers_opened=500, checkouts=600, servers_closed={"login": 480},
                    pinned_clients=[{"session": 3, "application_name": "web",
                                     "reason": "listen", "statement": "LISTEN x"}])
    kinds = [(f["kind"], f.get("reason")) for f in findings(pool)]
    assert kinds == [("connection_churn", None), ("session_state_in_pool", "listen")]
    assert "authenticate through" in findings(pool)[0]["suggestion"]


def _app_counts(p: Pool[str, str]) -> dict[str, int]:
    return {name: count.active for name, count in p._apps.items()}


def _carry_out(p: Pool[str, str], held: dict[str, str], handoffs: list[Handoff[str, str]],
               name: str, now: float) -> None:
    """What a session does with hand-overs: a server taken, or one opened (named ``name``)."""
    for h in handoffs:
        if h.server is OPEN:
            p.opened(name, now)
            held[h.client] = name
        else:
            assert isinstance(h.server, str)
            held[h.client] = h.server


def test_hand_on_is_checkin_without_a_handoff() -> None:
    """The fast path's check-in (``hand_on``) and queueing (``queue``) leave the pool as
    ``checkin`` and ``checkout`` do: same holders, idle list, queue, figures and
    per-application counts, over random traffic."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    ops = st.lists(st.tuples(st.sampled_from(["out", "back", "dirty", "gone", "tick"]),
                             st.integers(0, 5), st.sampled_from(["web", "jobs", None])),
                   max_size=60)

    @settings(max_examples=300, deadline=None)
    @given(ops, st.sampled_from([0.0, 2.5]))
    def run(steps: list[tuple[str, int, str | None]], lifetime: float) -> None:
        pools = [make(2, lifetime_s=lifetime), make(2, lifetime_s=lifetime)]
        holds: list[dict[str, str]] = [{}, {}]  # client -> server it holds
        now = 0.0
        opened = 0
        for op, i, app in steps:
            client = f"c{i}"
            if op == "tick":
                now += 1.0
                continue
            for k, (p, held) in enumerate(zip(pools, holds, strict=True)):
                if op == "out":
                    if client in held or any(w.client == client for w in p.waiters):
                        continue
                    if k == 1 and not (p.idle and not p.waiters) \
                            and not (p.may_open and p.total < p.limits.size and not p.waiters):
                        p.queue(Waiter(client, now, app=app))  # what the fast path does
                        continue
                    got = p.checkout(client, now, app)
                    if got is OPEN:
                        p.opened(f"s{opened}", now)
                        held[client] = f"s{opened}"
                    elif got is not None:
                        assert isinstance(got, str)
                        held[client] = got
                    continue
                if client not in held:
                    continue
                server = held.pop(client)
                if op == "gone":  # closed while lent (PoolIO.discard, then .lost)
                    handoffs = p.remove(server, now, "server_closed")
                    handoffs += p.checkin(server, now, client, clean=False,
                                          reason="server_closed")[0]
                elif op == "dirty":
                    handoffs, _ = p.checkin(server, now, client, clean=False)
                elif k == 1 and (w := p.hand_on(server, p.servers.get(server), now,
                                                client)) is not p.slow:
                    handoffs = [] if w is None else [Handoff(w.client, server, 0.0)]
                else:
                    handoffs, _ = p.checkin(server, now, client)
                _carry_out(p, held, handoffs, f"s{opened}x", now)
            if op == "out":
                opened += 1
            a, b = pools
            assert holds[0] == holds[1]
            assert (a.active, a.opening, a.idle, sorted(a.servers)) \
                == (b.active, b.opening, b.idle, sorted(b.servers))
            assert [w.client for w in a.waiters] == [w.client for w in b.waiters]
            assert a.stats == b.stats
            assert _app_counts(a) == _app_counts(b)
        for p, held in zip(pools, holds, strict=True):  # everyone gives back
            while held:
                client, server = held.popitem()
                _carry_out(p, held, p.checkin(server, now, client)[0], f"{client}-drain", now)
            assert not p.waiters and p.active == 0
            assert all(n == 0 for n in _app_counts(p).values()), _app_counts(p)

    run()


def test_wait_queue_is_a_fifo() -> None:
    """The pool's queue of waiters (a list read from its head) against a deque."""
    from collections import deque

    from hypothesis import given, settings
    from hypothesis import strategies as st

    from sqlproxy.pool.state import WaitQueue

    @settings(max_examples=300, deadline=None)
    @given(st.lists(st.sampled_from(["add", "add", "pop", "remove"]), max_size=400))
    def run(ops: list[str]) -> None:
        q: WaitQueue[int] = WaitQueue()
        model: deque[Waiter[int]] = deque()
        for n, op in enumerate(ops):
            if op == "add":
                w = Waiter(n, float(n))
                q.append(w)
                model.append(w)
            elif op == "pop" and model:
                assert q.popleft() is model.popleft()
            elif op == "remove" and model:
                w = model[len(model) // 2]
                model.remove(w)
                q.remove(w)
            assert len(q) == len(model) and bool(q) == bool(model)
            assert list(q) == list(model)
            if model:
                assert q[0] is model[0]
        assert len(q.items) - q.head == len(model)

    run()


def test_hand_on_with_a_record_of_a_forgotten_server() -> None:
    """The fast path keeps a server's record at hand: once the pool forgot the server, the
    record says so and ``hand_on`` leaves the check-in to the general rules."""
    p = make(1)
    assert p.checkout("a", 0.0) is OPEN
    p.opened("s1", 0.0)
    kept = p.servers["s1"]
    assert p.hand_on("s1", kept, 1.0, "a") is None and p.idle == ["s1"]
    assert p.checkout("b", 1.0) == "s1"
    p.remove("s1", 2.0, "server_closed")
    assert kept.gone
    assert p.hand_on("s1", kept, 3.0, "b") is p.slow
    assert p.hand_on("s1", None, 3.0, "b") is p.slow
    handoffs, close = p.checkin("s1", 3.0, "b", clean=False, reason="server_closed")
    assert close and handoffs == [] and p.active == 0
