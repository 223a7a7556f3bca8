"""Node's short paths (a send to a node seen before, a receive that selects nothing)
behave as the general ones: same errors, same waiting, nothing lost."""

from __future__ import annotations

import threading

import pytest

from reliable import Node, errors


def test_a_send_to_a_known_node_after_close_raises_node_closed() -> None:
    with Node() as server:
        client = Node()
        client.send(server.address, b"first")  # the destination is now known
        assert server.receive(timeout=5).data == b"first"
        client.close()
        with pytest.raises(errors.NodeClosed):
            client.send_nowait(server.address, b"late")


def test_a_plain_receive_waits_times_out_and_polls() -> None:
    with Node() as node:
        with pytest.raises(errors.ReceiveTimeout):
            node.receive(timeout=0)
        with pytest.raises(errors.ReceiveTimeout):
            node.receive(timeout=0.05)
        node.post("", b"mine")
        assert node.receive(timeout=0).data == b"mine"  # own posts are seen at once
        with pytest.raises(errors.UnknownMailbox):
            node.receive(timeout=0.05, mailbox="nope")


def test_many_threads_stream_to_plain_receives_exactly_once() -> None:
    """Several sending threads (send_nowait to a known node, so held back while the
    link is busy) and several receiving threads (plain receive): every message
    arrives once, and a burst followed by silence is flushed (no stall)."""
    senders, per_sender, receivers = 4, 300, 3
    total = senders * per_sender
    got: list[bytes] = []
    got_lock = threading.Lock()
    with Node() as server, Node() as client:

        def send(k: int) -> None:
            handles = [
                client.send_nowait(server.address, b"%d:%d" % (k, i)) for i in range(per_sender)
            ]
            for handle in handles:
                handle.result(30)

        def receive() -> None:
            while True:
                with got_lock:
                    if len(got) >= total:
                        return
                try:
                    message = server.receive(timeout=0.2)
                except errors.ReceiveTimeout:
                    continue
                with got_lock:
                    got.append(message.data)

        threads = [threading.Thread(target=send, args=(k,)) for k in range(senders)]
        threads += [threading.Thread(target=receive) for _ in range(receivers)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert not any(thread.is_alive() for thread in threads)
    expected = {b"%d:%d" % (k, i) for k in range(senders) for i in range(per_sender)}
    assert len(got) == total
    assert set(got) == expected


def test_an_async_plain_receive_times_out_waits_and_is_served_in_order() -> None:
    import asyncio

    from reliable.aio import AsyncNode

    async def run() -> None:
        async with AsyncNode() as server, AsyncNode() as client:
            with pytest.raises(errors.ReceiveTimeout):
                await server.receive(timeout=0)
            with pytest.raises(errors.UnknownMailbox):
                await server.receive(timeout=0.05, mailbox="nope")
            waiter = asyncio.ensure_future(server.receive(timeout=5))  # nothing queued: waits
            await asyncio.sleep(0.01)
            assert not waiter.done()
            await client.send(server.address, b"first")
            assert (await waiter).data == b"first"
            for i in range(50):
                client.send_nowait(server.address, b"%d" % i)
            got = [(await server.receive(timeout=5)).data for _ in range(50)]
            assert got == [b"%d" % i for i in range(50)]

    asyncio.run(run())
