"""Hash scripted exchanges on the simulated pair: every datagram both ends send, every
event they report, and their counters. A refactoring that claims "no behaviour change"
prints the same digests before and after.

    python tools/wire_digest.py                  # this checkout
    RMSG_DIGEST_TREE=/path/to/other python tools/wire_digest.py

The scenarios cover the paths a received datagram can take: big messages with loss and
reordering (the bulk fast path and reassembly), bundles of small messages into a mailbox
that fills (parked messages, their outcomes as node messages, withdrawals), and a peer
that restarts mid-stream.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, os.environ.get("RMSG_DIGEST_TREE", str(ROOT)))

from reliable import Config, events  # noqa: E402
from tests.harness import B, Pair  # noqa: E402


class Recorder:
    def __init__(self) -> None:
        self.h = hashlib.sha256()

    def add(self, label: str, value: object) -> None:
        self.h.update(label.encode() + b"\0" + repr(value).encode() + b"\n")


def _pump(p: Pair, rng: random.Random, rec: Recorder, loss: float, steps: int) -> None:
    for _ in range(steps):
        moved = 0
        for side in (p.a, p.b):
            out = p.outgoing(side)
            for d in out:
                rec.add("wire", d)
            kept = [d for d in out if rng.random() >= loss]
            if rng.random() < 0.2:
                kept.reverse()
            p.deliver(p.other(side), kept)
            moved += len(out)
        if not moved and p.a.endpoint.quiet() and p.b.endpoint.quiet():
            return
        if not moved:
            timers = [t for t in (p.a.endpoint.get_timer(), p.b.endpoint.get_timer()) if t]
            p.now = max(p.now, min(timers, default=p.now))
        p.tick()


def _finish(p: Pair, rec: Recorder) -> None:
    for side in (p.a, p.b):
        for e in side.drain():
            rec.add("event", _event_key(e))
        s = side.endpoint.stats(p.now)
        rec.add("stats", (s.datagrams_sent, s.datagrams_received, s.retransmissions))
        rec.add("peers", [(q.packets_sent, q.packets_received, q.messages_sent) for q in s.peers])


def _event_key(e: events.Event) -> object:
    # the event's type and fields, without the error objects' identities
    fields = getattr(e, "__dataclass_fields__", {})
    return (type(e).__name__, [(k, str(getattr(e, k))) for k in sorted(fields)])


def bulk(rec: Recorder, loss: float, seed: int) -> None:
    p = Pair(Config(peer_timeout=30.0), Config(peer_timeout=30.0), seed=seed)
    rng = random.Random(seed)
    for i in range(3):
        p.a.endpoint.send(B, bytes([i]) * 200_000, now=p.now)
        p.a.endpoint.send(B, bytes([i]) * 100, now=p.now)
    p.b.endpoint.send(p.a.addr, b"r" * 150_000, now=p.now)
    _pump(p, rng, rec, loss, 20_000)
    _finish(p, rec)


def parked(rec: Recorder, loss: float, seed: int) -> None:
    p = Pair(Config(peer_timeout=30.0), Config(peer_timeout=30.0), seed=seed)
    p.release = False
    p.b.create_mailbox("jobs", capacity=5)
    rng = random.Random(seed)
    tickets = [p.a.endpoint.send(B, bytes([i]) * 40, mailbox="jobs", now=p.now) for i in range(40)]
    _pump(p, rng, rec, loss, 300)
    for t in tickets[30:34]:
        rec.add("withdraw", p.a.endpoint.withdraw(t, p.now))
    owner = p.b.owners["jobs"]
    for _ in range(3):
        for _ in range(4):
            m = p.b.endpoint.take("jobs", owner=owner, now=p.now)
            rec.add("take", None if m is None else m.data)
        _pump(p, rng, rec, loss, 300)
    p.release = True
    _pump(p, rng, rec, loss, 5_000)
    _finish(p, rec)


def restart(rec: Recorder, loss: float, seed: int) -> None:
    p = Pair(Config(peer_timeout=30.0), Config(peer_timeout=30.0), seed=seed)
    rng = random.Random(seed)
    for i in range(20):
        p.a.endpoint.send(B, bytes([i]) * 3000, now=p.now)
    _pump(p, rng, rec, loss, 5)
    _finish(p, rec)
    p.restart_b(Config(peer_timeout=30.0))
    for i in range(20):
        p.a.endpoint.send(B, bytes([i]) * 500, now=p.now)
    _pump(p, rng, rec, loss, 5_000)
    _finish(p, rec)


SCENARIOS: dict[str, Callable[[Recorder, float, int], None]] = {
    "bulk": bulk,
    "parked": parked,
    "restart": restart,
}


def build_parser() -> argparse.ArgumentParser:
    return argparse.ArgumentParser(
        description="Digests of scripted exchanges on the simulated pair (every datagram, "
        "event and counter). RMSG_DIGEST_TREE=DIR measures the checkout at DIR instead."
    )


def main() -> int:
    build_parser().parse_args()
    for name, scenario in SCENARIOS.items():
        for loss, seed in ((0.0, 1), (0.05, 2), (0.2, 3)):
            rec = Recorder()
            scenario(rec, loss, seed)
            print(f"{name:8} loss {loss:4.2f} seed {seed}  {rec.h.hexdigest()[:32]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
