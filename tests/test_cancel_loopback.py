"""Cancelled sends and closing nodes over real UDP on 127.0.0.1.

Cancelling withdraws a message while it can be withdrawn (the receiver never
gets it) and otherwise leaves its fate learnable; ``close()`` tells every
peer (CLOSE) before the socket goes, even through a full socket or a thread
stalled while driving the node, so a message whose send failed is never
received afterwards.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from netem.socket import FaultySocket
from reliable import (
    AsyncNode,
    AsyncSendHandle,
    Node,
    ReceiveTimeout,
    SendAborted,
    SendCancelled,
    events,
)
from reliable.driver import open_socket

pytestmark = pytest.mark.loopback

BIG = 8 << 20  # the reported case: an 8 MiB transfer


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(asyncio.wait_for(coro, 60))


def _slow_socket() -> FaultySocket:
    """A sender socket whose path takes 50 ms: an 8 MiB transfer spans several round trips."""
    return FaultySocket(open_socket("127.0.0.1:0"), "delay 50ms", seed=1)


def _dest(address: Any, mailbox: str = "") -> str:
    host, port = address[:2]
    return f"{host}:{port}/{mailbox}" if mailbox else f"{host}:{port}"


class _Fates:
    """An ``on_event`` observer: the outcome events of the sending node, by ticket."""

    def __init__(self) -> None:
        self.by_ticket: dict[int, list[events.Event]] = {}
        self.peer_closed = 0

    def __call__(self, event: events.Event) -> None:
        if isinstance(event, (events.MessageDelivered, events.MessageFailed)):
            self.by_ticket.setdefault(event.ticket, []).append(event)
        elif isinstance(event, events.PeerClosed):
            self.peer_closed += 1

    def the_failure(self) -> events.MessageFailed:
        """The one failed send (and every send had one outcome)."""
        assert all(len(fates) == 1 for fates in self.by_ticket.values())
        (fate,) = [f[0] for f in self.by_ticket.values() if isinstance(f[0], events.MessageFailed)]
        assert isinstance(fate, events.MessageFailed)
        return fate


def _wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, "condition not reached in time"
        time.sleep(0.01)


# ------------------------------------------------------------------ asyncio


def test_cancelling_an_8_mib_send_mid_way_withdraws_it() -> None:
    fates = _Fates()

    async def main() -> None:
        async with AsyncNode(sock=_slow_socket(), on_event=fates) as a, AsyncNode() as b:
            await a.send(b.address, b"warm-up")  # the path is validated: timing below is data
            await b.receive(timeout=5)
            task = asyncio.create_task(a.send(b.address, os.urandom(BIG)))
            await asyncio.sleep(0.12)  # a couple of round trips: part of it is out
            assert not task.done()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            fate = fates.the_failure()
            assert isinstance(fate.error, SendCancelled) and fate.error.delivered is False
            assert fate.error.stage == "partial"
            await a.send(b.address, b"after")
            assert (await b.receive(timeout=5)).data == b"after", "the 8 MiB never arrives"
            with pytest.raises(ReceiveTimeout):
                await b.receive(timeout=0.5)
            assert b.stats().receive_bytes == 0

    run(main())


def test_a_cancelled_send_parked_at_a_rendezvous_is_never_taken() -> None:
    fates = _Fates()

    async def main() -> None:
        async with AsyncNode(on_event=fates) as a, AsyncNode() as b:
            box = b.create_mailbox("meet", 0)
            task = asyncio.create_task(a.send(_dest(b.address, "meet"), b"knock"))
            await asyncio.sleep(0.3)  # parked at B; A knows it waits
            assert box.stats().parked == 1
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await asyncio.sleep(0.3)  # the Cancel reaches B
            with pytest.raises(ReceiveTimeout):
                await box.receive(timeout=0.5)  # a receiver arriving later gets nothing
            fate = fates.the_failure()
            assert isinstance(fate.error, SendCancelled) and fate.error.stage == "parked"
            assert box.stats().discarded == 1

    run(main())


def test_withdraw_keeps_the_handle_live_for_the_real_fate() -> None:
    async def main() -> None:
        async with AsyncNode() as a, AsyncNode() as b:
            box = b.create_mailbox("meet", 0)
            handle = a.send_nowait(_dest(b.address, "meet"), b"knock")
            assert isinstance(handle, AsyncSendHandle) and handle.ticket > 0
            await asyncio.sleep(0.3)
            assert handle.withdraw() is False, "parked: asked back, the answer decides"
            with pytest.raises(SendCancelled) as caught:
                await asyncio.wait_for(handle, 5)
            assert caught.value.delivered is False
            assert box.receive_nowait() is None
            done = a.send_nowait(b.address, b"quick")
            await done
            assert done.withdraw() is False  # already delivered

    run(main())


def test_a_send_that_can_no_longer_be_withdrawn_reports_its_receipt() -> None:
    async def main() -> None:
        async with AsyncNode(sock=_slow_socket()) as a, AsyncNode() as b:
            handle = a.send_nowait(b.address, b"small")  # leaves at once, whole
            assert handle.withdraw() is False
            receipt = await asyncio.wait_for(handle, 5)
            assert receipt.size == 5
            assert (await b.receive(timeout=5)).data == b"small"

    run(main())


# ----------------------------------------------------------------- blocking


def test_send_handle_cancel_withdraws_a_transfer_in_progress() -> None:
    with Node(sock=_slow_socket()) as a, Node() as b:
        a.send(b.address, b"warm-up")
        b.receive(timeout=5)
        handle = a.send_nowait(b.address, os.urandom(BIG))
        time.sleep(0.12)
        assert handle.cancel() is True
        with pytest.raises(SendCancelled) as caught:
            handle.result(0)  # known at once
        assert (caught.value.stage, caught.value.delivered) == ("partial", False)
        assert handle.cancel() is False, "already done"
        a.send(b.address, b"after")
        assert b.receive(timeout=5).data == b"after"
        with pytest.raises(ReceiveTimeout):
            b.receive(timeout=0.5)


def test_send_handle_cancel_of_a_parked_message_reports_the_receivers_answer() -> None:
    with Node() as a, Node() as b:
        box = b.create_mailbox("meet", 0)
        handle = a.send_nowait(_dest(b.address, "meet"), b"knock")
        _wait_until(lambda: box.stats().parked == 1)
        time.sleep(0.1)  # A heard of the deferral
        assert handle.cancel() is False, "not certain yet: the receiver answers"
        with pytest.raises(SendCancelled) as caught:
            handle.result(5)
        assert caught.value.stage == "parked"
        with pytest.raises(ReceiveTimeout):
            box.receive(timeout=0.3)


# ---------------------------------------------------------------- closing


class _JammedSocket:
    """A socket whose sends fail with EAGAIN while ``jammed`` (a full send buffer)."""

    def __init__(self) -> None:
        self._sock = open_socket("127.0.0.1:0")
        self.family = self._sock.family
        self.jammed = False
        self.refused = 0

    def fileno(self) -> int:
        return self._sock.fileno()

    def recvfrom(self, bufsize: int, /) -> tuple[bytes, Any]:
        return self._sock.recvfrom(bufsize)

    def sendto(self, data: bytes, address: Any, /) -> int:
        if self.jammed:
            self.refused += 1
            raise BlockingIOError
        return self._sock.sendto(data, address)

    def getsockname(self) -> Any:
        return self._sock.getsockname()

    def setblocking(self, flag: bool, /) -> None:
        self._sock.setblocking(flag)

    def close(self) -> None:
        self._sock.close()


def _park_three(receiver_box: Any, send: Callable[[bytes], Any]) -> list[Any]:
    """Four sends to a capacity-1 mailbox: the first gets in, three park."""
    handles = [send(b"m%d" % i) for i in range(4)]
    _wait_until(lambda: receiver_box.stats().parked == 3)
    return handles


def _assert_told(b: Node, box: Any, watcher: _Fates) -> None:
    _wait_until(lambda: watcher.peer_closed == 1, timeout=3.0)
    assert b.stats().peers == () and box.stats().parked == 0
    got = []
    while (m := box.receive_nowait()) is not None:
        got.append(m.data)
    assert got == [b"m0"], "a message whose send failed was received"


def test_close_gets_close_out_through_a_full_socket() -> None:
    watcher = _Fates()
    jammed = _JammedSocket()
    with Node(on_event=watcher) as b:
        box = b.create_mailbox("box", 1)
        a = Node(sock=jammed)
        handles = _park_three(box, lambda m: a.send_nowait(_dest(b.address, "box"), m))
        jammed.jammed = True
        threading.Timer(1.3, lambda: setattr(jammed, "jammed", False)).start()
        a.close(1.0)  # its CLOSE meets a full socket; the socket frees up 0.3 s later
        assert jammed.refused > 0
        for h in handles[1:]:
            assert isinstance(h.exception(5), SendAborted)
        _assert_told(b, box, watcher)


def test_close_gets_close_out_through_a_full_socket_asyncio() -> None:
    watcher = _Fates()
    jammed = _JammedSocket()

    async def main() -> None:
        async with AsyncNode(on_event=watcher) as b:
            box = b.create_mailbox("box", 1)
            a = await AsyncNode(sock=jammed).start()
            handles = [a.send_nowait(_dest(b.address, "box"), b"m%d" % i) for i in range(4)]
            while box.stats().parked < 3:
                await asyncio.sleep(0.01)
            jammed.jammed = True
            asyncio.get_running_loop().call_later(1.3, setattr, jammed, "jammed", False)
            await a.close(1.0)
            assert jammed.refused > 0
            for h in handles[1:]:
                assert isinstance(h.exception(), SendAborted)
            for _ in range(300):
                if watcher.peer_closed:
                    break
                await asyncio.sleep(0.01)
            assert watcher.peer_closed == 1
            assert b.stats().peers == () and box.stats().parked == 0
            assert box.receive_nowait().data == b"m0"  # type: ignore[union-attr]
            assert box.receive_nowait() is None

    run(main())


def test_close_tells_the_peer_even_when_the_background_thread_is_stalled() -> None:
    """Under load the thread that drove the node last (here a's background thread)
    may not run again until after close() gave up waiting for it (a done-callback
    holds it for 2.6 s, past close(1.0)'s 2 s wait); close() drives the flush itself."""
    watcher = _Fates()
    with Node(on_event=watcher) as b:
        box = b.create_mailbox("box", 1)
        gate = b.create_mailbox("gate", 0)
        a = Node()
        handles = _park_three(box, lambda m: a.send_nowait(_dest(b.address, "box"), m))
        stall = a.send_nowait(_dest(b.address, "gate"), b"stall")
        _wait_until(lambda: gate.stats().parked == 1)
        stall.add_done_callback(lambda _h: time.sleep(2.6))  # on a's background thread
        gate.receive(timeout=5)  # a's background thread hears it, stalls in the callback
        time.sleep(0.05)
        a.close(1.0)
        for h in handles[1:]:
            assert isinstance(h.exception(5), SendAborted)
        _assert_told(b, box, watcher)


def _close_with_bulk_in_flight() -> None:
    watcher = _Fates()
    with Node(on_event=watcher) as b:
        box = b.create_mailbox("box", 1)
        a = Node()
        handles = _park_three(box, lambda m: a.send_nowait(_dest(b.address, "box"), m))
        bulk = [a.send_nowait(b.address, os.urandom(4 << 20)) for _ in range(4)]
        a.close(1.0)
        for h in handles[1:]:
            assert isinstance(h.exception(5), SendAborted)
        for h in bulk:
            h.wait(5)
        _assert_told(b, box, watcher)


def test_close_under_load_always_tells_the_peer() -> None:
    """The reported scenario: messages parked at a capacity-1 mailbox and megabytes in
    flight when close(1.0) ends the flush; the receiver must drop the session and the
    parked messages, and never hand out a message whose send failed."""
    for _ in range(3):
        _close_with_bulk_in_flight()
