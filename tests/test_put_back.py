"""Endpoint.put_back: a message handed to a receive that gave up in the same instant goes
back as if it had never been taken (its sender already has its receipt, so it must not be
lost): its place in priority order, a waiting receiver first, a lock released, a durable
row stored again first, a rendezvous sender not told twice."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from reliable import Message, Selector, events
from reliable.store import MemoryStore, sync_stores

from .harness import B, Pair
from .test_durable import DurablePair


def _filled(p: Pair, items: list[tuple[bytes, int]], **options: object) -> None:
    p.b.create_mailbox("q", **options)
    for data, priority in items:
        p.a.endpoint.send(B, data, now=p.now, mailbox="q", priority=priority)
    p.run(0.5)


def _drain(p: Pair) -> list[bytes]:
    out = []
    while (m := p.b.endpoint.take("q", now=p.now)) is not None:
        out.append(m.data)
    return out


@settings(max_examples=40, deadline=None)
@given(
    priorities=st.lists(st.integers(0, 3), min_size=1, max_size=8),
    taken=st.integers(1, 8),
    seed=st.integers(0, 2**16),
)
def test_putting_back_what_was_taken_restores_the_order(
    priorities: list[int], taken: int, seed: int
) -> None:
    """Take some messages, put them back in any order: the mailbox hands out exactly
    what it would have, had they never been taken (each is back at the head of its
    priority, so putting back in the reverse order of taking restores the order)."""
    p = Pair(release=False)
    _filled(p, [(b"m%d" % i, pr) for i, pr in enumerate(priorities)])
    ep = p.b.endpoint
    before = ep.stats().mailbox("q")
    held = ep.stats().mailbox_bytes
    out = [m for _ in range(min(taken, len(priorities))) if (m := ep.take("q", now=p.now))]
    # Back in the reverse order of taking (as nested cancellations unwind), the
    # priorities interleaved at random: each lands at its own priority's head.
    rng = random.Random(seed)
    stacks: dict[int, list[Message]] = {}
    for m in out:
        stacks.setdefault(m.priority, []).append(m)
    while stacks:
        priority = rng.choice(sorted(stacks))
        assert ep.put_back(stacks[priority].pop(), now=p.now) is True
        if not stacks[priority]:
            del stacks[priority]
    after = ep.stats().mailbox("q")
    assert after.messages == before.messages and after.total_out == before.total_out
    assert after.total_in == before.total_in
    assert ep.stats().mailbox_bytes == held
    expected = [
        b"m%d" % i for i, _pr in sorted(enumerate(priorities), key=lambda ip: (-ip[1], ip[0]))
    ]
    assert _drain(p) == expected


def test_a_message_put_back_goes_to_the_receiver_already_waiting() -> None:
    p = Pair(release=False)
    _filled(p, [(b"job", 0)])
    ep = p.b.endpoint
    msg = ep.take("q", now=p.now)
    assert msg is not None
    waiter = ep.wait_for_message("q", now=p.now)
    assert ep.put_back(msg, now=p.now) is True
    (taken,) = [e for e in p.b.of(events.MessageTaken) if e.waiter == waiter]
    assert taken.message is msg
    stats = ep.stats().mailbox("q")
    assert (stats.total_in, stats.total_out, stats.messages) == (1, 1, 0)
    assert ep.stats().mailbox_bytes == 0


def test_a_handed_off_message_put_back_is_received_again() -> None:
    """The race itself, in the core: a waiting receive is answered, its receiver gives
    up at that moment and puts the message back; the next receive gets it."""
    p = Pair(release=False)
    p.b.create_mailbox("q")
    p.connect()
    ep = p.b.endpoint
    waiter = ep.wait_for_message("q", now=p.now)
    ticket = p.a.endpoint.send(B, b"x", now=p.now, mailbox="q")
    p.settle()
    (taken,) = p.b.of(events.MessageTaken)
    assert taken.waiter == waiter
    assert any(e.ticket == ticket for e in p.a.of(events.MessageDelivered))
    assert ep.put_back(taken.message, now=p.now) is True
    again = ep.take("q", now=p.now)
    assert again is taken.message


def test_a_locked_take_put_back_is_released() -> None:
    p = Pair(release=False)
    _filled(p, [(b"one", 0), (b"two", 0)])
    ep = p.b.endpoint
    msg = ep.take("q", lock=30.0, now=p.now)
    assert msg is not None and msg.data == b"one"
    assert ep.put_back(msg, locked=True, now=p.now) is True
    assert ep.stats().mailbox("q").locked == 0
    assert ep.ack("q", msg, now=p.now) is False, "no longer locked"
    assert _drain(p) == [b"one", b"two"]
    # Its lock expired first: it is back already, and put_back says so.
    p2 = Pair(release=False)
    _filled(p2, [(b"one", 0)])
    m2 = p2.b.endpoint.take("q", lock=1.0, now=p2.now)
    assert m2 is not None
    p2.now += 2.0
    p2.b.endpoint.handle_timer(p2.now)
    assert p2.b.endpoint.put_back(m2, locked=True, now=p2.now) is False
    assert _drain(p2) == [b"one"], "once, not twice"


def test_a_truncated_message_or_one_of_a_deleted_mailbox_is_not_put_back() -> None:
    p = Pair(release=False)
    _filled(p, [(b"abcdef", 0), (b"x", 0)])
    ep = p.b.endpoint
    cut = ep.take("q", Selector(max_size=2, truncate=True), now=p.now)
    assert cut is not None and cut.data == b"ab" and cut.truncated == 4
    assert ep.put_back(cut, now=p.now) is False
    whole = ep.take("q", now=p.now)
    assert whole is not None
    ep.delete_mailbox("q", now=p.now)
    assert ep.put_back(whole, now=p.now) is False


def test_a_durable_message_put_back_is_stored_again_first() -> None:
    p = DurablePair(release=False)
    store = MemoryStore()
    p.b.create_mailbox("jobs", store=store)
    for i in range(3):
        p.a.endpoint.send(B, b"m%d" % i, now=p.now, mailbox="jobs")
    p.settle()
    ep = p.b.endpoint
    first = ep.take("jobs", now=p.now)
    assert first is not None and first.data == b"m0"
    sync_stores(ep, p.now)  # handed out: its row deleted
    assert sorted(m.data for m in store.crashed().rows.values()) == [b"m1", b"m2"]
    assert ep.put_back(first, now=p.now) is True
    assert ep.owes_writes()
    sync_stores(ep, p.now)
    assert [m.data for _row, m in store.crashed().restored] == [b"m0", b"m1", b"m2"]
    # Taken again, its new row goes; a restart then finds the other two, in order.
    again = ep.take("jobs", now=p.now)
    assert again is first
    sync_stores(ep, p.now)
    assert [m.data for _row, m in store.crashed().restored] == [b"m1", b"m2"]


def test_a_durable_put_back_taken_again_before_its_commit_leaves_no_row() -> None:
    p = DurablePair(release=False)
    store = MemoryStore()
    p.b.create_mailbox("jobs", store=store)
    p.a.endpoint.send(B, b"m0", now=p.now, mailbox="jobs")
    p.settle()
    ep = p.b.endpoint
    msg = ep.take("jobs", now=p.now)
    assert msg is not None
    sync_stores(ep, p.now)
    assert ep.put_back(msg, now=p.now) is True
    assert ep.take("jobs", now=p.now) is msg  # before the re-insert commits
    sync_stores(ep, p.now)  # insert, then delete, in one batch
    assert store.crashed().restored == []
    assert ep.stats().mailbox_bytes == 0


def test_a_rendezvous_message_put_back_waits_for_the_next_receiver() -> None:
    p = Pair(release=False)
    p.b.create_mailbox("meet", capacity=0)
    p.connect()
    ep = p.b.endpoint
    waiter = ep.wait_for_message("meet", receiver="first", now=p.now)
    ticket = p.a.endpoint.send(B, b"x", now=p.now, mailbox="meet")
    p.settle()
    (taken,) = p.b.of(events.MessageTaken)
    assert taken.waiter == waiter
    (delivered,) = [e for e in p.a.of(events.MessageDelivered) if e.ticket == ticket]
    assert delivered.receiver == "first"
    assert ep.put_back(taken.message, now=p.now) is True
    assert ep.stats().mailbox("meet").parked == 1
    again = ep.take("meet", receiver="second", now=p.now)
    assert again is taken.message
    p.settle()
    assert len(p.a.of(events.MessageDelivered)) == 1, "its sender was told once"
    assert ep.stats().mailbox_bytes == 0
