"""Mailbox semantics against small reference models (hypothesis chooses the operations)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from reliable import Message, Selector, UsageError
from reliable.mailbox import Mailbox, MessageQueue

SOURCES = ["p", "q", "r"]

selectors = st.builds(
    Selector,
    source=st.sampled_from([None, *SOURCES]),
    msg_type=st.integers(-3, 3),
    except_type=st.just(False),
) | st.builds(Selector, msg_type=st.integers(1, 3), except_type=st.just(True))


def _message(n: int, source: str, msg_type: int, priority: int, size: int = 1) -> Message:
    return Message(source=source, data=bytes(size), msg_type=msg_type, priority=priority, msg_id=n)


def model_take(queue: list[Message], selector: Selector) -> Message | None:
    """msgrcv selection over priority order, written as directly as the docs state it."""
    candidates = [m for m in queue if selector.admits(m)]
    if not candidates:
        return None
    if selector.msg_type < 0:
        lowest = min(m.msg_type for m in candidates)
        candidates = [m for m in candidates if m.msg_type == lowest]
    # highest priority first, then arrival order (list position)
    best = max(candidates, key=lambda m: (m.priority, -queue.index(m)))
    queue.remove(best)
    return best


push_ops = st.tuples(
    st.just("push"), st.sampled_from(SOURCES), st.integers(1, 3), st.integers(0, 2)
)
take_ops = st.tuples(st.just("take"), selectors)


@settings(max_examples=300, deadline=None)
@given(ops=st.lists(st.one_of(push_ops, take_ops), max_size=60))
def test_queue_selects_exactly_as_the_reference_model(ops: list[tuple[Any, ...]]) -> None:
    queue = MessageQueue()
    model: list[Message] = []
    counter = itertools.count()
    for op in ops:
        if op[0] == "push":
            msg = _message(next(counter), op[1], op[2], op[3])
            queue.push(msg)
            model.append(msg)
        else:
            assert queue.take(op[1]) is model_take(model, op[1])
        assert len(queue) == len(model) and list(queue) == sorted(
            model, key=lambda m: (-m.priority, model.index(m))
        )


def test_negative_type_takes_the_lowest_type_first() -> None:
    queue = MessageQueue()
    for n, (t, prio) in enumerate([(5, 0), (2, 0), (3, 1), (2, 1), (1, 0)]):
        queue.push(_message(n, "p", t, prio))
    assert [queue.take(Selector(msg_type=-3)).msg_id for _ in range(4)] == [4, 3, 1, 2]  # type: ignore[union-attr]
    assert queue.take(Selector(msg_type=-3)) is None and len(queue) == 1


def test_except_type_and_source_selection() -> None:
    queue = MessageQueue()
    queue.push(_message(0, "p", 1, 0))
    queue.push(_message(1, "q", 2, 0))
    queue.push(_message(2, "p", 3, 0))
    assert queue.take(Selector(msg_type=1, except_type=True)).msg_id == 1  # type: ignore[union-attr]
    assert queue.take(Selector(source="p", msg_type=3)).msg_id == 2  # type: ignore[union-attr]
    assert queue.take(Selector(source="q")) is None


def test_bad_selectors_fail_before_anything_happens() -> None:
    with pytest.raises(UsageError, match="except_type"):
        Selector(msg_type=0, except_type=True)
    with pytest.raises(UsageError, match="32-bit"):
        Selector(msg_type=1 << 40)
    with pytest.raises(UsageError, match="integer"):
        Selector(msg_type="3")  # type: ignore[arg-type]


# --------------------------------------------------------------- whole mailbox


@dataclass
class Harness:
    """One mailbox and a record of everything its callbacks reported."""

    capacity: int | None
    max_bytes: int | None = None
    unparked: list[tuple[Message, str | None]] = field(default_factory=list)
    handed: dict[int, Message] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.box = Mailbox(
            "m",
            capacity=self.capacity,
            max_bytes=self.max_bytes,
            owner=None,
            on_unpark=lambda m, r: self.unparked.append((m, r)),
            on_handoff=self.handed.__setitem__,
            now=0.0,
        )

    def unparked_messages(self) -> list[Message]:
        return [m for m, _ in self.unparked]


mailbox_ops = st.lists(
    st.one_of(
        st.tuples(st.just("offer"), st.sampled_from(SOURCES), st.integers(1, 3), st.integers(0, 2)),
        st.tuples(st.just("take"), selectors),
        st.tuples(st.just("wait"), selectors),
        st.tuples(st.just("cancel"), st.integers(0, 20)),
    ),
    max_size=80,
)


@settings(max_examples=300, deadline=None)
@given(capacity=st.sampled_from([0, 1, 3, None]), ops=mailbox_ops)
def test_mailbox_invariants_hold_under_any_operations(
    capacity: int | None, ops: list[tuple[Any, ...]]
) -> None:
    h = Harness(capacity)
    box = h.box
    offered: list[Message] = []
    taken: list[Message] = []
    waiting: dict[int, Selector] = {}
    counter = itertools.count()
    for op in ops:
        if op[0] == "offer":
            msg = _message(next(counter), op[1], op[2], op[3])
            offered.append(msg)
            entered = box.offer(msg, 0.0)
            assert entered != (msg in list(box.parked) or msg in h.unparked_messages())
        elif op[0] == "take":
            got = box.take(op[1], "r", 0.0)
            if got is not None:
                assert op[1].admits(got)
                taken.append(got)
        elif op[0] == "wait":  # a blocking receive: take, or queue up
            if (got := box.take(op[1], "w", 0.0)) is not None:
                taken.append(got)
            else:
                ticket = next(counter)
                box.wait(ticket, op[1], "w")
                waiting[ticket] = op[1]
        else:
            tickets = sorted(waiting)
            if tickets:
                ticket = tickets[op[1] % len(tickets)]
                if box.cancel_wait(ticket):
                    del waiting[ticket]
        for ticket in list(waiting):
            if ticket in h.handed:
                assert waiting.pop(ticket).admits(h.handed[ticket])
        # Invariants.
        delivered = taken + list(h.handed.values())
        assert len({id(m) for m in delivered}) == len(delivered), "a message went out twice"
        assert len(delivered) + len(box.queue) + len(box.parked) == len(offered), "lost"
        if capacity is not None:
            assert len(box.queue) <= capacity
        visible = list(box.parked) if capacity == 0 else list(box.queue)
        for selector in waiting.values():
            assert not any(selector.admits(m) for m in visible), "a wanted message sits idle"
        if box.parked and capacity != 0:
            assert len(box.queue) == capacity, "parked while there was room"
    # Unparking reports each parked message once, and a rendezvous names its receiver.
    assert len({id(m) for m, _ in h.unparked}) == len(h.unparked)
    if capacity == 0:
        assert all(r is not None for _, r in h.unparked)


@settings(max_examples=200, deadline=None)
@given(
    capacity=st.sampled_from([0, 1, 2, 5, None]),
    arrivals=st.lists(st.tuples(st.sampled_from(SOURCES), st.integers(0, 2)), max_size=40),
    takes=st.lists(st.integers(0, 3), max_size=40),
)
def test_each_sender_keeps_its_order_within_a_priority(
    capacity: int | None, arrivals: list[tuple[str, int]], takes: list[int]
) -> None:
    """Arrivals interleaved with plain receives: per (sender, priority) order survives parking."""
    h = Harness(capacity)
    out: list[Message] = []
    steps = iter(takes)
    for n, (source, priority) in enumerate(arrivals):
        h.box.offer(_message(n, source, 1, priority), 0.0)
        for _ in range(next(steps, 0)):
            if (got := h.box.take(Selector(), "r", 0.0)) is not None:
                out.append(got)
    while (got := h.box.take(Selector(), "r", 0.0)) is not None:
        out.append(got)
    assert sorted(m.msg_id for m in out) == list(range(len(arrivals))), "all, exactly once"
    for source, priority in itertools.product(SOURCES, range(3)):
        ids = [m.msg_id for m in out if (m.source, m.priority) == (source, priority)]
        assert ids == sorted(ids)


def test_waiting_receivers_are_served_first_come_first_served() -> None:
    h = Harness(None)
    for ticket in (1, 2, 3):
        h.box.wait(ticket, Selector(), f"w{ticket}")
    for n in range(3):
        h.box.offer(_message(n, "p", 1, 0), 0.0)
    assert [(t, m.msg_id) for t, m in h.handed.items()] == [(1, 0), (2, 1), (3, 2)]


def test_a_selective_waiter_is_passed_over_for_a_message_it_does_not_want() -> None:
    h = Harness(None)
    h.box.wait(1, Selector(msg_type=7), "picky")
    h.box.wait(2, Selector(), "any")
    h.box.offer(_message(0, "p", 1, 0), 0.0)
    assert list(h.handed) == [2]
    h.box.offer(_message(1, "p", 7, 0), 0.0)
    assert h.handed[1].msg_id == 1


def test_rendezvous_parks_until_taken_and_names_the_receiver() -> None:
    h = Harness(0)
    msg = _message(0, "p", 1, 0)
    assert h.box.offer(msg, 0.0) is False and list(h.box.parked) == [msg]
    assert h.box.take(Selector(), "alice", 1.0) is msg
    assert h.unparked == [(msg, "alice")]
    stats = h.box.stats(3.0)
    assert (stats.total_in, stats.total_out, stats.last_receiver) == (1, 1, "alice")
    assert stats.last_receive_age == 2.0 and stats.last_sender == "p"


def test_bounded_mailbox_admits_parked_messages_by_priority_as_room_appears() -> None:
    h = Harness(1)
    first, low, high = (_message(n, "p", 1, prio) for n, prio in enumerate([0, 0, 5]))
    assert h.box.offer(first, 0.0) is True
    assert h.box.offer(low, 0.0) is False and h.box.offer(high, 0.0) is False
    assert h.box.take(Selector(), "r", 0.0) is first
    assert h.unparked == [(high, None)]  # the highest priority parked message got in
    stats = h.box.stats(0.0)
    assert (stats.messages, stats.parked, stats.high_water, stats.deferred) == (1, 1, 1, 2)


def test_byte_bounded_mailbox() -> None:
    h = Harness(None, max_bytes=10)
    assert h.box.offer(_message(0, "p", 1, 0, size=6), 0.0) is True
    assert h.box.offer(_message(1, "p", 1, 0, size=6), 0.0) is False
    assert not h.box.fits(11) and h.box.fits(10)


@pytest.mark.parametrize(
    ("capacity", "max_bytes", "match"),
    [
        (-1, None, "capacity"),
        (None, 0, "rendezvous"),
        (1.5, None, "capacity"),
        (True, None, "capacity"),
    ],
)
def test_bad_capacities_are_refused(capacity: object, max_bytes: object, match: str) -> None:
    with pytest.raises(UsageError, match=match):
        Harness(capacity, max_bytes)  # type: ignore[arg-type]
