"""What the sans-I/O core alone costs per message: two Endpoints, a perfect link, virtual time.

No sockets, threads or clocks: the figures are the protocol's own work, the
part a compiled core or a leaner design would change. Four workloads:

* ``stream``: 1 KiB messages from A to B, sent 64 at a time (so they bundle
  as the adapters let them), every one received from B's mailbox;
* ``rr``: 64 B request/reply round trips, one at a time, each end receiving
  as the adapters' blocking ``receive`` does (take, else queue a wait that a
  ``MessageTaken`` event answers), B replying as it takes each request: the
  reply carries the request's acknowledgement and the next request the
  reply's (``Config.reply_ack_delay``), so a round trip is two datagrams, as
  between two Nodes;
* ``bulk``: one big message from A to B over a path of 1472-byte datagrams
  (what Ethernet carries, and what path MTU discovery finds on a veth pair),
  so the figure is the per-datagram work a real network path costs: encoding
  a DATA packet, choosing its fragment, decoding, reassembling, acknowledging;
* ``bulk64k``: the same over loopback, whose datagrams are 64 KiB.

The bulk workloads send one message of N MiB and one of 2N MiB (``--mib``,
default 4), and count per DATA datagram (and per MiB) of the difference.

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
from reliable import Config, Endpoint  # noqa: E402
from reliable.events import MessageTaken  # noqa: E402

CORE = "compiled" if getattr(reliable, "__compiled__", False) else "pure"

A = ("127.0.0.1", 1)  # labels on a simulated loopback path (64 KiB datagrams, as a real one)
B = ("127.0.0.1", 2)
# labels on a simulated Ethernet path (not loopback: Config.max_datagram_size applies)
A_NET = ("198.18.0.1", 1)
B_NET = ("198.18.0.2", 2)
#: The datagram size of the ``bulk`` workload's path: an MTU of 1500 less IPv4 and UDP.
NET_DATAGRAM = 1472
HOP = 0.00005  # virtual seconds a datagram takes: 50 us, about what loopback does
MIB = 1024 * 1024
WORKLOADS = {"stream": (1024, 4000), "rr": (64, 1000)}  # message size, default N
#: The big-message workloads; their N is the message's size in MiB.
BULK = {"bulk": NET_DATAGRAM, "bulk64k": None}  # the path's datagram size (None: loopback)
BULK_MIB = 4
ALL = [*WORKLOADS, *BULK]


def run_bulk(name: str, mib: int) -> tuple[int, int]:
    """Send one ``mib`` MiB message from A to B over the workload's path.

    Returns how many messages B received (1) and how many datagrams A sent (its DATA
    datagrams, and the few others a session sends: the difference between two sizes
    is DATA alone).
    """
    size = BULK[name]
    config = Config() if size is None else Config(max_datagram_size=size, pmtu_max=None)
    src, dst = (A, B) if size is None else (A_NET, B_NET)
    a = Endpoint(config, rng=random.Random(1))
    b = Endpoint(config, rng=random.Random(2))
    now = 0.0
    received = 0
    a.send(dst, bytes(mib * MIB), now=now)
    for _ in range(1_000_000):  # bounded: a stall fails the run instead of spinning
        moved = False
        for sender, receiver, addr in ((a, b, src), (b, a, dst)):
            for datagram, _ in sender.datagrams_to_send(now):
                receiver.receive_datagram(datagram, addr, now)
                moved = True
        while b.take(now=now) is not None:
            received += 1
        while a.next_event() is not None:
            pass
        while b.next_event() is not None:
            pass
        now += HOP
        if not moved:
            if received and _quiet(a) and _quiet(b):
                break
            timers = [t for t in (a.get_timer(), b.get_timer()) if t is not None]
            if timers:
                now = max(now, min(timers))
            for ep in (a, b):
                timer = ep.get_timer()
                if timer is not None and timer <= now:
                    ep.handle_timer(now)
    return received, a.datagrams_sent


def run_workload(name: str, count: int, datagrams: list[int] | None = None) -> int:
    """Run ``count`` messages (stream) or round trips (rr); returns how many B received.

    ``stream`` polls: B takes whatever is queued after each flight. ``rr`` models the
    adapters' request/reply (a blocking ``receive`` on each side): a receive that
    finds nothing queues a wait (``wait_for_message``) and is answered by a
    ``MessageTaken`` event; B replies as it takes the request and waits again, and A
    waits for the reply after each request. So each request reaches a waiting
    receiver, the reply carries its acknowledgement (``Config.reply_ack_delay``), the
    next request carries the reply's, and a round trip is two datagrams, as it is
    between two Nodes. ``datagrams``, if given, gets how many A and B sent.
    """
    size, _ = WORKLOADS[name]
    a, b = Endpoint(rng=random.Random(1)), Endpoint(rng=random.Random(2))
    payload = bytes(size)
    now = 0.0
    received = 0
    rr = name == "rr"

    def receive(ep: Endpoint) -> bool:
        """A blocking receive's first step: take, else queue a wait. True if it took one."""
        if ep.take(now=now) is not None:
            return True
        ep.wait_for_message(now=now)
        return False

    def exchange() -> None:
        nonlocal now, received
        moved = True
        while moved:
            moved = False
            for src, dst, src_addr in ((a, b, A), (b, a, B)):
                for datagram, _ in src.datagrams_to_send(now):
                    dst.receive_datagram(datagram, src_addr, now)
                    moved = True
            if rr:
                while (event := b.next_event()) is not None:
                    if type(event) is MessageTaken:  # B's wait answered: reply, wait again
                        received += 1
                        b.send(A, payload, now=now)
                        moved = True
                        if receive(b):  # one request at a time: nothing else is queued
                            raise AssertionError("two requests at once")
                while (event := a.next_event()) is not None:
                    if type(event) is MessageTaken:
                        moved = True
                now += HOP
                continue
            while b.take(now=now) is not None:
                received += 1
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
        if receive(b):  # B's server loop starts waiting
            raise AssertionError("B's mailbox is not empty at the start")
        for _ in range(count):
            a.send(B, payload, now=now)
            if receive(a):  # the reply cannot be there yet
                raise AssertionError("a reply before its request")
            exchange()
    for _ in range(100):  # let the last acknowledgements settle
        if _quiet(a) and _quiet(b):
            break
        exchange()
        now += 0.01
    if datagrams is not None:
        datagrams[:] = [a.datagrams_sent, b.datagrams_sent]
    return received


