"""The scapy layer agrees with the library's own encoder and decoder, both ways."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP, UDP
from scapy.packet import Raw

from reliable import wire
from rmsg.scapy_layer import RMSG, RejectNotice, SackRange

from .test_wire import packets


@settings(max_examples=150, deadline=None)
@given(packets())
def test_scapy_dissects_what_the_library_encodes(packet: wire.Packet) -> None:
    raw = wire.encode(packet)
    layer = RMSG(raw)
    assert bytes(layer) == raw
    assert layer.checksum_ok()
    assert layer.kind == packet.kind and layer.src_incarnation == packet.src_incarnation
    assert [(s.start, s.end) for s in layer.sacks] == list(packet.sacks)
    assert [(n.msg_id, n.reason) for n in layer.notices] == list(packet.notices)
    if packet.fragment is not None:
        f = packet.fragment
        assert (layer.seq, layer.base, layer.frag_index, layer.frag_count) == (
            f.seq,
            f.base,
            f.index,
            f.count,
        )
        assert (layer.msg_type, layer.priority) == (f.msg_type, f.priority)
        assert layer.mailbox == f.mailbox.encode() and layer.data == f.payload
    bundle = layer.bundle if packet.kind == wire.Kind.DATA else []
    assert [(b.seq, b.msg_id, b.mailbox, b.data) for b in bundle] == [
        (f.seq, f.msg_id, f.mailbox.encode(), f.payload) for f in packet.bundle
    ]
    assert int(layer.checksum) == int.from_bytes(raw[-4:], "big")
    if packet.cookie is not None:
        assert layer.cookie == packet.cookie
    if packet.group:
        assert layer.group == packet.group.encode()
    if packet.kind in (wire.Kind.PROBE, wire.Kind.PROBE_ACK):
        assert layer.probe == packet.probe
    if packet.kind == wire.Kind.PROBE:
        assert len(layer.padding) == packet.padding


@settings(max_examples=100, deadline=None)
@given(
    kind=st.sampled_from(list(wire.Kind)),
    data=st.binary(max_size=200),
    sacks=st.lists(st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1)), max_size=4),
    mailbox=st.text(max_size=10),
)
def test_library_decodes_what_scapy_builds(
    kind: wire.Kind, data: bytes, sacks: list[tuple[int, int]], mailbox: str
) -> None:
    layer = RMSG(
        kind=int(kind),
        src_incarnation=99,
        dst_incarnation=7,
        flags="ACK+COOKIE" if kind == wire.Kind.CHALLENGE else "ACK",
        ack=5,
        window=12,
        sacks=[SackRange(start=s, end=e) for s, e in sacks],
        notices=[RejectNotice(msg_id=3, reason=2)],
    )
    if kind in (wire.Kind.DATA, wire.Kind.GDATA):
        layer.seq, layer.data, layer.mailbox = 42, data, mailbox.encode()
    if kind in wire.GROUP_KINDS:
        layer.group = b"239.1.2.3:7000"
    if kind == wire.Kind.CHALLENGE:
        layer.cookie = bytes(range(16))
    decoded = wire.decode(bytes(layer))  # lengths, counts and CRC were filled in by post_build
    assert decoded.kind == kind and decoded.sacks == tuple(sacks) and decoded.notices == ((3, 2),)
    assert decoded.group == ("239.1.2.3:7000" if kind in wire.GROUP_KINDS else "")
    if kind in (wire.Kind.DATA, wire.Kind.GDATA):
        assert decoded.fragment is not None
        assert decoded.fragment.payload == data and decoded.fragment.mailbox == mailbox
        assert decoded.fragment.total_len == len(data)
    assert decoded.cookie == (bytes(range(16)) if kind == wire.Kind.CHALLENGE else None)
    assert decoded.refusal == (1 if kind == wire.Kind.AUTH_FAILED else 0)


def test_bound_to_the_default_port_both_ways() -> None:
    inner = RMSG(kind="PING", src_incarnation=1)
    for udp in (
        UDP(sport=40000, dport=wire.DEFAULT_PORT),
        UDP(sport=wire.DEFAULT_PORT, dport=40000),
    ):
        pkt = IP(bytes(IP(src="127.0.0.1", dst="127.0.0.1") / udp / inner))
        assert RMSG in pkt and pkt[RMSG].kind == wire.Kind.PING


def test_found_on_any_port_by_its_header() -> None:
    """The documented commands use 7000 and 9000, not 7431: the heuristic finds rmsg there,
    and leaves a payload that is not rmsg (or that another layer claims) alone."""
    inner = RMSG(kind="DATA", src_incarnation=5, seq=9, frag_index=1, frag_count=3, data=b"x")
    for sport, dport in ((40000, 7000), (9000, 51234), (1234, 5678)):
        pkt = IP(
            bytes(IP(src="127.0.0.1", dst="127.0.0.1") / UDP(sport=sport, dport=dport) / inner)
        )
        assert RMSG in pkt and pkt[RMSG].seq == 9
    not_rmsg = IP(bytes(IP() / UDP(sport=40000, dport=7000) / Raw(b"RM" + b"\x02" * 40)))
    assert RMSG not in not_rmsg
    from scapy.layers.dns import DNS  # binds UDP port 53

    dns = IP(bytes(IP() / UDP(sport=40000, dport=53) / inner))
    assert DNS in dns
    assert RMSG not in dns  # a port another layer owns stays that layer's


def test_summary_numbers_fragments_from_one_like_rmsg_dissect() -> None:
    from rmsg.dissect import timeline

    inner = RMSG(kind="DATA", src_incarnation=5, seq=9, frag_index=0, frag_count=3, total_len=3)
    inner.data = b"x"
    raw = bytes(inner)
    assert "frag=1/3" in RMSG(raw).mysummary()
    (entry,) = timeline([(0.0, ("127.0.0.1", 1), ("127.0.0.1", 2), raw)])
    assert "frag=1/3" in entry.format()


def test_a_corrupted_packet_fails_its_checksum() -> None:
    raw = bytearray(bytes(RMSG(kind="ACK", src_incarnation=3, flags="ACK", ack=9)))
    raw[12] ^= 0x01
    assert not RMSG(bytes(raw)).checksum_ok()


def test_scapy_reads_sealed_datagrams_and_its_forgeries_are_refused() -> None:
    import random

    from reliable import Config, Endpoint
    from reliable.security import Authenticated, Encrypted

    key = bytes(range(32))
    for security in (Authenticated(key), Encrypted(key)):
        victim = Endpoint(Config(validate_addresses=False), rng=random.Random(1), security=security)
        body = wire.encode_body(wire.Packet(kind=wire.Kind.PING, src_incarnation=77))
        genuine = security.seal(body, 77, 3)
        layer = RMSG(genuine)
        assert layer.packet_number == 3 and layer.checksum_ok()
        assert layer.flags.AUTHENTICATED or layer.flags.ENCRYPTED
        # a forgery: a DATA message with a made-up tag (and a correct CRC)
        forged = RMSG(
            kind="DATA",
            flags="AUTHENTICATED",
            src_incarnation=78,
            packet_number=1,
            data=b"transfer everything",
            tag=b"\x42" * 16,
        )
        victim.receive_datagram(bytes(forged), ("198.18.0.9", 4000), 0.0)
        # a tampered genuine one: a header field changed, CRC recomputed
        tampered = RMSG(genuine)
        tampered.window = 999
        tampered.checksum = None
        victim.receive_datagram(bytes(tampered), ("198.18.0.9", 4001), 0.0)
        # a truncated one
        victim.receive_datagram(genuine[:-9], ("198.18.0.9", 4002), 0.0)
        assert victim.peers() == [] and victim.next_event() is None
        dropped = victim.stats().dropped
        assert sum(dropped.values()) == 3
        assert dropped.get("security.bad_tag", 0) + dropped.get("security.wrong_mode", 0) == 2
