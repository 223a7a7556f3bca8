"""``rmsg bench``'s loss rows alone, on the real loopback path, with what recovery did.

``rmsg bench`` measures goodput under loss (``FaultySocket`` on both ends,
as there) among forty other rows; this runs only the ones asked for (1 KiB,
``Node`` and ``AsyncNode``, 0/5/10% by default, rounds interleaved, through
the bench's own ``_measure_throughput``), and looks inside the sender's core
while it runs:

* ``probes``: probe timeouts that fired; ``spur``: losses proven spurious
  (the network reordered); ``thr``: the time threshold at the end, in RTTs;
* ``detect``: median time from a packet's (last) transmission to its being
  declared lost; ``repair``: median time from then to the acknowledgement of
  its copy; ``srtt`` at the end;
* ``cwnd%``: the share of the time between acknowledgements that ended with
  data queued and the congestion window full;
* ``late``: median time the loss and probe timers ran after they were due
  (the adapter's timer granularity).

The hooks wrap the core's methods in the sender's process (pure-Python core
only; a compiled one keeps its figures but shows ``-`` for these).

Run it from a checkout; another tree's code through ``PYTHONPATH``::

    python tools/loss_bench.py                           # 3 rounds, 1.5 s windows
    python tools/loss_bench.py --rounds 5 --loss 0 --loss 0.1 --transport rmsg
    PYTHONPATH=/path/to/other/checkout python tools/loss_bench.py

Loopback only; every run is bounded (the bench's own limits).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if "PYTHONPATH" not in os.environ:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout

_OUT = "RMSG_LOSS_BENCH_OUT"  # where the sender's process writes what it saw


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _hook() -> dict[str, Any]:
    """Wrap the sender's core methods to record recovery (in the sender's process)."""
    from reliable import sender as core

    seen: dict[str, Any] = {
        "streams": [],
        "declared": {},  # seq -> (last transmission, declared at, copy sent at)
        "detect": [],
        "repair": [],
        "late": [],
        "limited": [0.0, 0.0],  # seconds cwnd-limited, seconds in all
        "last_ack": None,
    }
    stream = core.SendStream
    if not hasattr(stream.__init__, "__code__"):
        return seen  # compiled: nothing to wrap
    init, on_timer, on_ack = stream.__init__, stream.on_timer, stream.on_ack
    declare, transmit, forget = stream._declare_lost, stream._transmit, stream._forget

    def _init(self: Any, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        seen["streams"].append(self)

    def _on_timer(self: Any, now: float) -> None:
        due = self.loss_time
        if due is None and self.flight:
            due = self.probe_deadline()
        if due is not None and now >= due:
            seen["late"].append(now - due)
        on_timer(self, now)

    def _on_ack(self: Any, *args: Any) -> Any:
        now = args[-1]
        last = seen["last_ack"]
        if last is not None:
            limited = seen["limited"]
            limited[1] += now - last
            if self.queue and self.in_flight_bytes >= self.cc.window:
                limited[0] += now - last
        seen["last_ack"] = now
        return on_ack(self, *args)

    def _declare(self: Any, pkt: Any) -> None:
        seen["declared"].setdefault(pkt.seq, [pkt.sent_time, time.monotonic(), None])
        declare(self, pkt)

    def _transmit(self: Any, pkt: Any, now: float) -> None:
        entry = seen["declared"].get(pkt.seq)
        if entry is not None and entry[2] is None:
            entry[2] = now
        transmit(self, pkt, now)

    def _forget(self: Any, pkt: Any, newest: Any, now: float) -> Any:
        entry = seen["declared"].pop(pkt.seq, None)
        if entry is not None and entry[2] is not None:
            seen["detect"].append(entry[1] - entry[0])
            seen["repair"].append(now - entry[1])
        return forget(self, pkt, newest, now)

    stream.__init__ = _init  # type: ignore[method-assign]
    stream.on_timer = _on_timer  # type: ignore[method-assign]
    stream.on_ack = _on_ack  # type: ignore[method-assign]
    stream._declare_lost = _declare  # type: ignore[method-assign]
    stream._transmit = _transmit  # type: ignore[method-assign]
    stream._forget = _forget  # type: ignore[method-assign]
    return seen


def _sender(*args: Any) -> None:
    """The bench's sender, watched (a process entry point)."""
    seen = _hook()
    from rmsg import bench

    bench._sender(*args)
    streams = seen["streams"]
    report: dict[str, Any] = {}
    if streams:
        s = max(streams, key=lambda x: x.packets_sent)
        spent, total = seen["limited"]
        report = {
            "probes": s.probes,
            "spur": s.spurious,
            "thr": s.time_threshold,
            "srtt": s.rtt.srtt,
            "detect": _median(seen["detect"]),
            "repair": _median(seen["repair"]),
            "cwnd": spent / total if total else None,
            "late": _median(seen["late"]),
        }
    with open(os.environ[_OUT], "w") as f:
        json.dump(report, f)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.2f}"


