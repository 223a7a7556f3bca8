"""Reliable multicast over the simulated network, with hypothesis choosing the faults.

One sender, several members, each copy of each datagram through its own
faulty link. Whatever the faults: every member that stays takes every
message exactly once, intact and in send order; every send is answered
by one receipt that tells the truth (``acked`` members really have the
message); members that leave or die are reported, not waited on forever.
"""

from __future__ import annotations

import random
import struct

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from netem import Impairment, SimNetwork
from reliable import Config, Endpoint, events
from reliable.addressing import GroupAddress
from reliable.message import GroupReceipt

from .harness import links

G = GroupAddress("multicast", "239.1.2.3", 7000)
SENDER = ("10.0.0.1", 7000)
_TAG = struct.Struct("!I")


CONFIG = Config(peer_timeout=3.0, announce_interval=0.5, group_timeout=30.0)


def build(
    members: int, seed: int, link: Impairment | None = None, config: Config = CONFIG
) -> tuple[SimNetwork, Endpoint, dict[tuple[str, int], Endpoint]]:
    net = SimNetwork(seed=seed, default=link)
    sender = Endpoint(config, rng=random.Random(seed))
    net.add_host(SENDER, sender)
    net.subscribe(G.sockaddr, SENDER)
    nodes = {}
    for i in range(members):
        addr = (f"10.0.0.{i + 2}", 7000)
        ep = Endpoint(config, rng=random.Random(seed * 31 + i + 1))
        net.add_host(addr, ep)
        net.subscribe(G.sockaddr, addr)
        nodes[addr] = ep
        net.call_at(0.0, lambda ep=ep: ep.open_group(G, 0.0, join=True), host=addr)
    net.call_at(0.0, lambda: sender.open_group(G, 0.0), host=SENDER)
    return net, sender, nodes


def drain(ep: Endpoint, now: float) -> list[bytes]:
    got = []
    while (msg := ep.take(now=now)) is not None:
        got.append(msg.data)
    return got


def receipts(ep: Endpoint) -> dict[int, GroupReceipt]:
    out: dict[int, GroupReceipt] = {}
    while (e := ep.next_event()) is not None:
        if isinstance(e, events.GroupSendDone):
            assert e.ticket not in out, "a message had two receipts"
            out[e.ticket] = e.receipt
    return out


def payload(i: int, size: int) -> bytes:
    return _TAG.pack(i) + bytes((i + k) % 251 for k in range(size))


SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@example(  # a member's last GACK lost, then only GSYNCs reached it: it must re-acknowledge
    members=4,
    sizes=[3099, 0, 0, 0, 1031, 0, 0],
    link=Impairment(loss=0.296875, duplicate=0.015625, jitter=1.192092896e-07, reorder=0.00390625),
    seed=31,
)
@given(
    members=st.integers(1, 4),
    sizes=st.lists(st.integers(0, 5000), min_size=1, max_size=25),
    link=links,
    seed=st.integers(0, 2**16),
)
def test_every_member_gets_every_message_once_in_order(
    members: int, sizes: list[int], link: Impairment, seed: int
) -> None:
    net, sender, nodes = build(members, seed, link)
    net.run(until=2.0)  # JOINs heard (through loss: several heartbeats)
    assert set(sender.group_members(G)) == set(nodes), "membership not learned in 2 s"
    tickets = []
    for i, size in enumerate(sizes):
        net.call_at(
            2.0 + i * 0.001,
            lambda i=i, size=size: tickets.append(
                sender.send_group(G, payload(i, size), now=net.now)
            ),
            host=SENDER,
        )
    got: dict[tuple[str, int], list[bytes]] = {a: [] for a in nodes}
    done: dict[int, GroupReceipt] = {}

    def finished() -> bool:
        done.update(receipts(sender))
        return len(done) == len(sizes)

    net.run(until=60.0, stop=finished)
    for addr, ep in nodes.items():
        got[addr] = drain(ep, net.now)
    assert len(done) == len(sizes), "some group sends were never answered"
    expected = [payload(i, size) for i, size in enumerate(sizes)]
    for addr in nodes:
        assert got[addr] == expected, f"member {addr} did not get every message once, in order"
    for ticket in tickets:
        receipt = done[ticket]
        assert set(receipt.acked) == set(nodes) and receipt.complete, receipt


def test_a_member_that_dies_is_reported_missing_and_the_others_still_get_everything() -> None:
    net, sender, nodes = build(3, seed=7, link=Impairment(loss=0.1))
    net.run(until=2.0)
    victim = sorted(nodes)[0]
    tickets: list[int] = []
    for i in range(40):
        net.call_at(
            2.0 + i * 0.01,
            lambda i=i: tickets.append(sender.send_group(G, payload(i, 300), now=net.now)),
            host=SENDER,
        )
    net.call_at(2.2, lambda: net.remove_host(victim))  # crashes: no LEAVE
    done: dict[int, GroupReceipt] = {}

    def finished() -> bool:
        done.update(receipts(sender))
        return len(done) == 40

    net.run(until=60.0, stop=finished)
    assert len(done) == 40
    survivors = [a for a in nodes if a != victim]
    for addr in survivors:
        assert drain(nodes[addr], net.now) == [payload(i, 300) for i in range(40)]
    late = [done[t] for t in tickets[25:]]  # sent well after the crash
    for receipt in late:
        assert set(receipt.acked) == set(survivors)
        assert victim not in receipt.acked
    # Sent after the crash and resolved before the liveness timeout noticed it: missing.
    assert any(victim in r.missing for r in done.values())
    assert all(r.missing.get(victim) in (None, "unreachable") for r in done.values())
    assert victim not in sender.group_members(G)
    # The receipts never wait much past peer_timeout for a dead member.
    assert net.now < 2.2 + CONFIG.peer_timeout + 2.0