def _quiet(ep: Endpoint) -> bool:
    """``Endpoint.quiet()``; a checkout from before it existed settles by its timer."""
    quiet = getattr(ep, "quiet", None)
    return bool(quiet()) if quiet is not None else ep.get_timer() is None


def _callgrind_instructions(name: str, count: int) -> tuple[int, int]:
    """Instructions the whole interpreter executes to run the workload once, and the
    datagrams A sent (bulk workloads; 0 for the others)."""
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
        sent = re.search(r"datagrams (\d+)", done.stdout)
        return int(match.group(1)), int(sent.group(1)) if sent else 0


def _run(name: str, count: int) -> tuple[int, int]:
    """Messages B received, and datagrams A sent (bulk workloads; else 0)."""
    if name in BULK:
        return run_bulk(name, count)
    return run_workload(name, count), 0


def _cpu_seconds(name: str, count: int, repeats: int) -> tuple[float, int]:
    best = float("inf")
    sent = 0
    for _ in range(repeats):
        start = time.process_time()
        _, sent = _run(name, count)
        best = min(best, time.process_time() - start)
    return best, sent


def measure(name: str, count: int, *, cpu: bool, repeats: int = 5) -> dict[str, object]:
    """One workload's cost per message (stream), per round trip (rr) or per datagram
    and per MiB (bulk workloads: ``count`` is the smaller message's size in MiB)."""
    bulk = name in BULK
    unit = "datagram" if bulk else "message" if name == "stream" else "round trip"
    result: dict[str, object] = {"workload": name, "unit": unit, "core": CORE}
    if not cpu and shutil.which("valgrind"):
        low, sent_low = _callgrind_instructions(name, count)
        high, sent_high = _callgrind_instructions(name, 2 * count)
        per = (sent_high - sent_low) if bulk else count
        result.update(method="callgrind", instructions=round((high - low) / per), n=count)
        if bulk:
            result.update(per_mib=round((high - low) / count), datagrams_per_mib=per / count)
        return result
    low_s, sent_low = _cpu_seconds(name, count, repeats)
    high_s, sent_high = _cpu_seconds(name, 2 * count, repeats)
    per = (sent_high - sent_low) if bulk else count
    result.update(method="cpu", cpu_us=round((high_s - low_s) / per * 1e6, 2), n=count)
    if bulk:
        result.update(
            per_mib_ms=round((high_s - low_s) / count * 1e3, 2), datagrams_per_mib=per / count
        )
    return result


def build_parser() -> argparse.ArgumentParser:
    """The command line (the docs test parses the commands the guides show with it)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", choices=[*ALL, "all"], default="all")
    parser.add_argument("--n", type=int, help="messages or round trips (default per workload)")
    parser.add_argument(
        "--mib", type=int, default=BULK_MIB, help="bulk workloads: the smaller message, in MiB"
    )
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
        name, count = args.child[0], int(args.child[1])
        received, sent = _run(name, count)
        print(f"datagrams {sent}")
        return 0 if received == (1 if name in BULK else count) else 1
    names = ALL if args.workload == "all" else [args.workload]
    results = [
        measure(n, args.mib if n in BULK else args.n or WORKLOADS[n][1], cpu=args.cpu)
        for n in names
    ]
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for r in results:
            if r["method"] == "callgrind":
                figure = f"{r['instructions']:>12,} instructions"
            else:
                figure = f"{r['cpu_us']:>12} us of CPU"
            how = f"{r['core']} core, {r['method']}, N={r['n']}"
            if r["unit"] == "datagram":
                if r["method"] == "callgrind":
                    mib = f"{r['per_mib']:,} per MiB"
                else:
                    mib = f"{r['per_mib_ms']} ms per MiB"
                how += f", {r['datagrams_per_mib']:.0f} datagrams and {mib}"
            print(f"core {r['workload']:<7} {figure} per {r['unit']}  ({how})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
