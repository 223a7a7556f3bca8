"""Anycast over the simulated network: selection, discovery, and the failover guarantee.

The guarantee under test (docs/groups.md): every anycast message ends in a
receipt naming the member that took it, or in ``NoServiceMember`` when every
candidate failed; a message goes to one member at a time and never twice to
the same member; it reaches a second member only after the first failed
it, and the receipt's ``failovers`` names each member tried before; so a
message with no failovers was delivered exactly once.
"""

from __future__ import annotations

import random
import struct
from collections import Counter

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from netem import Impairment, SimNetwork
from reliable import Config, Endpoint, errors, events
from reliable.addressing import GroupAddress, ServiceAddress

DISCOVERY = GroupAddress("multicast", "239.9.9.9", 7400)
SERVICE = ServiceAddress("printer")
CLIENT = ("10.0.1.1", 7000)
CONFIG = Config(peer_timeout=2.0, announce_interval=0.5, max_probe_interval=0.25)
_TAG = struct.Struct("!I")


def build(
    members: int, seed: int, link: Impairment | None = None, *, announce: bool = True
) -> tuple[SimNetwork, Endpoint, dict[tuple[str, int], Endpoint]]:
    net = SimNetwork(seed=seed, default=link)
    client = Endpoint(CONFIG, rng=random.Random(seed))
    net.add_host(CLIENT, client)
    nodes = {}
    for i in range(members):
        addr = (f"10.0.1.{i + 2}", 7000)
        ep = Endpoint(CONFIG, rng=random.Random(seed * 17 + i + 1))
        net.add_host(addr, ep)
        nodes[addr] = ep
        if announce:
            net.subscribe(DISCOVERY.sockaddr, addr)
            net.call_at(0.0, lambda ep=ep: ep.serve("printer", [DISCOVERY], 0.0), host=addr)
    if announce:
        net.subscribe(DISCOVERY.sockaddr, CLIENT)
        net.call_at(0.0, lambda: client.discover(DISCOVERY, 0.0), host=CLIENT)
    else:
        client.add_service_members("printer", sorted(nodes))
    return net, client, nodes


def outcomes(ep: Endpoint, into: dict[int, events.Event]) -> None:
    while (e := ep.next_event()) is not None:
        if isinstance(e, (events.MessageDelivered, events.MessageFailed)):
            assert e.ticket not in into, "a message had two outcomes"
            into[e.ticket] = e


def taken(ep: Endpoint, now: float) -> list[int]:
    got = []
    while (msg := ep.take(now=now)) is not None:
        got.append(_TAG.unpack(msg.data[:4])[0])
    return got


def test_announced_members_are_discovered_and_used_round_robin() -> None:
    net, client, nodes = build(3, seed=1)
    net.run(until=1.0)
    assert sorted(client.service_members("printer")) == sorted(nodes)
    tickets = []
    for i in range(9):
        net.call_at(
            1.0 + i * 0.01,
            lambda i=i: tickets.append(client.send_anycast(SERVICE, _TAG.pack(i), now=net.now)),
            host=CLIENT,
        )
    done: dict[int, events.Event] = {}
    net.run(until=3.0)
    outcomes(client, done)
    peers = Counter(done[t].peer for t in tickets if isinstance(done[t], events.MessageDelivered))
    assert sum(peers.values()) == 9 and set(peers.values()) == {3}, peers


