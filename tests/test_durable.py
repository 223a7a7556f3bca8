"""Durable mailboxes on virtual time: the core with an in-memory store (see reliable/durable.py)."""

from __future__ import annotations

from typing import Any

import pytest

from reliable import errors, events
from reliable.store import MemoryStore, sync_stores

from .harness import B, Pair, Side


class DurablePair(Pair):
    """A pair whose B commits its stores each turn, before it sends, as the adapters do."""

    def outgoing(self, side: Side) -> list[bytes]:
        sync_stores(side.endpoint, self.now)
        return super().outgoing(side)

    def _release(self, side: Side) -> None:
        super()._release(side)
        if self.release:
            sync_stores(side.endpoint, self.now)


def _fates(p: Pair) -> dict[int, Any]:
    out: dict[int, Any] = {}
    for e in p.a.of(events.MessageDelivered) + p.a.of(events.MessageFailed):
        out[e.ticket] = e
    return out


def test_a_message_is_acknowledged_only_after_its_commit() -> None:
    p = DurablePair(release=False)
    p.connect()
    store = MemoryStore()
    p.b.create_mailbox("jobs", store=store)
    ticket = p.a.endpoint.send(B, b"one", now=p.now, mailbox="jobs")
    # B acks with DEFERRED but has not committed: no receipt yet, nothing visible.
    p.deliver(p.b, Pair.outgoing(p, p.a))
    assert p.b.endpoint.take("jobs", now=p.now) is None, "invisible until committed"
    assert p.b.endpoint.owes_writes()
    p.deliver(p.a, Pair.outgoing(p, p.b))  # B's ack, before any commit
    p.settle()  # now B's turns commit
    assert isinstance(_fates(p)[ticket], events.MessageDelivered)
    assert store.commits >= 1 and [m.data for m in store.rows.values()] == [b"one"]


def test_no_receipt_leaves_before_the_commit_even_if_the_node_crashes() -> None:
    p = DurablePair(release=False)
    p.connect()
    store = MemoryStore()
    p.b.create_mailbox("jobs", store=store)
    ticket = p.a.endpoint.send(B, b"one", now=p.now, mailbox="jobs")
    p.deliver(p.b, Pair.outgoing(p, p.a))
    p.deliver(p.a, Pair.outgoing(p, p.b))  # B never commits: it "crashes" here
    assert ticket not in _fates(p)
    assert store.crashed().restored == []


def test_committed_messages_survive_a_restart_in_order_exactly_once() -> None:
    p = DurablePair(release=False)
    store = MemoryStore()
    p.b.create_mailbox("jobs", store=store)
    tickets = [
        p.a.endpoint.send(B, b"m%d" % i, now=p.now, mailbox="jobs", priority=i % 2)
        for i in range(10)
    ]
    p.settle()
    assert all(isinstance(_fates(p)[t], events.MessageDelivered) for t in tickets)
    first = p.b.endpoint.take("jobs", now=p.now)
    assert first is not None and first.data == b"m1"  # priority 1 first
    sync_stores(p.b.endpoint, p.now)  # the adapter commits the take before handing it out
    expected = []
    while (m := p.b.endpoint.take("jobs", now=p.now)) is not None:
        expected.append(m.data)
    # B crashes without committing those takes: they come back; "m1" does not.
    p.restart_b()
    p.b.create_mailbox("jobs", store=store.crashed())
    again = []
    while (m := p.b.endpoint.take("jobs", now=p.now)) is not None:
        again.append(m.data)
    assert again == expected == [b"m3", b"m5", b"m7", b"m9", b"m0", b"m2", b"m4", b"m6", b"m8"]


def test_a_waiting_receiver_gets_its_message_only_after_the_delete_commits() -> None:
    p = DurablePair(release=False)
    store = MemoryStore()
    p.b.create_mailbox("jobs", store=store)
    p.connect()
    waiter = p.b.endpoint.wait_for_message("jobs", now=p.now)
    p.a.endpoint.send(B, b"x", now=p.now, mailbox="jobs")
    p.deliver(p.b, Pair.outgoing(p, p.a))
    assert not p.b.of(events.MessageTaken)
    sync_stores(p.b.endpoint, p.now)  # insert, then the hand-off's delete
    (taken,) = p.b.of(events.MessageTaken)
    assert taken.waiter == waiter and taken.message.data == b"x"
    assert store.rows == {}, "handed out, so deleted"


