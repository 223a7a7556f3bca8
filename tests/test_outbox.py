"""Durable outboxes (issue 19): the receiver's memory of outbox ids and the tagged
mailbox names on virtual time, then the SQLite outbox through both adapters on
loopback. The SIGKILL crash test is tests/test_outbox_crash.py."""

from __future__ import annotations

import asyncio
import socket
import sqlite3
from contextlib import closing
from pathlib import Path

import pytest

from reliable import AsyncNode, Node, errors, events
from reliable.outbox import OutboxStore
from reliable.outbox_ids import TAG_MAX, DeliveredIds, format_tag, parse_tagged

from .harness import A, Pair

# ------------------------------------------------------------- ids and memory


def test_a_tag_round_trips_and_anything_else_names_no_mailbox() -> None:
    tag = format_tag(0xDEADBEEF, 7, 3)
    assert parse_tagged("jobs" + tag) == ("jobs", 0xDEADBEEF, 7, 3)
    assert parse_tagged(tag) == ("", 0xDEADBEEF, 7, 3)  # the default mailbox
    assert len(format_tag(2**64 - 1, 2**64 - 1, 2**64 - 1)) == TAG_MAX
    for bad in (
        "jobs",
        "jobs/",
        "jobs/x.1.2.1",
        "jobs/o.1.2",
        "jobs/o.1.2.3.4",
        "jobs/o.1.2.3",  # floor above the row
        "jobs/o.g.2.1",
        "jobs/o.1.-2.1",
        "jobs/o." + "f" * 17 + ".2.1",
        "jobs/o..2.1",
        "jobs/o.1.2.1/o.1.2.1",
    ):
        assert parse_tagged(bad) is None, bad


def test_the_memory_recognises_a_delivered_id_and_what_the_floor_settles() -> None:
    ids = DeliveredIds()
    assert not ids.seen(1, 5, 5)
    ids.remember(1, 5, 5)
    assert ids.seen(1, 5, 5)
    assert not ids.seen(1, 6, 5) and not ids.seen(2, 5, 5), "another row, another outbox"
    ids.remember(1, 6, 5)
    assert ids.seen(1, 3, 7), "below the floor: settled by the sender"
    assert len(ids) == 0, "the floor forgot rows 5 and 6"
    ids.remember(1, 9, 7)
    ids.forget(1, 9)
    assert not ids.seen(1, 9, 7), "a message that never got in is delivered when re-sent"
    assert ids.duplicates == 2


def test_the_memory_is_bounded_and_forgets_rather_than_drops() -> None:
    ids = DeliveredIds(max_outboxes=2, max_rows=3)
    for row in range(1, 6):
        ids.remember(1, row, 1)
    assert len(ids) == 3 and ids.forgotten == 2
    assert not ids.seen(1, 1, 1), "forgotten: a re-send would be delivered again"
    assert ids.seen(1, 5, 1)
    ids.remember(2, 1, 1)
    ids.remember(3, 1, 1)  # a third outbox: the least recently heard from (1) goes
    assert ids.forgotten == 5
    assert not ids.seen(1, 5, 1) and ids.seen(2, 1, 1) and ids.seen(3, 1, 1)


# ------------------------------------------------------------- core, virtual time

TAG = format_tag(0xABC, 1, 1)


def test_a_re_send_from_a_restarted_sender_is_acknowledged_not_delivered_again() -> None:
    p = Pair(release=False)
    p.a.create_mailbox("jobs")
    p.b.endpoint.send(A, b"once", now=p.now, mailbox="jobs", outbox=TAG)
    p.settle()
    assert [e.mailbox for e in p.b.of(events.MessageDelivered)] == ["jobs"], "the plain name"
    p.restart_b()  # the sender crashed before it settled the send; it sends it again
    ticket = p.b.endpoint.send(A, b"once", now=p.now, mailbox="jobs", outbox=TAG)
    p.settle()
    assert [e.ticket for e in p.b.of(events.MessageDelivered)] == [ticket], "acknowledged"
    box = p.a.endpoint.stats().mailbox("jobs")
    assert box.messages == 1 and box.total_in == 1
    assert p.a.endpoint.stats().dropped.get("duplicate.outbox") == 1
    msg = p.a.endpoint.take("jobs", now=p.now)
    assert msg is not None and (msg.data, msg.mailbox) == (b"once", "jobs")