def test_lowest_rtt_prefers_the_nearest_member() -> None:
    net, client, nodes = build(3, seed=2, announce=False)
    near = sorted(nodes)[1]
    for addr in nodes:
        net.set_link(CLIENT, addr, Impairment(delay=0.001 if addr == near else 0.03))
    for i in range(12):
        net.call_at(
            i * 0.2,
            lambda i=i: client.send_anycast(
                SERVICE, _TAG.pack(i), now=net.now, policy="lowest-rtt"
            ),
            host=CLIENT,
        )
    net.run(until=5.0)
    done: dict[int, events.Event] = {}
    outcomes(client, done)
    last = [done[t].peer for t in sorted(done)[-6:]]
    assert last == [near] * 6, last


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    kill_at=st.floats(0.05, 0.6),
    loss=st.floats(0, 0.2),
    seed=st.integers(0, 2**16),
    announce=st.booleans(),
)
def test_failover_when_a_member_dies_mid_stream(
    kill_at: float, loss: float, seed: int, announce: bool
) -> None:
    net, client, nodes = build(3, seed, Impairment(loss=loss), announce=announce)
    # discovery (announcements, each confirmed by a SOLICIT round trip) through the loss
    net.run(until=10.0, stop=lambda: len(client.service_members("printer")) == 3)
    assert len(client.service_members("printer")) == 3
    start = net.now
    victim = sorted(nodes)[seed % 3]
    tickets: dict[int, int] = {}
    count = 60
    for i in range(count):
        net.call_at(
            start + i * 0.01,
            lambda i=i: tickets.__setitem__(
                client.send_anycast(SERVICE, _TAG.pack(i), now=net.now), i
            ),
            host=CLIENT,
        )
    net.call_at(start + kill_at, lambda: net.remove_host(victim))
    done: dict[int, events.Event] = {}

    def finished() -> bool:
        outcomes(client, done)
        return len(done) == count

    net.run(until=start + 30.0, stop=finished)
    assert len(done) == count, "some anycast sends were never answered"
    got = {addr: taken(ep, net.now) for addr, ep in nodes.items() if addr != victim}
    where: dict[int, list[tuple[str, int]]] = {}
    for addr, items in got.items():
        assert len(items) == len(set(items)), "a message reached one member twice"
        for i in items:
            where.setdefault(i, []).append(addr)
    for ticket, i in tickets.items():
        outcome = done[ticket]
        assert isinstance(outcome, events.MessageDelivered), outcome
        tried = [m for m, _ in outcome.failovers]
        assert outcome.peer not in tried and len(tried) == len(set(tried))
        if outcome.peer != victim:
            assert outcome.peer in where.get(i, []), "the receipt names a member without it"
        # Beyond the member that took it, only members that failed it may hold it too.
        extra = [a for a in where.get(i, []) if a != outcome.peer]
        assert all(a in tried for a in extra)
        if not tried:
            assert where.get(i, []) in ([], [outcome.peer])
    failed_over = [done[t] for t in tickets if done[t].failovers]  # type: ignore[union-attr]
    assert all(m == victim for e in failed_over for m, _ in e.failovers)  # type: ignore[union-attr]


def test_a_send_crossing_a_members_close_fails_over_at_once() -> None:
    """A member's CLOSE reaches other nodes a link delay after its ``close()``.

    A send chosen in between goes to the closing member; its CLOSE then fails
    the message there ("closed") and it goes to the other member at once, not
    after ``peer_timeout``. The anycast example in docs/groups.md depends on
    exactly this: the client may or may not have heard the CLOSE when it sends.
    """
    net, client, nodes = build(2, seed=7, link=Impairment(delay=0.01))
    net.run(until=1.0)
    assert sorted(client.service_members("printer")) == sorted(nodes)
    done: dict[int, events.Event] = {}
    first = client.send_anycast(SERVICE, _TAG.pack(1), now=net.now)
    net.flush(CLIENT)
    net.run(until=1.5)
    outcomes(client, done)
    closing = done[first].peer  # type: ignore[attr-defined]
    (other,) = set(nodes) - {closing}
    client.send_anycast(SERVICE, _TAG.pack(2), now=net.now)  # round-robin: to the other one
    net.flush(CLIENT)
    net.run(until=2.0)
    start = net.now
    net.call_at(start, lambda: nodes[closing].close(start, 0.0), host=closing)
    # the CLOSE and WITHDRAW are on the wire; the closed node's socket is gone
    net.call_at(start + 0.001, lambda: net.remove_host(closing))
    third: list[int] = []
    net.call_at(
        start + 0.002,
        lambda: third.append(client.send_anycast(SERVICE, _TAG.pack(3), now=net.now)),
        host=CLIENT,
    )
    net.run(until=start + 1.0)  # well within peer_timeout (2 s)
    outcomes(client, done)
    assert third[0] in done, "no outcome yet: the CLOSE did not fail it over"
    outcome = done[third[0]]
    assert isinstance(outcome, events.MessageDelivered), outcome
    assert outcome.peer == other
    assert outcome.failovers == ((closing, "closed"),)  # sent to it before its CLOSE arrived
    assert 3 in taken(nodes[other], net.now)


