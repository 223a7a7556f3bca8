"""One big message on loopback, on a fresh session (cold) and after a first small one (warm).

A fresh session pays address validation: the receiver keeps no state for an
unknown address until its cookie is echoed. This measures what that costs a
16 MiB ``Node.send``: two processes on 127.0.0.1 (a receiver and a sender,
started fresh for every measurement, as ``rmsg bench`` does), the time from
``send`` to its receipt. Cold: the big message is the first thing sent.
Warm: a 1-byte message is sent (and confirmed) first, untimed. Rounds are
interleaved, cold then warm, so drift on a shared machine hits both alike;
the report gives the medians.

Run it from a checkout::

    python tools/cold_send.py                 # 16 MiB, 5 rounds
    python tools/cold_send.py --size 1048576 --rounds 9

Loopback only; every wait is bounded.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys
import time
from multiprocessing.connection import Connection
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TREE = os.environ.get("RMSG_COLD_SEND_TREE", str(ROOT))  # measure another checkout


def _receiver(conn: Connection, tree: str, count: int) -> None:
    sys.path.insert(0, tree)
    from reliable import Config, Node

    with Node("127.0.0.1:0", config=Config(peer_timeout=30.0)) as node:
        conn.send(node.address)
        for _ in range(count):
            node.receive(timeout=60)
        conn.recv()  # the sender has its receipt: close


def _sender(conn: Connection, tree: str, addr: object, size: int, warm: bool) -> None:
    sys.path.insert(0, tree)
    from reliable import Config, Node

    payload = bytes(size)
    with Node("127.0.0.1:0", config=Config(peer_timeout=30.0)) as node:
        if warm:
            node.send(addr, b"w", timeout=30)
        start = time.monotonic()
        node.send(addr, payload, timeout=60)
        conn.send(time.monotonic() - start)


def measure(size: int, warm: bool, tree: str = TREE) -> float:
    """Seconds from ``send`` to the receipt of one ``size``-byte message."""
    ctx = mp.get_context("spawn")
    rx, rx_child = ctx.Pipe()
    tx, tx_child = ctx.Pipe()
    receiver = ctx.Process(target=_receiver, args=(rx_child, tree, 1 + warm))
    receiver.start()
    try:
        if not rx.poll(30):
            raise RuntimeError("the receiver did not start")
        addr = rx.recv()
        sender = ctx.Process(target=_sender, args=(tx_child, tree, addr, size, warm))
        sender.start()
        try:
            if not tx.poll(120):
                raise RuntimeError("the send did not finish in 120 s")
            seconds: float = tx.recv()
        finally:
            sender.join(30)
        rx.send(True)
        return seconds
    finally:
        receiver.join(30)
        if receiver.is_alive():
            receiver.kill()


def build_parser() -> argparse.ArgumentParser:
    """The command line (the docs test parses the commands the guides show with it)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=16 * 1024 * 1024, help="bytes (16 MiB)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (5)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cold: list[float] = []
    warm: list[float] = []
    for _ in range(max(1, min(args.rounds, 50))):
        cold.append(measure(args.size, warm=False))
        warm.append(measure(args.size, warm=True))
    c, w = statistics.median(cold), statistics.median(warm)
    mb = args.size / 1e6
    print(f"{args.size} B from {TREE}, median of {len(cold)} interleaved rounds:")
    print(f"  cold {c * 1000:8.1f} ms  {mb / c:7.1f} MB/s")
    print(f"  warm {w * 1000:8.1f} ms  {mb / w:7.1f} MB/s   cold/warm {c / w:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