def test_a_parked_outbox_message_of_a_dead_sender_is_delivered_when_re_sent() -> None:
    p = Pair(release=False)
    p.a.create_mailbox("jobs", capacity=1)
    p.b.endpoint.send(A, b"filler", now=p.now, mailbox="jobs")
    p.settle()
    p.b.endpoint.send(A, b"parked", now=p.now, mailbox="jobs", outbox=TAG)
    p.run(0.2)
    assert p.a.endpoint.stats().mailbox("jobs").parked == 1
    p.restart_b()  # the parked copy is forgotten with its sender's incarnation ...
    p.b.endpoint.send(A, b"parked", now=p.now, mailbox="jobs", outbox=TAG)
    p.run(0.2)
    took = [p.a.endpoint.take("jobs", now=p.now) for _ in range(2)]
    p.run(0.2)
    took.append(p.a.endpoint.take("jobs", now=p.now))
    assert [m.data for m in took if m] == [b"filler", b"parked"], "... so the re-send counts"
    assert p.a.endpoint.take("jobs", now=p.now) is None


def test_an_untagged_name_with_a_slash_is_still_no_mailbox() -> None:
    p = Pair(release=False)
    p.a.create_mailbox("jobs")
    p.b.endpoint.send(A, b"x", now=p.now, mailbox="jobs", outbox="/o.zz.1.1")
    p.settle()
    failed = p.b.of(events.MessageFailed)
    assert len(failed) == 1 and isinstance(failed[0].error, errors.MailboxNotFound)
    assert p.a.endpoint.stats().mailbox("jobs").messages == 0


def test_a_name_too_long_for_the_tag_is_refused_before_anything_is_queued() -> None:
    p = Pair()
    with pytest.raises(errors.UsageError, match="too long for an outbox send"):
        p.b.endpoint.send(A, b"x", now=p.now, mailbox="j" * 250, outbox=TAG)
    assert not p.outgoing(p.b)


# ------------------------------------------------------------- adapters, loopback

pytestmark_loopback = pytest.mark.loopback


def _rows(path: Path) -> list[tuple[int, bytes]]:
    with closing(sqlite3.connect(path)) as conn:
        return [(r, bytes(d)) for r, d in conn.execute("SELECT row, data FROM sends ORDER BY row")]


@pytestmark_loopback
def test_an_outbox_send_is_stored_then_settled_and_deleted(tmp_path: Path) -> None:
    path = tmp_path / "out.db"
    with Node() as server, Node() as client:
        box = server.create_mailbox("jobs")
        outbox = client.open_outbox(path)
        receipt = outbox.send(f"127.0.0.1:{server.address[1]}/jobs", b"one")
        assert receipt.mailbox == "jobs"
        assert box.receive(timeout=5).data == b"one"
        assert outbox.pending == 0
        assert outbox.store.count() == 1, "its deletion waits for the next commit"
        outbox.flush()
        assert outbox.store.count() == 0
    assert _rows(path) == []


@pytestmark_loopback
def test_sends_left_in_the_file_are_sent_again_in_order_and_only_once(tmp_path: Path) -> None:
    path = tmp_path / "out.db"
    with Node() as server:
        box = server.create_mailbox("jobs")
        store = OutboxStore(path)  # a process that stored three sends and died
        for data in (b"a", b"b", b"c"):
            store.add(server.address, "jobs", 0, 0, data)
        store.close()
        with Node() as client:
            outbox = client.open_outbox(path)
            assert [h.result(5).mailbox for h in outbox.replayed] == ["jobs"] * 3
        assert [box.receive(timeout=5).data for _ in range(3)] == [b"a", b"b", b"c"]
        assert _rows(path) == []
        # The process died again after the sends went through, before the deletions were
        # committed: the rows come back, and the receiver recognises every one.
        with closing(sqlite3.connect(path)) as conn, conn:
            conn.executemany(
                "INSERT INTO sends VALUES (?, ?, 'jobs', 0, 0, ?)",
                [
                    (row, f'["127.0.0.1", {server.address[1]}]', d)
                    for row, d in [(1, b"a"), (2, b"b"), (3, b"c")]
                ],
            )
        with Node() as client:
            outbox = client.open_outbox(path)
            assert len([h.result(5) for h in outbox.replayed]) == 3
        assert box.receive_nowait() is None
        assert server.stats().dropped["duplicate.outbox"] == 3
        with Node() as client:  # rows are never reused: a new send is a new id
            receipt = client.open_outbox(path).send(server.address, b"d", mailbox="jobs")
            assert receipt.peer == server.address
        assert box.receive(timeout=5).data == b"d"


