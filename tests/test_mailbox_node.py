"""Mailboxes through the blocking and asyncio adapters, over real loopback UDP."""

from __future__ import annotations

import asyncio
import gc
import resource
import threading
import time

import pytest

from netem import Impairment
from netem.socket import FaultySocket
from reliable import AsyncNode, Config, Node, errors
from reliable.driver import open_socket

pytestmark = pytest.mark.loopback


@pytest.fixture
def pair():  # type: ignore[no-untyped-def]
    with Node() as a, Node() as b:
        yield a, b


def _dest(node: Node, mailbox: str) -> str:
    host, port = node.address[:2]
    return f"{host}:{port}/{mailbox}"


def test_rendezvous_send_blocks_until_a_receiver_takes_it(pair) -> None:  # type: ignore[no-untyped-def]
    a, b = pair
    box = b.create_mailbox("meet", 0)
    done = threading.Event()
    result = {}

    def sender() -> None:
        result["receipt"] = a.send(_dest(b, "meet"), b"knock", timeout=10)
        done.set()

    t = threading.Thread(target=sender)
    t.start()
    assert not done.wait(0.5), "a rendezvous send returned before anyone received"
    msg = box.receive(timeout=5, receiver="worker-7")
    assert done.wait(5)
    t.join()
    assert msg.data == b"knock"
    assert result["receipt"].receiver == "worker-7" and result["receipt"].deferred


def test_a_blocking_producer_waits_for_room_and_nothing_is_lost(pair) -> None:  # type: ignore[no-untyped-def]
    a, b = pair
    box = b.create_mailbox("jobs", 2)
    sent_at: list[float] = []

    def producer() -> None:
        for i in range(6):
            a.send(_dest(b, "jobs"), bytes([i]), timeout=10)
            sent_at.append(time.monotonic())

    t = threading.Thread(target=producer)
    t.start()
    time.sleep(0.4)
    assert len(sent_at) == 2, "the third send must wait for room"
    stats = box.stats()
    assert (stats.messages, stats.parked) == (2, 1)
    got = [box.receive(timeout=5).data for _ in range(6)]
    t.join(10)
    assert got == [bytes([i]) for i in range(6)] and len(sent_at) == 6


def test_non_blocking_calls_say_would_block(pair) -> None:  # type: ignore[no-untyped-def]
    a, b = pair
    box = b.create_mailbox("tiny", 1)
    assert box.receive_nowait() is None
    first = a.send_nowait(_dest(b, "tiny"), b"1")
    second = a.send_nowait(_dest(b, "tiny"), b"2")
    assert first.result(5).deferred is False
    time.sleep(0.2)  # the deferral of the second is known by now
    assert not second.done()
    with pytest.raises(errors.MailboxFull) as info:
        a.send_nowait(_dest(b, "tiny"), b"3")
    assert isinstance(info.value, errors.WouldBlock) and info.value.mailbox == "tiny"
    assert box.receive_nowait().data == b"1"  # type: ignore[union-attr]
    assert second.result(5).deferred


def test_several_receivers_each_message_to_exactly_one_served_in_turn(pair) -> None:  # type: ignore[no-untyped-def]
    a, b = pair
    box = b.create_mailbox("work")
    got: dict[str, list[bytes]] = {}
    lock = threading.Lock()

    def worker(name: str) -> None:
        while True:
            try:
                msg = box.receive(timeout=1.0, receiver=name)
            except errors.ReceiveTimeout:
                return
            with lock:
                got.setdefault(name, []).append(msg.data)
            time.sleep(0.01)  # busy: the next message should go to someone waiting

    workers = [threading.Thread(target=worker, args=(f"w{i}",)) for i in range(4)]
    for w in workers:
        w.start()
    time.sleep(0.2)  # all four are waiting
    for i in range(200):
        a.send(_dest(b, "work"), b"%03d" % i)
    for w in workers:
        w.join(10)
    everything = sorted(m for ms in got.values() for m in ms)
    assert everything == [b"%03d" % i for i in range(200)], "each message to exactly one"
    assert len(got) == 4 and min(map(len, got.values())) >= 20, "waiting receivers share the work"