def test_every_member_failing_is_reported_with_who_was_tried() -> None:
    net, client, nodes = build(2, seed=4, announce=False)
    net.call_at(0.0, lambda: client.send_anycast(SERVICE, b"x" * 4, now=0.0), host=CLIENT)
    for addr in nodes:
        net.remove_host(addr)
    net.run(until=20.0)
    done: dict[int, events.Event] = {}
    outcomes(client, done)
    (outcome,) = done.values()
    assert isinstance(outcome, events.MessageFailed)
    assert isinstance(outcome.error, errors.NoServiceMember)
    assert sorted(m for m, _ in outcome.error.tried) == sorted(nodes)
    assert {why for _, why in outcome.error.tried} == {"unreachable"}


def test_no_known_member_fails_before_anything_is_sent() -> None:
    client = Endpoint(CONFIG)
    try:
        client.send_anycast(SERVICE, b"x", now=0.0)
    except errors.NoServiceMember as exc:
        assert "no live member is known" in str(exc)
    else:  # pragma: no cover
        raise AssertionError("expected NoServiceMember")
    assert client.datagrams_to_send(0.0) == []


def test_a_member_without_the_mailbox_is_skipped() -> None:
    net, client, nodes = build(2, seed=6, announce=False)
    keeper = sorted(nodes)[1]
    nodes[keeper].create_mailbox("jobs", now=0.0)
    jobs = ServiceAddress("printer", "jobs")
    for i in range(4):
        net.call_at(
            i * 0.05, lambda i=i: client.send_anycast(jobs, _TAG.pack(i), now=net.now), host=CLIENT
        )
    net.run(until=3.0)
    done: dict[int, events.Event] = {}
    outcomes(client, done)
    assert all(isinstance(e, events.MessageDelivered) and e.peer == keeper for e in done.values())
    assert any(e.failovers for e in done.values())  # type: ignore[union-attr]


def test_a_forged_announcement_never_aims_messages_at_its_victim() -> None:
    """An ANNOUNCE claims a source address; the client checks it before trusting it."""
    from reliable import wire

    net, client, nodes = build(1, seed=8)
    victim_addr = ("10.0.1.99", 7000)
    victim = Endpoint(CONFIG, rng=random.Random(99))  # a bystander that serves nothing
    net.add_host(victim_addr, victim)
    forged = wire.Packet(
        kind=wire.Kind.ANNOUNCE, src_incarnation=4242, group="printer", cookie=bytes(16)
    )
    raw = wire.encode(forged)
    for i in range(5):  # "from" the victim, every 0.2 s
        net.call_at(
            0.2 * i, lambda: client.receive_datagram(raw, victim_addr, net.now), host=CLIENT
        )
    net.run(until=1.5)
    assert client.service_members("printer") == sorted(nodes)  # the real one only
    for i in range(10):
        net.call_at(
            1.5 + i * 0.01,
            lambda i=i: client.send_anycast(SERVICE, _TAG.pack(i), now=net.now),
            host=CLIENT,
        )
    net.run(until=3.0)
    done: dict[int, events.Event] = {}
    outcomes(client, done)
    assert all(
        isinstance(e, events.MessageDelivered) and e.peer != victim_addr for e in done.values()
    )
    # The victim got one SOLICIT per forged ANNOUNCE, each the ANNOUNCE's size, and no data.
    assert victim.stats().datagrams_received == 5
    assert victim.stats().dropped == {"anycast.not_served": 5}
