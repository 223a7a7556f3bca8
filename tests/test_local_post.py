"""Local posts (node.post): into the node's own mailbox, without the transport, from a
thread or a signal handler; the core on virtual time, then both adapters."""

from __future__ import annotations

import asyncio
import os
import signal
import threading

import pytest

from reliable import AsyncNode, Node, wire

from .harness import B, Pair


def test_a_post_is_admitted_as_an_arrival_order_limits_and_refusals() -> None:
    p = Pair(release=False)
    e = p.b.endpoint
    p.b.create_mailbox("box", capacity=2)
    for i in range(3):
        assert e.post("box", b"p%d" % i, source=B, now=p.now) is None
    stats = e.stats().mailbox("box")
    assert (stats.messages, stats.parked) == (2, 1), "full: the third one parks"
    got = [e.take("box", now=p.now) for _ in range(3)]
    assert [m.data for m in got if m] == [b"p0", b"p1", b"p2"]
    assert all(m is not None and m.source == B and m.incarnation == 0 for m in got)
    assert e.post("nope", b"x", source=B, now=p.now) == wire.Verdict.NO_MAILBOX
    assert e.stats().dropped["refused.no_mailbox"] == 1
    assert e.post("box", b"hi", source=B, priority=5, now=p.now) is None
    assert e.post("box", b"lo", source=B, now=p.now) is None
    assert [e.take("box", now=p.now).data for _ in range(2)] == [b"hi", b"lo"]  # type: ignore[union-attr]


@pytest.mark.loopback
def test_a_thread_and_a_signal_handler_post_to_a_waiting_receiver() -> None:
    with Node() as node:
        box = node.create_mailbox("irq")
        threading.Timer(0.1, lambda: node.post("irq", b"from a thread")).start()
        msg = box.receive(timeout=5)
        assert (msg.data, msg.source) == (b"from a thread", node.address)

        def handler(signum: int, frame: object) -> None:
            node.post("irq", b"interrupt %d" % signum)  # runs inside box.receive below

        old = signal.signal(signal.SIGUSR1, handler)
        try:
            threading.Timer(0.1, lambda: os.kill(os.getpid(), signal.SIGUSR1)).start()
            msg = box.receive(timeout=5)  # the main thread waits (holding the node) here
        finally:
            signal.signal(signal.SIGUSR1, old)
        assert msg.data == b"interrupt %d" % signal.SIGUSR1
        node.post("missing", b"x")
        assert box.receive_nowait() is None
        deadline = 50
        while node.stats().dropped.get("refused.no_mailbox", 0) == 0 and deadline:
            box.receive_nowait()  # a call drives the node
            deadline -= 1
            threading.Event().wait(0.01)
        assert node.stats().dropped["refused.no_mailbox"] == 1


@pytest.mark.loopback
def test_async_node_posts_from_the_loop_and_from_another_thread() -> None:
    async def main() -> None:
        async with AsyncNode() as node:
            box = node.create_mailbox("q", capacity=1)
            node.post("q", b"one")
            thread = threading.Thread(target=node.post, args=("q", b"two"))
            thread.start()
            thread.join()
            assert (await box.receive(timeout=5)).data == b"one"
            got = await box.receive(timeout=5)  # parked while full, then in
            assert (got.data, got.source) == (b"two", node.address)

    asyncio.run(asyncio.wait_for(main(), 30))


def test_a_thread_that_posts_then_receives_sees_all_its_posts() -> None:
    """Read your own posts: a receive right after a drive (so it takes what is queued
    without another) used to find the posts admitted so far but not the later ones, and
    receive_many returned a partial list (docs/mailboxes.md's consumer example, 3 in 40)."""
    with Node() as node:
        box = node.create_mailbox("mine")
        for i in range(20):
            node.post("mine", b"a%d" % i)
            node.post("mine", b"b%d" % i)
            assert box.receive(timeout=5).data == b"a%d" % i  # a drive: the node is fresh
            node.post("mine", b"c%d" % i)  # queued, not yet admitted
            got = [m.data for m in box.receive_many(5, timeout=5)]
            assert got == [b"b%d" % i, b"c%d" % i]