def test_deleting_a_mailbox_mid_stream_fails_pending_sends_cleanly(pair) -> None:  # type: ignore[no-untyped-def]
    a, b = pair
    box = b.create_mailbox("doomed", 1)
    handles = []
    for i in range(5):
        try:
            handles.append(a.send_nowait(_dest(b, "doomed"), bytes([i])))
        except errors.MailboxFull:  # the deferral of an earlier one is already known
            break
    assert len(handles) >= 2
    handles[0].result(5)
    time.sleep(0.2)
    waiter_error = []
    other = b.create_mailbox("empty")

    def waiter() -> None:
        try:
            other.receive(timeout=5)
        except errors.ReliableError as exc:
            waiter_error.append(exc)

    t = threading.Thread(target=waiter)
    t.start()
    time.sleep(0.1)
    box.delete()
    other.delete()
    t.join(5)
    for h in handles[1:]:
        assert isinstance(h.exception(5), errors.MailboxClosed)
    assert isinstance(waiter_error[0], errors.MailboxDeleted)
    with pytest.raises(errors.MailboxNotFound, match="doomed"):
        a.send(_dest(b, "doomed"), b"late", timeout=5)


def test_timed_calls(pair) -> None:  # type: ignore[no-untyped-def]
    a, b = pair
    box = b.create_mailbox("slow", 1)
    a.send(_dest(b, "slow"), b"fills it")
    start = time.monotonic()
    with pytest.raises(errors.SendTimeout):
        a.send(_dest(b, "slow"), b"cannot get in", timeout=0.3)
    assert 0.3 <= time.monotonic() - start < 2.0
    assert box.stats().parked == 0, "the timed-out message was withdrawn"
    start = time.monotonic()
    with pytest.raises(errors.ReceiveTimeout):
        box.receive(timeout=0.2, msg_type=99)
    assert 0.2 <= time.monotonic() - start < 1.0
    assert box.receive(timeout=0).data == b"fills it"


def test_ports_mailbox_handles_and_errors(pair) -> None:  # type: ignore[no-untyped-def]
    a, b = pair
    port = b.create_mailbox("svc", port=True)
    a.send(_dest(b, "svc"), b"req")
    with pytest.raises(errors.UsageError, match="port"):
        b.mailbox("svc").receive(timeout=1)
    assert port.receive(timeout=1).data == b"req"
    with pytest.raises(errors.MailboxExists):
        b.create_mailbox("svc")
    with pytest.raises(errors.UnknownMailbox):
        b.mailbox("nothing")
    with pytest.raises(errors.UsageError, match="give one"):
        a.send(_dest(b, "svc"), b"x", mailbox="other")
    port.close()
    with pytest.raises(errors.MailboxClosed):
        a.send(_dest(b, "svc"), b"refused", timeout=5)
    port.open()
    a.send(_dest(b, "svc"), b"welcome back", timeout=5)


