"""Goodput under loss on netem's simulated network: deterministic, virtual time.

Loss recovery is judged by how full it keeps the pipe when datagrams are
lost, so this measures it where nothing else varies: two ``Endpoint``\\ s on a
``SimNetwork`` link with a rate limit (the bottleneck, as CPU is on the
loopback bench) and a fixed delay, one seed, virtual time. The sender keeps
``--window`` messages unconfirmed, as ``rmsg bench`` does, and the figure is
messages acknowledged per virtual second, as a ratio to the lossless run.

Loss follows the bench's convention: ``--loss 0.10`` drops 10% at each of
the two sockets a datagram crosses (``FaultySocket`` on both ends, outgoing
and incoming), so about 19% of each direction's datagrams are lost.

Run it from a checkout::

    python tools/loss_sim.py                  # 0/1/5/10% loss, 1 KiB messages
    python tools/loss_sim.py --size 65536 --seconds 5
    python tools/loss_sim.py --cold 16777216  # one message on a fresh session: bytes
                                              # sent before the peer validated us

The figures are the same on every run and every machine (no clock is read
except to report CPU seconds).
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path and "RMSG_LOSS_SIM_TREE" not in os.environ:
    sys.path.insert(0, str(ROOT))  # this checkout's reliable/ and netem/
elif "RMSG_LOSS_SIM_TREE" in os.environ:
    sys.path.insert(0, os.environ["RMSG_LOSS_SIM_TREE"])

from netem import Impairment, SimNetwork  # noqa: E402
from reliable import Endpoint, events  # noqa: E402

A = ("127.0.0.1", 1)  # labels on a simulated loopback path (64 KiB datagrams, as a real one)
B = ("127.0.0.1", 2)
LOSSES = (0.0, 0.01, 0.05, 0.10)


class Run(NamedTuple):
    """One measurement: goodput and what recovery did to get it."""

    loss: float  #: per socket, as ``rmsg bench`` gives it
    delivered: int  #: messages acknowledged in the measured interval
    seconds: float  #: virtual
    packets: int  #: fragments transmitted by the sender, first copies and retransmissions
    retransmissions: int
    probes: int  #: probe timeouts that fired
    cpu: float  #: CPU seconds the simulation took

    @property
    def goodput(self) -> float:
        """Messages per virtual second."""
        return self.delivered / self.seconds


def per_direction(loss: float) -> float:
    """The share of one direction's datagrams lost when each socket drops ``loss``."""
    return 1 - (1 - loss) ** 2


def run(
    loss: float,
    *,
    size: int = 1024,
    window: int = 256,
    seconds: float = 3.0,
    rate: float = 100e6,
    delay: float = 0.002,
    seed: int = 1,
    rcvbuf: int | None = 8 << 20,
) -> Run:
    """Stream ``size``-byte messages A -> B for ``seconds`` of virtual time."""
    link = Impairment(loss=per_direction(loss), rate=rate, delay=delay)
    net = SimNetwork(seed=seed, latency=0.0, default=link)
    a, b = Endpoint(rng=random.Random(seed)), Endpoint(rng=random.Random(seed + 1))
    b.set_receive_buffer(rcvbuf)  # what the bench's receiver reports for its socket
    net.add_host(A, a)
    net.add_host(B, b)
    payload = bytes(size)
    state = {"unconfirmed": 0, "delivered": 0}
    cpu0 = time.process_time()

    def top_up() -> None:
        while state["unconfirmed"] < window:
            a.send(B, payload, now=net.now)
            state["unconfirmed"] += 1

    def app() -> bool:
        """The applications' step between network events (never stops the run)."""
        while (event := a.next_event()) is not None:
            if isinstance(event, (events.MessageDelivered, events.MessageFailed)):
                state["unconfirmed"] -= 1
                state["delivered"] += isinstance(event, events.MessageDelivered)
        if state["unconfirmed"] < window // 2:
            top_up()
            net.flush(A)
        took = False
        while b.take(now=net.now) is not None:
            took = True
        while b.next_event() is not None:
            pass
        if took:
            net.flush(B)  # taking makes room: the window may reopen
        return False

    net.call_at(0.0, top_up, host=A)
    net.run(until=seconds, stop=app)
    peer = a.stats().peers[0]
    session = a._peers[B]  # the probe count is not a public statistic
    return Run(
        loss=loss,
        delivered=state["delivered"],
        seconds=seconds,
        packets=peer.packets_sent,
        retransmissions=peer.retransmissions,
        probes=getattr(session.sender, "probes", -1),
        cpu=time.process_time() - cpu0,
    )


