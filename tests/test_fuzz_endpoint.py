"""Hostile input: whatever arrives, a node never raises, never delivers garbage and
never grows without bound. Everything is counted."""

from __future__ import annotations

import dataclasses
import random

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reliable import Config, Endpoint, events, wire
from reliable.wire import GROUP_KINDS, Flag, Fragment, Kind, Packet

from .harness import A, B, Pair

CONFIG = Config(max_window=64, max_peers=16, remembered_incarnations=8, max_message_size=50_000)
FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
u32 = st.integers(0, 2**32 - 1)


def assert_bounded(ep: Endpoint) -> None:
    cfg = ep.config
    assert len(ep._peers) <= cfg.max_peers
    assert len(ep._ended) <= cfg.remembered_incarnations
    for session in ep._peers.values():
        r = session.receiver
        if r.expected is not None:
            assert all(r.expected <= s < r.expected + cfg.max_window for s in r.ooo)
        assert len(r.ooo) <= cfg.max_window
        assert r.partial is None or r.partial.size <= cfg.max_message_size
        assert len(r.notices) <= cfg.max_window
        assert len(r.ranges) <= cfg.max_window
        # receive-memory accounting: exactly what waits, reservations included
        waiting = sum(len(f.payload) for seq, f in r.ooo.items() if seq not in r.covered)
        assert r.held == waiting + (r.partial.reserved if r.partial is not None else 0)
    group_streams = [m for g in ep._groups._groups.values() for m in g.streams.values()]
    for g in ep._groups._groups.values():
        assert len(g.streams) <= cfg.max_peers and len(g.view) <= cfg.max_peers
        if g.sender is not None:
            assert g.sender.buffered <= cfg.send_buffer
    held = sum(s.receiver.held for s in ep._peers.values())
    assert ep._receive_budget.used == held + sum(m.receive.held for m in group_streams)
    assert ep._receive_budget.used <= cfg.receive_memory + cfg.max_message_size


@FUZZ
@given(st.lists(st.tuples(st.binary(max_size=1500), st.integers(0, 40)), max_size=50))
def test_random_bytes_are_counted_drops(datagrams: list[tuple[bytes, int]]) -> None:
    ep = Endpoint(CONFIG, rng=random.Random(0), arrival_events=True)
    for i, (data, port) in enumerate(datagrams):
        ep.receive_datagram(data, ("192.0.2.1", port), float(i))
        ep.handle_timer(float(i))
        ep.datagrams_to_send(float(i))
    assert ep.next_event() is None
    assert sum(ep.dropped.values()) == len(datagrams)
    assert ep.peers() == []


@st.composite
def hostile_fragments(draw: st.DrawFn, for_node: bool) -> Fragment:
    total = draw(st.sampled_from([0, 1, 100, 60_000, 2**32 - 1]))
    count = draw(st.integers(1, max(1, min(total, 2**32 - 1))))
    return Fragment(
        seq=draw(u32),
        base=draw(u32),
        msg_id=draw(u32),
        index=draw(st.integers(0, count - 1)),
        count=count,
        total_len=total,
        msg_type=draw(st.integers(-5, 5)),
        priority=draw(st.integers(0, 3)),
        mailbox=draw(st.sampled_from(["", "inbox"])),
        payload=draw(st.binary(max_size=min(total, 200))),
        for_node=for_node,
    )


@st.composite
def hostile_packets(draw: st.DrawFn, incarnations: list[int]) -> Packet:
    kind = draw(st.sampled_from(list(Kind)))
    fragment = None
    bundle: tuple[Fragment, ...] = ()
    if kind == Kind.DATA and draw(st.integers(0, 3)) == 0:  # a bundle of insane fragments
        for_node = draw(st.booleans())
        fragment = draw(hostile_fragments(for_node))
        bundle = tuple(draw(st.lists(hostile_fragments(for_node), min_size=1, max_size=4)))
    elif kind in (Kind.DATA, Kind.GDATA):
        # node messages reach the control decoder
        fragment = draw(hostile_fragments(draw(st.booleans())))
    return Packet(
        kind=kind,
        flags=draw(st.sampled_from([0, Flag.ACK, Flag.ACK | Flag.ACK_NOW])),
        window=draw(st.integers(0, 0xFFFF)),
        src_incarnation=draw(st.sampled_from(incarnations)),
        dst_incarnation=draw(st.sampled_from([0, *incarnations])),
        ack=draw(u32),
        sacks=tuple(draw(st.lists(st.tuples(u32, u32), max_size=4))),
        notices=tuple(draw(st.lists(st.tuples(u32, st.just(1)), max_size=3))),
        cookie=draw(st.binary(min_size=16, max_size=16))
        if kind == Kind.CHALLENGE
        else draw(st.none() | st.binary(min_size=16, max_size=16)),
        refusal=draw(st.integers(0, 3)) if kind == Kind.AUTH_FAILED else 0,
        fragment=fragment,
        bundle=bundle,
        group=draw(st.sampled_from(["239.1.2.3:7000", "printer", "x"]))
        if kind in GROUP_KINDS
        else "",
    )


