"""rmsg wire format, version 1: pure encode/decode of datagrams.

Every datagram is one packet: a fixed 32-byte header, a variable acknowledgement
section, a kind-specific body and a 4-byte CRC-32 trailer over everything before
it. All integers are network byte order. The layout is specified, with a diagram,
in ``docs/protocol.md``; this module is its executable form.

Design choices worth knowing:

* Every packet carries the acknowledgement state of the reverse direction
  (cumulative ack, advertised window, SACK ranges, verdict notices), so data
  piggybacks acks for free and a pure ACK is just a packet with no body.
* Sequence numbers, message ids and acks are 32-bit on the wire and wrap.
  Protocol state keeps them as unbounded Python ints; :func:`unwrap` maps a
  32-bit wire value back to the int nearest a reference point (RFC 1982 serial
  arithmetic), so a wrap is never mistaken for an old or a future packet.
* The decoder trusts nothing: each length is checked against what is actually
  there, reserved flag bits must be zero, fragment fields must be coherent, and
  the checksum is verified before any field is interpreted. Failures raise
  :class:`MalformedPacket` with a short machine-readable reason that callers
  count; they never escape the protocol core.
* Room for later versions: ``magic`` + ``version`` let a v2 coexist. Kinds
  16 and up are group addressing (:mod:`reliable.groups`); they share the
  header and add a length-prefixed group name after the ack section.
* Security modes (:mod:`reliable.security`) reuse this layout: ``encode_body``
  and ``decode_body`` handle a packet without its trailer, and a sealed
  datagram inserts a packet number after the header and a MAC or AEAD tag
  before the CRC, with a mode bit in the flags saying which.
"""

from __future__ import annotations

import enum
import struct
import zlib
from dataclasses import dataclass

__all__ = [
    "ACK_DELAY_TICK",
    "COOKIE_SIZE",
    "DATA_NOTICES",
    "DATA_SACK_RANGES",
    "DEFAULT_PORT",
    "FRAGMENT_OVERHEAD",
    "GROUP_KINDS",
    "HEADER_OVERHEAD",
    "MAGIC",
    "MAX_GROUP_BYTES",
    "MAX_MAILBOX_BYTES",
    "MAX_NOTICES",
    "MAX_SACK_RANGES",
    "MODE_FLAGS",
    "MSG_TYPE_MAX",
    "MSG_TYPE_MIN",
    "NOTICE_LIMIT",
    "NOTICE_SIZE",
    "PRIORITY_MAX",
    "PROBE_OVERHEAD",
    "RECORD_HEAD",
    "SECURITY_OVERHEAD",
    "SERIAL_BITS",
    "VERSION",
    "BulkFragment",
    "Flag",
    "Fragment",
    "Kind",
    "MalformedPacket",
    "Packet",
    "Verdict",
    "check_crc",
    "data_budget",
    "decode",
    "decode_body",
    "decode_bulk",
    "encode",
    "encode_body",
    "encode_session",
    "encoded_size",
    "fragment_capacity",
    "pack_record",
    "record_size",
    "unwrap",
    "with_crc",
]

MAGIC = 0x524D  # "RM"
#: rmsg's conventional UDP port (unregistered): dissectors bind to it, examples use it.
DEFAULT_PORT = 7431
VERSION = 1
SERIAL_BITS = 32
_SERIAL_MOD = 1 << SERIAL_BITS
_SERIAL_HALF = 1 << (SERIAL_BITS - 1)
_SERIAL_MASK = _SERIAL_MOD - 1

#: Unit of the header's ``ack_delay`` field, in seconds (10 microseconds).
ACK_DELAY_TICK = 1e-5
#: Most SACK ranges one packet may carry. The receiver reports the ranges
#: nearest the cumulative ack first, which are the ones a sender acts on.
MAX_SACK_RANGES = 32
#: Verdict notices a pure ACK always has room for (the datagram size floor counts them).
MAX_NOTICES = 32
#: Most verdict notices one packet may carry (its count is one byte). A pure ACK carries
#: more than :data:`MAX_NOTICES` when its datagram has room: a receiver owing many
#: notices (a durable mailbox's ``STAGED``) then acknowledges more messages per ACK.
NOTICE_LIMIT = 255
#: SACK ranges and notices a DATA packet carries at most; pure ACKs carry the full set.
#: Kept small so acknowledgement state costs data packets little room.
DATA_SACK_RANGES = 4
DATA_NOTICES = 2
#: Longest mailbox name, in UTF-8 bytes.
MAX_MAILBOX_BYTES = 255

# magic, version, kind, flags, window, src_inc, dst_inc, ack, ack_delay, n_sack, n_notice
_HEADER = struct.Struct("!HBBHHQQIHBB")
_SACK = struct.Struct("!II")
_NOTICE = struct.Struct("!IB")
NOTICE_SIZE = _NOTICE.size  #: bytes of one verdict notice
# seq, base, msg_id, frag_index, frag_count, total_len, msg_type, priority, mailbox_len
_FRAGMENT = struct.Struct("!IIIIIIiHB")
_PAYLOAD_LEN = struct.Struct("!H")
_TRAILER = struct.Struct("!I")
_REFUSAL = struct.Struct("!B")
_PROBE = struct.Struct("!I")
#: Bytes a PROBE spends beyond :data:`HEADER_OVERHEAD` before its padding.
PROBE_OVERHEAD = _PROBE.size
_PREAMBLE = struct.Struct("!HB")  # magic, version

