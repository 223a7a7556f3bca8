"""What the sans-I/O core costs per message into a durable mailbox, beside a volatile one.

Two Endpoints on virtual time (no sockets, threads, clocks or disk): A keeps
``WINDOW`` 1 KiB messages unconfirmed to mailbox ``bench`` on B, as
``rmsg bench --durable`` and ``tools/durable_cpu.py`` do over loopback; B's
mailbox is durable, with an in-memory store that B commits once per
exchange, after its acknowledgements left (the adapters' ``Committer``
commits on a thread, each commit taking what arrived meanwhile; here every
exchange is one commit, and its receipts leave with the next), or volatile. The
figure is the protocol's own work for both ends together — staging, the
``STAGED`` notices, the commits' reports, the ``AdmittedMany`` receipts and
their settling — without SQLite (whose cost is the bench's ceiling) and
without the adapters' threads.

Instructions are counted with ``valgrind --tool=callgrind`` as in
``tools/core_bench.py``: each kind runs at N and 2N messages in fresh
interpreters and the figure is ``(Ir(2N) - Ir(N)) / N``, so start-up and
imports cancel out. Deterministic: the same count every run.

Run it from a checkout::

    python tools/durable_core.py            # N = 4000
    python tools/durable_core.py --n 2000
"""

from __future__ import annotations

import argparse
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if "RMSG_DURABLE_CORE_TREE" in os.environ:  # measure another checkout (e.g. main's)
    sys.path.insert(0, os.environ["RMSG_DURABLE_CORE_TREE"])
else:
    sys.path.insert(0, str(ROOT))

from reliable import Endpoint, events  # noqa: E402
from reliable.store import MemoryStore, sync_stores  # noqa: E402

A = ("127.0.0.1", 1)  # labels on a simulated loopback path
B = ("127.0.0.1", 2)
HOP = 0.00005  # virtual seconds a datagram takes
WINDOW = 256
SIZE = 1024
KINDS = ("durable", "volatile")


def run(kind: str, count: int) -> int:
    """Send ``count`` messages A -> B, ``WINDOW`` unconfirmed; returns the receipts A got."""
    a, b = Endpoint(rng=random.Random(1)), Endpoint(rng=random.Random(2))
    if kind == "durable":
        b.create_mailbox("bench", store=MemoryStore(), now=0.0)
    else:
        b.create_mailbox("bench", now=0.0)
    payload = bytes(SIZE)
    now = 0.0
    sent = delivered = 0
    for _step in range(count * 20):  # bounded: far more steps than a run takes
        if delivered >= count:
            break
        while sent < count and sent - delivered < WINDOW:
            a.send(B, payload, now=now, mailbox="bench")
            sent += 1
        for datagram, _ in a.datagrams_to_send(now):
            b.receive_datagram(datagram, A, now)
        for datagram, _ in b.datagrams_to_send(now):
            a.receive_datagram(datagram, B, now)
        if kind == "durable":
            # The commit of what B staged, after its acknowledgements left (an adapter's
            # commit thread takes longer than a turn): its receipts leave next step.
            sync_stores(b, now)
        while (event := a.next_event()) is not None:
            if isinstance(event, events.MessageDelivered):
                delivered += 1
            elif isinstance(event, events.MessageFailed):
                raise RuntimeError(f"a message failed: {event.error}")
        while b.next_event() is not None:
            pass
        now += HOP
        for ep in (a, b):  # delayed acks and other timers due by now
            timer = ep.get_timer()
            if timer is not None and timer <= now:
                ep.handle_timer(now)
    return delivered


def _instructions(kind: str, count: int) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "callgrind.out")
        done = subprocess.run(
            [
                "valgrind",
                "--tool=callgrind",
                f"--callgrind-out-file={out}",
                sys.executable,
                __file__,
                "--child",
                kind,
                str(count),
            ],
            capture_output=True,
            text=True,
            check=True,
            env=os.environ,
        )
        match = re.search(r"Collected\s*:\s*(\d+)", done.stderr)
        if match is None:
            raise RuntimeError(f"callgrind printed no total:\n{done.stderr[-2000:]}")
        return int(match.group(1))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=4000, help="messages (the smaller run)")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.child:
        kind, count = args.child[0], int(args.child[1])
        return 0 if run(kind, count) == count else 1
    if not 0 < args.n <= 100_000:
        build_parser().error("--n 1..100000")
    if shutil.which("valgrind") is None:
        build_parser().error("needs valgrind (callgrind)")
    figures = {}
    for kind in KINDS:
        low, high = _instructions(kind, args.n), _instructions(kind, 2 * args.n)
        figures[kind] = (high - low) / args.n
    print(f"1 KiB messages, window {WINDOW}, both ends, N={args.n} (callgrind)")
    for kind, per in figures.items():
        print(f"  {kind:<9} {per:>10,.0f} instructions per message")
    extra = figures["durable"] - figures["volatile"]
    print(f"  durable - volatile: {extra:,.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