def test_a_late_joiner_gets_what_was_sent_after_it_joined() -> None:
    net, sender, _ = build(2, seed=3)
    net.run(until=1.0)
    for i in range(5):
        net.call_at(1.0 + i * 0.01, lambda i=i: sender.send_group(G, payload(i, 10), now=net.now))
    net.run(until=2.0)
    late_addr = ("10.0.0.9", 7000)
    late = Endpoint(CONFIG, rng=random.Random(99))
    net.add_host(late_addr, late)
    net.subscribe(G.sockaddr, late_addr)
    net.call_at(2.0, lambda: late.open_group(G, 2.0, join=True), host=late_addr)
    net.run(until=3.0)
    assert late_addr in sender.group_members(G)
    for i in range(5, 10):
        net.call_at(3.0 + i * 0.01, lambda i=i: sender.send_group(G, payload(i, 10), now=net.now))
    net.run(until=5.0)
    assert drain(late, net.now) == [payload(i, 10) for i in range(5, 10)]
    done = receipts(sender)
    assert len(done) == 10
    assert all(late_addr in r.acked for t, r in done.items() if t > 5)


def test_leave_is_an_event_and_ends_expectations() -> None:
    net, sender, nodes = build(2, seed=5)
    net.run(until=1.0)
    leaver = sorted(nodes)[1]
    net.call_at(1.0, lambda: nodes[leaver].leave_group(G, 1.0), host=leaver)
    net.run(until=1.5)
    seen = []
    while (e := sender.next_event()) is not None:
        seen.append(e)
    joined = {e.member for e in seen if isinstance(e, events.MemberJoined)}
    left = [(e.member, e.reason) for e in seen if isinstance(e, events.MemberLeft)]
    assert joined == set(nodes) and left == [(leaver, "left")]
    net.call_at(1.5, lambda: sender.send_group(G, b"after", now=net.now), host=SENDER)
    net.run(until=3.0)
    (receipt,) = receipts(sender).values()
    assert receipt.acked == (sorted(nodes)[0],) and receipt.complete
    assert drain(nodes[leaver], net.now) == []


def test_a_refusing_member_is_listed_with_its_reason() -> None:
    net, sender, nodes = build(2, seed=11)
    net.run(until=1.0)
    box = GroupAddress("multicast", G.host, G.port, "jobs")
    keeper = sorted(nodes)[0]
    nodes[keeper].create_mailbox("jobs", now=1.0)
    net.call_at(1.0, lambda: sender.send_group(box, b"job", now=net.now), host=SENDER)
    net.run(until=3.0)
    (receipt,) = receipts(sender).values()
    assert receipt.acked == (keeper,)
    assert receipt.missing == {sorted(nodes)[1]: "no_mailbox"}
    assert nodes[keeper].take("jobs", now=net.now).data == b"job"  # type: ignore[union-attr]


def test_one_loss_upstream_of_every_member_draws_few_naks() -> None:
    """NAK suppression: a fragment lost before the copy point costs about one NAK, not one
    per member (here the loss is on every member's link at once, which is the same thing)."""
    members = 8
    net, sender, nodes = build(members, seed=13)
    net.run(until=1.0)
    lost = {"armed": True}

    def drop_first_data(data: bytes) -> bool:
        return len(data) > 200 and lost["armed"]

    original = net.flush

    def flush(addr: object) -> None:
        if addr == SENDER and lost["armed"]:
            out = sender.datagrams_to_send(net.now)
            kept = [(d, dst) for d, dst in out if not drop_first_data(d)]
            if len(kept) != len(out):
                lost["armed"] = False
            for d, dst in kept:
                sender._loose.append((d, dst))  # re-queue what survives
        original(addr)

    net.flush = flush  # type: ignore[method-assign]
    for i in range(6):
        net.call_at(
            1.0 + i * 0.002,
            lambda i=i: sender.send_group(G, payload(i, 400), now=net.now),
            host=SENDER,
        )
    net.run(until=4.0)
    assert not lost["armed"]
    for ep in nodes.values():
        assert drain(ep, net.now) == [payload(i, 400) for i in range(6)]
    naks = sum(g["naks_sent"] for ep in nodes.values() for g in ep.stats().groups)
    suppressed = sum(g["naks_suppressed"] for ep in nodes.values() for g in ep.stats().groups)
    assert naks <= members // 2, (naks, suppressed)
    assert suppressed >= 1


def test_a_leave_carries_the_final_ack_so_a_lost_gack_is_not_read_as_missing() -> None:
    from reliable import wire

    net, sender, nodes = build(1, seed=17)
    net.run(until=1.0)
    (addr,) = nodes
    member = nodes[addr]
    lost: list[int] = []
    original = net.flush

    def flush(host: object) -> None:
        if host == addr:  # the member's GACKs vanish, everything else goes through
            for data, dst in member.datagrams_to_send(net.now):
                if wire.decode(data).kind == wire.Kind.GACK:
                    lost.append(len(data))
                else:
                    member._loose.append((data, dst))
        original(host)

    net.flush = flush  # type: ignore[method-assign]
    net.call_at(1.0, lambda: sender.send_group(G, b"last words", now=net.now), host=SENDER)
    net.run(until=1.05)
    assert lost, "the member acknowledged (and lost it)"
    net.call_at(1.05, lambda: member.leave_group(G, net.now), host=addr)
    net.run(until=1.5)
    (receipt,) = receipts(sender).values()
    assert receipt.acked == (addr,) and receipt.complete, receipt
