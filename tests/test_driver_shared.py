"""Pieces of reliable.driver that both adapters use, tested once here."""

from __future__ import annotations

import pytest

from reliable.driver import OutboxTarget, StoredBatch


class _Store:
    def __init__(self) -> None:
        self.settled: list[int] = []

    def settle(self, row: int) -> None:
        self.settled.append(row)


def test_a_stored_batch_settles_the_rows_after_one_that_failed_to_queue() -> None:
    store = _Store()
    stored = [(10, "t10"), (11, "t11"), (12, "t12"), (13, "t13")]
    queued = []
    with (
        pytest.raises(RuntimeError),
        StoredBatch(
            store,  # type: ignore[arg-type]
            ("127.0.0.1", 9),
            "jobs",
            stored,
            [b"a", b"b", b"c", b"d"],
        ) as batch,
    ):
        for row, target, data in batch:
            assert target == OutboxTarget(("127.0.0.1", 9), "jobs", f"t{row}")
            if row == 11:
                raise RuntimeError("queueing failed")
            queued.append((row, data))
    assert queued == [(10, b"a")]
    assert store.settled == [12, 13], "stored, never queued: they leave the outbox file"


def test_a_stored_batch_queued_whole_settles_nothing() -> None:
    store = _Store()
    with StoredBatch(store, ("::1", 9), "", [(1, "x")], [b"m"]) as batch:  # type: ignore[arg-type]
        assert [(row, data) for row, _target, data in batch] == [(1, b"m")]
    assert store.settled == []


def test_receipt_of_makes_the_receipt_from_event_makes() -> None:
    """The fast receipt maker copies every field (non-default values, so a field it
    missed would show as a default) and makes a real, frozen Receipt."""
    import dataclasses

    from reliable import events
    from reliable.driver import receipt_of
    from reliable.message import Receipt

    event = events.MessageDelivered(
        ticket=7,
        peer=("127.0.0.1", 9),
        size=1024,
        fragments=3,
        transmissions=5,
        elapsed=0.25,
        incarnation=0x1234,
        mailbox="jobs",
        deferred=True,
        receiver="worker-1",
        failovers=((("127.0.0.1", 8), "unreachable"),),
    )
    made = receipt_of(event)
    assert type(made) is Receipt
    assert made == Receipt.from_event(event)
    for field in dataclasses.fields(Receipt):
        assert getattr(made, field.name) == getattr(event, field.name)
    assert made.retransmissions == 2
    with pytest.raises(dataclasses.FrozenInstanceError):
        made.size = 1  # type: ignore[misc]
    assert hash(made) == hash(Receipt.from_event(event))
