"""The asyncio AsyncNode over real UDP on 127.0.0.1."""

from __future__ import annotations

import asyncio
import time

import pytest

from netem import Impairment
from netem.socket import FaultySocket
from reliable import AsyncNode, Config, NodeClosed, PeerUnreachable, ReceiveTimeout, UsageError
from reliable.driver import DRIVE_GAP, HOLD_MAX, open_socket

from .conftest import free_port

pytestmark = pytest.mark.loopback


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(asyncio.wait_for(coro, 30))


def test_send_receive_and_receipt() -> None:
    async def main() -> None:
        async with AsyncNode() as a, AsyncNode() as b:
            receipt = await a.send(b.address, b"hi", msg_type=3)
            assert receipt.peer == b.address and receipt.incarnation == b.incarnation
            msg = await b.receive(timeout=2)
            assert (msg.data, msg.msg_type, msg.source) == (b"hi", 3, a.address)

    run(main())


def test_pipelined_futures_and_order() -> None:
    async def main() -> None:
        async with AsyncNode() as a, AsyncNode() as b:
            msgs = [b"%05d" % i * (i % 40) for i in range(3000)]
            futures = [a.send_nowait(b.address, m) for m in msgs]
            got = [(await b.receive(timeout=5)).data for _ in msgs]
            assert got == msgs
            receipts = await asyncio.gather(*futures)
            assert [r.size for r in receipts] == [len(m) for m in msgs]

    run(main())


def test_a_burst_in_one_loop_turn_leaves_in_several_datagrams() -> None:
    """Sends to a busy peer made in one loop turn share datagrams, but at most HOLD_MAX
    of them: 256 small messages once left as one 64 KiB loopback datagram, so that
    under loss the whole window hung on one datagram and its retransmission timer
    (no later datagram's ack could report the gap), and a lost ack resent all 256."""

    async def main() -> None:
        sock = FaultySocket(open_socket("127.0.0.1:0"), Impairment())
        async with AsyncNode(sock=sock) as a, AsyncNode() as b:
            first = a.send_nowait(b.address, b"first")  # idle peer: leaves at once
            await first  # the session is up: first contact no longer limits what leaves
            before = sock.counters.seen
            burst = [b"%03d" % i for i in range(256)]
            handles = [a.send_nowait(b.address, m) for m in burst]  # one loop turn
            assert sock.counters.seen - before >= len(burst) // HOLD_MAX - 1
            await asyncio.gather(first, *handles)
            got = [(await b.receive(timeout=5)).data for _ in range(len(burst) + 1)]
            assert got == [b"first", *burst]

    run(main())


def test_a_coroutine_that_never_yields_still_hears_its_peers() -> None:
    """Taking queued messages (or sending) in a loop does not yield to the event loop,
    so the socket's reader callback does not run meanwhile; the node reads the socket
    itself every DRIVE_GAP, as a blocking Node's caller does. Before, what arrived
    waited for the loop: its acks went out late and the sender's RTT estimate (and
    so its retransmission timer) grew with how long the coroutine ran."""

    async def main() -> None:
        async with AsyncNode() as a, AsyncNode() as b:
            await asyncio.gather(*(a.send_nowait(b.address, b"q%d" % i) for i in range(20)))
            late = a.send_nowait(b.address, b"late")  # in b's socket now; b's loop is idle
            got = []
            for _ in range(21):  # no await: the loop never turns
                time.sleep(DRIVE_GAP * 2)
                message = b.receive_nowait()
                if message is None:
                    break
                got.append(message.data)
            assert got == [b"q%d" % i for i in range(20)] + [b"late"]
            assert (await late).size == 4

    run(main())


def test_receive_timeouts_and_nowait() -> None:
    async def main() -> None:
        async with AsyncNode() as b:
            assert b.receive_nowait() is None
            with pytest.raises(ReceiveTimeout):
                await b.receive(timeout=0.1)

    run(main())


def test_selective_receive_and_dead_source() -> None:
    async def main() -> None:
        cfg = Config(peer_timeout=0.5, initial_rto=0.05)
        async with AsyncNode(config=cfg) as a, AsyncNode() as b, AsyncNode() as c:
            await a.send(c.address, b"a")
            await b.send(c.address, b"b")
            assert (await c.receive(source=b.address, timeout=2)).data == b"b"
            assert (await c.receive(timeout=2)).data == b"a"
            with pytest.raises(PeerUnreachable):
                await a.receive(source=f"127.0.0.1:{free_port()}", timeout=10)
            with pytest.raises(PeerUnreachable):
                await a.send(f"127.0.0.1:{free_port()}", b"x")

    run(main())


def test_close_flushes_and_refuses_more() -> None:
    async def main() -> None:
        async with AsyncNode() as b:
            a = await AsyncNode().start()
            futures = [a.send_nowait(b.address, b"x" * 3000) for _ in range(100)]
            await a.close(timeout=5)
            assert all(f.done() and f.exception() is None for f in futures)
            for _ in futures:
                await b.receive(timeout=2)
            with pytest.raises(NodeClosed):
                a.send_nowait(b.address, b"late")

    run(main())


def test_misuse_is_reported_before_start_or_send() -> None:
    async def main() -> None:
        node = AsyncNode()
        with pytest.raises(UsageError, match="start"):
            node.send_nowait("127.0.0.1:9", b"x")
        async with node:
            with pytest.raises(UsageError, match="timeout"):
                await node.send("127.0.0.1:9", b"x", timeout=0)

    run(main())