class _Counting(Endpoint):
    """B, counting the bytes it dropped unread while it validated A's address."""

    unread = 0

    def receive_datagram(self, data: bytes, addr: object, now: float) -> None:
        before = self.dropped.get("unvalidated", 0)
        super().receive_datagram(data, addr, now)
        if self.dropped.get("unvalidated", 0) > before:
            self.unread += len(data)


def cold_bytes(size: int, *, seed: int = 1) -> tuple[int, int, float]:
    """One ``size``-byte message on a fresh session over a perfect 1 Gbit/s link: the
    bytes B dropped unread before it validated A, the fragments A sent, virtual seconds."""
    net = SimNetwork(seed=seed, latency=0.0, default=Impairment(rate=1e9, delay=0.0001))
    a, b = Endpoint(rng=random.Random(seed)), _Counting(rng=random.Random(seed + 1))
    net.add_host(A, a)
    net.add_host(B, b)
    done = {"delivered": False}

    def app() -> bool:
        while (event := a.next_event()) is not None:
            done["delivered"] |= isinstance(event, events.MessageDelivered)
        while b.take(now=net.now) is not None:
            pass
        return done["delivered"]

    net.call_at(0.0, lambda: a.send(B, bytes(size), now=net.now), host=A)
    net.run(until=60.0, stop=app)
    return b.unread, a.stats().peers[0].packets_sent, net.now


def build_parser() -> argparse.ArgumentParser:
    """The command line (the docs test parses the commands the guides show with it)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=1024, help="message bytes (1024)")
    parser.add_argument("--window", type=int, default=256, help="unconfirmed messages (256)")
    parser.add_argument("--seconds", type=float, default=3.0, help="virtual seconds (3)")
    parser.add_argument("--rate", type=float, default=100e6, help="link bits/s (100e6)")
    parser.add_argument("--delay", type=float, default=0.002, help="one-way delay, s (0.002)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--rcvbuf", type=int, default=8 << 20, help="receiver's socket buffer, bytes (8 MiB)"
    )
    parser.add_argument("--loss", type=float, action="append", help="per-socket loss (repeat)")
    parser.add_argument("--cold", type=int, metavar="BYTES", help="measure a cold first send")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.cold:
        unread, sent, took = cold_bytes(args.cold, seed=args.seed)
        print(
            f"cold {args.cold} B: {unread} bytes dropped unread before validation, "
            f"{sent} fragments sent, delivered at {took * 1000:.1f} ms virtual"
        )
        return 0
    losses = args.loss or LOSSES
    options = {
        "size": args.size,
        "window": args.window,
        "seconds": args.seconds,
        "rate": args.rate,
        "delay": args.delay,
        "seed": args.seed,
        "rcvbuf": args.rcvbuf or None,
    }
    lossless = run(0.0, **options) if 0.0 not in losses else None
    print(
        f"{args.size} B messages, {args.window} unconfirmed, {args.rate / 1e6:g} Mbit/s, "
        f"{args.delay * 1000:g} ms each way, {args.seconds:g} s virtual, seed {args.seed}"
    )
    header = ("loss", "/dir", "msgs/s", "ratio", "retx%", "probes", "cpu s")
    print("{:>5} {:>5} {:>9} {:>6} {:>6} {:>6} {:>6}".format(*header))
    for loss in losses:
        r = run(loss, **options)
        if loss == 0.0:
            lossless = r
        assert lossless is not None
        ratio = r.goodput / lossless.goodput if lossless.goodput else 0.0
        retx = 100 * r.retransmissions / max(r.packets, 1)
        print(
            f"{loss:>5.0%} {per_direction(loss):>5.0%} {r.goodput:>9,.0f} {ratio:>6.2f} "
            f"{retx:>6.1f} {r.probes:>6} {r.cpu:>6.2f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
