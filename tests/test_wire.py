"""Wire format: round trips, strict decoding, serial-number arithmetic."""

from __future__ import annotations

import dataclasses
import struct
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from reliable import wire
from reliable.wire import Flag, Fragment, Kind, MalformedPacket, Packet, decode, encode, unwrap

u32 = st.integers(0, 2**32 - 1)
ranges = st.lists(st.tuples(u32, u32), max_size=wire.MAX_SACK_RANGES).map(tuple)
notices = st.lists(
    st.tuples(u32, st.sampled_from([int(r) for r in wire.Verdict])), max_size=wire.MAX_NOTICES
).map(tuple)


@st.composite
def fragments(draw: st.DrawFn) -> Fragment:
    payload = draw(st.binary(max_size=300))
    total = draw(st.integers(len(payload), len(payload) + 10_000))
    count = draw(st.integers(1, max(1, total)))
    return Fragment(
        seq=draw(u32),
        base=draw(u32),
        msg_id=draw(u32),
        index=draw(st.integers(0, count - 1)),
        count=count,
        total_len=total,
        msg_type=draw(st.integers(wire.MSG_TYPE_MIN, wire.MSG_TYPE_MAX)),
        priority=draw(st.integers(0, wire.PRIORITY_MAX)),
        mailbox=draw(st.text(max_size=40)),
        payload=payload,
    )


@st.composite
def packets(draw: st.DrawFn) -> Packet:
    kind = draw(st.sampled_from(list(Kind)))
    return Packet(
        kind=kind,
        flags=draw(st.sampled_from([0, Flag.ACK, Flag.ACK_NOW, Flag.ACK | Flag.ACK_NOW])),
        window=draw(st.integers(0, 0xFFFF)),
        src_incarnation=draw(st.integers(1, 2**64 - 1)),
        dst_incarnation=draw(st.integers(0, 2**64 - 1)),
        ack=draw(u32),
        ack_delay=draw(st.integers(0, 0xFFFF)),
        sacks=draw(ranges),
        notices=draw(notices),
        cookie=draw(st.binary(min_size=16, max_size=16))
        if kind == Kind.CHALLENGE
        else draw(st.none() | st.binary(min_size=16, max_size=16)),
        refusal=draw(st.integers(0, 255)) if kind == Kind.AUTH_FAILED else 0,
        fragment=draw(fragments()) if kind in (Kind.DATA, Kind.GDATA) else None,
        bundle=tuple(draw(st.lists(fragments(), max_size=3))) if kind == Kind.DATA else (),
        group=draw(st.text(min_size=1, max_size=30).filter(lambda g: len(g.encode()) <= 255))
        if kind in wire.GROUP_KINDS
        else "",
    )


@given(packets())
def test_round_trip(packet: Packet) -> None:
    assert decode(encode(packet)) == packet


@given(packets())
def test_encoded_size_is_exact(packet: Packet) -> None:
    if packet.fragment is None:
        assert wire.encoded_size(packet) == len(encode(packet))