#: Bytes of an address-validation cookie (``Flag.COOKIE``).
COOKIE_SIZE = 16
#: Most bytes a security mode adds to a datagram (a packet number and a 16-byte
#: tag; the CRC stays); datagram sizing always leaves room for them.
SECURITY_OVERHEAD = 8 + 16

#: Bytes every packet spends on header and trailer, before SACKs and notices.
HEADER_OVERHEAD = _HEADER.size + _TRAILER.size
#: Bytes a DATA packet spends beyond :data:`HEADER_OVERHEAD`, before the mailbox name.
FRAGMENT_OVERHEAD = _FRAGMENT.size + _PAYLOAD_LEN.size

_U16_MAX = 0xFFFF
#: Range of the message type field (signed 32-bit).
MSG_TYPE_MIN = -(1 << 31)
MSG_TYPE_MAX = (1 << 31) - 1
#: Range of the priority field.
PRIORITY_MAX = _U16_MAX


class Kind(enum.IntEnum):
    """Packet kinds. Values 16-255 are reserved for group addressing."""

    DATA = 1  #: one fragment of a message, plus ack state
    ACK = 2  #: ack state only
    PING = 3  #: asks for an immediate ACK: liveness and zero-window probes
    CLOSE = 4  #: the sender is closing; its incarnation ends
    RESET = 5  #: "the incarnation you addressed is not mine": I restarted
    CHALLENGE = 6  #: "prove you are at this address": echo the cookie it carries
    AUTH_FAILED = 7  #: "your datagram failed my security check" (sent unsealed)
    DROPPED = 8  #: "I dropped what you sent me below ``ack``: fail it, and go on from there"
    PROBE = 9  #: a path MTU probe: a probe number and padding (reliable/pmtud.py)
    PROBE_ACK = 10  #: "your probe of this number arrived"
    # Group addressing (docs/protocol.md section 10); each carries a group name.
    GDATA = 16  #: one fragment of a group message, sent to the group address
    GACK = 17  #: a member's ack state for one sender's group stream (unicast to it)
    GNAK = 18  #: a member's gaps in one sender's stream (to the group, for suppression)
    GSYNC = 19  #: a sender's heartbeat: the stream range it can still repair
    JOIN = 20  #: "I am a member of this group" (to the group, periodically)
    LEAVE = 21  #: "I left this group"
    SOLICIT = 22  #: "members, announce yourselves" (answered by at most one JOIN each)
    ANNOUNCE = 23  #: "I serve this anycast service" (to a discovery group)
    WITHDRAW = 24  #: "I no longer serve this anycast service"


class Flag(enum.IntFlag):
    """Header flag bits. Unknown bits must be zero in v1."""

    NONE = 0
    ACK_NOW = 0x0001  #: the receiver should acknowledge at once, not after a delay
    ACK = 0x0002  #: the ack fields are valid (the sender has received data from us)
    NODE = 0x0004  #: DATA only: the message is for the rmsg node itself, not a mailbox
    COOKIE = 0x0008  #: an address-validation cookie follows the header
    #: DATA only: a fragment in it is a one-datagram message sent between two fragments
    #: of a lower-priority one. Receivers that predate priority interleaving refuse the
    #: bit (unknown flags are malformed) instead of losing the interrupted message.
    NESTED = 0x0010
    AUTHENTICATED = 0x0100  #: sealed with a MAC (set by the security layer)
    ENCRYPTED = 0x0200  #: sealed with an AEAD (set by the security layer)


#: The security-mode bits; a datagram carries at most one, and only sealed ones do.
MODE_FLAGS = int(Flag.AUTHENTICATED | Flag.ENCRYPTED)
_KNOWN_FLAGS = int(Flag.ACK_NOW | Flag.ACK | Flag.NODE | Flag.COOKIE | Flag.NESTED)
# Plain ints for the per-packet paths: enum flag arithmetic costs microseconds a packet.
_NODE = int(Flag.NODE)
_COOKIE = int(Flag.COOKIE)
_NESTED = int(Flag.NESTED)
_KINDS = {int(k): k for k in Kind}
# (compared as ints on the per-datagram path: an enum member's lookup costs about 0.2 us)
_DATA_KIND = int(Kind.DATA)
_CHALLENGE_KIND = int(Kind.CHALLENGE)
_AUTH_FAILED_KIND = int(Kind.AUTH_FAILED)
_PROBE_ACK_KIND = int(Kind.PROBE_ACK)
_FLAGS_OFFSET = 4  # of the u16 flags field in the header


class Verdict(enum.IntEnum):
    """A receiver's word on a whole message, carried in the notices of its acks.

    A message acknowledged without a notice entered its mailbox. The refusals
    (1-5) end the message; ``DEFERRED`` means the node holds it while its
    mailbox is full (or, for a rendezvous mailbox, until a receiver takes it)
    and will report the outcome in a node message; ``STAGED`` the same,
    while a durable mailbox commits it. ``CANCELLED`` appears only in node
    messages.
    """

    TOO_LARGE = 1  #: larger than the receiver's ``max_message_size``
    NO_MAILBOX = 2  #: no mailbox of that name on the receiving node
    MAILBOX_CLOSED = 3  #: the mailbox exists but no longer accepts messages
    REFUSED = 4  #: the receiving application refused it
    NO_MEMORY = 5  #: the receiving node's mailbox memory cap is reached
    DEFERRED = 6  #: held until the mailbox has room; the outcome follows
    CANCELLED = 7  #: withdrawn at the sender's request before it entered the mailbox
    #: held until its (durable) mailbox's store commits it; the outcome follows, as for
    #: ``DEFERRED``, but the mailbox had room: a non-blocking send need not wait
    STAGED = 8