@pytestmark_loopback
def test_bad_arguments_fail_before_anything_is_stored(tmp_path: Path) -> None:
    path = tmp_path / "out.db"
    with Node() as client:
        outbox = client.open_outbox(path)
        with pytest.raises(errors.UsageError, match="priority"):
            outbox.send("127.0.0.1:9/jobs", b"x", priority=-1)
        with pytest.raises(errors.UsageError, match="group"):
            outbox.send("multicast://239.1.2.3:7000/jobs", b"x")
        with pytest.raises(errors.UsageError, match="anycast"):
            outbox.send("anycast://svc/jobs", b"x")
        with pytest.raises(errors.UsageError, match="too long for an outbox send"):
            outbox.send("127.0.0.1:9/" + "j" * 230, b"x")
        with pytest.raises(errors.UsageError, match="sync must be one of"):
            client.open_outbox(tmp_path / "other.db", sync="grouped")
        with pytest.raises(errors.UsageError, match="in use by another process"):
            Node().open_outbox(path)
        assert outbox.store.count() == 0 and outbox.pending == 0


@pytestmark_loopback
def test_a_failed_send_is_the_applications_and_is_not_retried(tmp_path: Path) -> None:
    path = tmp_path / "out.db"
    with Node() as server, Node() as client:
        outbox = client.open_outbox(path)
        with pytest.raises(errors.MailboxNotFound) as refused:
            outbox.send(server.address, b"x", mailbox="nope")
        assert refused.value.delivered is False and "'nope'" in str(refused.value)
    assert _rows(path) == [], "settled: the next open does not send it again"


@pytestmark_loopback
def test_a_send_the_close_cut_short_stays_for_the_next_open(tmp_path: Path) -> None:
    path = tmp_path / "out.db"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:  # never answers
        silent.bind(("127.0.0.1", 0))
        client = Node()
        handle = client.open_outbox(path).send_nowait(silent.getsockname(), b"later")
        client.close(timeout=0.1)
        with pytest.raises(errors.SendAborted):
            handle.result(5)
    assert _rows(path) == [(1, b"later")]


@pytestmark_loopback
def test_asyncnode_outbox_sends_and_replays(tmp_path: Path) -> None:
    path = tmp_path / "out.db"
    with Node() as server:
        box = server.create_mailbox("jobs")
        store = OutboxStore(path)
        store.add(server.address, "jobs", 0, 0, b"left")
        store.close()

        async def main() -> None:
            async with AsyncNode() as client:
                outbox = await client.open_outbox(path)
                assert [(await h).mailbox for h in outbox.replayed] == ["jobs"]
                receipt = await outbox.send(server.address, b"new", mailbox="jobs")
                assert receipt.mailbox == "jobs"
                handle = await outbox.send_nowait(server.address, b"newer", mailbox="jobs")
                await handle
                with pytest.raises(errors.UsageError):
                    await outbox.send(server.address, b"x", msg_type=2**40)

        asyncio.run(main())
        assert [box.receive(timeout=5).data for _ in range(3)] == [b"left", b"new", b"newer"]
    assert _rows(path) == []


# ------------------------------------------------ ids kept by a durable mailbox


