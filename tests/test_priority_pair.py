"""Priority on the wire, on the simulated pair: overtaking and the no-starvation share."""

from __future__ import annotations

import pytest

from reliable import events, wire
from reliable.sender import PRIORITY_SHARE

from .harness import A, B, Pair

#: The documented share (docs/usage.md): one fragment in eight for the oldest message.
SHARE = 8


def _rounds(p: Pair, n: int) -> None:
    """``n`` steps of the link: each side sends what it may, then time moves a tick."""
    for _ in range(n):
        p.transfer(p.a)
        p.transfer(p.b)
        p.tick()


def test_urgent_message_overtakes_the_rest_of_a_big_one() -> None:
    p = Pair()
    p.connect()
    big = bytes(1 << 20)  # about 900 datagrams on a non-loopback path
    big_ticket = p.a.endpoint.send(B, big, now=p.now, priority=0)
    _rounds(p, 3)  # the big message is under way: about 180 of its 900 datagrams sent
    assert not p.b.received()
    urgent_ticket = p.a.endpoint.send(B, b"urgent", now=p.now, priority=65535)
    nested: list[wire.Packet] = []

    def watch(_i: int, d: bytes) -> bool:
        pkt = wire.decode(d)
        if pkt.flags & wire.Flag.NESTED:
            nested.append(pkt)
        return False

    for _ in range(2):  # slow start: 576 more datagrams, still not the whole message
        p.transfer(p.a, drop=watch)
        p.transfer(p.b)
        p.tick()
    # Delivered and acknowledged within a few round trips, the big message still going.
    assert p.b.received() == [b"urgent"]
    delivered = [e.ticket for e in p.a.of(events.MessageDelivered)]
    assert delivered == [urgent_ticket]
    assert nested and all(pkt.kind == wire.Kind.DATA for pkt in nested)
    p.settle()
    assert p.b.received() == [b"urgent", big]
    assert [e.ticket for e in p.a.of(events.MessageDelivered)] == [urgent_ticket, big_ticket]
    assert p.b.endpoint._peers[A].receiver.reassembly_errors == 0


def test_higher_priority_goes_first_and_fifo_holds_within_a_priority() -> None:
    p = Pair()
    p.connect()
    sent = [(b"low%d" % i, 1) for i in range(3)] + [(b"high%d" % i, 9) for i in range(3)]
    for data, prio in sent:
        p.a.endpoint.send(B, data, now=p.now, priority=prio)
    p.settle()
    got = p.b.received()
    assert [d for d in got if d.startswith(b"high")] == [b"high0", b"high1", b"high2"]
    assert [d for d in got if d.startswith(b"low")] == [b"low0", b"low1", b"low2"]
    assert got.index(b"high2") < got.index(b"low1")  # priority overtook send order


def test_a_one_datagram_message_never_nests_ahead_of_an_older_one_of_its_priority() -> None:
    """Found by tests/test_mailbox_sim.py: while a big low-priority message was in
    progress, a one-datagram urgent message nested in it ahead of an older urgent
    message of two datagrams (which cannot nest), so one producer's messages of one
    priority arrived out of order. The older one goes first; the younger follows it."""
    p = Pair()
    p.connect()
    p.a.endpoint.send(B, bytes(100_000), now=p.now, priority=0)
    _rounds(p, 1)  # the big one is in progress
    p.a.endpoint.send(B, b"a" * 2000, now=p.now, priority=5)  # two datagrams: cannot nest
    p.a.endpoint.send(B, b"b", now=p.now, priority=5)  # one datagram: could nest
    p.a.endpoint.send(B, b"c", now=p.now, priority=7)  # higher: nests at once
    p.settle()
    got = p.b.received()
    assert got[0] == b"c"
    assert got.index(b"a" * 2000) < got.index(b"b")
    assert len(got) == 4


def test_a_big_urgent_message_overtakes_messages_not_yet_started() -> None:
    p = Pair()
    p.connect()
    for i in range(5):
        p.a.endpoint.send(B, bytes([i]) * 5000, now=p.now, priority=0)
    urgent = b"u" * 20_000  # many datagrams: it cannot nest, but goes before unstarted ones
    p.a.endpoint.send(B, urgent, now=p.now, priority=7)
    p.settle()
    got = p.b.received()
    assert got.index(urgent) <= 1
    assert len(got) == 6


def test_the_share_is_the_documented_one() -> None:
    assert PRIORITY_SHARE == SHARE


def test_low_priority_one_datagram_message_is_not_starved() -> None:
    p = Pair()
    p.connect()
    p.a.endpoint.send(B, b"low", now=p.now, priority=0)
    for i in range(200):
        p.a.endpoint.send(B, b"high%d" % i, now=p.now, priority=9)
    p.settle()
    got = p.b.received()
    assert len(got) == 201
    # Strict priority would put it last; the share sends it within SHARE.
    assert got.index(b"low") < SHARE


def test_low_priority_big_message_keeps_its_share_under_a_stream_of_urgent_ones() -> None:
    p = Pair()
    p.connect()
    low = b"L" * 20_000  # 17 datagrams at 1200 bytes
    p.a.endpoint.send(B, low, now=p.now, priority=0)
    for i in range(400):
        p.a.endpoint.send(B, b"high%d" % i, now=p.now, priority=9)
    p.settle()
    got = p.b.received()
    assert len(got) == 401
    fragments = -(-len(low) // 1100)  # at least this many datagrams, at most one more
    # It sends one fragment in every SHARE: done after at most that many per
    # fragment of its own, far before the 400 urgent ones end.
    assert got.index(low) <= SHARE * (fragments + 1)
    assert p.b.endpoint._peers[A].receiver.reassembly_errors == 0


def test_nested_is_a_data_flag_only() -> None:
    frag = wire.Fragment(
        seq=1, base=1, msg_id=0, index=0, count=1, total_len=1,
        msg_type=0, priority=0, mailbox="", payload=b"x", nested=True,
    )  # fmt: skip
    raw = wire.encode(wire.Packet(kind=wire.Kind.DATA, src_incarnation=5, fragment=frag))
    pkt = wire.decode(raw)
    assert pkt.flags & wire.Flag.NESTED and pkt.fragment is not None and pkt.fragment.nested
    body = bytearray(wire.encode_body(wire.Packet(kind=wire.Kind.PING, src_incarnation=5)))
    wire.decode(wire.with_crc(bytes(body)))  # valid as it is
    body[4:6] = int(wire.Flag.NESTED).to_bytes(2, "big")
    with pytest.raises(wire.MalformedPacket, match="NESTED"):
        wire.decode(wire.with_crc(bytes(body)))
