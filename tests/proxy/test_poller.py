"""The relay's readiness watch (``_sockio.Poller`` through ``pump.add_reader``): one loop
reader for every relayed socket, callbacks called while their socket is readable, nothing
left behind."""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import time
from collections.abc import Callable

import pytest

from sqlproxy.analysis.profiler import Profiler
from sqlproxy.analysis.statement import SessionInfo
from sqlproxy.config import AnalysisSection
from sqlproxy.proxy import _sockio, pump
from sqlproxy.proxy.recorder import PooledRecorder
from sqlproxy.wire.conversation import Conversation


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


def test_the_after_callback_runs_once_after_each_batch_that_had_sockets() -> None:
    """``set_after``: called with no arguments once the batch's sockets had their turn; not
    for a dispatch that found nothing; its error is raised like a socket callback's (after a
    socket callback's error, it goes to sys.unraisablehook)."""
    poller = _sockio.Poller()
    pairs = [socket.socketpair() for _ in range(2)]
    calls: list[str] = []
    try:
        for i, (x, _y) in enumerate(pairs):
            poller.add(x.fileno(), lambda now, i=i, x=x: (calls.append(f"read {i}"), x.recv(9)))
        poller.set_after(lambda: calls.append("after"))
        poller.dispatch()
        assert calls == []  # nothing readable: no batch
        for _, y in pairs:
            y.send(b"z")
        poller.dispatch()
        assert sorted(calls[:2]) == ["read 0", "read 1"] and calls[2:] == ["after"]

        def boom() -> None:
            raise RuntimeError("after")

        poller.set_after(boom)
        pairs[0][1].send(b"z")
        with pytest.raises(RuntimeError, match="after"):
            poller.dispatch()
        with pytest.raises(TypeError):
            poller.set_after("not callable")  # type: ignore[arg-type]
        poller.set_after(None)
        calls.clear()
        pairs[1][1].send(b"z")
        poller.dispatch()
        assert calls == ["read 1"]
    finally:
        poller.close()
        for x, y in pairs:
            x.close()
            y.close()


def _holding(profiler: Profiler, sql: str) -> Conversation:
    """A pooled session's conversation holding back the record of ``sql``, a SELECT
    answered whole (``feed_backend(..., hold=True)``, as the pooled fast path feeds it)."""

    class Session:
        def statement_event(self, *args: object) -> None:
            pass

    conv = Conversation(PooledRecorder(profiler, Session(), SessionInfo(1, "p", "d", "u")),
                        1 << 20)
    text = sql.encode() + b"\0"
    conv.query_sent(b"Q" + struct.pack("!i", len(text) + 4) + text, 1.0)
    answer = (b"T" + struct.pack("!ih", 6, 0) + b"D" + struct.pack("!ih", 6, 0)
              + b"C" + struct.pack("!i", 13) + b"SELECT 1\0" + b"Z" + struct.pack("!i", 5) + b"I")
    conv.feed_backend(answer, 2.0, hold=True)
    assert conv.h_entry is not None
    return conv


def test_the_loop_s_batch_makes_its_records_after_each_poller_batch_and_when_it_goes() -> None:
    """What a socket's callback leaves in its Batch (``add_reader`` returns the loop's one)
    is made once the batch's sockets had their turn, in the order it was left; when the loop's
    last relayed socket goes, so does the poller, and what its batch still held is made."""
    profiler = Profiler(AnalysisSection())

    async def main() -> list[object]:
        loop = asyncio.get_running_loop()
        a, b = socket.socketpair()
        c, d = socket.socketpair()
        seen: list[object] = []
        done = asyncio.Event()

        def on(sock: socket.socket) -> Callable[[float], None]:
            def readable(now: float) -> None:
                for sql in sock.recv(99).decode().split():
                    seen.append((sql, profiler.executions))
                    batch.held.append(_holding(profiler, f"select {sql}"))
                if len(seen) == 3:
                    done.set()
            return readable

        try:
            batch = pump.add_reader(loop, a.fileno(), on(a))
            assert pump.add_reader(loop, c.fileno(), on(c)) is batch  # the loop's one batch
            b.send(b"1 2")
            d.send(b"3")
            await asyncio.wait_for(done.wait(), 5)
            await asyncio.sleep(0.05)
            assert profiler.executions == 3
            batch.held.append(_holding(profiler, "select 4"))
            pump.remove_reader(loop, a.fileno())
            assert profiler.executions == 3
            pump.remove_reader(loop, c.fileno())  # the poller goes: what it held is made
            assert profiler.executions == 4 and loop not in pump._pollers
            return seen
        finally:
            for s in (a, b, c, d):
                s.close()

    seen = asyncio.run(main())
    # Read in one batch (both sockets were ready): no record made before all were read.
    assert sorted(seen) == [("1", 0), ("2", 0), ("3", 0)]


def test_the_poller_goes_even_if_a_record_it_held_fails() -> None:
    """A record that fails when the loop's last relayed socket goes (a bug path) does not
    leave the poller open or the loop watching it: its error is raised once both are gone."""

    class Failing:
        def record_held(self) -> None:
            raise RuntimeError("record failed")

    async def main() -> None:
        loop = asyncio.get_running_loop()
        a, b = socket.socketpair()
        try:
            batch = pump.add_reader(loop, a.fileno(), lambda now: None)
            poller = pump._pollers[loop]
            fd = poller.fileno()
            batch.held.append(Failing())  # type: ignore[arg-type]
            with pytest.raises((RuntimeError, TypeError)):
                pump.remove_reader(loop, a.fileno())
            assert loop not in pump._pollers and loop not in pump._batches
            assert not loop.remove_reader(fd)  # the loop no longer watches it
            assert not batch.held
        finally:
            a.close()
            b.close()

    asyncio.run(main())