@FUZZ
@given(st.data())
def test_wellformed_hostile_packets_keep_every_bound(data: st.DataObject) -> None:
    """Valid checksums, insane contents: seqs, acks, SACKs, bases, 2**32-fragment claims."""
    p = Pair(CONFIG, CONFIG)
    p.a.endpoint.send(B, b"real traffic" * 100, now=p.now)
    p.settle()
    incarnations = [p.a.endpoint.incarnation, p.b.endpoint.incarnation, 1, 2, 3, 2**64 - 1]
    for _ in range(data.draw(st.integers(1, 40))):
        pkt = data.draw(hostile_packets(incarnations))
        src = data.draw(st.sampled_from([A, ("192.0.2.9", 9)]))
        p.b.endpoint.receive_datagram(wire.encode(pkt), src, p.now)
        p.now += data.draw(st.sampled_from([0.0, 0.001, 0.5]))
        p.b.endpoint.handle_timer(p.now)
        for d, _ in p.b.endpoint.datagrams_to_send(p.now):
            assert len(d) <= CONFIG.max_datagram_size
        assert_bounded(p.b.endpoint)
    for e in p.b.drain():
        if isinstance(e, events.MessageReceived):
            assert len(e.data) <= CONFIG.max_message_size


# Address validation off: these reach the per-peer state that a validated peer could.
UNVALIDATED = dataclasses.replace(CONFIG, validate_addresses=False)


def test_a_flood_of_new_incarnations_from_one_address_stays_bounded() -> None:
    ep = Endpoint(UNVALIDATED, rng=random.Random(0), arrival_events=True)
    for inc in range(1, 5001):
        pkt = Packet(kind=Kind.PING, src_incarnation=inc)
        ep.receive_datagram(wire.encode(pkt), A, 0.0)
    assert len(ep.peers()) == 1
    assert len(ep._ended) == CONFIG.remembered_incarnations
    restarts = [e for e in iter(ep.next_event, None) if isinstance(e, events.PeerRestarted)]
    assert len(restarts) == 4999


def test_a_flood_of_new_addresses_is_capped_and_counted() -> None:
    """Idle sessions make way for new peers; what each reached is remembered, boundedly."""
    config = dataclasses.replace(UNVALIDATED, remembered_sessions=100)
    ep = Endpoint(config, rng=random.Random(0), arrival_events=True)
    for port in range(1, 1001):
        pkt = Packet(kind=Kind.PING, src_incarnation=port)
        ep.receive_datagram(wire.encode(pkt), ("192.0.2.1", port), 0.0)
    assert len(ep.peers()) == CONFIG.max_peers
    assert ep.dropped == {}
    assert ep.stats().sessions_dropped == {"evicted": 1000 - CONFIG.max_peers}
    assert len(ep._resumable) == 100


def test_a_flood_of_new_addresses_cannot_evict_sessions_that_hold_data() -> None:
    ep = Endpoint(UNVALIDATED, rng=random.Random(0), arrival_events=True)
    for port in range(1, 1001):
        # The first of two fragments: each peer now holds a reservation here.
        frag = Fragment(
            seq=7,
            base=7,
            msg_id=0,
            index=0,
            count=2,
            total_len=400,
            msg_type=0,
            priority=0,
            mailbox="",
            payload=b"x" * 200,
        )
        pkt = Packet(kind=Kind.DATA, src_incarnation=port, fragment=frag)
        ep.receive_datagram(wire.encode(pkt), ("192.0.2.1", port), 0.0)
    assert len(ep.peers()) == CONFIG.max_peers
    assert ep.dropped == {"peer_limit": 1000 - CONFIG.max_peers}
    assert ep.stats().sessions_dropped == {}


def test_a_claim_of_four_billion_fragments_allocates_nothing() -> None:
    p = Pair(UNVALIDATED, UNVALIDATED)
    frag = Fragment(
        seq=0,
        base=0,
        msg_id=0,
        index=0,
        count=2**32 - 1,
        total_len=2**32 - 1,
        msg_type=0,
        priority=0,
        mailbox="",
        payload=b"x" * 100,
    )
    pkt = Packet(kind=Kind.DATA, src_incarnation=77, fragment=frag)
    p.b.endpoint.receive_datagram(wire.encode(pkt), A, 0.0)
    r = p.b.endpoint._peers[A].receiver
    assert r.partial is not None and r.partial.rejected is not None and r.partial.size == 0
    (notice,) = wire.decode(p.outgoing(p.b)[0]).notices
    assert notice[1] == wire.Verdict.TOO_LARGE


