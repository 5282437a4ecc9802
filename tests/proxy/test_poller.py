"""The relay's readiness watch (``_sockio.Poller`` through ``pump.add_reader``): one loop
reader for every relayed socket, callbacks called while their socket is readable, nothing
left behind."""

from __future__ import annotations

import asyncio
import os
import socket
import time

import pytest

from sqlproxy.proxy import _sockio, pump


def test_poller_calls_back_while_readable_and_forgets_removed_sockets() -> None:
    poller = _sockio.Poller()
    a, b = socket.socketpair()
    c, d = socket.socketpair()
    calls: list[str] = []
    try:
        poller.add(a.fileno(), lambda now: calls.append("a"))
        poller.add(c.fileno(), lambda now: calls.append("c"))
        assert len(poller) == 2
        poller.dispatch()
        assert calls == []  # nothing to read
        b.send(b"x")
        poller.dispatch()
        poller.dispatch()  # level-triggered: still unread, called again
        assert calls == ["a", "a"]
        a.recv(1)
        calls.clear()
        d.send(b"y")
        poller.add(c.fileno(), lambda now: calls.append("c2"))  # a new callback, one watch
        assert len(poller) == 2
        poller.dispatch()
        assert calls == ["c2"]
        assert poller.remove(c.fileno())
        assert not poller.remove(c.fileno())
        calls.clear()
        poller.dispatch()
        assert calls == [] and len(poller) == 1
    finally:
        poller.close()
        for s in (a, b, c, d):
            s.close()
    with pytest.raises(ValueError):
        poller.fileno()
    poller.dispatch()  # closed: nothing to do


def test_poller_callback_errors_propagate_after_the_others_had_their_turn() -> None:
    poller = _sockio.Poller()
    pairs = [socket.socketpair() for _ in range(3)]
    calls: list[int] = []

    def failing(now: float) -> None:
        raise RuntimeError("boom")

    try:
        for i, (x, y) in enumerate(pairs):
            poller.add(x.fileno(), failing if i == 0 else (lambda now, i=i: calls.append(i)))
            y.send(b"z")
        with pytest.raises(RuntimeError, match="boom"):
            poller.dispatch()
        assert sorted(calls) == [1, 2]  # a failing callback does not keep the others waiting
        with pytest.raises(TypeError):
            poller.add(pairs[0][0].fileno(), "not callable")  # type: ignore[arg-type]
        with pytest.raises(ValueError):
            poller.add(-1, failing)
    finally:
        poller.close()
        for x, y in pairs:
            x.close()
            y.close()


def test_a_callback_may_remove_its_own_and_other_sockets_and_close_the_poller() -> None:
    async def main() -> list[str]:
        loop = asyncio.get_running_loop()
        a, b = socket.socketpair()
        c, d = socket.socketpair()
        calls: list[str] = []

        def on_a(now: float) -> None:
            calls.append("a")
            pump.remove_reader(loop, a.fileno())
            pump.remove_reader(loop, c.fileno())  # the last one: the poller goes
            done.set()

        def on_c(now: float) -> None:
            calls.append("c")
            pump.remove_reader(loop, c.fileno())
            pump.remove_reader(loop, a.fileno())
            done.set()

        done = asyncio.Event()
        try:
            pump.add_reader(loop, a.fileno(), on_a)
            pump.add_reader(loop, c.fileno(), on_c)
            assert loop in pump._pollers
            b.send(b"1")
            d.send(b"2")
            await asyncio.wait_for(done.wait(), 5)
            await asyncio.sleep(0.05)
            assert loop not in pump._pollers
            return calls
        finally:
            for s in (a, b, c, d):
                s.close()

    before = set(os.listdir("/proc/self/fd"))
    calls = asyncio.run(main())
    assert len(calls) == 1  # the first callback removed the other's socket: not called
    assert set(os.listdir("/proc/self/fd")) <= before  # the epoll descriptor is closed


def test_callbacks_get_the_batch_time_of_perf_counter() -> None:
    """Every callback of one dispatch gets the same time, read once as time.perf_counter reads
    it (pump.POLL_CLOCK), at or after the moment the sockets became readable."""
    poller = _sockio.Poller()
    pairs = [socket.socketpair() for _ in range(3)]
    times: list[float] = []
    try:
        for x, y in pairs:
            poller.add(x.fileno(), times.append)
            y.send(b"z")
        before = time.perf_counter()
        poller.dispatch()
        after = time.perf_counter()
        assert len(times) == 3 and len(set(times)) == 1
        assert pump.POLL_CLOCK
        assert before <= times[0] <= after
    finally:
        poller.close()
        for x, y in pairs:
            x.close()
            y.close()