def test_stats_locally_and_over_the_network(pair) -> None:  # type: ignore[no-untyped-def]
    a, b = pair
    box = b.create_mailbox("jobs", 10, max_bytes=1 << 20)
    for i in range(3):
        a.send(_dest(b, "jobs"), b"x" * (i + 1))
    box.receive(timeout=1, receiver="me")
    local = box.stats()
    assert (local.messages, local.bytes, local.high_water, local.total_in, local.total_out) == (
        2,
        5,
        3,
        3,
        1,
    )
    assert local.last_sender == a.address and local.last_receiver == "me"
    remote = a.query_stats(b.address, timeout=5)
    assert remote.mailbox("jobs").messages == 2 and remote.incarnation == b.incarnation
    assert any(p.address == a.address for p in remote.peers)
    with Node(config=Config(serve_stats=False)) as mute, pytest.raises(errors.ReceiveTimeout):
        a.query_stats(mute.address, timeout=0.3)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_fast_sender_slow_receiver_over_a_lossy_link_bounded_and_complete() -> None:
    link = Impairment(loss=0.1, duplicate=0.02, reorder=0.05, delay=0.0005)
    config = Config(peer_timeout=30.0, receive_backlog=256 * 1024)
    rx = FaultySocket(open_socket("127.0.0.1:0"), link, seed=3)
    tx = FaultySocket(open_socket("127.0.0.1:0"), link, seed=4)
    n, size = 400, 4000
    with Node(sock=rx, config=config) as b, Node(sock=tx, config=config) as a:
        box = b.create_mailbox("q", 16)
        peak = [0]
        got: list[bytes] = []

        def consumer() -> None:
            for _ in range(n):
                got.append(box.receive(timeout=30).data)
                stats = b.stats()
                peak[0] = max(peak[0], stats.mailbox_bytes)
                time.sleep(0.002)  # slower than the producer

        t = threading.Thread(target=consumer)
        t.start()
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        for i in range(n):
            a.send(_dest(b, "q"), i.to_bytes(4, "big") * (size // 4), timeout=30)
        t.join(60)
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert got == [i.to_bytes(4, "big") * (size // 4) for i in range(n)]
    assert peak[0] <= 16 * size + size, "the mailbox held at most its capacity (+1 parked)"
    assert tx.counters.dropped > 0 and after - before < 50_000  # KiB: no unbounded growth


def test_asyncio_mailboxes() -> None:
    async def main() -> None:
        async with AsyncNode() as a, AsyncNode() as b:
            host, port = b.address[:2]
            meet = b.create_mailbox("meet", 0)
            send = asyncio.ensure_future(a.send(f"{host}:{port}/meet", b"hi", timeout=5))
            await asyncio.sleep(0.3)
            assert not send.done(), "rendezvous: not before a receiver takes it"
            msg = await meet.receive(timeout=5, receiver="task-1")
            receipt = await send
            assert msg.data == b"hi" and receipt.receiver == "task-1"
            jobs = b.create_mailbox("jobs", 1)
            first = a.send_nowait(f"{host}:{port}/jobs", b"1", priority=1)
            second = a.send_nowait(f"{host}:{port}/jobs", b"2", msg_type=4)
            await first
            await asyncio.sleep(0.2)
            with pytest.raises(errors.MailboxFull):
                a.send_nowait(f"{host}:{port}/jobs", b"3")
            assert jobs.receive_nowait().data == b"1"  # type: ignore[union-attr]
            assert (await second).deferred
            assert (await jobs.receive(timeout=1, msg_type=4)).data == b"2"
            with pytest.raises(errors.ReceiveTimeout):
                await jobs.receive(timeout=0.1)
            waiter = asyncio.ensure_future(jobs.receive(timeout=5))
            await asyncio.sleep(0.05)
            jobs.delete()
            with pytest.raises(errors.MailboxDeleted):
                await waiter
            remote = await a.query_stats(b.address, timeout=5)
            assert [m.name for m in remote.mailboxes] == ["", "meet"]
            assert b.stats().mailbox("meet").total_out == 1

    asyncio.run(asyncio.wait_for(main(), 30))


def test_only_the_owner_handle_closes_opens_or_deletes_a_port(pair) -> None:  # type: ignore[no-untyped-def]
    server, _ = pair
    owner = server.create_mailbox("p", port=True)
    other = server.mailbox("p")
    for action in (other.close, other.open, other.delete):
        with pytest.raises(errors.UsageError, match="only its owner"):
            action()
    owner.close()
    owner.open()
    owner.delete()
    assert "p" not in [m.name for m in server.stats().mailboxes]


def test_a_port_whose_owner_handle_is_gone_is_deleted_and_senders_told(pair) -> None:  # type: ignore[no-untyped-def]
    """It kept acknowledging messages that nobody could ever receive."""
    server, client = pair
    owner = server.create_mailbox("p", port=True)
    client.send(_dest(server, "p"), b"while the owner lives")
    del owner
    gc.collect()
    deadline = time.monotonic() + 5
    while "p" in [m.name for m in server.stats().mailboxes]:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    with pytest.raises(errors.MailboxNotFound):
        client.send(_dest(server, "p"), b"after", timeout=5)


def test_an_async_port_whose_owner_handle_is_gone_is_deleted() -> None:
    async def main() -> None:
        async with AsyncNode() as server, AsyncNode() as client:
            owner = server.create_mailbox("p", port=True)
            dest = "{}:{}/p".format(*server.address)
            await client.send(dest, b"while the owner lives")
            del owner
            gc.collect()
            await asyncio.sleep(0.05)
            assert "p" not in [m.name for m in server.stats().mailboxes]
            with pytest.raises(errors.MailboxNotFound):
                await client.send(dest, b"after", timeout=5)

    asyncio.run(main())


def test_a_plain_mailbox_outlives_its_dropped_handle(pair) -> None:  # type: ignore[no-untyped-def]
    """Only a port dies with its owner handle; a plain mailbox whose handle was
    dropped at once (``node.create_mailbox("jobs", 2)`` as a statement) was deleted."""
    server, client = pair
    server.create_mailbox("jobs", 2)
    gc.collect()
    time.sleep(0.05)  # the node's own schedule would have deleted it by now
    client.send(_dest(server, "jobs"), b"kept", timeout=5)
    assert server.mailbox("jobs").receive(timeout=5).data == b"kept"

    async def main() -> None:
        async with AsyncNode() as node:
            node.create_mailbox("jobs", 2)
            gc.collect()
            await asyncio.sleep(0.05)
            assert "jobs" in [m.name for m in node.stats().mailboxes]

    asyncio.run(main())
