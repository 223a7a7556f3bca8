"""How fast a durable outbox accepts sends: one thread, ``send_nowait`` in a loop
(each call commits the send to the outbox file before it returns), 256 sends
unconfirmed, 1 KiB messages to a volatile mailbox of another node in this
process, over loopback; and ``send_many`` in batches of 256 (one commit per
batch); per sync policy, rounds interleaved, medians.

Run it from a checkout::

    python tools/outbox_rate.py                  # 2 s per measurement, 3 rounds
    python tools/outbox_rate.py --duration 1 --rounds 5

Loopback only; every loop is bounded in count and time.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections import deque
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def rate(path: str, sync: str, dest: str, duration: float, batch: bool) -> float:
    """Sends per second accepted (stored) and delivered, through an outbox at ``path``
    (``batch``: ``send_many`` of 256 at a time)."""
    from reliable import Node

    with Node() as client:
        outbox = client.open_outbox(path, sync=sync)
        payload = b"\x5a" * 1024
        window: deque[Any] = deque()
        sent = 0
        started = time.monotonic()
        while sent < 200_000 and time.monotonic() - started < duration:
            if batch:
                for handle in window:
                    handle.result(30)
                window = deque(outbox.send_many(dest, [payload] * 256))
                sent += 256
                continue
            window.append(outbox.send_nowait(dest, payload))
            sent += 1
            if len(window) > 256:
                window.popleft().result(30)
        for handle in window:
            handle.result(30)
        return sent / (time.monotonic() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=2.0)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if not 0 < args.duration <= 60 or not 0 < args.rounds <= 50:
        parser.error("--duration 0..60 s, --rounds 1..50")
    from reliable import Node

    figures: dict[tuple[str, bool], list[float]] = {
        (sync, batch): [] for sync in ("message", "os") for batch in (False, True)
    }
    with (
        Node() as server,
        tempfile.TemporaryDirectory(dir=os.getcwd(), prefix="rmsg-outbox-") as scratch,
    ):
        box = server.create_mailbox("bench")
        dest = f"127.0.0.1:{server.address[1]}/bench"
        for i in range(args.rounds):
            for (sync, batch), runs in figures.items():
                path = os.path.join(scratch, f"{sync}-{batch}-{i}.db")
                runs.append(rate(path, sync, dest, args.duration, batch))
                while box.receive_many(100_000, timeout=0):
                    pass
    print(f"durable outbox accept rate, 1 KiB sends, one thread, medians of {args.rounds}")
    for (sync, batch), runs in figures.items():
        how = "send_many, 256 per commit" if batch else "send_nowait, one per commit"
        print(f"  sync={sync:<8} {how:<28} {statistics.median(runs):>8,.0f} sends/s")


if __name__ == "__main__":
    main()
