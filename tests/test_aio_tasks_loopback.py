"""Many coroutines on one AsyncNode, through a lossy link: no receive misses its
wake-up, no message is handed out twice or lost, and no receiver starves.

The asyncio counterpart of tests/test_threads_loopback.py. Four sender tasks
(awaited ``send``, ``send_nowait`` handles gathered, ``send_many``) share one
node; three receiver tasks (``receive`` with no timeout, ``receive_many``, and
``receive`` with a short timeout that often runs out) share the other. Their
waits all go through one wait loop and one loop timer for the waiters'
deadlines; a receive woken for another's change, or by another's deadline,
must wait on without losing its own answer.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import pytest

from netem import Impairment
from netem.socket import FaultySocket
from reliable import AsyncNode, Config, ReceiveTimeout
from reliable.addressing import Address
from reliable.driver import open_socket
from reliable.errors import WouldBlock

pytestmark = [pytest.mark.loopback]

LINK = Impairment(loss=0.05, duplicate=0.02, reorder=0.05, delay=0.0003, jitter=0.0003)
SENDERS = 4
RECEIVERS = 3
PER_SENDER = 240
BOUND = 90.0  # seconds for the whole exchange; about two on an idle machine
STOP = b"stop"


async def _sender(node: AsyncNode, dest: Address, sid: int) -> None:
    messages = [b"%d:%d" % (sid, i) for i in range(PER_SENDER)]
    style = sid % 3
    if style == 0:  # one awaited send at a time
        for m in messages:
            await node.send(dest, m, timeout=BOUND)
    elif style == 1:  # handles, gathered at the end
        handles = [node.send_nowait(dest, m, timeout=BOUND) for m in messages[:64]]
        for m in messages[64:]:
            while True:
                try:
                    handles.append(node.send_nowait(dest, m, timeout=BOUND))
                    break
                except WouldBlock:  # a full send buffer: let the others go on
                    await asyncio.sleep(0.001)
        await asyncio.gather(*handles)
    else:  # one batch handle for all
        batch = await node.send_many(dest, messages, timeout=BOUND)
        await batch
        assert batch.failures() == {}


async def _receiver(node: AsyncNode, rid: int, got: list[bytes], timeouts: list[int]) -> None:
    while True:
        if rid == 0:  # no timeout: a missed wake-up hangs here
            batch = [await node.receive()]
        elif rid == 1:
            batch = await node.receive_many(16)
        else:  # a short timeout, often running out while the others wait on
            try:
                batch = [await node.receive(timeout=0.003)]
            except ReceiveTimeout:
                timeouts[0] += 1
                continue
        for m in batch:
            if m.data == STOP:
                return
            got.append(m.data)


def test_many_tasks_send_and_receive_every_message_exactly_once() -> None:
    async def main() -> None:
        config = Config(peer_timeout=30.0)
        rx = FaultySocket(open_socket("127.0.0.1:0"), LINK, incoming=LINK, seed=43)
        async with AsyncNode(sock=rx, config=config) as b, AsyncNode(config=config) as a:
            dest = b.address
            got: list[list[bytes]] = [[] for _ in range(RECEIVERS)]
            timeouts = [0]
            started = time.monotonic()
            receivers = [
                asyncio.ensure_future(_receiver(b, r, got[r], timeouts)) for r in range(RECEIVERS)
            ]
            senders = [asyncio.ensure_future(_sender(a, dest, s)) for s in range(SENDERS)]
            await asyncio.wait_for(asyncio.gather(*senders), BOUND)
            await (await a.send_many(dest, [STOP] * RECEIVERS))
            done, pending = await asyncio.wait(
                receivers, timeout=max(0.1, started + BOUND - time.monotonic())
            )
            for task in pending:
                task.cancel()
            assert not pending, (
                f"a receiver missed its wake-up ({time.monotonic() - started:.1f} s after "
                "the start)"
            )
            for task in done:
                task.result()
            received = Counter(m for part in got for m in part)
            expected = {b"%d:%d" % (s, i) for s in range(SENDERS) for i in range(PER_SENDER)}
            assert set(received) == expected
            assert max(received.values()) == 1, "a message was received twice"
            assert all(len(part) > 0 for part in got), [len(part) for part in got]
            assert timeouts[0] > 0  # the short-timeout receiver did time out meanwhile
            for part in got:  # within one receiver, each sender's messages keep their order
                for s in range(SENDERS):
                    seq = [int(m.split(b":")[1]) for m in part if m.startswith(b"%d:" % s)]
                    assert seq == sorted(seq)
            assert not b._receives and not b._taken

    asyncio.run(main())