def test_a_durable_mailbox_keeps_the_ids_so_a_restarted_receiver_still_knows_them() -> None:
    import random

    from reliable import Config, Endpoint
    from reliable.store import MemoryStore, sync_stores

    from .harness import B, Side

    p = Pair(release=False)
    store = MemoryStore()
    p.b.create_mailbox("jobs", store=store)
    p.a.endpoint.send(B, b"received", now=p.now, mailbox="jobs", outbox=TAG)
    p.a.endpoint.send(B, b"queued", now=p.now, mailbox="jobs", outbox=format_tag(0xABC, 2, 1))
    for _ in range(50):
        p.transfer(p.a)
        p.transfer(p.b)
        sync_stores(p.b.endpoint, p.now)
        p.tick()
    got = p.b.endpoint.take("jobs", now=p.now)
    sync_stores(p.b.endpoint, p.now)
    assert got is not None and got.data == b"received"
    assert sorted(store.ids) == [(0xABC, 1, 1), (0xABC, 2, 1)]
    # Both nodes crash. The receiver comes back on its store; the sender sends both again.
    p.restart_b()
    p.b.create_mailbox("jobs", store=store.crashed())
    p.a = Side(A, Endpoint(Config(), rng=random.Random(7)))
    p.a.endpoint.send(B, b"received", now=p.now, mailbox="jobs", outbox=TAG)
    p.a.endpoint.send(B, b"queued", now=p.now, mailbox="jobs", outbox=format_tag(0xABC, 2, 1))
    p.run(0.5)
    assert len(p.a.of(events.MessageDelivered)) == 2, "both acknowledged"
    assert p.b.endpoint.stats().dropped.get("duplicate.outbox") == 2, "neither delivered again"
    left = p.b.endpoint.take("jobs", now=p.now)
    assert left is not None and left.data == b"queued"
    assert p.b.endpoint.take("jobs", now=p.now) is None


def test_the_sqlite_store_keeps_ids_and_forgets_what_a_floor_settles(tmp_path: Path) -> None:
    from reliable.message import Message
    from reliable.store import SqliteStore

    path = tmp_path / "box.db"
    store = SqliteStore(path, "jobs")
    msgs = [Message(source=("127.0.0.1", 1), data=b"%d" % i, mailbox="jobs") for i in range(3)]
    big = 2**64 - 5  # outbox ids are 64-bit unsigned
    store.commit([(1, msgs[0]), (2, msgs[1])], [], False, ids=[(1, big, 7, 7), (2, big, 8, 7)])
    store.close()
    store = SqliteStore(path, "jobs")
    assert sorted(store.restored_ids) == [(big, 7, 7), (big, 8, 7)]
    store.commit([(3, msgs[2])], [1, 2], False, ids=[(3, big, 9, 8)])  # floor 8: 7 goes
    store.close()
    store = SqliteStore(path, "jobs")
    assert sorted(store.restored_ids) == [(big, 8, 7), (big, 9, 8)]
    assert [row for row, _ in store.restored] == [3]
    store.commit([], [], True)  # the mailbox was deleted: its file is emptied
    store.close()
    assert SqliteStore(path, "jobs").restored_ids == []


@pytestmark_loopback
def test_send_many_stores_all_in_one_commit_then_sends_in_order(tmp_path: Path) -> None:
    path = tmp_path / "out.db"
    with Node() as server, Node() as client:
        box = server.create_mailbox("jobs")
        outbox = client.open_outbox(path)
        dest = f"127.0.0.1:{server.address[1]}/jobs"
        commits = outbox.store.commits
        handles = outbox.send_many(dest, (b"%d" % i for i in range(50)))
        assert outbox.store.commits == commits + 1, "one transaction for the fifty"
        assert [h.result(5).mailbox for h in handles] == ["jobs"] * 50
        assert [m.data for m in box.receive_many(50, timeout=5)] == [b"%d" % i for i in range(50)]
        with pytest.raises(errors.UsageError, match="priority"):
            outbox.send_many(dest, [b"ok", b"ok"], priority=70000)
        with pytest.raises(errors.UsageError):
            outbox.send_many(dest, [b"ok", "not bytes"])  # type: ignore[list-item]
        assert outbox.send_many(dest, []) == []
        outbox.flush()
        assert outbox.store.count() == 0, "nothing of the refused batches was stored"


@pytestmark_loopback
def test_asyncnode_outbox_send_many(tmp_path: Path) -> None:
    with Node() as server:
        box = server.create_mailbox("jobs")

        async def main() -> None:
            async with AsyncNode() as client:
                outbox = await client.open_outbox(tmp_path / "out.db")
                handles = await outbox.send_many(server.address, [b"a", b"b"], mailbox="jobs")
                assert [(await h).mailbox for h in handles] == ["jobs", "jobs"]

        asyncio.run(main())
        assert [m.data for m in box.receive_many(2, timeout=5)] == [b"a", b"b"]
