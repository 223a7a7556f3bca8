"""Randomized soak of the protocol core on netem's simulated network: bounded, deterministic.

The hypothesis property tests (tests/test_property_sim.py and friends) keep
their messages small so that CI can afford hundreds of examples. This soak
runs the cases they leave out: messages from 0 B to a few MiB in one exchange
(so the one-fragment fast path, bundling and the big-message paths all run),
several priorities, several mailboxes, traffic both ways, datagrams of
1200-1472 bytes with path MTU discovery on (and the path's MTU dropping
mid-run: a black hole) or of 65000 bytes, and loss, duplication, reordering
and corruption in both directions. Each scenario is drawn from one seed, so
any failure is replayed exactly with ``--seed``.

It checks, for both directions of every scenario:

* every accepted message gets exactly one fate (delivered or failed), and a
  failure is one the sender may be told about (peer unreachable, timed out);
* only sent payloads arrive, intact, in the mailbox and at the priority they
  were sent with, each at most once, and every delivered one exactly once;
* within one priority, messages arrive in send order;
* the receiver's mailboxes hand out the same messages it reported arriving.

Run it from a checkout (one process; every run bounded in scenarios and in
wall-clock seconds)::

    python tools/soak.py                        # 200 scenarios from seed 1, at most 600 s
    python tools/soak.py --runs 50 --first 1000 --seconds 120
    python tools/soak.py --seed 1234 -v         # replay one scenario, print what it drew

Exit status 0 when every scenario held, 1 when one failed (its seed and the
first broken property are printed; ``--keep-going`` runs the rest too).
"""

import argparse
import os
import random
import struct
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if "RMSG_SOAK_TREE" in os.environ:
    sys.path.insert(0, os.environ["RMSG_SOAK_TREE"])
elif str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # this checkout's reliable/ and netem/

from netem import Impairment, SimNetwork  # noqa: E402
from reliable import Config, Endpoint, errors, events  # noqa: E402

A = ("sim-a", 1)  # labels, not loopback: max_datagram_size and PMTUD apply
B = ("sim-b", 2)
MAILBOXES = ("", "m1", "m2")
PRIORITIES = (0, 1, 2, 3)
_HEAD = struct.Struct("!IB")  # message index, priority: who a payload is, readable on arrival
ALLOWED_FAILURES = (errors.PeerUnreachable, errors.SendTimeout, errors.PeerDroppedSession)
VIRTUAL_LIMIT = 3600.0  #: simulated seconds a scenario may take before it counts as stuck


class SoakFailure(AssertionError):
    """A broken property, with the scenario's seed in its message."""


@dataclass
class Plan:
    """What one seed draws: the path, the faults and each side's messages."""

    seed: int
    datagram: int
    pmtu_max: int | None
    mtu: int  #: the link's MTU at the start (0: none)
    mtu_drop_at: float | None  #: when the MTU falls to ``datagram`` (a black hole), if ever
    forward: Impairment
    backward: Impairment
    #: per side: (send time, size, priority, mailbox)
    messages: dict[str, list[tuple[float, int, int, str]]] = field(default_factory=dict)

    def describe(self) -> str:
        lines = [
            f"seed={self.seed} datagram={self.datagram} pmtu_max={self.pmtu_max} "
            f"mtu={self.mtu} mtu_drop_at={self.mtu_drop_at}",
            f"  a->b {self.forward}",
            f"  b->a {self.backward}",
        ]
        for side, msgs in self.messages.items():
            sizes = [m[1] for m in msgs]
            largest = max(sizes, default=0)
            lines.append(
                f"  {side} sends {len(msgs)} messages, {sum(sizes)} bytes, largest {largest}"
            )
        return "\n".join(lines)


def _impairment(rng: random.Random) -> Impairment:
    calm = rng.random() < 0.2
    return Impairment(
        loss=0.0 if calm else rng.choice([0.0, 0.01, 0.05, rng.uniform(0, 0.2)]),
        loss_correlation=rng.choice([0.0, 0.0, 0.25]),
        duplicate=0.0 if calm else rng.choice([0.0, rng.uniform(0, 0.1)]),
        corrupt=0.0 if calm else rng.choice([0.0, rng.uniform(0, 0.05)]),
        corrupt_bits=rng.randint(1, 8),
        delay=rng.uniform(0, 0.03),
        jitter=rng.choice([0.0, rng.uniform(0, 0.01)]),
        reorder=0.0 if calm else rng.choice([0.0, rng.uniform(0, 0.3)]),
    )