def test_unknown_peers_cannot_create_state_with_acks_or_close() -> None:
    ep = Endpoint(CONFIG, rng=random.Random(0), arrival_events=True)
    for kind in (Kind.ACK, Kind.CLOSE, Kind.RESET):
        ep.receive_datagram(wire.encode(Packet(kind=kind, src_incarnation=5)), A, 0.0)
    assert ep.peers() == []


@FUZZ
@given(st.data())
def test_hostile_group_packets_keep_every_bound_and_never_amplify(data: st.DataObject) -> None:
    """A member, a group sender and an anycast server at once, under hostile group traffic.

    Whatever arrives, state stays bounded and no address is ever sent more group
    traffic (acks, NAK-driven repairs aimed at it) than it sent us.
    """
    from reliable.addressing import GroupAddress

    ep = Endpoint(CONFIG, rng=random.Random(0), arrival_events=True)
    joined = GroupAddress("multicast", "239.1.2.3", 7000)
    other = GroupAddress("multicast", "239.1.2.4", 7000)
    ep.open_group(joined, 0.0, join=True)
    ep.serve("printer", [other], 0.0)
    ep.send_group(other, b"ours" * 300, now=0.0)
    sources = [(f"192.0.2.{i}", 7000) for i in range(1, 30)]
    incarnations = [ep.incarnation, 1, 2, 3, 2**64 - 1]
    received: dict[object, int] = {}
    sent: dict[object, int] = {}
    now = 0.0
    for _ in range(data.draw(st.integers(1, 60))):
        pkt = data.draw(hostile_packets(incarnations))
        if pkt.kind in GROUP_KINDS:
            pkt = dataclasses.replace(
                pkt, group=data.draw(st.sampled_from([joined.name, other.name, "printer", "x"]))
            )
        src = data.draw(st.sampled_from(sources))
        if data.draw(st.integers(0, 9)) == 0:
            ep.send_group(other, b"more" * 400, now=now)  # expecting whoever "joined" so far
        raw = wire.encode(pkt)
        ep.receive_datagram(raw, src, now)
        received[src] = received.get(src, 0) + len(raw)
        now += data.draw(st.sampled_from([0.0, 0.001, 0.05, 0.5]))
        if (timer := ep.get_timer()) is not None and timer <= now:
            ep.handle_timer(now)
        for d, dst in ep.datagrams_to_send(now):
            assert len(d) <= CONFIG.max_datagram_size
            if wire.decode(d).kind in GROUP_KINDS and dst not in (joined.sockaddr, other.sockaddr):
                sent[dst] = sent.get(dst, 0) + len(d)
        assert_bounded(ep)
    for dst, nbytes in sent.items():
        assert nbytes <= received.get(dst, 0), f"{dst} got {nbytes} bytes for {received.get(dst)}"
    while ep.next_event() is not None:
        pass


def test_an_acknowledgement_of_nothing_earns_no_unicast_repairs() -> None:
    """A forged JOIN plus a GACK that acknowledges no fragment we sent (the stream's
    first seq, or a blind guess outside what was sent) must not aim repairs at an address.

    Hypothesis found the blind guess: ``ack=0`` unwrapped to a value below the stream's
    start and counted as "has acknowledged", and RTO repairs followed, 24x amplified.
    """
    from reliable.addressing import GroupAddress

    ep = Endpoint(CONFIG, rng=random.Random(0), arrival_events=True)
    group = GroupAddress("multicast", "239.1.2.4", 7000)
    ep.open_group(group, 0.0, join=False)
    victim = ("192.0.2.9", 7000)
    join = Packet(kind=Kind.JOIN, src_incarnation=1, group=group.name)
    ep.receive_datagram(wire.encode(join), victim, 0.0)
    ep.send_group(group, b"x" * 1000, now=0.0)
    sender = ep._groups._groups[group.name].sender
    assert sender is not None
    now, unicast = 0.0, 0
    for step in range(400):
        if step % 10 == 0:  # the forger keeps "acknowledging" and stays a member
            for ack in (sender.initial_seq, 0, sender.initial_seq - 7):
                gack = Packet(
                    kind=Kind.GACK,
                    src_incarnation=1,
                    dst_incarnation=ep.incarnation,
                    ack=ack & 0xFFFFFFFF,
                    group=group.name,
                )
                ep.receive_datagram(wire.encode(gack), victim, now)
        for d, dst in ep.datagrams_to_send(now):
            unicast += dst == victim and wire.decode(d).kind == Kind.GDATA
        now += 0.05
        if (timer := ep.get_timer()) is not None and timer <= now:
            ep.handle_timer(now)
    assert unicast == 0