def test_a_full_durable_mailbox_parks_and_stages_when_room_appears() -> None:
    p = DurablePair(release=False)
    store = MemoryStore()
    p.b.create_mailbox("jobs", capacity=2, store=store)
    tickets = [p.a.endpoint.send(B, b"m%d" % i, now=p.now, mailbox="jobs") for i in range(4)]
    p.run(0.5)
    assert sorted(_fates(p)) == tickets[:2]
    assert p.b.endpoint.stats().mailbox("jobs").parked == 2
    assert len(store.rows) == 2, "parked messages are not stored (nor acknowledged)"
    got = [p.b.endpoint.take("jobs", now=p.now) for _ in range(2)]
    p.run(0.5)
    assert [m.data for m in got if m] == [b"m0", b"m1"]
    assert sorted(_fates(p)) == tickets
    assert [m.data for m in store.rows.values()] == [b"m2", b"m3"]


def test_a_failed_commit_refuses_the_message_to_its_sender() -> None:
    p = DurablePair(release=False)
    store = MemoryStore()
    store.fail = True
    p.b.create_mailbox("jobs", store=store)
    ticket = p.a.endpoint.send(B, b"x", now=p.now, mailbox="jobs")
    p.settle()
    fate = _fates(p)[ticket]
    assert isinstance(fate, events.MessageFailed)
    assert isinstance(fate.error, errors.MessageRejected) and fate.error.delivered is False
    assert p.b.endpoint.stats().dropped["store.failed"] == 1
    assert p.b.endpoint.stats().mailbox_bytes == 0


def test_deleting_a_durable_mailbox_empties_its_store() -> None:
    p = DurablePair(release=False)
    store = MemoryStore()
    p.b.create_mailbox("jobs", store=store)
    p.a.endpoint.send(B, b"x", now=p.now, mailbox="jobs")
    p.settle()
    assert store.rows
    p.b.endpoint.delete_mailbox("jobs", p.now)
    sync_stores(p.b.endpoint, p.now)
    assert store.rows == {}


def test_a_durable_rendezvous_is_refused() -> None:
    p = DurablePair()
    with pytest.raises(errors.UsageError, match="rendezvous"):
        p.b.create_mailbox("meet", capacity=0, store=MemoryStore())


@pytest.mark.loopback
def test_dropping_the_handle_of_a_durable_mailbox_keeps_it_and_its_store(tmp_path: Any) -> None:
    import gc

    from reliable import Node

    path = str(tmp_path / "jobs.db")
    with Node() as server, Node() as client:
        server.create_mailbox("jobs", durable=path)  # the handle is dropped at once
        gc.collect()
        client.send(f"127.0.0.1:{server.address[1]}/jobs", b"kept", timeout=5)
        assert server.mailbox("jobs").receive(timeout=5).data == b"kept"


@pytest.mark.loopback
def test_every_blocking_receive_commits_the_deletion_before_it_returns(tmp_path: Any) -> None:
    """receive_nowait, receive, receive_many and a receive that waited (answered by the
    core's event) all return only once their message's row is gone from the store."""
    import threading

    from reliable import Node

    with Node() as server, Node() as client:
        box = server.create_mailbox("jobs", durable=str(tmp_path / "jobs.db"))
        (store,) = server._endpoint.durable_stores()

        def rows() -> int:  # read under the node lock: no commit runs meanwhile
            return int(server._call(lambda now: store.count(), drive=False))

        dest = f"127.0.0.1:{server.address[1]}/jobs"
        for i in range(6):
            client.send(dest, b"%d" % i, timeout=5)  # a receipt: committed
        assert rows() == 6
        assert box.receive_nowait() is not None and rows() == 5
        assert box.receive(timeout=5).data == b"1" and rows() == 4
        assert [m.data for m in box.receive_many(3, timeout=5)] == [b"2", b"3", b"4"]
        assert rows() == 1
        assert [m.data for m in box.receive_many(5, timeout=5)] == [b"5"] and rows() == 0
        late = threading.Timer(0.2, lambda: client.send(dest, b"late", timeout=5))
        late.start()
        try:
            assert [m.data for m in box.receive_many(5, timeout=5)] == [b"late"]
            assert rows() == 0
        finally:
            late.join(5)