def _size(rng: random.Random) -> int:
    roll = rng.random()
    if roll < 0.1:
        return 0
    if roll < 0.55:
        return rng.randint(1, 1500)  # one fragment, bundled with others
    if roll < 0.8:
        return rng.randint(1500, 70_000)  # a few fragments, or one 64 KiB datagram
    if roll < 0.95:
        return rng.randint(70_000, 600_000)
    return rng.randint(600_000, 3 * 1024 * 1024)  # the bulk paths


def draw(seed: int, *, max_bytes: int = 6 * 1024 * 1024, one_way: bool = False) -> Plan:
    """The scenario ``seed`` stands for (the same on every run and machine).

    ``one_way``: B sends nothing, so A's DATA carries no piggybacked acks (the
    receiver's fast path for big messages takes only such datagrams)."""
    rng = random.Random(seed)
    if rng.random() < 0.3:
        datagram, pmtu_max, mtu, drop = 65000, None, 0, None
    else:
        datagram = rng.choice([1200, 1280, 1350, 1400, 1472, rng.randint(1200, 1472)])
        pmtu_max = rng.choice([1472, 1472, None])
        mtu = rng.choice([0, 1472, 1400, 1300, rng.randint(1200, 1472)])
        mtu = max(mtu, datagram) if mtu else 0
        drop = rng.choice([None, None, rng.uniform(0.05, 2.0)])
    plan = Plan(seed, datagram, pmtu_max, mtu, drop, _impairment(rng), _impairment(rng))
    for side in ("a", "b"):
        budget = max_bytes if side == "a" else max_bytes // 4
        msgs: list[tuple[float, int, int, str]] = []
        when = 0.0
        for _ in range(rng.randint(1 if side == "a" else 0, 60)):
            size = min(_size(rng), budget)
            budget -= size
            when += rng.choice([0.0, 0.0, rng.uniform(0, 0.05), rng.uniform(0, 0.5)])
            msgs.append((when, size, rng.choice(PRIORITIES), rng.choice(MAILBOXES)))
        plan.messages[side] = [] if one_way and side == "b" else msgs
    return plan


@dataclass
class Flow:
    """One direction's bookkeeping: what was sent and what became of it."""

    sender: Endpoint
    receiver: Endpoint
    dest: Any
    sent: dict[int, tuple[int, bytes, int, str]] = field(default_factory=dict)  # ticket ->
    by_index: dict[int, int] = field(default_factory=dict)  # message index -> ticket
    fates: dict[int, events.Event] = field(default_factory=dict)
    arrived: list[events.MessageReceived] = field(default_factory=list)
    taken: dict[str, list[bytes]] = field(default_factory=dict)


def _payload(index: int, priority: int, size: int, rng: random.Random) -> bytes:
    head = _HEAD.pack(index, priority)
    return (head + rng.randbytes(max(0, size - len(head))))[: max(size, len(head))]


def _collect(ep: Endpoint, mine: Flow, theirs: Flow, now: float) -> None:
    """Sort ``ep``'s events: fates of what it sent, arrivals of what the other sent."""
    while (e := ep.next_event()) is not None:
        if isinstance(e, (events.MessageDelivered, events.MessageFailed)):
            if e.ticket in mine.fates:
                raise SoakFailure(f"ticket {e.ticket} had two fates: {mine.fates[e.ticket]}, {e}")
            mine.fates[e.ticket] = e
        elif isinstance(e, events.MessageReceived):
            theirs.arrived.append(e)
    for box in MAILBOXES:
        while (msg := ep.take(box, now=now)) is not None:
            theirs.taken.setdefault(box, []).append(bytes(msg.data))


