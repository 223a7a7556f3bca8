"""Path MTU discovery (reliable/pmtud.py, RFC 8899) on the simulated pair.

The pair's addresses are not loopback, so sessions start at 1200-byte
datagrams and probe up to ``Config.pmtu_max`` (1472). A "path MTU" here is a
link that drops every datagram larger than it.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from reliable import Config, errors, events, wire
from reliable.pmtud import MAX_PROBES, SEARCH_GRANULARITY, PathMtu, PmtuState

from .harness import B, Pair

BIG = 50_000  # a message of several datagrams: what starts discovery


def _kinds(datagrams: list[bytes]) -> list[wire.Kind]:
    return [wire.decode(d).kind for d in datagrams]


def _link(p: Pair, mtu: int, seen: list[bytes]) -> Callable[[int, bytes], bool]:
    def drop(_i: int, d: bytes) -> bool:
        seen.append(d)
        return len(d) > mtu

    return drop


def _exchange(p: Pair, mtu: int, seconds: float, seen: list[bytes]) -> None:
    """Run the pair for ``seconds`` of virtual time over a path of ``mtu`` bytes."""
    drop = _link(p, mtu, seen)
    end = p.now + seconds
    for _ in range(200_000):
        if p.now >= end:
            return
        moved = p.transfer(p.a, drop=drop) + p.transfer(p.b, drop=drop)
        if not moved:
            timers = [t for t in (p.a.endpoint.get_timer(), p.b.endpoint.get_timer()) if t]
            p.now = min([end, *timers]) if timers else end
            for side in (p.a, p.b):
                t = side.endpoint.get_timer()
                if t is not None and t <= p.now:
                    side.endpoint.handle_timer(p.now)
        else:
            p.tick()


def test_an_answered_probe_grows_the_datagrams() -> None:
    p = Pair()
    p.connect()
    session = p.a.endpoint._peers[B]
    assert session.datagram_size == 1200 and session.pmtu.state is PmtuState.SEARCHING
    p.a.endpoint.send(B, b"a" * BIG, now=p.now)
    seen: list[bytes] = []
    _exchange(p, 1472, 2.0, seen)
    probes = [d for d in seen if wire.decode(d).kind == wire.Kind.PROBE]
    assert len(probes) == 1 and len(probes[0]) == 1472 - wire.SECURITY_OVERHEAD
    assert wire.Kind.PROBE_ACK in _kinds(seen)
    assert session.datagram_size == 1472 and session.pmtu.state is PmtuState.SEARCH_COMPLETE
    # The next message is cut for the larger size; nothing crosses the path too big.
    seen.clear()
    p.a.endpoint.send(B, b"b" * BIG, now=p.now)
    _exchange(p, 1472, 2.0, seen)
    data = [d for d in seen if wire.decode(d).kind == wire.Kind.DATA]
    assert 1300 < max(map(len, data)) <= 1472 - wire.SECURITY_OVERHEAD
    assert p.b.received() == [b"a" * BIG, b"b" * BIG]


def test_queued_messages_not_yet_started_are_cut_for_the_confirmed_size() -> None:
    p = Pair()
    p.connect()
    session = p.a.endpoint._peers[B]
    # Queued before discovery: the first starts at 1200 (and keeps its cut), the
    # others have sent nothing when the probe's answer comes, and are cut again.
    for i in range(3):
        p.a.endpoint.send(B, bytes([i]) * BIG, now=p.now)
    queued = list(session.sender.queue)
    assert {m.count for m in queued} == {-(-BIG // queued[0].fragment_size)}
    seen: list[bytes] = []
    _exchange(p, 1472, 2.0, seen)
    assert session.datagram_size == 1472
    assert queued[0].fragment_size < queued[1].fragment_size == queued[2].fragment_size
    assert queued[2].count < queued[0].count
    data = [wire.decode(d) for d in seen if wire.decode(d).kind == wire.Kind.DATA]
    counts = {f.msg_id: f.count for pkt in data for f in pkt.fragments}
    assert sorted(counts.values(), reverse=True) == [m.count for m in queued]
    assert max(map(len, seen)) <= 1472 - wire.SECURITY_OVERHEAD
    assert p.b.received() == [bytes([i]) * BIG for i in range(3)]


def test_lost_probes_leave_the_size_and_the_data_alone() -> None:
    p = Pair()
    p.connect()
    session = p.a.endpoint._peers[B]
    for i in range(4):
        p.a.endpoint.send(B, bytes([i]) * BIG, now=p.now)
    seen: list[bytes] = []
    _exchange(p, 1200, 20.0, seen)  # the path carries no more than the base
    assert session.datagram_size == 1200
    assert session.pmtu.probes_lost >= 1 and session.pmtu.probes_acked == 0
    assert p.b.received() == [bytes([i]) * BIG for i in range(4)]
    assert p.a.endpoint.stats().retransmissions == 0  # a lost probe is no lost data


def test_the_search_narrows_to_a_path_smaller_than_ethernet() -> None:
    p = Pair()
    p.connect()
    session = p.a.endpoint._peers[B]
    seen: list[bytes] = []
    for i in range(40):  # keep data flowing while the search goes on
        p.a.endpoint.send(B, bytes([i]) * BIG, now=p.now)
        _exchange(p, 1350, 1.0, seen)
        if session.pmtu.state is PmtuState.SEARCH_COMPLETE:
            break
    assert session.pmtu.state is PmtuState.SEARCH_COMPLETE
    unsealed = session.datagram_size - wire.SECURITY_OVERHEAD
    assert 1350 - SEARCH_GRANULARITY <= unsealed <= 1350
    assert session.pmtu.probes_lost >= MAX_PROBES  # 1472 failed three times first
    assert len(p.b.received()) == i + 1


def test_a_black_hole_falls_back_to_the_base_size() -> None:
    p = Pair(Config(peer_timeout=30.0))
    p.connect()
    session = p.a.endpoint._peers[B]
    p.a.endpoint.send(B, b"a" * BIG, now=p.now)
    seen: list[bytes] = []
    _exchange(p, 1472, 2.0, seen)
    assert session.datagram_size == 1472
    # The path shrinks to 1300: every full-size datagram vanishes, and no ICMP says so.
    ticket = p.a.endpoint.send(B, b"b" * BIG, now=p.now, timeout=5.0)
    _exchange(p, 1300, 6.0, seen)
    assert session.pmtu.black_holes == 1 and session.datagram_size == 1200
    failed = [e for e in p.a.of(events.MessageFailed) if e.ticket == ticket]
    # Cut too big: it fails once the path is shown to be smaller, before its timeout.
    assert failed and isinstance(failed[0].error, errors.PeerUnreachable)
    assert failed[0].error.cause is not None and "black hole" in failed[0].error.cause
    p.a.endpoint.send(B, b"c" * BIG, now=p.now)  # cut for the base size: it crosses
    _exchange(p, 1300, 5.0, seen)
    assert p.b.received() == [b"a" * BIG, b"c" * BIG]


def test_a_black_hole_recuts_the_messages_not_yet_started() -> None:
    p = Pair(Config(peer_timeout=30.0, initial_peer_window=40))
    p.connect()
    session = p.a.endpoint._peers[B]
    p.a.endpoint.send(B, b"a" * BIG, now=p.now)
    seen: list[bytes] = []
    _exchange(p, 1472, 2.0, seen)
    assert session.datagram_size == 1472
    # The path shrinks; a long message holds the queue while the black hole is found,
    # and the one behind it, cut for 1472 when queued, has not started by then.
    first = p.a.endpoint.send(B, b"b" * (40 * BIG), now=p.now, timeout=5.0)
    p.a.endpoint.send(B, b"c" * BIG, now=p.now)
    waiting = session.sender.queue[-1]
    assert waiting.fragment_size > 1300
    _exchange(p, 1300, 8.0, seen)
    assert session.pmtu.black_holes == 1 and session.datagram_size == 1200
    assert [e.ticket for e in p.a.of(events.MessageFailed)] == [first]
    assert waiting.fragment_size < 1200
    assert p.b.received() == [b"a" * BIG, b"c" * BIG]


def test_discovery_is_off_on_loopback_and_when_configured_off() -> None:
    assert PathMtu(65000, None).state is PmtuState.DISABLED
    assert PathMtu(1200, 1200).state is PmtuState.DISABLED
    p = Pair(Config(pmtu_max=None), Config(pmtu_max=None))
    p.connect()
    p.a.endpoint.send(B, b"a" * BIG, now=p.now)
    seen: list[bytes] = []
    _exchange(p, 1472, 2.0, seen)
    assert wire.Kind.PROBE not in _kinds(seen)
    assert p.a.endpoint._peers[B].datagram_size == 1200


def test_stray_probe_acks_change_nothing() -> None:
    mtu = PathMtu(1200, 1472)
    probe = mtu.next_probe(0.0, 1.0)
    assert probe is not None and probe.size == 1472
    assert mtu.next_probe(0.0, 1.0) is None  # one probe in flight at a time
    assert not mtu.on_ack(probe.number + 1, 0.1) and mtu.size == 1200
    mtu.on_timer(0.5)  # not yet due
    assert mtu.probe is probe
    mtu.on_timer(1.0)
    assert mtu.probe is None and mtu.probes_lost == 1
    assert not mtu.on_ack(probe.number, 1.1)  # too late: it counted as lost


@pytest.mark.parametrize("kind", [wire.Kind.PROBE, wire.Kind.PROBE_ACK])
def test_probe_packets_round_trip_and_reject_bad_lengths(kind: wire.Kind) -> None:
    padding = 100 if kind == wire.Kind.PROBE else 0
    raw = wire.encode(wire.Packet(kind=kind, src_incarnation=7, probe=0xFFFFFFFF, padding=padding))
    pkt = wire.decode(raw)
    assert (pkt.kind, pkt.probe, pkt.padding) == (kind, 0xFFFFFFFF, padding)
    short = wire.encode(wire.Packet(kind=wire.Kind.ACK, src_incarnation=7))
    forged = bytearray(short[:-4])
    forged[3] = int(kind)  # the kind byte: a probe with no probe number
    with pytest.raises(wire.MalformedPacket):
        wire.decode(wire.with_crc(bytes(forged)))


def test_a_message_cut_too_big_for_a_shrunk_path_fails_instead_of_stalling() -> None:
    """Found by tools/soak.py (seed 2): with no send timeout, a message cut for 1472
    bytes before a black hole was retransmitted whole forever. The peer kept answering
    the session's small pings, so peer_timeout never fired and the message never got a
    fate. Its fragments cannot be cut again once sent, so it fails, and says why."""
    p = Pair(Config(peer_timeout=30.0))
    p.connect()
    session = p.a.endpoint._peers[B]
    p.a.endpoint.send(B, b"a" * BIG, now=p.now)
    seen: list[bytes] = []
    _exchange(p, 1472, 2.0, seen)
    assert session.datagram_size == 1472
    # One fragment of 1267 bytes: it fits 1472-byte datagrams, not 1200-byte ones.
    ticket = p.a.endpoint.send(B, b"b" * 1267, now=p.now)
    _exchange(p, 1200, 60.0, seen)  # the path shrank to the base size
    assert session.pmtu.black_holes == 1 and session.datagram_size == 1200
    failed = [e for e in p.a.of(events.MessageFailed) if e.ticket == ticket]
    assert failed, "a message that can no longer cross the path must fail, not stall"
    error = failed[0].error
    # Its one fragment was wholly sent, so the sender cannot know it never arrived.
    assert isinstance(error, errors.PeerUnreachable) and error.delivered is None
    assert error.cause is not None and "1200" in error.cause
    assert not p.a.of(events.PeerUnreachable)  # the peer itself is fine: only that message
    p.a.endpoint.send(B, b"c" * 1267, now=p.now)  # cut for the base size: it crosses
    _exchange(p, 1200, 5.0, seen)
    assert p.b.received() == [b"a" * BIG, b"c" * 1267]


def test_confirm_probes_the_size_asked_and_answers_from_the_probes() -> None:
    """PathMtu.confirm: a data-free probe of the size a message was cut for decides
    whether the path carries it (answered), or not (MAX_PROBES lost); until then, None.
    Loss alone cannot: a receiver out of memory drops full-size data too."""
    from reliable.pmtud import MAX_PROBES, PathMtu

    answered = PathMtu(1200, 1472)
    answered.on_black_hole(0.0)
    assert answered.confirm(1400) is None
    probe = answered.next_probe(0.0, 0.1)
    assert probe is not None and probe.size == 1400
    answered.on_ack(probe.number, 0.01)
    assert answered.confirm(1400) is True and answered.size == 1400

    lost = PathMtu(1200, 1472)
    lost.on_black_hole(0.0)
    now = 0.0
    for _ in range(MAX_PROBES):
        assert lost.confirm(1400) is None
        probe = lost.next_probe(now, 0.1)
        assert probe is not None and probe.size == 1400
        now += 0.2
        lost.on_timer(now)
    assert lost.confirm(1400) is False and lost.size == 1200
    after = lost.next_probe(now, 0.1)  # settled: the search may go on, below it
    assert after is None or after.size < 1400
