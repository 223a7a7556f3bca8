"""10,000 messages of mixed sizes over real loopback UDP through a link that drops 20%,
duplicates, reorders and corrupts in both directions: every one arrives exactly once,
intact, in order."""

from __future__ import annotations

import random
import struct
import threading
import zlib

import pytest

from netem import Impairment
from netem.socket import FaultySocket
from reliable import Config, Node
from reliable.driver import open_socket

pytestmark = [pytest.mark.loopback, pytest.mark.slow]

LINK = Impairment(
    loss=0.2, duplicate=0.05, corrupt=0.02, corrupt_bits=3, delay=0.0005, jitter=0.0005, reorder=0.1
)
_HEAD = struct.Struct("!II")


def _sizes(rng: random.Random, n: int) -> list[int]:
    # mostly small, one in ten spanning several fragments, a few large
    return [
        rng.choice([rng.randrange(0, 200), rng.randrange(200, 1100)])
        if i % 10
        else rng.randrange(2_000, 40_000)
        for i in range(n)
    ]


@pytest.mark.timeout(300)
def test_ten_thousand_messages_through_a_bad_link() -> None:
    rng = random.Random(2026)
    n = 10_000
    payloads = []
    for i, size in enumerate(_sizes(rng, n)):
        body = rng.randbytes(size)
        payloads.append(_HEAD.pack(i, zlib.crc32(body)) + body)
    config = Config(peer_timeout=30.0)
    rx = FaultySocket(open_socket("127.0.0.1:0"), LINK, seed=11)
    tx = FaultySocket(open_socket("127.0.0.1:0"), LINK, seed=12)
    with Node(sock=rx, config=config) as receiver, Node(sock=tx, config=config) as sender:
        got: list[bytes] = []

        def drain() -> None:
            for _ in range(n):
                got.append(receiver.receive(timeout=60).data)

        consumer = threading.Thread(target=drain)
        consumer.start()
        handles = []
        for p in payloads:
            handles.append(sender.send_nowait(receiver.address, p))
            if len(handles) % 500 == 0:
                handles[-500].wait(60)  # keep a bounded number in flight
        for h in handles:
            h.result(120)
        consumer.join(120)
        stats = sender.stats()
    assert len(got) == n
    assert got == payloads  # exactly once, intact, in order
    assert tx.counters.dropped > 0.15 * tx.counters.seen  # the link really was bad
    assert rx.counters.corrupted > 0 and tx.counters.duplicated > 0
    assert stats.retransmissions > 0