def _check(flow: Flow, name: str) -> dict[str, int]:
    """Every property of one direction; returns counts for the summary."""
    if len(flow.fates) != len(flow.sent):
        missing = sorted(set(flow.sent) - set(flow.fates))
        raise SoakFailure(
            f"{name}: {len(missing)} messages never got a fate: tickets {missing[:10]}"
        )
    seen: set[int] = set()
    last: dict[int, int] = {}
    for e in flow.arrived:
        if len(e.data) < _HEAD.size:
            raise SoakFailure(f"{name}: a {len(e.data)}-byte message arrived that nobody sent")
        index, priority = _HEAD.unpack_from(e.data)
        ticket = flow.by_index.get(index)
        if ticket is None:
            raise SoakFailure(f"{name}: message index {index} arrived but was never sent")
        _, data, sent_priority, mailbox = flow.sent[ticket]
        if bytes(e.data) != data:
            diff = next(
                (i for i, (x, y) in enumerate(zip(e.data, data, strict=False)) if x != y),
                min(len(e.data), len(data)),
            )
            raise SoakFailure(
                f"{name}: message {index} ({len(data)} B) arrived damaged: "
                f"{len(e.data)} B, first difference at byte {diff}"
            )
        if e.priority != sent_priority or e.mailbox != mailbox:
            raise SoakFailure(
                f"{name}: message {index} arrived at priority {e.priority} mailbox "
                f"{e.mailbox!r}, sent at {sent_priority} to {mailbox!r}"
            )
        if index in seen:
            raise SoakFailure(f"{name}: message {index} arrived twice")
        seen.add(index)
        if index < last.get(priority, -1):
            raise SoakFailure(
                f"{name}: message {index} arrived after {last[priority]} at priority {priority}"
            )
        last[priority] = index
    delivered = failed = 0
    reasons: dict[str, int] = {}
    for ticket, fate in flow.fates.items():
        index = flow.sent[ticket][0]
        if isinstance(fate, events.MessageDelivered):
            delivered += 1
            if index not in seen:
                raise SoakFailure(f"{name}: message {index} reported delivered, never arrived")
        else:
            assert isinstance(fate, events.MessageFailed)
            failed += 1
            if not isinstance(fate.error, ALLOWED_FAILURES):
                raise SoakFailure(f"{name}: message {index} failed with {fate.error!r}")
            why = type(fate.error).__name__
            cause = getattr(fate.error, "cause", None)
            if cause:
                why += " (path shrank)" if "black hole" in cause else " (cause)"
            reasons[why] = reasons.get(why, 0) + 1
    for box in MAILBOXES:
        # a mailbox hands out the highest priority first: compare per priority, in order
        want = [bytes(e.data) for e in flow.arrived if e.mailbox == box]
        got = flow.taken.get(box, [])
        for priority in PRIORITIES:
            if [d for d in got if d[4] == priority] != [d for d in want if d[4] == priority]:
                raise SoakFailure(
                    f"{name}: mailbox {box!r} handed out other messages at priority {priority} "
                    "than arrived there, or in another order"
                )
        if len(got) != len(want):
            raise SoakFailure(f"{name}: mailbox {box!r} handed out {len(got)} of {len(want)}")
    counts = {"delivered": delivered, "failed": failed}
    counts["bytes"] = sum(len(e.data) for e in flow.arrived)
    counts.update({f"failed: {why}": n for why, n in reasons.items()})
    return counts