def test_request_reply_never_loses_a_wakeup() -> None:
    """A reply arriving in the same loop turn in which the receiver starts waiting
    must still wake it (an Event pulsed set()+clear() used to lose that wake-up)."""

    async def main() -> None:
        async with AsyncNode() as server, AsyncNode() as client:

            async def echo() -> None:
                for _ in range(2000):
                    msg = await server.receive(timeout=5)
                    server.send_nowait(msg.source, msg.data)

            echoing = asyncio.ensure_future(echo())
            for i in range(2000):
                client.send_nowait(server.address, b"%d" % i)
                assert (await client.receive(timeout=5)).data == b"%d" % i
            await echoing

    run(main())


def test_a_received_message_leaves_the_loop_timer_armed_within_the_turn() -> None:
    """The reader callback that hands a waiting coroutine its message re-arms the loop
    timer after that coroutine ran (it usually pumps and arms anyway, replying); a
    coroutine that then leaves the node alone must still find the timer at the core's
    next deadline by the end of the turn, or a held ack or a retransmission would wait
    for the next datagram."""

    async def main() -> None:
        async with AsyncNode() as a, AsyncNode() as b:
            # a conversation, so that b's core holds its ack for a reply (a timer)
            a.send_nowait(b.address, b"hello")
            assert (await b.receive(timeout=2)).data == b"hello"
            b.send_nowait(a.address, b"hi")
            assert (await a.receive(timeout=2)).data == b"hi"
            for _ in range(20):
                handle = a.send_nowait(b.address, b"request")
                msg = await b.receive(timeout=2)  # woken by b's reader callback
                assert msg.data == b"request"
                await asyncio.sleep(0)  # the rest of the turn: nobody calls b
                deadline = b._endpoint.get_timer()
                assert deadline is not None and not b._timer_stale
                assert b._timer is not None and b._timer.when() == deadline
                receipt = await asyncio.wait_for(handle, 2)  # the held ack left on the timer
                assert receipt.peer == b.address

    run(main())


def test_a_cancelled_receive_does_not_swallow_the_next_message() -> None:
    """A receive given up by cancellation (a task's cancel, ``asyncio.wait_for``'s
    timeout) withdraws its wait from the core. It used to stay registered, and the
    core handed the next message to that dead receive: acknowledged to its sender,
    lost to the application."""

    async def main() -> None:
        async with AsyncNode() as a, AsyncNode() as b:
            task = asyncio.ensure_future(b.receive(timeout=5))
            await asyncio.sleep(0.02)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await a.send(b.address, b"after cancel", timeout=2)
            assert (await b.receive(timeout=2)).data == b"after cancel"

            for source in (None, a.address):  # the named source is unwatched again, too
                with pytest.raises(TimeoutError):
                    await asyncio.wait_for(b.receive(source=source), 0.05)
                await a.send(b.address, b"after wait_for", timeout=2)
                assert (await b.receive(timeout=2)).data == b"after wait_for"
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(b.receive_any([""]), 0.05)
            await a.send(b.address, b"after receive_any", timeout=2)
            assert (await b.receive(timeout=2)).data == b"after receive_any"
            assert not b._receives and not b._taken

    run(main())


def test_a_receive_cancelled_as_its_message_arrives_puts_the_message_back() -> None:
    """The cancellation lands in the very turn the core answers the receive (as
    ``asyncio.wait_for``'s timeout can): the message, acknowledged to its sender,
    goes back to its mailbox instead of away with the cancelled receive. Forced
    deterministically: the answer's routing cancels the task; and, second, the
    task is cancelled while the core's answer is not yet routed."""

    async def main() -> None:
        async with AsyncNode() as a, AsyncNode() as b:
            task = asyncio.ensure_future(b.receive(timeout=5))
            for _ in range(100):  # a few loop steps until it waits in the core
                if b._receives:
                    break
                await asyncio.sleep(0)
            assert b._receives
            routed = b._on_receive

            def answered_then_cancelled(waiter: int, message: object, error: object) -> None:
                routed(waiter, message, error)  # type: ignore[arg-type]
                task.cancel()  # in the same turn, before the task resumes

            b._on_receive = answered_then_cancelled  # type: ignore[method-assign]
            receipt = await a.send(b.address, b"taken, then cancelled", timeout=2)
            assert receipt.peer == b.address, "its sender was told it was delivered"
            with pytest.raises(asyncio.CancelledError):
                await task
            del b._on_receive
            assert (await b.receive(timeout=2)).data == b"taken, then cancelled"

            # Under a lock, from a mailbox handle; answered in the core, not yet routed.
            jobs = b.create_mailbox("jobs")
            task = asyncio.ensure_future(jobs.receive(timeout=5, lock=30.0))
            for _ in range(100):
                if b._receives:
                    break
                await asyncio.sleep(0)
            task.cancel()
            b.post("jobs", b"locked")
            assert b._sock is not None
            b._posts.admit(b._endpoint, b.address, b._clock())  # the hand-off, unrouted
            assert not b._taken
            with pytest.raises(asyncio.CancelledError):
                await task
            assert b.stats().mailbox("jobs").locked == 0, "its lock released"
            again = await jobs.receive(timeout=2, lock=30.0)
            assert again.data == b"locked"
            assert jobs.ack(again)
            assert not b._receives and not b._taken

    run(main())