@pytest.mark.loopback
def test_every_async_receive_commits_the_deletion_before_it_returns(tmp_path: Any) -> None:
    import asyncio

    from reliable import AsyncNode

    async def main() -> None:
        async with AsyncNode() as server, AsyncNode() as client:
            box = server.create_mailbox("jobs", durable=str(tmp_path / "jobs.db"))
            (store,) = server._endpoint.durable_stores()
            dest = f"127.0.0.1:{server.address[1]}/jobs"
            for i in range(5):
                await client.send(dest, b"%d" % i, timeout=5)
            assert store.count() == 5
            assert box.receive_nowait() is not None and store.count() == 4
            assert (await box.receive(timeout=5)).data == b"1" and store.count() == 3
            got = await box.receive_many(5, timeout=5)
            assert [m.data for m in got] == [b"2", b"3", b"4"] and store.count() == 0
            waiting = asyncio.ensure_future(box.receive_many(5, timeout=5))
            await asyncio.sleep(0.05)
            await client.send(dest, b"late", timeout=5)
            assert [m.data for m in await waiting] == [b"late"] and store.count() == 0

    asyncio.run(asyncio.wait_for(main(), 30))


def test_a_message_being_committed_does_not_make_its_mailbox_full() -> None:
    """A durable mailbox with room answers STAGED, not DEFERRED: the sender waits for the
    receipt but may go on sending without blocking (send_nowait raised MailboxFull)."""
    p = DurablePair(release=False)
    p.connect()
    p.b.create_mailbox("jobs", store=MemoryStore())
    first = p.a.endpoint.send(B, b"one", now=p.now, mailbox="jobs")
    p.deliver(p.b, Pair.outgoing(p, p.a))
    p.deliver(p.a, Pair.outgoing(p, p.b))  # B's ack (STAGED), before its commit
    assert first not in _fates(p), "no receipt before the commit"
    second = p.a.endpoint.send(B, b"two", now=p.now, mailbox="jobs")  # no MailboxFull
    p.settle()
    assert all(isinstance(_fates(p)[t], events.MessageDelivered) for t in (first, second))


def test_a_full_durable_mailbox_still_makes_a_nonblocking_send_wait() -> None:
    p = DurablePair(release=False)
    p.connect()
    p.b.create_mailbox("jobs", capacity=1, store=MemoryStore())
    p.a.endpoint.send(B, b"one", now=p.now, mailbox="jobs")
    p.settle()
    p.a.endpoint.send(B, b"two", now=p.now, mailbox="jobs")  # parks: DEFERRED
    for _ in range(3):
        p.transfer(p.a)
        p.transfer(p.b)
    with pytest.raises(errors.MailboxFull):
        p.a.endpoint.send(B, b"three", now=p.now, mailbox="jobs")


class _GatedStore(MemoryStore):
    """A store whose commits wait for a gate (an fsync that takes its time)."""

    def __init__(self) -> None:
        super().__init__()
        import threading

        self.gate = threading.Event()
        self.entered = threading.Event()  #: a commit has begun (and waits for the gate)
        self.batches: list[list[bytes]] = []

    def commit(self, inserts: list[tuple[int, Any]], deletes: list[int], destroy: bool) -> None:
        self.entered.set()
        assert self.gate.wait(10)
        self.batches.append([m.data for _row, m in inserts])
        super().commit(inserts, deletes, destroy)


def test_the_committer_groups_what_arrives_while_a_commit_runs() -> None:
    """Grouped commits across turns: while one commit is in flight the node goes on
    acknowledging (STAGED) and the next commit takes everything that came meanwhile;
    receipts leave only after their commit."""
    import threading
    import time

    from reliable.store import Committer

    woken = threading.Event()
    committer = Committer(woken.set)

    class CommitterPair(Pair):
        def outgoing(self, side: Side) -> list[bytes]:
            if side is self.b:  # the committer of B's node
                committer.turn(side.endpoint, self.now)
            return super().outgoing(side)

    p = CommitterPair(release=False)
    p.connect()
    store = _GatedStore()
    p.b.create_mailbox("jobs", store=store)
    first = p.a.endpoint.send(B, b"m0", now=p.now, mailbox="jobs")
    p.deliver(p.b, p.outgoing(p.a))
    p.deliver(p.a, p.outgoing(p.b))  # B's turn: the commit of m0 starts, and blocks
    assert store.entered.wait(10)
    tickets = [p.a.endpoint.send(B, b"m%d" % i, now=p.now, mailbox="jobs") for i in (1, 2, 3)]
    for _ in range(3):  # several turns of B while the commit runs
        p.deliver(p.b, p.outgoing(p.a))
        p.deliver(p.a, p.outgoing(p.b))
    session = p.a.endpoint._peers[B]
    assert not session.sender.unacked, "acknowledged (STAGED) while the commit ran"
    assert not _fates(p), "but no receipt before a commit"
    store.gate.set()
    # The thread goes on to m1..m3 (handed over by B's turns meanwhile, as one batch)
    # as soon as m0 is committed, without waiting for another turn of B.
    for _ in range(1000):
        if committer.commits == 2:
            break
        time.sleep(0.01)
    assert store.batches == [[b"m0"], [b"m1", b"m2", b"m3"]]
    assert not _fates(p), "receipts leave on B's next turn, which reports both commits"
    p.deliver(p.a, p.outgoing(p.b))
    assert sorted(_fates(p)) == [first, *tickets]
    p.settle()
    committer.close(p.b.endpoint, p.now)
    assert store.batches == [[b"m0"], [b"m1", b"m2", b"m3"]]
    assert all(isinstance(_fates(p)[t], events.MessageDelivered) for t in [first, *tickets])


