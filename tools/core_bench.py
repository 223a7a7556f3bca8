"""What the sans-I/O core alone costs per message: two Endpoints, a perfect link, virtual time.

No sockets, threads or clocks: the figures are the protocol's own work, the
part a compiled core or a leaner design would change. Two workloads:

* ``stream``: 1 KiB messages from A to B, sent 64 at a time (so they bundle
  as the adapters let them), every one received from B's mailbox;
* ``rr``: 64 B request/reply round trips, one at a time, B answering each
  request as it is taken (acknowledgements ride on the reply or leave after
  ``max_ack_delay``, as on a real link).

Cost is counted two ways:

* instructions, with ``valgrind --tool=callgrind`` when it is installed:
  deterministic, the same count every run whatever else the machine does.
  Each workload runs at two sizes, N and 2N, in fresh interpreters, and the
  figure is ``(Ir(2N) - Ir(N)) / N``, so start-up and imports cancel out;
* CPU time (``time.process_time``), best of several runs, when valgrind is
  missing or with ``--cpu``: noisy on a shared machine, but always available.

Run it from a checkout::

    python tools/core_bench.py             # both workloads, callgrind if installed
    python tools/core_bench.py --cpu --json
    .venv-compiled/bin/python tools/core_bench.py --installed   # a compiled install

Each figure says which core ran (``pure`` or ``compiled``, ``reliable.__compiled__``).

``run_workload`` is importable (the test suite checks that each workload
moves what it claims).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# --installed: measure the reliable this interpreter has installed (e.g. a compiled build in
# another venv), not the checkout. The valgrind children inherit it through the environment.
INSTALLED = "--installed" in sys.argv or os.environ.get("RMSG_CORE_BENCH_INSTALLED") == "1"
if INSTALLED:
    os.environ["RMSG_CORE_BENCH_INSTALLED"] = "1"
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() not in (ROOT, ROOT / "tools")]
elif str(ROOT) not in sys.path and "RMSG_CORE_BENCH_TREE" not in os.environ:
    sys.path.insert(0, str(ROOT))  # this checkout's reliable/, unless told to measure another
elif "RMSG_CORE_BENCH_TREE" in os.environ:
    sys.path.insert(0, os.environ["RMSG_CORE_BENCH_TREE"])

import reliable  # noqa: E402
from reliable import Endpoint  # noqa: E402

CORE = "compiled" if getattr(reliable, "__compiled__", False) else "pure"

A = ("127.0.0.1", 1)  # labels on a simulated loopback path (64 KiB datagrams, as a real one)
B = ("127.0.0.1", 2)
HOP = 0.00005  # virtual seconds a datagram takes: 50 us, about what loopback does
WORKLOADS = {"stream": (1024, 4000), "rr": (64, 1000)}  # message size, default N


def run_workload(name: str, count: int) -> int:
    """Run ``count`` messages (stream) or round trips (rr); returns how many B received."""
    size, _ = WORKLOADS[name]
    a, b = Endpoint(rng=random.Random(1)), Endpoint(rng=random.Random(2))
    payload = bytes(size)
    now = 0.0
    received = 0

    def exchange() -> None:
        nonlocal now, received
        moved = True
        while moved:
            moved = False
            for src, dst, src_addr in ((a, b, A), (b, a, B)):
                for datagram, _ in src.datagrams_to_send(now):
                    dst.receive_datagram(datagram, src_addr, now)
                    moved = True
            while b.take(now=now) is not None:
                received += 1
                if name == "rr":
                    b.send(A, payload, now=now)  # the reply
                    moved = True
            while a.take(now=now) is not None:
                pass
            while a.next_event() is not None:
                pass
            while b.next_event() is not None:
                pass
            now += HOP
        for ep in (a, b):  # delayed acks and other timers due by now
            timer = ep.get_timer()
            if timer is not None and timer <= now + HOP:
                now = max(now, timer)
                ep.handle_timer(now)

    if name == "stream":
        sent = 0
        while sent < count:
            for _ in range(min(64, count - sent)):
                a.send(B, payload, now=now)
                sent += 1
            exchange()
    else:
        for _ in range(count):
            a.send(B, payload, now=now)
            exchange()
    for _ in range(100):  # let the last acknowledgements settle
        if _quiet(a) and _quiet(b):
            break
        exchange()
        now += 0.01
    return received


def _quiet(ep: Endpoint) -> bool:
    """``Endpoint.quiet()``; a checkout from before it existed settles by its timer."""
    quiet = getattr(ep, "quiet", None)
    return bool(quiet()) if quiet is not None else ep.get_timer() is None


def _callgrind_instructions(name: str, count: int) -> int:
    """Instructions the whole interpreter executes to run the workload once."""
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
                name,
                str(count),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        match = re.search(r"Collected\s*:\s*(\d+)", done.stderr)
        if match is None:
            raise RuntimeError(f"callgrind printed no total:\n{done.stderr[-2000:]}")
        return int(match.group(1))


def _cpu_seconds(name: str, count: int, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.process_time()
        run_workload(name, count)
        best = min(best, time.process_time() - start)
    return best


def measure(name: str, count: int, *, cpu: bool, repeats: int = 5) -> dict[str, object]:
    """One workload's cost per message (stream) or per round trip (rr)."""
    unit = "message" if name == "stream" else "round trip"
    if not cpu and shutil.which("valgrind"):
        low = _callgrind_instructions(name, count)
        high = _callgrind_instructions(name, 2 * count)
        return {
            "workload": name,
            "unit": unit,
            "core": CORE,
            "method": "callgrind",
            "instructions": round((high - low) / count),
            "n": count,
        }
    low = _cpu_seconds(name, count, repeats)
    high = _cpu_seconds(name, 2 * count, repeats)
    return {
        "workload": name,
        "unit": unit,
        "core": CORE,
        "method": "cpu",
        "cpu_us": round((high - low) / count * 1e6, 2),
        "n": count,
    }


def build_parser() -> argparse.ArgumentParser:
    """The command line (the docs test parses the commands the guides show with it)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", choices=[*WORKLOADS, "all"], default="all")
    parser.add_argument("--n", type=int, help="messages or round trips (default per workload)")
    parser.add_argument("--cpu", action="store_true", help="CPU time even if valgrind exists")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.add_argument(
        "--installed",
        action="store_true",
        help="measure the reliable installed for this interpreter, not this checkout",
    )
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.child:
        received = run_workload(args.child[0], int(args.child[1]))
        return 0 if received == int(args.child[1]) else 1
    names = list(WORKLOADS) if args.workload == "all" else [args.workload]
    results = [measure(n, args.n or WORKLOADS[n][1], cpu=args.cpu) for n in names]
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for r in results:
            if r["method"] == "callgrind":
                figure = f"{r['instructions']:>12,} instructions"
            else:
                figure = f"{r['cpu_us']:>12} us of CPU"
            how = f"{r['core']} core, {r['method']}, N={r['n']}"
            print(f"core {r['workload']:<7} {figure} per {r['unit']}  ({how})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
