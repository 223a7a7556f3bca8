"""The receive fast path for big messages (``wire.decode_bulk``, ``PeerSession.on_bulk``,
``ReceiveStream.take_middle``) does exactly what the general path does.

Each scenario runs twice on the simulated pair, with the fast path and with it
turned off, and every datagram both ends send must be the same, byte for byte,
as must what each end received and counted.
"""

from __future__ import annotations

import random
from typing import Any

import pytest

from reliable import Config
from reliable.peer import PeerSession

from .harness import B, Pair

BIG = 200_000


def _run(fast: bool, loss: float, seed: int) -> dict[str, Any]:
    p = Pair(Config(peer_timeout=30.0), Config(peer_timeout=30.0), seed=seed)
    rng = random.Random(seed)
    wire_log: list[bytes] = []

    seen: dict[int, PeerSession] = {}  # every session, even those idle expiry dropped

    def sessions() -> list[PeerSession]:
        for side in (p.a, p.b):
            seen.update((id(s), s) for s in side.endpoint._peers.values())
        return list(seen.values())

    def drop(_i: int, d: bytes) -> bool:
        wire_log.append(d)
        return rng.random() < loss

    for i in range(3):
        p.a.endpoint.send(B, bytes([i]) * BIG, now=p.now)
        p.a.endpoint.send(B, bytes([i]) * 100, now=p.now)  # small ones between
    for step in range(20_000):
        if step == 300:
            # The other way too: from now on A's DATA carries acknowledgements (the
            # general path's case) while the rest crosses
            p.b.endpoint.send(p.a.addr, b"r" * BIG, now=p.now)
        moved = 0
        for side in (p.a, p.b):  # a lossy link that now and then reverses a batch
            out = p.outgoing(side)
            kept = [d for i, d in enumerate(out) if not drop(i, d)]
            if rng.random() < 0.2:
                kept.reverse()
            for d in kept:  # one at a time: a session made by one has its switch set
                p.deliver(p.other(side), [d])
                for session in sessions():
                    session.bulk_path = fast
            moved += len(out)
        if not moved and step > 300 and p.a.endpoint.quiet() and p.b.endpoint.quiet():
            break
        if not moved:
            timers = [t for t in (p.a.endpoint.get_timer(), p.b.endpoint.get_timer()) if t]
            p.now = max(p.now, min(timers, default=p.now))
        p.tick()
    stats = [side.endpoint.stats(p.now) for side in (p.a, p.b)]
    return {
        "wire": wire_log,
        "received": (p.b.received(), p.a.received()),
        "stats": [(s.datagrams_sent, s.datagrams_received, s.retransmissions) for s in stats],
        "peers": [[(q.packets_sent, q.packets_received) for q in s.peers] for s in stats],
        "taken": sum(s.bulk_taken for s in sessions()),
    }


@pytest.mark.parametrize(("loss", "seed"), [(0.0, 1), (0.05, 2), (0.2, 3)])
def test_the_fast_path_changes_nothing_on_the_wire(loss: float, seed: int) -> None:
    fast = _run(True, loss, seed)
    slow = _run(False, loss, seed)
    assert slow["taken"] == 0
    assert fast["received"] == slow["received"]
    assert fast["received"][0] == [bytes([i]) * n for i in range(3) for n in (BIG, 100)]
    assert fast["received"][1] == [b"r" * BIG]
    assert fast["stats"] == slow["stats"] and fast["peers"] == slow["peers"]
    assert fast["wire"] == slow["wire"]
    # and the fast path took many of the big messages' datagrams (some 700 in all, fewer
    # in order the more are lost)
    assert fast["taken"] > 100