@pytest.mark.loopback
def test_async_receive_many_commits_its_deletions_once(tmp_path: Any) -> None:
    import asyncio

    from reliable import AsyncNode

    async def main() -> None:
        async with AsyncNode() as server, AsyncNode() as client:
            box = server.create_mailbox("jobs", durable=str(tmp_path / "jobs.db"))
            (store,) = server._endpoint.durable_stores()
            dest = f"127.0.0.1:{server.address[1]}/jobs"
            for i in range(8):
                await client.send(dest, b"%d" % i, timeout=5)
            before = store.commits
            got = await box.receive_many(8, timeout=5)
            assert [m.data for m in got] == [b"%d" % i for i in range(8)]
            assert store.count() == 0
            assert store.commits - before == 1, "one commit for the batch, not one per message"

    asyncio.run(asyncio.wait_for(main(), 30))


def test_one_ack_carries_the_staged_notices_of_a_whole_burst() -> None:
    """A durable mailbox owes a STAGED notice per message until the sender's base passes
    it, and an ack never passes a notice it leaves out: a pure ACK capped at 32 notices
    let a burst through 32 messages per round trip (issue 19's accept rate)."""
    from reliable import wire

    from .harness import decode_all

    p = DurablePair(release=False)
    p.connect()
    p.b.create_mailbox("jobs", store=MemoryStore())
    for i in range(100):
        p.a.endpoint.send(B, b"m%d" % i, now=p.now, mailbox="jobs")
    sent = 0
    for _ in range(10):  # A's window opens as it goes: until all 100 are at B
        out = Pair.outgoing(p, p.a)
        if not out:
            break
        p.deliver(p.b, out)
        sent += len(out)
    acks = [pkt for pkt in decode_all(Pair.outgoing(p, p.b)) if pkt.kind == wire.Kind.ACK]
    assert acks and max(len(pkt.notices) for pkt in acks) > wire.MAX_NOTICES


def test_one_commit_admits_all_its_messages_in_one_control_message() -> None:
    """The receipts of a commit's messages travel as one AdmittedMany per sender (up to
    ADMITTED_MANY_MAX ids each), not one node message per message."""
    from reliable.node_messages import (
        ADMITTED_MANY_MAX,
        AdmittedMany,
        decode_node_message,
        encode_node_message,
    )

    p = Pair(release=False)  # the test commits by hand, once, for everything staged
    p.connect()
    store = MemoryStore()
    p.b.create_mailbox("jobs", store=store)
    count = ADMITTED_MANY_MAX + 5
    tickets = [p.a.endpoint.send(B, b"%d" % i, now=p.now, mailbox="jobs") for i in range(count)]
    p.run(0.5)
    assert not _fates(p), "staged: nothing is delivered before the commit"
    session = p.b.endpoint._peers[p.a.addr]
    queued = len(session.sender.node_messages)
    sync_stores(p.b.endpoint, p.now)
    assert store.commits == 1
    assert len(session.sender.node_messages) - queued == 2, "one AdmittedMany of 200 ids, one of 5"
    p.run(0.5)
    fates = _fates(p)
    assert sorted(fates) == tickets
    assert all(isinstance(e, events.MessageDelivered) for e in fates.values())
    many = AdmittedMany(tuple(range(2**32 - 3, 2**32)))
    assert decode_node_message(encode_node_message(many)) == many
    for bad in (b"\x06\x00\x00", b"\x06\x00\x02\x00\x00\x00\x01", b"\x06\x00\xc9" + b"\0" * 804):
        with pytest.raises(ValueError):
            decode_node_message(bad)