def build_parser() -> argparse.ArgumentParser:
    """The command line (the docs test parses the commands the guides show with it)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--loss", type=float, action="append", help="per socket (0, 0.05, 0.1)")
    parser.add_argument(
        "--transport", action="append", choices=("rmsg", "rmsg-async"), help="(both)"
    )
    parser.add_argument("--size", type=int, default=1024, help="message bytes (1024)")
    parser.add_argument("--seconds", type=float, default=1.5, help="window per row (1.5)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (3)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.rounds < 1 or not 0 < args.seconds <= 60 or not 0 < args.size <= 1 << 20:
        build_parser().error("--rounds >= 1, 0 < --seconds <= 60, 0 < --size <= 1 MiB")
    if any(not 0 <= loss < 1 for loss in args.loss or ()):
        build_parser().error("--loss is a share of datagrams, 0 <= loss < 1")
    losses = args.loss or [0.0, 0.05, 0.10]
    if 0.0 not in losses:
        losses = [0.0, *losses]  # the ratios' denominator, measured in the same round
    transports = args.transport or ["rmsg", "rmsg-async"]
    from rmsg import bench

    bench._sender = _sender  # type: ignore[assignment]  # (spawned children look it up)
    import reliable

    core = "compiled (recovery columns blank)" if reliable.__compiled__ else "pure"
    print(f"{args.size} B, {args.seconds:g} s windows; {core} core from {reliable.__file__}")
    print(
        f"{'round':>5} {'transport':<10} {'loss':>4} {'msgs/s':>8} {'ratio':>5} {'retx':>5} "
        f"{'probes':>6} {'spur':>4} {'thr':>4} {'srtt':>5} {'detect':>6} {'repair':>6} "
        f"{'cwnd%':>5} {'late':>5}"
    )
    ratios: dict[tuple[str, float], list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        os.environ[_OUT] = os.path.join(tmp, "sender.json")
        for r in range(args.rounds):
            for transport in transports:
                lossless = 0.0
                for loss in losses:
                    t = bench._measure_throughput(transport, args.size, loss, args.seconds, False)
                    try:
                        with open(os.environ[_OUT]) as f:
                            seen = json.load(f)
                        os.unlink(os.environ[_OUT])
                    except (OSError, ValueError):
                        seen = {}
                    if loss == 0.0:
                        lossless = t.messages_per_s
                    ratio = t.messages_per_s / lossless if lossless else 0.0
                    ratios.setdefault((transport, loss), []).append(ratio)
                    thr = seen.get("thr")
                    cwnd = seen.get("cwnd")
                    print(
                        f"{r + 1:>5} {transport:<10} {loss:>4.0%} {t.messages_per_s:>8,.0f} "
                        f"{ratio:>5.2f} {t.retransmission_ratio or 0:>5.1%} "
                        f"{seen.get('probes', '-'):>6} {seen.get('spur', '-'):>4} "
                        f"{'-' if thr is None else f'{thr:.2f}':>4} {_ms(seen.get('srtt')):>5} "
                        f"{_ms(seen.get('detect')):>6} {_ms(seen.get('repair')):>6} "
                        f"{'-' if cwnd is None else f'{cwnd:.0%}':>5} {_ms(seen.get('late')):>5}",
                        flush=True,
                    )
    print("median ratio to lossless over rounds (min-max):")
    for (transport, loss), values in ratios.items():
        if loss:
            print(
                f"  {transport:<10} {loss:>4.0%}  {statistics.median(values):.2f}"
                f"  ({min(values):.2f}-{max(values):.2f})"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
