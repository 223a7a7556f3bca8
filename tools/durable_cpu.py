"""CPU time per message of the durable path, sender and receiving host, beside a
volatile mailbox: a figure that a loaded, shared machine disturbs far less than
a wall-clock rate.

A sender keeps 256 1 KiB messages unconfirmed (``send_nowait``) to a mailbox on
a node in another process, over loopback, for a fixed count of messages; the
report gives each process's CPU time (user + system, all threads: the durable
host's commit thread included, and that thread's own share beside it, from
``/proc``, in clock ticks) per message, and the wall-clock rate. Three
kinds, rounds interleaved, medians:

* ``durable``: a durable mailbox (sync ``grouped``), as shipped;
* ``durable, one Admitted each``: the same with ``AdmittedMany`` turned off
  (``ADMITTED_MANY_MAX = 1`` in the host), i.e. one control message per
  message's receipt, as before it existed;
* ``volatile``: no ``durable=``.

Run it from a checkout::

    python tools/durable_cpu.py                  # 20000 messages, 3 rounds
    python tools/durable_cpu.py --count 5000 --rounds 5
    RMSG_DURABLE_CPU_TREE=/path/to/other/checkout python tools/durable_cpu.py

Loopback only; every loop is bounded in count and every wait in time.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections import deque
from pathlib import Path
from typing import Any

# The checkout measured: this one, or another's (e.g. main's, for a before/after pair
# run by the same tool) named by RMSG_DURABLE_CPU_TREE.
ROOT = Path(os.environ.get("RMSG_DURABLE_CPU_TREE") or Path(__file__).resolve().parent.parent)
sys.path.insert(0, str(ROOT))

_HOST = r"""
import os, resource, sys
import reliable.post_office
if os.environ.get("RMSG_BENCH_ONE_ADMITTED"):
    reliable.post_office.ADMITTED_MANY_MAX = 1  # where the receipts are batched
from reliable import Node
path = sys.argv[1]
node = Node("127.0.0.1:0")
if path == "-":
    node.create_mailbox("bench")
else:
    node.create_mailbox("bench", durable=path)
def commit_thread_cpu():
    # The commit thread's user + system time, from /proc (clock ticks); 0 if none ran.
    import threading
    for t in threading.enumerate():
        if t.name == "rmsg-durable-commit" and t.native_id is not None:
            try:
                with open(f"/proc/self/task/{t.native_id}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                return 0.0
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return 0.0
usage = resource.getrusage(resource.RUSAGE_SELF)
print(node.address[1], usage.ru_utime + usage.ru_stime, flush=True)
sys.stdin.readline()
usage = resource.getrusage(resource.RUSAGE_SELF)
print(usage.ru_utime + usage.ru_stime, commit_thread_cpu(), flush=True)
sys.stdin.read()
node.close()
"""


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def measure(path: str, count: int, one_admitted: bool) -> tuple[float, float, float, float]:
    """(msgs/s, sender CPU us/msg, host CPU us/msg, the host's commit thread's share of
    it) for ``count`` messages."""
    from reliable import Node

    env = dict(os.environ, PYTHONPATH=str(ROOT))
    if one_admitted:
        env["RMSG_BENCH_ONE_ADMITTED"] = "1"
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOST, path],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert proc.stdin is not None and proc.stdout is not None
    try:
        port_text, host_start = proc.stdout.readline().split()
        payload = b"\x5a" * 1024
        with Node() as node:
            dest = f"127.0.0.1:{port_text}/bench"
            node.send(dest, payload, timeout=10)  # the session is up
            cpu0, t0 = _cpu(), time.monotonic()
            window: deque[Any] = deque()
            for _ in range(count):
                if len(window) >= 256:
                    window.popleft().result(60)
                window.append(node.send_nowait(dest, payload))
            for handle in window:
                handle.result(60)
            elapsed, sender = time.monotonic() - t0, _cpu() - cpu0
        proc.stdin.write("\n")
        proc.stdin.flush()
        host_end, committing = (float(v) for v in proc.stdout.readline().split())
        host = host_end - float(host_start)
        proc.stdin.close()
        proc.wait(30)
        per = 1e6 / count
        return count / elapsed, sender * per, host * per, committing * per
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=20000, help="messages per measurement")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if not 0 < args.count <= 1_000_000 or not 0 < args.rounds <= 50:
        parser.error("--count 1..1000000, --rounds 1..50")
    kinds = [("durable", True, False), ("durable, one Admitted each", True, True)]
    kinds.append(("volatile", False, False))
    results: dict[str, list[tuple[float, float, float, float]]] = {k: [] for k, _, _ in kinds}
    with tempfile.TemporaryDirectory(dir=os.getcwd(), prefix="rmsg-cpu-") as scratch:
        for i in range(args.rounds):
            for label, durable, one in kinds:
                path = os.path.join(scratch, f"{i}-{len(results[label])}-{one}.db")
                results[label].append(measure(path if durable else "-", args.count, one))
                print(f"round {i + 1}/{args.rounds}: {label}", file=sys.stderr, flush=True)
    print(f"{args.count} x 1 KiB messages, window 256, medians of {args.rounds} rounds")
    print(
        f"  {'mailbox':<28} {'msgs/s':>8} {'sender us/msg':>14} {'host us/msg':>12}"
        f" {'of it, commit thread':>21}"
    )
    for label, runs in results.items():
        rate, sender, host, committing = (statistics.median(r[k] for r in runs) for k in range(4))
        print(f"  {label:<28} {rate:>8,.0f} {sender:>14.1f} {host:>12.1f} {committing:>21.1f}")


if __name__ == "__main__":
    main()