@given(packets(), st.data())
def test_any_single_bit_flip_is_detected(packet: Packet, data: st.DataObject) -> None:
    raw = bytearray(encode(packet))
    bit = data.draw(st.integers(0, len(raw) * 8 - 1))
    raw[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises(MalformedPacket):
        decode(bytes(raw))


@given(st.binary(max_size=2000))
def test_random_bytes_only_ever_raise_malformed(data: bytes) -> None:
    try:
        decode(data)
    except MalformedPacket as exc:
        assert exc.reason


@given(packets(), st.integers(0, 64))
def test_truncation_is_detected(packet: Packet, cut: int) -> None:
    raw = encode(packet)
    with pytest.raises(MalformedPacket):
        decode(raw[: max(0, len(raw) - 1 - cut)])


def _recrc(body: bytes) -> bytes:
    """Re-seal a hand-built body so only the field under test is wrong."""
    return body + struct.pack("!I", zlib.crc32(body))


def _ack_packet() -> bytes:
    return encode(Packet(kind=Kind.ACK, src_incarnation=7, flags=Flag.ACK, ack=5, window=10))


@pytest.mark.parametrize(
    ("offset", "value", "reason"),
    [
        (0, b"XX", "magic"),
        (2, b"\x02", "version"),
        (3, b"\x63", "kind"),
        (4, b"\x80\x00", "flags"),  # reserved bit (authenticated mode) in a v1 packet
        (8, b"\x00" * 8, "incarnation"),
        (30, b"\x05", "length"),  # claims five SACK ranges that are not there
        (30, b"\xff", "length"),  # more SACK ranges than a packet may carry
    ],
)
def test_each_bad_field_has_its_reason(offset: int, value: bytes, reason: str) -> None:
    raw = bytearray(_ack_packet()[:-4])
    raw[offset : offset + len(value)] = value
    with pytest.raises(MalformedPacket) as info:
        decode(_recrc(bytes(raw)))
    assert info.value.reason == reason


def test_checksum_reason() -> None:
    raw = bytearray(_ack_packet())
    raw[-1] ^= 0xFF
    with pytest.raises(MalformedPacket) as info:
        decode(bytes(raw))
    assert info.value.reason == "checksum"


def _data(**changes: object) -> Fragment:
    fields = dict(
        seq=1,
        base=1,
        msg_id=0,
        index=0,
        count=1,
        total_len=3,
        msg_type=0,
        priority=0,
        mailbox="",
        payload=b"abc",
    )
    fields.update(changes)
    return Fragment(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "fragment",
    [
        _data(count=0),  # no fragments
        _data(index=5, count=5),  # index past the end
        _data(count=2**32 - 1, total_len=10),  # 4 billion fragments for 10 bytes
        _data(total_len=2),  # payload longer than the message
    ],
)
def test_incoherent_fragments_are_rejected(fragment: Fragment) -> None:
    raw = encode(Packet(kind=Kind.DATA, src_incarnation=1, fragment=fragment))
    with pytest.raises(MalformedPacket) as info:
        decode(raw)
    assert info.value.reason == "fragment"


def test_payload_length_must_match_the_datagram() -> None:
    raw = bytearray(encode(Packet(kind=Kind.DATA, src_incarnation=1, fragment=_data()))[:-4])
    raw[-5:-3] = struct.pack("!H", 4)  # payload_len says 4, three bytes follow
    with pytest.raises(MalformedPacket) as info:
        decode(_recrc(bytes(raw)))
    assert info.value.reason == "length"


def test_non_utf8_mailbox_is_rejected() -> None:
    raw = bytearray(
        encode(Packet(kind=Kind.DATA, src_incarnation=1, fragment=_data(mailbox="ab")))[:-4]
    )
    at = raw.index(b"ab")
    raw[at : at + 2] = b"\xff\xfe"
    with pytest.raises(MalformedPacket) as info:
        decode(_recrc(bytes(raw)))
    assert info.value.reason == "mailbox"


def test_encode_refuses_out_of_range_fields() -> None:
    with pytest.raises(ValueError):
        encode(Packet(kind=Kind.ACK, src_incarnation=1, window=70_000))
    with pytest.raises(ValueError):
        encode(Packet(kind=Kind.DATA, src_incarnation=1, fragment=_data(mailbox="x" * 300)))
    with pytest.raises(ValueError):
        encode(Packet(kind=Kind.ACK, src_incarnation=1, fragment=_data()))


def test_header_is_32_bytes_and_ack_is_36() -> None:
    assert len(_ack_packet()) == 36


@given(st.integers(0, 2**40), st.integers(-(2**31) + 1, 2**31 - 1))
def test_unwrap_recovers_values_within_half_the_space(reference: int, delta: int) -> None:
    value = reference + delta
    if value < 0:
        return
    assert unwrap(value & 0xFFFFFFFF, reference) == value


def test_unwrap_across_the_wrap() -> None:
    assert unwrap(3, 2**32 - 2) == 2**32 + 3
    assert unwrap(2**32 - 2, 2**32 + 3) == 2**32 - 2


def test_fragment_capacity_fits_a_full_data_packet() -> None:
    mailbox = "m" * 255
    size = 1200
    cap = wire.fragment_capacity(size, mailbox)
    sacks = tuple((i, i + 1) for i in range(wire.DATA_SACK_RANGES))
    notes = tuple((i, 1) for i in range(wire.DATA_NOTICES))
    pkt = Packet(
        kind=Kind.DATA,
        src_incarnation=1,
        sacks=sacks,
        notices=notes,
        fragment=_data(mailbox=mailbox, payload=b"x" * cap, total_len=cap),
    )
    assert len(encode(pkt)) <= size


def test_a_bundle_decodes_to_its_fragments_in_order() -> None:
    frags = [_data(payload=bytes([i]) * (i + 1), total_len=i + 1) for i in range(5)]
    packet = Packet(kind=Kind.DATA, src_incarnation=3, fragment=frags[0], bundle=tuple(frags[1:]))
    decoded = decode(encode(packet))
    assert decoded.fragments == tuple(frags)
    budget = wire.data_budget(1200)
    assert sum(wire.record_size(0, len(f.payload)) for f in frags) <= budget


def test_bundles_are_for_data_only_and_share_the_control_flag() -> None:
    frag = _data()
    with pytest.raises(ValueError, match="only DATA"):
        encode(Packet(kind=Kind.GDATA, src_incarnation=1, group="g", fragment=frag, bundle=(frag,)))
    for_node = Fragment(**{**_fields(frag), "for_node": True})
    with pytest.raises(ValueError, match="node-message"):
        encode(Packet(kind=Kind.DATA, src_incarnation=1, fragment=frag, bundle=(for_node,)))
    # a GDATA body with a second record is malformed, not silently half-read
    one = encode(Packet(kind=Kind.GDATA, src_incarnation=1, group="g", fragment=frag))[:-4]
    single = encode(Packet(kind=Kind.DATA, src_incarnation=1, fragment=frag))[:-4]
    two = encode(Packet(kind=Kind.DATA, src_incarnation=1, fragment=frag, bundle=(frag,)))[:-4]
    record = two[len(single) :]
    with pytest.raises(MalformedPacket, match="one fragment"):
        decode(_recrc(one + record))
    # a bundle's tail shorter than a record header is malformed
    with pytest.raises(MalformedPacket, match="overruns"):
        decode(_recrc(two[:-3]))


def _fields(frag: Fragment) -> dict[str, object]:
    return {f.name: getattr(frag, f.name) for f in dataclasses.fields(Fragment)}


@given(
    frags=st.lists(fragments(), min_size=0, max_size=4),
    for_node=st.booleans(),
    nested=st.lists(st.booleans(), min_size=4, max_size=4),
    flags=st.sampled_from([0, int(Flag.ACK), int(Flag.ACK | Flag.ACK_NOW)]),
    window=st.integers(0, 0xFFFF),
    src=st.integers(1, 2**64 - 1),
    dst=st.integers(0, 2**64 - 1),
    ack=st.integers(0, 2**40),
    ack_delay=st.integers(0, 2**20),
    sacks=ranges,
    notices=notices,
    cookie=st.none() | st.binary(min_size=wire.COOKIE_SIZE, max_size=wire.COOKIE_SIZE),
    kind=st.sampled_from([Kind.ACK, Kind.PING, Kind.CLOSE]),
)
def test_encode_session_writes_what_encode_body_does(
    frags: list[Fragment],
    for_node: bool,
    nested: list[bool],
    flags: int,
    window: int,
    src: int,
    dst: int,
    ack: int,
    ack_delay: int,
    sacks: tuple[tuple[int, int], ...],
    notices: tuple[tuple[int, int], ...],
    cookie: bytes | None,
    kind: Kind,
) -> None:
    """The sessions' fast encoder is the general one, byte for byte (DATA and ack kinds)."""
    frags = [
        dataclasses.replace(f, for_node=for_node, nested=n, mailbox=f.mailbox[:60])
        for f, n in zip(frags, nested[: len(frags)], strict=True)
    ]
    fields = dict(
        flags=flags,
        window=window,
        src_incarnation=src,
        dst_incarnation=dst,
        ack=ack,
        ack_delay=ack_delay,
        sacks=sacks,
        notices=notices,
        cookie=cookie,
    )
    if frags:
        packet = Packet(kind=Kind.DATA, fragment=frags[0], bundle=tuple(frags[1:]), **fields)
    else:
        packet = Packet(kind=kind, **fields)
    fast = wire.encode_session(
        packet.kind, flags, window, src, dst, ack, ack_delay, sacks, notices, cookie, frags
    )
    assert fast == wire.encode_body(packet)
    # decoding marks every fragment of a datagram with NESTED when any carried it
    anywhere = any(f.nested for f in frags)
    expected = tuple(dataclasses.replace(f, nested=anywhere) for f in frags)
    assert decode(wire.with_crc(fast)).fragments == expected


def _bulk_view(pkt: Packet) -> wire.BulkFragment | None:
    """What decode_bulk must return for a decoded packet: its fields if the packet is in
    the simplest form of DATA (one default-mailbox fragment of at least half the body,
    no ack section, cookie or flags but ACK_NOW), else None."""
    frag = pkt.fragment
    if (
        pkt.kind != Kind.DATA
        or frag is None
        or pkt.bundle
        or frag.mailbox
        or frag.for_node
        or frag.nested
        or pkt.flags & ~Flag.ACK_NOW
        or pkt.cookie is not None
        or pkt.sacks
        or pkt.notices
        or not isinstance(frag.payload, memoryview)
    ):
        return None
    return (
        bool(pkt.flags & Flag.ACK_NOW),
        pkt.src_incarnation,
        pkt.dst_incarnation,
        frag.seq,
        frag.base,
        frag.msg_id,
        frag.index,
        frag.count,
        frag.total_len,
        frag.payload,
    )


@st.composite
def bulk_bodies(draw: st.DrawFn) -> bytes:
    """A big message's DATA body, often as the sender makes it, sometimes mangled."""
    payload = draw(st.binary(min_size=70, max_size=300) | st.binary(max_size=70))
    total = draw(st.integers(len(payload), len(payload) + 10_000))
    count = draw(st.integers(1, max(1, total)))
    frag = Fragment(
        seq=draw(u32),
        base=draw(u32),
        msg_id=draw(u32),
        index=draw(st.integers(0, count - 1)),
        count=count,
        total_len=total,
        msg_type=0,
        priority=draw(st.integers(0, 3)),
        mailbox=draw(st.sampled_from(["", "", "", "box"])),
        payload=payload,
    )
    body = wire.encode_body(
        Packet(
            kind=Kind.DATA,
            flags=draw(st.sampled_from([0, 0, Flag.ACK_NOW, Flag.ACK])),
            src_incarnation=draw(st.integers(1, 2**64 - 1)),
            dst_incarnation=draw(st.integers(0, 2**64 - 1)),
            cookie=draw(st.none() | st.just(bytes(16))),
            fragment=frag,
            bundle=tuple(draw(st.lists(st.just(frag), max_size=1))),
        )
    )
    for at, value in draw(st.lists(st.tuples(st.integers(0, 70), st.integers(0, 255)), max_size=2)):
        if at < len(body):
            body = body[:at] + bytes([value]) + body[at + 1 :]
    return body


@settings(max_examples=300)
@given(bulk_bodies(), st.booleans())
def test_decode_bulk_reads_what_decode_body_reads_or_declines(body: bytes, view: bool) -> None:
    """The receive fast path's decoder accepts exactly the simplest DATA packets, and reads
    them as the general decoder does; anything else it leaves to decode_body."""
    data: bytes | memoryview = memoryview(body) if view else body
    try:
        pkt = wire.decode_body(data)
    except MalformedPacket:
        assert wire.decode_bulk(data) is None  # malformed: never taken
        return
    fast = wire.decode_bulk(data)
    assert fast == _bulk_view(pkt)
    if fast is not None:
        assert isinstance(fast[-1], memoryview) and fast[-1].readonly


def test_decode_bulk_takes_a_big_messages_datagram() -> None:
    frag = _data(index=3, count=10, total_len=10_000, payload=bytes(1000), mailbox="")
    body = wire.encode_body(Packet(kind=Kind.DATA, src_incarnation=7, fragment=frag))
    fast = wire.decode_bulk(body)
    assert fast is not None and fast[:9] == (False, 7, 0, 1, 1, 0, 3, 10, 10_000)
    assert bytes(fast[9]) == bytes(1000)


@given(st.lists(fragments(), min_size=1, max_size=3), st.sampled_from([0, int(Flag.ACK_NOW)]))
def test_packed_records_encode_as_the_fragments_do(frags: list[Fragment], flags: int) -> None:
    """A sender's records (pack_record, with unbounded sequence numbers) are the bytes
    encode_session writes for the same fragments."""
    records: list[bytes | memoryview] = []
    for f in frags:
        wire.pack_record(
            records,
            f.seq + 2**32,  # unbounded, as a session numbers them: sent mod 2**32
            f.base,
            f.msg_id + 2**33,
            f.index,
            f.count,
            f.total_len,
            f.msg_type,
            f.priority,
            f.mailbox.encode(),
            f.payload,
        )
    head = (Kind.DATA, flags, 9, 1, 2, 3, 4, (), (), None)
    assert wire.encode_session(*head, None, records) == wire.encode_session(*head, frags)
