"""The batch API: ``send_many`` (one handle, and which messages failed) and
``receive_many`` (a list), on both adapters."""

from __future__ import annotations

import asyncio

import pytest

from reliable import (
    AsyncBatchHandle,
    AsyncNode,
    BatchHandle,
    MailboxNotFound,
    Node,
    SendTimeout,
    UsageError,
)

pytestmark = [pytest.mark.loopback]


def _dest(addr: tuple[str, int], box: str) -> str:
    return "{}:{}/{}".format(*addr[:2], box)


def test_send_many_is_one_handle_and_receive_many_a_list() -> None:
    with Node() as a, Node() as b:
        batch = a.send_many(b.address, [b"m%d" % i for i in range(300)])
        assert isinstance(batch, BatchHandle) and len(batch) == 300
        receipts = batch.result(10)
        assert len(receipts) == 300 and batch.done() and batch.failures() == {}
        assert [r.size for r in receipts[:2]] == [2, 2]
        got: list[bytes] = []
        while len(got) < 300:
            part = b.receive_many(64, timeout=5)
            assert 0 < len(part) <= 64
            got.extend(m.data for m in part)
        assert got == [b"m%d" % i for i in range(300)]
        assert b.receive_many(10, timeout=0.05) == []  # the timeout passed: an empty list


def test_send_many_says_which_messages_failed() -> None:
    with Node() as a, Node() as b:
        b.create_mailbox("two", 2)
        batch = a.send_many(_dest(b.address, "two"), [b"a", b"b", b"c", b"d"], timeout=0.5)
        failed = batch.failures(10)
        assert sorted(failed) == [2, 3]  # the mailbox holds two; the others time out
        assert all(isinstance(e, SendTimeout) for e in failed.values())
        with pytest.raises(SendTimeout):
            batch.result(0)
        nowhere = a.send_many(_dest(b.address, "nobody"), [b"x", b"y"])
        assert all(isinstance(e, MailboxNotFound) for e in nowhere.failures(10).values())
        assert len(nowhere.failures()) == 2


def test_batch_misuse_is_a_usage_error() -> None:
    with Node() as a:
        with pytest.raises(UsageError):
            a.send_many("multicast://239.1.2.3:7000", [b"x"])
        with pytest.raises(UsageError):
            a.receive_many(0)
        with pytest.raises(UsageError):
            a.send_many(a.address, [b"ok", 42])  # type: ignore[list-item]
        assert a.stats().peers == ()  # checked before anything was queued


def test_async_send_many_and_receive_many() -> None:
    async def main() -> None:
        async with AsyncNode() as a, AsyncNode() as b:
            b.create_mailbox("two", 2)
            batch = await a.send_many(b.address, [b"m%d" % i for i in range(200)])
            assert isinstance(batch, AsyncBatchHandle) and len(batch) == 200
            assert len(await batch) == 200 and batch.failures() == {}
            got: list[bytes] = []
            while len(got) < 200:
                got.extend(m.data for m in await b.receive_many(50, timeout=5))
            assert got == [b"m%d" % i for i in range(200)]
            assert await b.receive_many(5, timeout=0.05) == []
            some = await a.send_many(_dest(b.address, "two"), [b"a", b"b", b"c"], timeout=0.5)
            await asyncio.wait([some])
            assert list(some.failures()) == [2]
            with pytest.raises(SendTimeout):
                await some

    asyncio.run(main())
