"""Consuming callbacks (node.on_message): exactly one taker per message, whether a receive
or a callback takes it; a callback that raises loses nothing and stops its consumer."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from reliable import AsyncNode, Node, errors

pytestmark = pytest.mark.loopback


def _wait(predicate: object, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not predicate() and time.monotonic() < deadline:  # type: ignore[operator]
        time.sleep(0.01)


def test_a_callback_and_a_receiver_share_a_mailbox_each_message_once() -> None:
    with Node() as server, Node() as client:
        server.create_mailbox("jobs")
        dest = f"127.0.0.1:{server.address[1]}/jobs"
        by_callback: list[bytes] = []
        by_receive: list[bytes] = []
        consumer = server.on_message("jobs", lambda m: by_callback.append(m.data))

        def receiver() -> None:
            box = server.mailbox("jobs")
            while True:
                try:
                    by_receive.append(box.receive(timeout=1.0).data)
                except errors.ReceiveTimeout:
                    return

        thread = threading.Thread(target=receiver)
        thread.start()
        sent = [b"%d" % i for i in range(40)]
        for data in sent:
            client.send(dest, data, timeout=5)
        thread.join(15)
        _wait(lambda: len(by_callback) + len(by_receive) >= len(sent))
        assert consumer.cancel() and not consumer.running
        assert sorted(by_callback + by_receive, key=int) == sent, "each exactly once"
        assert by_callback and consumer.consumed == len(by_callback)
        assert server.mailbox("jobs").stats().messages == 0


def test_a_callback_that_raises_loses_nothing_and_stops_its_consumer() -> None:
    with Node() as node:
        box = node.create_mailbox("q")
        seen: list[bytes] = []

        def callback(msg: object) -> None:
            data = msg.data  # type: ignore[attr-defined]
            if data == b"poison":
                raise RuntimeError("cannot handle it")
            seen.append(data)

        consumer = node.on_message("q", callback, lock=30)
        for data in (b"one", b"poison", b"two"):
            node.post("q", data)
        _wait(lambda: not consumer.running)
        assert isinstance(consumer.error, RuntimeError) and seen == [b"one"]
        left = [m.data for m in box.receive_many(5, timeout=5)]
        assert left == [b"poison", b"two"], "released whole, at the head, in order"
        assert box.stats().locked == 0


def test_async_coroutine_callback_consumes_and_a_failure_releases() -> None:
    async def main() -> None:
        async with AsyncNode() as node:
            box = node.create_mailbox("q")
            got: list[bytes] = []

            async def callback(msg: object) -> None:
                await asyncio.sleep(0)
                if msg.data == b"bad":  # type: ignore[attr-defined]
                    raise ValueError("bad")
                got.append(msg.data)  # type: ignore[attr-defined]

            consumer = node.on_message("q", callback)
            for data in (b"a", b"b", b"bad", b"c"):
                node.post("q", data)
            for _ in range(500):
                if not consumer.running:
                    break
                await asyncio.sleep(0.01)
            assert got == [b"a", b"b"] and isinstance(consumer.error, ValueError)
            assert [m.data for m in await box.receive_many(5, timeout=5)] == [b"bad", b"c"]
            again = node.on_message("q", lambda m: got.append(m.data))
            node.post("q", b"d")
            for _ in range(500):
                if got[-1] == b"d":
                    break
                await asyncio.sleep(0.01)
            await again.cancel()
            assert got[-1] == b"d" and again.consumed == 1

    asyncio.run(asyncio.wait_for(main(), 30))