def test_an_admitted_many_settles_parked_overtaken_and_bogus_ids_each_once() -> None:
    """The sender settles an AdmittedMany in one pass (PeerSession.on_admitted_many):
    messages parked while the mailbox was full (not staged: counted in full_mailboxes)
    leave that count, a receipt that overtook its acknowledgement still completes its
    message, a stranger's id is counted bogus, and every message gets one fate."""
    p = DurablePair(release=False)
    p.connect()
    p.b.create_mailbox("jobs", capacity=2, store=MemoryStore())
    tickets = [p.a.endpoint.send(B, b"m%d" % i, now=p.now, mailbox="jobs") for i in range(4)]
    p.run(0.5)
    session = p.a.endpoint._peers[B]
    assert sorted(_fates(p)) == tickets[:2]
    assert len(session.deferred) == 2 and session.full_mailboxes == {"jobs": 2}
    for _ in range(2):
        assert p.b.endpoint.take("jobs", now=p.now) is not None
    p.settle()  # room: the parked two are staged, committed, admitted in one AdmittedMany
    assert p.a.endpoint._peers[B] is session
    assert sorted(_fates(p)) == tickets
    assert not session.deferred and session.full_mailboxes == {}
    assert all(_fates(p)[t].deferred for t in tickets[2:])

    # A receipt ahead of the acknowledgement: B's answer (ack and all) never arrives.
    for _ in range(2):  # room for it
        assert p.b.endpoint.take("jobs", now=p.now) is not None
    late = p.a.endpoint.send(B, b"m4", now=p.now, mailbox="jobs")
    p.deliver(p.b, Pair.outgoing(p, p.a))
    (msg,) = [m for m in session.sender.by_msg_id.values() if not m.for_node]
    bogus = session.bogus_outcomes
    session.on_admitted_many((msg.msg_id & 0xFFFFFFFF, 999_999), p.now)
    p.a.endpoint._take_events(session)
    assert session.bogus_outcomes == bogus + 1, "the stranger's id"
    assert isinstance(_fates(p)[late], events.MessageDelivered)
    assert sum(1 for e in p.a.of(events.MessageDelivered) if e.ticket == late) == 1
    p.settle()  # B's ack and its own receipt arrive after all: no second fate
    assert sum(1 for e in p.a.of(events.MessageDelivered) if e.ticket == late) == 1
    assert not p.a.of(events.MessageFailed)


def test_one_commit_from_two_senders_gives_each_its_receipts_and_window() -> None:
    """A commit's receipts are made in one pass over its messages (PostOffice._receipts),
    a session per run of one sender's messages: with two senders' messages interleaved
    in one commit, each sender gets receipts for exactly its own, and the host gives
    each session back exactly the bytes it had parked."""
    import random

    from reliable import Endpoint

    host_addr, one_addr, two_addr = ("10.0.0.9", 9), ("10.0.0.1", 1), ("10.0.0.2", 2)
    host = Endpoint(rng=random.Random(9))
    senders = {one_addr: Endpoint(rng=random.Random(1)), two_addr: Endpoint(rng=random.Random(2))}
    store = MemoryStore()
    host.create_mailbox("jobs", store=store, now=0.0)
    now = 0.0
    tickets: dict[Any, list[int]] = {addr: [] for addr in senders}
    fates: dict[Any, list[int]] = {addr: [] for addr in senders}

    def exchange(commit: bool) -> None:
        nonlocal now
        for _ in range(200):
            moved = False
            for addr, ep in senders.items():
                for d, _ in ep.datagrams_to_send(now):
                    host.receive_datagram(d, addr, now)
                    moved = True
            if commit:
                sync_stores(host, now)
            for d, dest in host.datagrams_to_send(now):
                senders[dest].receive_datagram(d, host_addr, now)
                moved = True
            for addr, ep in senders.items():
                while (e := ep.next_event()) is not None:
                    if isinstance(e, events.MessageDelivered) and e.mailbox == "jobs":
                        fates[addr].append(e.ticket)
            now += 0.001
            for ep in (host, *senders.values()):
                timer = ep.get_timer()
                if timer is not None and timer <= now:
                    ep.handle_timer(now)
            if not moved:
                return

    for ep in senders.values():  # the sessions up
        ep.send(host_addr, b"", now=now)
    exchange(commit=False)
    for i in range(6):  # interleaved: one, two, one, two, ...
        for addr, ep in senders.items():
            tickets[addr].append(ep.send(host_addr, b"x" * (10 + i), now=now, mailbox="jobs"))
            for d, _ in ep.datagrams_to_send(now):
                host.receive_datagram(d, addr, now)
    exchange(commit=False)  # all staged, acknowledged, none committed
    assert not any(fates.values())
    sessions = {addr: host._peers[addr] for addr in senders}
    assert all(s.parked == sum(10 + i for i in range(6)) for s in sessions.values())
    assert sync_stores(host, now) == 1, "one commit for both senders' messages"
    exchange(commit=True)
    for addr in senders:
        assert sorted(fates[addr]) == sorted(tickets[addr])
        assert sessions[addr].parked == 0
    assert len(store.rows) == 12
