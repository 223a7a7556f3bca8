"""Peek, receive under a lock (visibility timeout), ack/release and explicit delete."""

from __future__ import annotations

import pytest

from reliable import Config, Node, Selector, errors, events
from reliable.store import MemoryStore, sync_stores

from .harness import B, Pair
from .test_durable import DurablePair


def _filled(p: Pair, texts: list[bytes], **options: object) -> None:
    p.b.create_mailbox("q", **options)
    for t in texts:
        p.a.endpoint.send(B, t, now=p.now, mailbox="q")
    p.run(0.5)  # not settle(): a sender waiting on a parked message keeps probing


def test_peek_browses_without_removing() -> None:
    p = Pair(release=False)
    _filled(p, [b"one", b"two"])
    ep = p.b.endpoint
    first = ep.peek("q", now=p.now)
    assert first is not None and first.data == b"one"
    assert ep.peek("q", now=p.now) is first, "read many times"
    assert ep.stats().mailbox("q").messages == 2
    assert ep.remove_message("q", first, now=p.now) is True, "explicit delete"
    assert ep.remove_message("q", first, now=p.now) is False
    taken = ep.take("q", now=p.now)
    assert taken is not None and taken.data == b"two"


def test_a_locked_message_is_invisible_until_its_lock_expires() -> None:
    p = Pair(release=False)
    _filled(p, [b"one", b"two"])
    ep = p.b.endpoint
    first = ep.take("q", lock=5.0, now=p.now)
    assert first is not None and first.data == b"one"
    assert ep.stats().mailbox("q").locked == 1
    second = ep.take("q", lock=5.0, now=p.now)
    assert second is not None and second.data == b"two", "nobody else sees the locked one"
    assert ep.take("q", now=p.now) is None
    assert ep.get_timer() is not None and ep.get_timer() <= p.now + 5.0
    p.now += 5.0
    ep.handle_timer(p.now)  # both locks expire: back, in their order
    again = ep.take("q", lock=5.0, now=p.now)
    assert again is first, "the same message comes back, at the head"
    assert ep.ack("q", again, now=p.now) is True
    assert ep.ack("q", second, now=p.now) is False, "its lock expired: the ack is refused"
    assert ep.ack("q", again, now=p.now) is False, "acked once"
    rest = ep.take("q", now=p.now)
    assert rest is second
    assert ep.stats().mailbox_bytes == 0


def test_a_late_ack_never_lets_two_lock_holders_own_one_message() -> None:
    p = Pair(release=False)
    _filled(p, [b"job"])
    ep = p.b.endpoint
    mine = ep.take("q", lock=1.0, receiver="slow", now=p.now)
    p.now += 1.5
    theirs = ep.take("q", lock=1.0, receiver="fast", now=p.now)  # expired lazily, relocked
    assert theirs is mine
    assert ep.ack("q", mine, now=p.now) is True  # one ack: the holder now is "fast"
    assert ep.ack("q", theirs, now=p.now) is False, "it is gone: no second owner"


def test_release_hands_the_message_to_a_waiting_receiver() -> None:
    p = Pair(release=False)
    _filled(p, [b"job"])
    ep = p.b.endpoint
    msg = ep.take("q", lock=30.0, now=p.now)
    assert msg is not None
    waiter = ep.wait_for_message("q", now=p.now)
    assert ep.release("q", msg, now=p.now) is True
    (taken,) = [e for e in p.b.of(events.MessageTaken) if e.waiter == waiter]
    assert taken.message is msg
    assert ep.stats().mailbox("q").total_out == 1


def test_locked_messages_hold_their_room() -> None:
    p = Pair(release=False)
    _filled(p, [b"a", b"b"], capacity=1)
    ep = p.b.endpoint
    assert ep.stats().mailbox("q").parked == 1
    msg = ep.take("q", lock=30.0, now=p.now)
    assert msg is not None
    assert ep.stats().mailbox("q").parked == 1, "still full: the locked one may come back"
    ep.ack("q", msg, now=p.now)
    assert ep.stats().mailbox("q").messages == 1 and ep.stats().mailbox("q").parked == 0


def test_a_durable_locked_message_stays_stored_until_acked() -> None:
    p = DurablePair(release=False)
    store = MemoryStore()
    _filled(p, [b"job"], store=store)
    ep = p.b.endpoint
    msg = ep.take("q", lock=30.0, now=p.now)
    assert msg is not None
    sync_stores(ep, p.now)
    assert [m.data for m in store.rows.values()] == [b"job"], "a crash now brings it back"
    p.restart_b()
    p.b.create_mailbox("q", store=store.crashed())
    assert p.b.endpoint.take("q", now=p.now) is not None
    assert ep.ack("q", msg, now=p.now)
    sync_stores(ep, p.now)
    assert store.rows == {}


@pytest.mark.parametrize("lock", [0, -1, float("inf"), True])
def test_bad_locks_are_refused(lock: object) -> None:
    p = Pair()
    with pytest.raises(errors.UsageError, match="lock"):
        p.b.endpoint.take("", Selector(), lock=lock, now=0.0)  # type: ignore[arg-type]


@pytest.mark.loopback
def test_mailbox_handles_peek_lock_ack_and_remove_over_loopback(tmp_path: object) -> None:
    with Node(config=Config()) as server, Node() as client:
        box = server.create_mailbox("q")
        dest = f"127.0.0.1:{server.address[1]}/q"
        for text in (b"a", b"b", b"c"):
            client.send(dest, text)
        peeked = box.peek()
        assert peeked is not None and peeked.data == b"a"
        assert box.remove(peeked)
        locked = box.receive(timeout=5, lock=0.2)
        assert locked.data == b"b"
        assert box.receive(timeout=5).data == b"c"
        again = box.receive(timeout=5, lock=10)  # "b" is back once its lock expired
        assert again is locked and box.ack(again)
        assert box.peek() is None and box.stats().locked == 0


def test_raising_the_capacity_at_run_time_admits_parked_messages() -> None:
    p = Pair(release=False)
    _filled(p, [b"a", b"b", b"c"], capacity=1)
    ep = p.b.endpoint
    assert ep.stats().mailbox("q").parked == 2
    ep.set_limits("q", 3, None, p.now)
    p.run(0.2)
    stats = ep.stats().mailbox("q")
    assert (stats.messages, stats.parked, stats.capacity) == (3, 0, 3)
    assert len(p.a.of(events.MessageDelivered)) == 3, "their senders got their receipts"


def test_lowering_the_limits_keeps_what_is_queued_and_parks_new_arrivals() -> None:
    p = Pair(release=False)
    _filled(p, [b"a", b"b"])
    ep = p.b.endpoint
    ep.set_limits("q", 1, 100, p.now)
    p.a.endpoint.send(B, b"c", now=p.now, mailbox="q")
    p.run(0.2)
    stats = ep.stats().mailbox("q")
    assert (stats.messages, stats.parked, stats.max_bytes) == (2, 1, 100)
    with pytest.raises(errors.UsageError, match="rendezvous"):
        ep.set_limits("q", 0, None, p.now)
    with pytest.raises(errors.UsageError, match="capacity"):
        ep.set_limits("q", -1, None, p.now)


@pytest.mark.loopback
def test_a_handle_changes_one_limit_and_keeps_the_other() -> None:
    with Node() as server:
        box = server.create_mailbox("q", 5, max_bytes=1000)
        box.set_limits(capacity=7)
        assert (box.stats().capacity, box.stats().max_bytes) == (7, 1000)
        box.set_limits(max_bytes=None)
        assert (box.stats().capacity, box.stats().max_bytes) == (7, None)
