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
