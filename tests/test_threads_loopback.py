"""Many threads on one node, through a lossy link: the leader/follower Node loses no
wake-up and starves no thread.

Four sender threads (blocking ``send``, ``send_nowait`` handles, ``send_many``)
share one node; three receiver threads (``receive`` with no timeout, and
``receive_many``) share the other. A receiver that missed its wake-up would
block for ever, and a sender waiting on a handle whose outcome was routed by
another thread likewise: the whole exchange must end within a bound, with
every message received exactly once and every sender told it was delivered.
"""

from __future__ import annotations

import threading
import time
from collections import Counter

import pytest

from netem import Impairment
from netem.socket import FaultySocket
from reliable import Config, Node
from reliable import node as node_module
from reliable.driver import open_socket

pytestmark = [pytest.mark.loopback]

LINK = Impairment(loss=0.05, duplicate=0.02, reorder=0.05, delay=0.0003, jitter=0.0003)
SENDERS = 4
RECEIVERS = 3
PER_SENDER = 240
BOUND = 90.0  # seconds for the whole exchange; it takes about two on an idle machine
STOP = b"stop"


def _sender(node: Node, dest: tuple[str, int], sid: int, errors: list[BaseException]) -> None:
    try:
        messages = [b"%d:%d" % (sid, i) for i in range(PER_SENDER)]
        style = sid % 3
        if style == 0:  # one blocking send at a time: this thread waits on each receipt
            for m in messages:
                node.send(dest, m, timeout=BOUND)
        elif style == 1:  # handles, waited on in bulk (outcomes routed by other threads)
            handles = [node.send_nowait(dest, m, timeout=BOUND) for m in messages]
            for h in handles:
                h.result(BOUND)
        else:  # one batch handle for all
            batch = node.send_many(dest, messages, timeout=BOUND)
            assert batch.failures(BOUND) == {}
            assert len(batch.result(0)) == PER_SENDER
    except BaseException as exc:  # reported by the test thread
        errors.append(exc)


def _receiver(node: Node, rid: int, got: list[bytes], errors: list[BaseException]) -> None:
    try:
        while True:
            # No timeout: a receiver that misses its wake-up hangs here.
            batch = node.receive_many(16) if rid % 2 else [node.receive()]
            for m in batch:
                if m.data == STOP:
                    return
                got.append(m.data)
    except BaseException as exc:
        errors.append(exc)


@pytest.mark.timeout(int(BOUND) + 60)
def test_many_threads_send_and_receive_every_message_exactly_once() -> None:
    config = Config(peer_timeout=30.0)
    rx = FaultySocket(open_socket("127.0.0.1:0"), LINK, incoming=LINK, seed=41)
    with Node(sock=rx, config=config) as b, Node(config=config) as a:
        dest = b.address
        errors: list[BaseException] = []
        got: list[list[bytes]] = [[] for _ in range(RECEIVERS)]
        receivers = [
            threading.Thread(target=_receiver, args=(b, r, got[r], errors), name=f"rx{r}")
            for r in range(RECEIVERS)
        ]
        senders = [
            threading.Thread(target=_sender, args=(a, dest, s, errors), name=f"tx{s}")
            for s in range(SENDERS)
        ]
        started = time.monotonic()
        for t in receivers + senders:
            t.start()
        for t in senders:
            t.join(max(0.1, started + BOUND - time.monotonic()))
        assert not any(t.is_alive() for t in senders), "a sender never heard its outcome"
        senders_done = time.monotonic()
        a.send_many(dest, [STOP] * RECEIVERS).result(BOUND)
        for t in receivers:
            t.join(max(0.1, started + BOUND - time.monotonic()))
        # (the elapsed time tells a lost wake-up from a budget a loaded machine used up)
        assert not any(t.is_alive() for t in receivers), (
            f"a receiver missed its wake-up ({time.monotonic() - started:.1f} s after the "
            f"start, senders done at {senders_done - started:.1f} s)"
        )
        assert errors == []
        received = Counter(m for part in got for m in part)
        expected = {b"%d:%d" % (s, i) for s in range(SENDERS) for i in range(PER_SENDER)}
        assert set(received) == expected
        assert max(received.values()) == 1, "a message was received twice"
        # No receiver starved: each was served while the others waited too.
        assert all(len(part) > 0 for part in got), [len(part) for part in got]
        # Within one receiver, each sender's messages keep their order.
        for part in got:
            for s in range(SENDERS):
                seq = [int(m.split(b":")[1]) for m in part if m.startswith(b"%d:" % s)]
                assert seq == sorted(seq)


def test_a_send_made_while_the_background_thread_polls_is_retransmitted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A send by a caller while another thread leads (asleep in poll) arms the core's
    retransmission timer; the leader must learn of it, or a lost first datagram
    waits for whatever timer the leader had (here the 30 s idle timeout).

    The node looks its copy of the core's timer up at most every TIMER_SLACK
    seconds; the race (a send within TIMER_SLACK of the leader's look-up) is made
    certain by widening the slack. The application never calls the node while it
    waits (``done()`` only reads the handle), so only the leader can retransmit.
    """
    monkeypatch.setattr(node_module, "TIMER_SLACK", 3600.0)
    sock = FaultySocket(open_socket("127.0.0.1:0"), Impairment())
    with Node() as b, Node(sock=sock) as a:
        a.send(b.address, b"hello", timeout=5)  # the session is up; now idle
        for attempt in range(3):
            time.sleep(0.05)  # no calls: the background thread leads, polling
            sock.partition("up")
            handle = a.send_nowait(b.address, b"lost once %d" % attempt)
            sock.heal("up")
            deadline = time.monotonic() + 5.0
            while not handle.done() and time.monotonic() < deadline:
                time.sleep(0.01)
            assert handle.done(), "the lost datagram was never retransmitted"
            assert handle.result(0).size == len(b"lost once 0")
        assert sock.counters.dropped >= 3