def run(plan: Plan) -> dict[str, int]:
    """Play ``plan`` to the end; raises :class:`SoakFailure` on a broken property."""
    seed = plan.seed
    config = Config(
        max_datagram_size=plan.datagram,
        pmtu_max=plan.pmtu_max,
        peer_timeout=30.0,
        send_buffer=64 * 1024 * 1024,
    )
    net = SimNetwork(seed=seed)
    forward, backward = plan.forward, plan.backward
    if plan.mtu:
        forward = _with_mtu(forward, plan.mtu)
        backward = _with_mtu(backward, plan.mtu)
    net.set_link(A, B, forward)
    net.set_link(B, A, backward)
    a = Endpoint(config, rng=random.Random(seed), arrival_events=True)
    b = Endpoint(config, rng=random.Random(seed + 1), arrival_events=True)
    for ep in (a, b):
        for box in MAILBOXES[1:]:
            ep.create_mailbox(box, now=0.0)
    net.add_host(A, a)
    net.add_host(B, b)
    ab, ba = Flow(a, b, B), Flow(b, a, A)
    data_rng = random.Random(seed ^ 0x5EED)
    for flow, host, msgs in ((ab, A, plan.messages["a"]), (ba, B, plan.messages["b"])):
        for index, (when, size, priority, box) in enumerate(msgs):
            payload = _payload(index, priority, size, data_rng)
            net.call_at(when, _sender(net, flow, index, payload, priority, box), host=host)
    if plan.mtu_drop_at is not None:

        def black_hole() -> None:
            net.set_link(A, B, _with_mtu(forward, plan.datagram))
            net.set_link(B, A, _with_mtu(backward, plan.datagram))

        net.call_at(plan.mtu_drop_at, black_hole)
    total = len(plan.messages["a"]) + len(plan.messages["b"])

    def done() -> bool:
        _collect(a, ab, ba, net.now)
        _collect(b, ba, ab, net.now)
        return len(ab.fates) + len(ba.fates) == total

    net.run(stop=done, until=VIRTUAL_LIMIT)
    counts = {f"a->b {k}": v for k, v in _check(ab, "a->b").items()}
    counts.update({f"b->a {k}": v for k, v in _check(ba, "b->a").items()})
    counts["virtual ms"] = int(net.now * 1000)
    for side, ep in (("a", a), ("b", b)):
        peer = next(iter(ep._peers.values()), None)  # what the path ended at, for -v
        if peer is not None:
            counts[f"{side} datagram"] = peer.datagram_size
            counts[f"{side} bulk taken"] = getattr(peer, "bulk_taken", -1)
    return counts


def _with_mtu(imp: Impairment, mtu: int) -> Impairment:
    from dataclasses import replace

    return replace(imp, mtu=mtu)


def _sender(
    net: SimNetwork, flow: Flow, index: int, payload: bytes, priority: int, box: str
) -> Callable[[], None]:
    def send() -> None:
        ticket = flow.sender.send(flow.dest, payload, now=net.now, priority=priority, mailbox=box)
        flow.sent[ticket] = (index, payload, priority, box)
        flow.by_index[index] = ticket

    return send


def build_parser() -> argparse.ArgumentParser:
    """The command line (tests/test_docs_examples.py parses the README's commands with it)."""
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--first", type=int, default=1, help="first seed (default 1)")
    ap.add_argument("--runs", type=int, default=200, help="scenarios, seeds first.. (200)")
    ap.add_argument("--seconds", type=float, default=600.0, help="wall-clock bound (600)")
    ap.add_argument("--seed", type=int, help="run only this scenario")
    ap.add_argument("--max-bytes", type=int, default=6 * 1024 * 1024, help="a->b bytes per run")
    ap.add_argument("--keep-going", action="store_true", help="run on after a failure")
    ap.add_argument("--one-way", action="store_true", help="only a sends (b acknowledges)")
    ap.add_argument("-v", "--verbose", action="store_true", help="print every scenario")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    seeds = [args.seed] if args.seed is not None else range(args.first, args.first + args.runs)
    start = time.monotonic()
    ran = failures = 0
    totals: dict[str, int] = {}
    for seed in seeds:
        if time.monotonic() - start > args.seconds:
            print(f"stopped at the {args.seconds:g} s bound before seed {seed}")
            break
        plan = draw(seed, max_bytes=args.max_bytes, one_way=args.one_way)
        if args.verbose:
            print(plan.describe(), flush=True)
        try:
            counts = run(plan)
        except (SoakFailure, AssertionError, errors.ReliableError, RuntimeError) as exc:
            failures += 1
            print(f"FAIL seed={seed}: {type(exc).__name__}: {exc}", flush=True)
            if not args.verbose:
                print(plan.describe(), flush=True)
            if not args.keep_going:
                ran += 1
                break
        else:
            if args.verbose:
                print("  ok", counts, flush=True)
            for k, v in counts.items():
                if "delivered" in k or "failed" in k or "bytes" in k:
                    totals[k] = totals.get(k, 0) + v
        ran += 1
    elapsed = time.monotonic() - start
    print(f"{ran} scenarios, {failures} failed, {elapsed:.0f} s; totals {totals}")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
