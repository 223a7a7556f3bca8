"""Receive-side size limits (msgrcv's msgsz: E2BIG or MSG_NOERROR) and receives from a
set of sources: the core on virtual time, then both adapters on loopback."""

from __future__ import annotations

import asyncio

import pytest

from reliable import AsyncNode, Node, Selector, errors, events

from .harness import A, B, Pair


def _queued(p: Pair, sizes: list[int], mailbox: str = "") -> None:
    for n in sizes:
        p.a.endpoint.send(B, b"x" * n, now=p.now, mailbox=mailbox)
    p.settle()


def test_a_message_longer_than_max_size_stays_queued_and_the_receive_fails() -> None:
    p = Pair(release=False)
    _queued(p, [10, 3])
    small = Selector(max_size=5)
    with pytest.raises(errors.MessageTooBig) as raised:
        p.b.endpoint.take(selector=small, now=p.now)
    assert (raised.value.size, raised.value.max_size) == (10, 5)
    assert "truncate=True" in str(raised.value)
    assert p.b.endpoint.stats().mailbox("").messages == 2, "nothing removed"
    whole = p.b.endpoint.take(selector=Selector(max_size=10), now=p.now)
    assert whole is not None and whole.data == b"x" * 10 and whole.truncated == 0


def test_truncate_hands_the_message_out_cut_and_says_so() -> None:
    p = Pair(release=False)
    _queued(p, [10])
    msg = p.b.endpoint.take(selector=Selector(max_size=4, truncate=True), now=p.now)
    assert msg is not None and msg.data == b"xxxx" and msg.truncated == 6
    assert p.b.endpoint.stats().mailbox_bytes == 0, "the whole message's bytes are released"


def test_a_waiting_receive_fails_on_a_message_too_long_and_the_next_one_gets_it() -> None:
    p = Pair(release=False)
    p.connect()
    small = p.b.endpoint.wait_for_message(selector=Selector(max_size=4), receiver="s", now=p.now)
    cut = p.b.endpoint.wait_for_message(
        selector=Selector(max_size=4, truncate=True), receiver="c", now=p.now
    )
    _queued(p, [9])
    failed = {e.waiter: e.error for e in p.b.of(events.ReceiveFailed)}
    taken = {e.waiter: e.message for e in p.b.of(events.MessageTaken)}
    assert isinstance(failed[small], errors.MessageTooBig)
    assert taken[cut].data == b"xxxx" and taken[cut].truncated == 5
    assert p.b.endpoint.stats().mailbox_bytes == 0


def test_truncate_needs_max_size_and_does_not_mix_with_a_lock() -> None:
    p = Pair(release=False)
    with pytest.raises(errors.UsageError, match="give max_size"):
        Selector(truncate=True)
    with pytest.raises(errors.UsageError, match="max_size"):
        Selector(max_size=-1)
    with pytest.raises(errors.UsageError, match="lock"):
        p.b.endpoint.take(selector=Selector(max_size=1, truncate=True), lock=5, now=p.now)


def test_a_receive_from_a_set_of_sources_takes_the_first_from_any_of_them() -> None:
    p = Pair(release=False)
    _queued(p, [1, 2])
    stranger = ("10.9.9.9", 9)
    assert p.b.endpoint.take(selector=Selector(source=frozenset({stranger})), now=p.now) is None
    either = Selector(source=frozenset({stranger, A}))
    first = p.b.endpoint.take(selector=either, now=p.now)
    assert first is not None and len(first.data) == 1  # arrival order


@pytest.mark.loopback
def test_blocking_node_max_size_truncate_and_source_sets() -> None:
    with Node() as server, Node() as one, Node() as two, Node() as three:
        box = server.create_mailbox("q")
        dest = f"127.0.0.1:{server.address[1]}/q"
        three.send(dest, b"from three", timeout=5)
        one.send(dest, b"0123456789", timeout=5)
        two.send(dest, b"from two", timeout=5)
        with pytest.raises(errors.MessageTooBig):
            box.receive(timeout=5, max_size=4)  # "from three" is first: 10 bytes
        got = box.receive(timeout=5, source=[one.address, two.address], max_size=4, truncate=True)
        assert (got.data, got.truncated, got.source) == (b"0123", 6, one.address)
        pair = [f"127.0.0.1:{one.address[1]}", f"127.0.0.1:{two.address[1]}"]
        assert server.receive_nowait(mailbox="q", source=pair).data == b"from two"
        assert box.receive_nowait(source=pair) is None
        assert [m.data for m in box.receive_many(5, timeout=5)] == [b"from three"]
        with pytest.raises(errors.UsageError, match="source"):
            box.receive_nowait(source=[])


@pytest.mark.loopback
def test_async_node_max_size_truncate_and_source_sets() -> None:
    async def main() -> None:
        async with AsyncNode() as server, AsyncNode() as one, AsyncNode() as two:
            box = server.create_mailbox("q")
            dest = f"127.0.0.1:{server.address[1]}/q"
            await one.send(dest, b"0123456789", timeout=5)
            await two.send(dest, b"short", timeout=5)
            with pytest.raises(errors.MessageTooBig):
                await box.receive(timeout=5, max_size=4)
            cut = await box.receive_many(5, timeout=5, max_size=5, truncate=True)
            assert [(m.data, m.truncated) for m in cut] == [(b"01234", 5), (b"short", 0)]
            waiting = asyncio.ensure_future(box.receive(timeout=5, max_size=2))
            await asyncio.sleep(0.05)
            await two.send(dest, b"late", timeout=5)
            with pytest.raises(errors.MessageTooBig):
                await waiting
            got = await server.receive(timeout=5, mailbox="q", source=[two.address, one.address])
            assert got.data == b"late", "still queued after the waiting receive failed"

    asyncio.run(asyncio.wait_for(main(), 30))


@pytest.mark.loopback
def test_truncate_without_max_size_is_refused_by_the_adapters_too() -> None:
    """Selector.of's fast path for "anything" skipped the check Selector() makes, so a
    receive with truncate=True and no max_size silently took whole messages."""
    from reliable import Node

    with Node() as node:
        with pytest.raises(errors.UsageError, match="give max_size too"):
            node.receive_nowait(truncate=True)
        with pytest.raises(errors.UsageError, match="give max_size too"):
            node.receive(timeout=0.01, truncate=True)