class MalformedPacket(ValueError):
    """A datagram that is not a valid v1 packet. ``reason`` is a short counter key."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass(slots=True)
class Fragment:
    """The body of a DATA packet: one fragment of one message.

    Treat it as immutable. It is not frozen because two are built per
    message (to encode and on decoding), and a frozen dataclass costs
    about 1.6 us more to build, a few percent of a small message's cost.

    Sequence-like fields hold 32-bit wire values; see :func:`unwrap`.
    """

    seq: int  #: packet sequence number
    base: int  #: sender's lowest outstanding seq: all below it is acked or abandoned
    msg_id: int  #: per-session message number
    index: int  #: this fragment's position, 0-based
    count: int  #: fragments in the message, >= 1
    total_len: int  #: whole message length in bytes
    msg_type: int  #: signed 32-bit message type (System V style)
    priority: int  #: 0-65535, higher is more urgent
    mailbox: str  #: destination mailbox name ("" for the node's default)
    #: A view into a larger buffer when that saves copying a big fragment (see decode).
    payload: bytes | memoryview
    for_node: bool = False  #: carried as :attr:`Flag.NODE`: a message for the node itself
    #: sent between two fragments of another message (:attr:`Flag.NESTED`; on decoding,
    #: set on every fragment of a datagram that carries the flag)
    nested: bool = False

    # Written out, not generated: a dataclass's generated __init__ stays interpreted
    # code in the compiled core (about 5x the cost per object there). Same
    # signature and defaults as the generated one.
    def __init__(
        self,
        seq: int,
        base: int,
        msg_id: int,
        index: int,
        count: int,
        total_len: int,
        msg_type: int,
        priority: int,
        mailbox: str,
        payload: bytes | memoryview,
        for_node: bool = False,
        nested: bool = False,
    ) -> None:
        self.seq = seq
        self.base = base
        self.msg_id = msg_id
        self.index = index
        self.count = count
        self.total_len = total_len
        self.msg_type = msg_type
        self.priority = priority
        self.mailbox = mailbox
        self.payload = payload
        self.for_node = for_node
        self.nested = nested


@dataclass(slots=True)
class Packet:
    """One decoded datagram.

    Treat it as immutable. It is not frozen for the reason :class:`Fragment`
    is not: one is built for every datagram received, and a frozen dataclass
    sets each of its 16 fields through ``object.__setattr__``, about four
    times the cost of a plain one.
    """

    kind: Kind
    src_incarnation: int  #: sender's incarnation (non-zero)
    flags: int = 0
    window: int = 0  #: advertised receive window, in packets beyond ``ack``
    dst_incarnation: int = 0  #: receiver's incarnation as the sender knows it, 0 if unknown
    ack: int = 0  #: cumulative ack: the next seq expected from the receiver of this packet
    ack_delay: int = 0  #: how long the ack was held, in :data:`ACK_DELAY_TICK` units
    sacks: tuple[tuple[int, int], ...] = ()  #: received ranges above ``ack``, [start, end)
    notices: tuple[tuple[int, int], ...] = ()  #: (msg_id, Verdict) pairs
    cookie: bytes | None = None  #: address-validation cookie (carried as ``Flag.COOKIE``)
    refusal: int = 0  #: AUTH_FAILED only: why (1 bad tag, 2 unsealed, 3 wrong mode)
    fragment: Fragment | None = None  #: DATA and GDATA: the (first) fragment
    group: str = ""  #: group kinds only: the group (or anycast service) name
    #: DATA only: further fragments packed into the same datagram, in order.
    bundle: tuple[Fragment, ...] = ()
    probe: int = 0  #: PROBE and PROBE_ACK: the probe number (32 bits)
    padding: int = 0  #: PROBE: bytes of padding after the probe number

    # Written out, not generated: a dataclass's generated __init__ stays interpreted
    # code in the compiled core (about 5x the cost per object there). Same
    # signature and defaults as the generated one.
    def __init__(
        self,
        kind: Kind,
        src_incarnation: int,
        flags: int = 0,
        window: int = 0,
        dst_incarnation: int = 0,
        ack: int = 0,
        ack_delay: int = 0,
        sacks: tuple[tuple[int, int], ...] = (),
        notices: tuple[tuple[int, int], ...] = (),
        cookie: bytes | None = None,
        refusal: int = 0,
        fragment: Fragment | None = None,
        group: str = "",
        bundle: tuple[Fragment, ...] = (),
        probe: int = 0,
        padding: int = 0,
    ) -> None:
        self.kind = kind
        self.flags = flags
        self.window = window
        self.src_incarnation = src_incarnation
        self.dst_incarnation = dst_incarnation
        self.ack = ack
        self.ack_delay = ack_delay
        self.sacks = sacks
        self.notices = notices
        self.cookie = cookie
        self.refusal = refusal
        self.fragment = fragment
        self.group = group
        self.bundle = bundle
        self.probe = probe
        self.padding = padding

    @property
    def fragments(self) -> tuple[Fragment, ...]:
        """Every fragment the datagram carries (none for kinds other than DATA and GDATA)."""
        if self.fragment is None:
            return ()
        return (self.fragment, *self.bundle) if self.bundle else (self.fragment,)


#: Kinds that carry a group name.
GROUP_KINDS = frozenset(k for k in Kind if k >= 16)
_GROUP_KIND_VALUES = frozenset(int(k) for k in GROUP_KINDS)
_DATA_KINDS = frozenset((Kind.DATA, Kind.GDATA))
_PROBE_KINDS = frozenset((Kind.PROBE, Kind.PROBE_ACK))
#: Longest group or service name, in UTF-8 bytes.
MAX_GROUP_BYTES = 255
_GROUP_LEN = struct.Struct("!B")


def unwrap(value: int, reference: int) -> int:
    """Map a 32-bit wire value to the unbounded int nearest ``reference``.

    Serial-number arithmetic (RFC 1982): the result lies within 2**31 of
    ``reference``, so a counter that wrapped is read as having moved forward.
    """
    delta = (value - reference) & _SERIAL_MASK
    if delta >= _SERIAL_HALF:
        delta -= _SERIAL_MOD
    return reference + delta


def fragment_capacity(max_datagram_size: int, mailbox: str, group: str = "") -> int:
    """Payload bytes that fit in one DATA datagram of ``max_datagram_size`` bytes.

    Leaves room for the ack state a DATA packet may piggyback
    (:data:`DATA_SACK_RANGES`, :data:`DATA_NOTICES`), so adding it never
    pushes a datagram over the size the sender promised.
    """
    reserved = (
        HEADER_OVERHEAD
        + SECURITY_OVERHEAD
        + COOKIE_SIZE
        + FRAGMENT_OVERHEAD
        + len(mailbox.encode("utf-8"))
        + (1 + len(group.encode("utf-8")) if group else 0)
        + _SACK.size * DATA_SACK_RANGES
        + _NOTICE.size * DATA_NOTICES
    )
    return min(_U16_MAX, max_datagram_size - reserved)


def data_budget(max_datagram_size: int, group: str = "") -> int:
    """Bytes a DATA datagram of ``max_datagram_size`` has for fragment records.

    The rest is reserved for the header, the worst-case sealing and cookie,
    and the ack state DATA may piggyback. A fragment record costs
    :func:`record_size` bytes; a datagram carries as many as fit.
    """
    return fragment_capacity(max_datagram_size, "", group) + FRAGMENT_OVERHEAD


def record_size(mailbox_bytes: int, payload_bytes: int) -> int:
    """Bytes one fragment record takes in a DATA body."""
    return FRAGMENT_OVERHEAD + mailbox_bytes + payload_bytes


def encoded_size(packet: Packet) -> int:
    """Bytes ``encode(packet)`` produces, without encoding it (unsealed; no DATA body)."""
    if packet.fragment is not None:
        raise ValueError("encoded_size is for packets without a fragment")
    size = HEADER_OVERHEAD + _SACK.size * len(packet.sacks) + _NOTICE.size * len(packet.notices)
    if packet.cookie is not None:
        size += COOKIE_SIZE
    if packet.kind in _GROUP_KIND_VALUES:
        size += 1 + len(packet.group.encode("utf-8"))
    if packet.kind == Kind.AUTH_FAILED:
        size += _REFUSAL.size
    elif packet.kind in _PROBE_KINDS:
        size += _PROBE.size + packet.padding
    return size


def encode(packet: Packet) -> bytes:
    """Serialise ``packet`` with its CRC-32 trailer; raises ``ValueError`` if a field is
    out of range."""
    return with_crc(encode_body(packet))


def with_crc(data: bytes) -> bytes:
    """``data`` followed by its CRC-32 trailer (every datagram ends in one, sealed or not)."""
    return data + _TRAILER.pack(zlib.crc32(data))


def check_crc(data: bytes) -> int:
    """Verify preamble, length and CRC-32 trailer of a datagram; returns where the trailer
    starts. Raises :class:`MalformedPacket` (``short``, ``magic``, ``version``, ``checksum``)."""
    size = len(data)
    if size < HEADER_OVERHEAD:
        raise MalformedPacket("short", f"{size} bytes")
    # check_preamble, inline (once per datagram received)
    magic, version = _PREAMBLE.unpack_from(data, 0)
    if magic != MAGIC:
        raise MalformedPacket("magic", f"{magic:#06x}")
    if version != VERSION:
        raise MalformedPacket("version", str(version))
    end = size - _TRAILER.size
    (crc,) = _TRAILER.unpack_from(data, end)
    if zlib.crc32(memoryview(data)[:end]) != crc:
        raise MalformedPacket("checksum")
    return end


def encode_body(packet: Packet) -> bytes:
    """Serialise ``packet`` without a trailer (for a security mode to seal)."""
    if len(packet.sacks) > MAX_SACK_RANGES or len(packet.notices) > NOTICE_LIMIT:
        raise ValueError("too many SACK ranges or notices for one packet")
    if packet.flags & ~_KNOWN_FLAGS:
        raise ValueError(f"unknown flag bits {packet.flags:#x}")
    if (packet.fragment is None) != (packet.kind not in _DATA_KINDS):
        raise ValueError("a DATA or GDATA packet needs a fragment and only they may carry one")
    if packet.bundle and packet.kind != Kind.DATA:
        raise ValueError("only DATA packets bundle several fragments")
    for_node = packet.fragment is not None and packet.fragment.for_node
    if any(f.for_node != for_node for f in packet.bundle):
        raise ValueError("a bundle's fragments are all node-message fragments or none is")
    is_group = packet.kind in _GROUP_KIND_VALUES
    if packet.group and not is_group:
        raise ValueError("only group kinds carry a group name")
    flags = int(packet.flags)
    if packet.fragment is not None and packet.fragment.for_node:
        flags |= _NODE
    elif flags & _NODE:
        raise ValueError("Flag.NODE belongs on DATA packets whose fragment is a node message's")
    if packet.fragment is not None and (
        packet.fragment.nested or (packet.bundle and any(f.nested for f in packet.bundle))
    ):
        flags |= _NESTED
    elif flags & _NESTED and packet.kind != Kind.DATA:
        raise ValueError("Flag.NESTED belongs on DATA packets")
    if flags & _COOKIE:
        raise ValueError("Flag.COOKIE is set from Packet.cookie")
    if packet.cookie is not None:
        if len(packet.cookie) != COOKIE_SIZE:
            raise ValueError(f"a cookie is {COOKIE_SIZE} bytes")
        flags |= _COOKIE
    elif packet.kind == Kind.CHALLENGE:
        raise ValueError("a CHALLENGE carries a cookie")
    try:
        parts: list[bytes | memoryview] = [
            _HEADER.pack(
                MAGIC,
                VERSION,
                packet.kind,
                flags,
                packet.window,
                packet.src_incarnation,
                packet.dst_incarnation,
                packet.ack & _SERIAL_MASK,
                min(packet.ack_delay, _U16_MAX),
                len(packet.sacks),
                len(packet.notices),
            )
        ]
        if packet.cookie is not None:
            parts.append(packet.cookie)
        for start, end in packet.sacks:
            parts.append(_SACK.pack(start & _SERIAL_MASK, end & _SERIAL_MASK))
        for msg_id, reason in packet.notices:
            parts.append(_NOTICE.pack(msg_id & _SERIAL_MASK, reason))
        if is_group:
            group = packet.group.encode("utf-8")
            if not group or len(group) > MAX_GROUP_BYTES:
                raise ValueError(f"a group name is 1-{MAX_GROUP_BYTES} bytes, got {len(group)}")
            parts.append(_GROUP_LEN.pack(len(group)))
            parts.append(group)
        if packet.fragment is not None:
            for frag in packet.fragments:
                _encode_fragment(frag, parts)
        elif packet.kind == Kind.AUTH_FAILED:
            parts.append(_REFUSAL.pack(packet.refusal))
        elif packet.kind in _PROBE_KINDS:
            parts.append(_PROBE.pack(packet.probe))
            if packet.padding:
                if packet.kind != Kind.PROBE:
                    raise ValueError("only a PROBE carries padding")
                parts.append(bytes(packet.padding))
    except struct.error as exc:
        raise ValueError(f"field out of range: {exc}") from None
    return b"".join(parts)


def encode_session(
    kind: int,
    flags: int,
    window: int,
    src_incarnation: int,
    dst_incarnation: int,
    ack: int,
    ack_delay: int,
    sacks: tuple[tuple[int, int], ...],
    notices: tuple[tuple[int, int], ...],
    cookie: bytes | None,
    fragments: list[Fragment] | None = None,
    records: list[bytes | memoryview] | None = None,
) -> bytes:
    """What ``encode_body`` makes of a session's DATA or ack-bearing bare packet
    (ACK, PING, CLOSE), from its fields, without building and checking a
    :class:`Packet`: the per-datagram path of a peer session, whose fields are its
    own (in range by construction). ``flags`` holds only ``ACK_NOW`` and ``ACK``;
    ``NODE``, ``NESTED`` and ``COOKIE`` are set here from the fragments and cookie.

    ``records`` instead of ``fragments``: the fragment records already packed
    (:func:`pack_record`); ``flags`` then carries their ``NODE`` and ``NESTED``.
    """
    if fragments:
        if fragments[0].for_node:
            flags |= _NODE
        for frag in fragments:
            if frag.nested:
                flags |= _NESTED
                break
    if cookie is not None:
        flags |= _COOKIE
    header = _HEADER.pack(
        MAGIC,
        VERSION,
        kind,
        flags,
        window,
        src_incarnation,
        dst_incarnation,
        ack & _SERIAL_MASK,
        ack_delay if ack_delay < _U16_MAX else _U16_MAX,
        len(sacks),
        len(notices),
    )
    if cookie is None:
        if not sacks and not notices and not records and not fragments:
            return header  # the whole packet (a plain ACK or PING): no list, no join
        parts: list[bytes | memoryview] = [header]
    else:
        parts = [header, cookie]
    for start, end in sacks:
        parts.append(_SACK.pack(start & _SERIAL_MASK, end & _SERIAL_MASK))
    for msg_id, reason in notices:
        parts.append(_NOTICE.pack(msg_id & _SERIAL_MASK, reason))
    if records:
        parts += records
    if fragments:
        pack = _FRAGMENT.pack
        payload_len = _PAYLOAD_LEN.pack
        for frag in fragments:
            mailbox = frag.mailbox.encode("utf-8") if frag.mailbox else b""
            payload = frag.payload
            parts.append(
                pack(
                    frag.seq & _SERIAL_MASK,
                    frag.base & _SERIAL_MASK,
                    frag.msg_id & _SERIAL_MASK,
                    frag.index,
                    frag.count,
                    frag.total_len,
                    frag.msg_type,
                    frag.priority,
                    len(mailbox),
                )
            )
            if mailbox:
                parts.append(mailbox)
            parts.append(payload_len(len(payload)))
            parts.append(payload)
    return b"".join(parts)


#: A fragment record's header and payload length together, when the mailbox name is empty.
_RECORD_HEAD = struct.Struct("!IIIIIIiHBH")
#: The same, public: the sender packs a default-mailbox record with it inline.
RECORD_HEAD = _RECORD_HEAD


def pack_record(
    parts: list[bytes | memoryview],
    seq: int,
    base: int,
    msg_id: int,
    index: int,
    count: int,
    total_len: int,
    msg_type: int,
    priority: int,
    mailbox: bytes,
    payload: bytes | memoryview,
) -> None:
    """Append one fragment record, from its fields (unbounded sequence numbers are
    sent mod 2**32), to ``parts``: what ``encode_session`` writes for a
    :class:`Fragment`, without building one (a sender's per-fragment path).
    ``mailbox`` is the name in UTF-8, at most :data:`MAX_MAILBOX_BYTES`."""
    if mailbox:
        parts.append(
            _FRAGMENT.pack(
                seq & _SERIAL_MASK,
                base & _SERIAL_MASK,
                msg_id & _SERIAL_MASK,
                index,
                count,
                total_len,
                msg_type,
                priority,
                len(mailbox),
            )
        )
        parts.append(mailbox)
        parts.append(_PAYLOAD_LEN.pack(len(payload)))
    else:
        parts.append(
            _RECORD_HEAD.pack(
                seq & _SERIAL_MASK,
                base & _SERIAL_MASK,
                msg_id & _SERIAL_MASK,
                index,
                count,
                total_len,
                msg_type,
                priority,
                0,
                len(payload),
            )
        )
    parts.append(payload)


def _encode_fragment(frag: Fragment, parts: list[bytes | memoryview]) -> None:
    mailbox = frag.mailbox.encode("utf-8")
    if len(mailbox) > MAX_MAILBOX_BYTES:
        raise ValueError(f"mailbox name is {len(mailbox)} bytes, at most 255")
    parts.append(
        _FRAGMENT.pack(
            frag.seq & _SERIAL_MASK,
            frag.base & _SERIAL_MASK,
            frag.msg_id & _SERIAL_MASK,
            frag.index,
            frag.count,
            frag.total_len,
            frag.msg_type,
            frag.priority,
            len(mailbox),
        )
    )
    parts.append(mailbox)
    parts.append(_PAYLOAD_LEN.pack(len(frag.payload)))
    parts.append(frag.payload)


def decode(data: bytes) -> Packet:
    """Parse and verify one unsealed datagram (CRC-32 trailer); raises :class:`MalformedPacket`."""
    return decode_body(data, check_crc(data))


def check_preamble(data: bytes) -> None:
    """Magic and version, the two fields read before anything is verified."""
    magic, version = _PREAMBLE.unpack_from(data, 0)
    if magic != MAGIC:
        raise MalformedPacket("magic", f"{magic:#06x}")
    if version != VERSION:
        raise MalformedPacket("version", str(version))


def decode_body(data: bytes | memoryview, end: int | None = None) -> Packet:
    """Parse a verified packet without its trailer (``data[:end]``).

    The security-mode bits in the flags are the sealing layer's business and
    are ignored here.
    """
    end = len(data) if end is None else end
    if end < _HEADER.size:
        raise MalformedPacket("short", f"{end} bytes")
    (
        magic,
        version,
        kind_value,
        flags,
        window,
        src_inc,
        dst_inc,
        ack,
        ack_delay,
        n_sack,
        n_notice,
    ) = _HEADER.unpack_from(data, 0)
    if magic != MAGIC:
        raise MalformedPacket("magic", f"{magic:#06x}")
    if version != VERSION:
        raise MalformedPacket("version", str(version))
    kind = _KINDS.get(kind_value)
    if kind is None:
        raise MalformedPacket("kind", str(kind_value))
    flags &= ~MODE_FLAGS
    if flags & ~_KNOWN_FLAGS:
        raise MalformedPacket("flags", f"{flags:#x}")
    if src_inc == 0:
        raise MalformedPacket("incarnation", "source incarnation is zero")
    if n_sack > MAX_SACK_RANGES or n_notice > NOTICE_LIMIT:
        raise MalformedPacket("length", "too many SACK ranges or notices")
    offset = _HEADER.size
    cookie = None
    if flags & _COOKIE:
        if offset + COOKIE_SIZE > end:
            raise MalformedPacket("length", "cookie overruns the datagram")
        cookie = bytes(data[offset : offset + COOKIE_SIZE])
        offset += COOKIE_SIZE
        flags &= ~_COOKIE
    elif kind_value == _CHALLENGE_KIND:
        raise MalformedPacket("cookie", "a CHALLENGE without its cookie")
    sacks: tuple[tuple[int, int], ...] = ()
    notices: tuple[tuple[int, int], ...] = ()
    if n_sack or n_notice:  # (an empty ack section cannot overrun: the header fit)
        if offset + n_sack * _SACK.size + n_notice * _NOTICE.size > end:
            raise MalformedPacket("length", "ack section overruns the datagram")
        if n_sack:
            sacks = tuple(_SACK.iter_unpack(data[offset : offset + n_sack * _SACK.size]))
            offset += n_sack * _SACK.size
        if n_notice:
            notices = tuple(_NOTICE.iter_unpack(data[offset : offset + n_notice * _NOTICE.size]))
            offset += n_notice * _NOTICE.size
            for _, reason in notices:
                if reason not in _VERDICTS:
                    raise MalformedPacket("notice", f"unknown verdict {reason}")
    if kind_value == _DATA_KIND:
        # DATA, the common packet, first: what the general path below does for it
        for_node = bool(flags & _NODE)
        nested = bool(flags & _NESTED)
        first, offset = _decode_fragment(data, offset, end, for_node, nested)
        # (positional: a class called with keywords builds a dict of them, per datagram)
        pkt = Packet(kind, src_inc, flags, window, dst_inc, ack, ack_delay)
        pkt.fragment = first
        if offset != end:
            pkt.bundle = _decode_bundle(data, offset, end, for_node, nested)
        if sacks:
            pkt.sacks = sacks
        if notices:
            pkt.notices = notices
        if cookie is not None:
            pkt.cookie = cookie
        return pkt
    fragment = None
    bundle: tuple[Fragment, ...] = ()
    refusal = 0
    probe = padding = 0
    group = ""
    if kind_value in _GROUP_KIND_VALUES:
        if offset >= end:
            raise MalformedPacket("length", "group name missing")
        group_len = data[offset]
        offset += 1
        if group_len == 0 or offset + group_len > end:
            raise MalformedPacket("group", "group name empty or overruns the datagram")
        try:
            group = bytes(data[offset : offset + group_len]).decode("utf-8")
        except UnicodeDecodeError:
            raise MalformedPacket("group", "name is not UTF-8") from None
        offset += group_len
    if kind in _DATA_KINDS:
        for_node = bool(flags & _NODE)
        nested = bool(flags & _NESTED)
        if nested and kind_value != _DATA_KIND:
            raise MalformedPacket("flags", "NESTED on a packet that is not DATA")
        fragment, offset = _decode_fragment(data, offset, end, for_node, nested)
        if offset != end:
            if kind_value != _DATA_KIND:
                raise MalformedPacket("length", "a GDATA packet carries one fragment")
            more = []
            while offset != end:
                extra, offset = _decode_fragment(data, offset, end, for_node, nested)
                more.append(extra)
            bundle = tuple(more)
    elif flags & _NODE:
        raise MalformedPacket("flags", "NODE on a packet that is not DATA")
    elif flags & _NESTED and kind_value != _DATA_KIND:
        raise MalformedPacket("flags", "NESTED on a packet that is not DATA")
    elif kind_value == _AUTH_FAILED_KIND:  # (ints: a Kind member lookup costs 0.1 us)
        if offset + _REFUSAL.size != end:
            raise MalformedPacket("length", "AUTH_FAILED carries one byte")
        (refusal,) = _REFUSAL.unpack_from(data, offset)
    elif kind in _PROBE_KINDS:
        if offset + _PROBE.size > end or (
            kind_value == _PROBE_ACK_KIND and offset + _PROBE.size != end
        ):
            raise MalformedPacket("length", f"a {kind.name} carries a 4-byte probe number")
        (probe,) = _PROBE.unpack_from(data, offset)
        padding = end - offset - _PROBE.size
    elif offset != end:
        raise MalformedPacket("length", f"{end - offset} trailing bytes")
    # The header's fields positionally (a class called with keywords builds a dict of
    # them), the rest only when not the default: a packet (an ACK) often has none.
    pkt = Packet(kind, src_inc, flags, window, dst_inc, ack, ack_delay)
    if sacks:
        pkt.sacks = sacks
    if notices:
        pkt.notices = notices
    if cookie is not None:
        pkt.cookie = cookie
    if fragment is not None:
        pkt.fragment = fragment
        if bundle:
            pkt.bundle = bundle
    if group:
        pkt.group = group
    if refusal:
        pkt.refusal = refusal
    if probe:
        pkt.probe = probe
    if padding:
        pkt.padding = padding
    return pkt


_VERDICTS = frozenset(int(r) for r in Verdict)


#: A DATA packet's fixed header, its one fragment's record header and payload length,
#: when the mailbox name is empty: the whole head of a big message's datagram.
_DATA_HEAD = struct.Struct("!HBBHHQQIHBBIIIIIIiHBH")
_ACK_NOW_BIT = int(Flag.ACK_NOW)
#: Flags in the low byte that decode_bulk never takes: all but ACK_NOW (the mode bits are
#: in the high byte, which the full test after the unpack reads).
_REFUSED_LOW_FLAGS = 0xFF & ~_ACK_NOW_BIT
#: The same, for a caller that reads byte 5 of a datagram first and calls
#: :func:`decode_bulk` only when none of these is set.
BULK_REFUSED_LOW_FLAGS = _REFUSED_LOW_FLAGS
#: What :func:`decode_bulk` reads: ``(ack_now, src_incarnation, dst_incarnation, seq, base,
#: msg_id, index, count, total_len, payload)``, wire values.
BulkFragment = tuple[bool, int, int, int, int, int, int, int, int, bytes | memoryview]


def decode_bulk(body: bytes | memoryview) -> BulkFragment | None:
    """A verified packet (as :func:`decode_body` takes it) read in one step, if it is in
    the simplest form of DATA; None for anything else, which ``decode_body`` then judges.

    The simplest form is what every datagram of a big message is: one fragment,
    for the default mailbox, most of the datagram, no acknowledgement section,
    cookie, ``NODE`` or ``NESTED`` flag, and only ``ACK_NOW`` among the flags. It is
    checked exactly as ``decode_body`` checks it; the session's receive path
    (``PeerSession.on_bulk``) then takes it without a :class:`Packet` or a
    :class:`Fragment`: those two objects, the generic decoder's branches and
    one more ``unpack`` cost about a third of a datagram's receive work.
    """
    end = len(body)
    # The flags' low byte (byte 5) first, from the buffer: a packet carrying acknowledgements
    # (every DATA of a two-way exchange, every ACK and PING) is turned away by one index
    # read instead of a 21-field unpack. (A pure ACK is shorter than _DATA_HEAD.)
    if end < _DATA_HEAD.size or body[5] & _REFUSED_LOW_FLAGS:
        return None
    (
        magic,
        version,
        kind,
        flags,
        _window,
        src_inc,
        dst_inc,
        _ack,
        _ack_delay,
        n_sack,
        n_notice,
        seq,
        base,
        msg_id,
        index,
        count,
        total_len,
        _msg_type,
        _priority,
        mailbox_len,
        payload_len,
    ) = _DATA_HEAD.unpack_from(body, 0)
    if (
        kind != _DATA_KIND
        or flags & ~(MODE_FLAGS | _ACK_NOW_BIT)
        or n_sack
        or n_notice
        or mailbox_len
        or not src_inc
        or magic != MAGIC
        or version != VERSION
        or _DATA_HEAD.size + payload_len != end  # (a bundle, or malformed)
        or 2 * payload_len < end  # (decode_body copies a small payload: let it)
        or count == 0
        or index >= count
        or payload_len > total_len
        or (count > total_len and count > 1)
    ):
        return None
    if type(body) is memoryview and body.readonly:
        payload: bytes | memoryview = body[_DATA_HEAD.size : end]
    else:
        payload = memoryview(body)[_DATA_HEAD.size : end].toreadonly()
    return (
        bool(flags & _ACK_NOW_BIT),
        src_inc,
        dst_inc,
        seq,
        base,
        msg_id,
        index,
        count,
        total_len,
        payload,
    )


def _decode_bundle(
    data: bytes | memoryview, offset: int, end: int, for_node: bool, nested: bool
) -> tuple[Fragment, ...]:
    """The records after a DATA packet's first, from ``offset`` to ``end``.

    A default-mailbox record whose fields pass :func:`_decode_fragment`'s checks
    (a small message in a bundle: most records) is read here, inline; any other
    record goes to that function, which reads it or raises what is wrong.
    """
    more = []
    unpack = _RECORD_HEAD.unpack_from
    head = _RECORD_HEAD.size
    half = len(data)  # (a payload at least half the datagram is a view: see below)
    while offset != end:
        if offset + head <= end:
            (
                seq,
                base,
                msg_id,
                index,
                count,
                total_len,
                msg_type,
                priority,
                mailbox_len,
                length,
            ) = unpack(data, offset)
            start = offset + head
            stop = start + length
            if (
                not mailbox_len
                and stop <= end
                and index < count
                and length <= total_len
                and (count <= total_len or count == 1)
                and 2 * length < half
            ):
                more.append(
                    Fragment(
                        seq,
                        base,
                        msg_id,
                        index,
                        count,
                        total_len,
                        msg_type,
                        priority,
                        "",
                        bytes(data[start:stop]),
                        for_node,
                        nested,
                    )
                )
                offset = stop
                continue
        fragment, offset = _decode_fragment(data, offset, end, for_node, nested)
        more.append(fragment)
    return tuple(more)


def _decode_fragment(
    data: bytes | memoryview, offset: int, end: int, for_node: bool, nested: bool = False
) -> tuple[Fragment, int]:
    """One fragment record at ``offset``, and where the next record starts."""
    if offset + _RECORD_HEAD.size <= end:
        # Header and payload length in one unpack; right when the mailbox name is empty
        # (the default mailbox: most records), and re-read below when it is not.
        (
            seq,
            base,
            msg_id,
            index,
            count,
            total_len,
            msg_type,
            priority,
            mailbox_len,
            payload_len,
        ) = _RECORD_HEAD.unpack_from(data, offset)
    elif offset + _FRAGMENT.size > end:
        raise MalformedPacket("length", "fragment header overruns the datagram")
    else:
        (seq, base, msg_id, index, count, total_len, msg_type, priority, mailbox_len) = (
            _FRAGMENT.unpack_from(data, offset)
        )
        payload_len = -1  # (the length field overruns: judged below)
    if mailbox_len or payload_len < 0:
        offset += _FRAGMENT.size
        if offset + mailbox_len + _PAYLOAD_LEN.size > end:
            raise MalformedPacket("length", "mailbox name overruns the datagram")
        if mailbox_len:
            try:
                mailbox = str(data[offset : offset + mailbox_len], "utf-8")
            except UnicodeDecodeError:
                raise MalformedPacket("mailbox", "name is not UTF-8") from None
            offset += mailbox_len
        else:
            mailbox = ""
        (payload_len,) = _PAYLOAD_LEN.unpack_from(data, offset)
        offset += _PAYLOAD_LEN.size
    else:
        mailbox = ""  # the default mailbox (every fragment of a plain big message)
        offset += _RECORD_HEAD.size
    stop = offset + payload_len
    if stop > end:
        raise MalformedPacket("length", "payload overruns the datagram")
    if count == 0 or index >= count:
        raise MalformedPacket("fragment", f"index {index} of {count}")
    if payload_len > total_len or (count > total_len and count > 1):
        raise MalformedPacket("fragment", f"{count} fragments for {total_len} bytes")
    # A view when the payload is most of the datagram: that saves copying a large
    # fragment twice (here and at reassembly). A small one is copied so that it never
    # pins a 64 KiB datagram: what a fragment holds stays within twice what it is
    # charged for.
    if 2 * payload_len >= len(data):
        # (a read-only view slices to a read-only view: only a writable one is wrapped)
        if type(data) is memoryview and data.readonly:
            payload: bytes | memoryview = data[offset:stop]
        else:
            payload = memoryview(data)[offset:stop].toreadonly()
    else:
        payload = bytes(data[offset:stop])
    # (positional: keywords cost a dict per fragment, one per small message)
    return Fragment(
        seq,
        base,
        msg_id,
        index,
        count,
        total_len,
        msg_type,
        priority,
        mailbox,
        payload,
        for_node,
        nested,
    ), stop
