"""A scapy layer for rmsg's wire format v1 (``docs/protocol.md``).

Dissects and builds every packet kind, a DATA packet's bundled fragments
included (``bundle``, a list of :class:`BundledFragment`); ``n_sack``, ``n_notice``, the mailbox
and payload lengths, the message length of a single-fragment message and the
CRC-32 trailer are filled in when left as ``None``. Found on any UDP port,
like the Wireshark dissector: a UDP payload no other layer claims is read as
rmsg when its header says so (magic, version 1, a known kind, reserved flag
bits clear); :data:`reliable.wire.DEFAULT_PORT` is also bound in both
directions. Summaries number fragments from 1, as ``rmsg dissect`` does
(``frag_index`` keeps the 0-based wire value).

    >>> from rmsg.scapy_layer import RMSG
    >>> pkt = RMSG(kind="DATA", src_incarnation=7, seq=1, data=b"hi")
    >>> RMSG(bytes(pkt)).data
    b'hi'
"""

from __future__ import annotations

import struct
import zlib
from typing import Any

from scapy.base_classes import BasePacket
from scapy.fields import (
    ByteEnumField,
    ByteField,
    ConditionalField,
    FieldLenField,
    FlagsField,
    IntField,
    PacketListField,
    ShortField,
    SignedIntField,
    StrField,
    StrFixedLenField,
    StrLenField,
    XIntField,
    XLongField,
    XShortField,
)
from scapy.layers.inet import UDP
from scapy.packet import Packet, Raw, bind_layers

from reliable.wire import DEFAULT_PORT, GROUP_KINDS, MAGIC, VERSION, Kind, Verdict

__all__ = ["RMSG", "BundledFragment", "RejectNotice", "SackRange", "looks_like_rmsg"]

_KINDS = {int(k): k.name for k in Kind}
_FIRST_GROUP_KIND = min(GROUP_KINDS)
_REASONS = {int(r): r.name for r in Verdict}


_FLAG_NAMES = [
    "ACK_NOW",
    "ACK",
    "NODE",
    "COOKIE",
    "NESTED",
    *("b5", "b6", "b7"),  # unassigned
    "AUTHENTICATED",
    "ENCRYPTED",
]
_AUTHENTICATED, _ENCRYPTED = 0x0100, 0x0200


def _flags(pkt: Packet) -> int:
    return int(pkt.flags or 0)


def _sealed(pkt: Packet) -> bool:
    return bool(_flags(pkt) & (_AUTHENTICATED | _ENCRYPTED))


def _readable(pkt: Packet) -> bool:
    """The body is in clear: unsealed, or authenticated (signed, not encrypted)."""
    return not _flags(pkt) & _ENCRYPTED


def _is_data(pkt: Packet) -> bool:
    return pkt.kind in (Kind.DATA, Kind.GDATA) and _readable(pkt)


def _is_probe(pkt: Packet) -> bool:
    return pkt.kind in (Kind.PROBE, Kind.PROBE_ACK) and _readable(pkt)


def _is_group(pkt: Packet) -> bool:
    return pkt.kind >= _FIRST_GROUP_KIND and _readable(pkt)


class SackRange(Packet):
    """One selective-ack range, ``[start, end)``."""

    name = "rmsg SACK"
    fields_desc = [IntField("start", 0), IntField("end", 0)]

    def extract_padding(self, s: bytes) -> tuple[bytes, bytes]:
        return b"", s


class RejectNotice(Packet):
    """A receiver's refusal of one message."""

    name = "rmsg notice"
    fields_desc = [IntField("msg_id", 0), ByteEnumField("reason", 1, _REASONS)]

    def extract_padding(self, s: bytes) -> tuple[bytes, bytes]:
        return b"", s


class _SealedField(StrField):
    """An encrypted body: everything up to the 4-byte CRC trailer."""

    def getfield(self, pkt: Packet, s: bytes) -> tuple[bytes, bytes]:
        return s[-4:], s[:-4]


class _PaddingField(StrField):
    """A PROBE's padding: everything up to the tag (sealed) and the CRC trailer."""

    def getfield(self, pkt: Packet, s: bytes) -> tuple[bytes, bytes]:
        tail = 4 + (16 if _sealed(pkt) else 0)
        cut = max(0, len(s) - tail)
        return s[cut:], s[:cut]


class _TotalLenField(IntField):
    """Message length; ``None`` means 'this fragment is the whole message'."""

    def i2m(self, pkt: Packet | None, x: Any) -> int:
        if x is None:
            return len(pkt.data or b"") if pkt is not None else 0
        return int(x)


class BundledFragment(Packet):
    """A further fragment record bundled into a DATA datagram (same layout as the first)."""

    name = "rmsg fragment"
    fields_desc = [
        IntField("seq", 0),
        IntField("base", 0),
        IntField("msg_id", 0),
        IntField("frag_index", 0),
        IntField("frag_count", 1),
        _TotalLenField("total_len", None),
        SignedIntField("msg_type", 0),
        ShortField("priority", 0),
        FieldLenField("mailbox_len", None, length_of="mailbox", fmt="B"),
        StrLenField("mailbox", b"", length_from=lambda p: p.mailbox_len),
        FieldLenField("payload_len", None, length_of="data", fmt="H"),
        StrLenField("data", b"", length_from=lambda p: p.payload_len),
    ]

    def extract_padding(self, s: bytes) -> tuple[bytes, bytes]:
        return b"", s


class _BundleField(PacketListField):
    """The records after the first, up to the tag (sealed) and the CRC trailer."""

    def getfield(self, pkt: Packet, s: bytes) -> tuple[bytes, list[BasePacket]]:
        tail = 4 + (16 if _sealed(pkt) else 0)
        records = PacketListField(
            self.name, [], BundledFragment, length_from=lambda _: max(0, len(s) - tail)
        )
        rest, found = records.getfield(pkt, s)
        return rest, found


class RMSG(Packet):
    """rmsg v1: header, ack section, DATA body (for DATA), CRC-32 trailer.

    Sealed datagrams (authenticated or encrypted modes) add the packet number
    after the header and the 16-byte tag before the CRC; an encrypted body is
    shown as ``sealed`` bytes. Building one leaves the tag to you: a forgery.
    """

    name = "rmsg"
    fields_desc = [
        XShortField("magic", MAGIC),
        ByteField("version", VERSION),
        ByteEnumField("kind", Kind.DATA, _KINDS),
        FlagsField("flags", 0, 16, _FLAG_NAMES),
        ShortField("window", 0),
        XLongField("src_incarnation", 1),
        XLongField("dst_incarnation", 0),
        IntField("ack", 0),
        ShortField("ack_delay", 0),
        FieldLenField("n_sack", None, count_of="sacks", fmt="B"),
        FieldLenField("n_notice", None, count_of="notices", fmt="B"),
        ConditionalField(XLongField("packet_number", 0), _sealed),
        ConditionalField(_SealedField("sealed", b""), lambda p: not _readable(p)),
        ConditionalField(
            StrFixedLenField("cookie", b"\0" * 16, 16),
            lambda p: _readable(p) and bool(_flags(p) & 0x8),
        ),
        ConditionalField(
            PacketListField("sacks", [], SackRange, count_from=lambda p: p.n_sack), _readable
        ),
        ConditionalField(
            PacketListField("notices", [], RejectNotice, count_from=lambda p: p.n_notice),
            _readable,
        ),
        ConditionalField(FieldLenField("group_len", None, length_of="group", fmt="B"), _is_group),
        ConditionalField(StrLenField("group", b"", length_from=lambda p: p.group_len), _is_group),
        ConditionalField(IntField("seq", 0), _is_data),
        ConditionalField(IntField("base", 0), _is_data),
        ConditionalField(IntField("msg_id", 0), _is_data),
        ConditionalField(IntField("frag_index", 0), _is_data),
        ConditionalField(IntField("frag_count", 1), _is_data),
        ConditionalField(_TotalLenField("total_len", None), _is_data),
        ConditionalField(SignedIntField("msg_type", 0), _is_data),
        ConditionalField(ShortField("priority", 0), _is_data),
        ConditionalField(
            FieldLenField("mailbox_len", None, length_of="mailbox", fmt="B"), _is_data
        ),
        ConditionalField(
            StrLenField("mailbox", b"", length_from=lambda p: p.mailbox_len), _is_data
        ),
        ConditionalField(FieldLenField("payload_len", None, length_of="data", fmt="H"), _is_data),
        ConditionalField(StrLenField("data", b"", length_from=lambda p: p.payload_len), _is_data),
        ConditionalField(
            _BundleField("bundle", [], BundledFragment),
            lambda p: p.kind == Kind.DATA and _readable(p),
        ),
        ConditionalField(ByteField("refusal", 1), lambda p: p.kind == Kind.AUTH_FAILED),
        ConditionalField(IntField("probe", 0), _is_probe),
        ConditionalField(_PaddingField("padding", b""), lambda p: p.kind == Kind.PROBE),
        ConditionalField(
            StrFixedLenField("tag", b"\0" * 16, 16), lambda p: _sealed(p) and _readable(p)
        ),
        XIntField("checksum", None),  # sealed or not, a CRC-32 ends every datagram
    ]

    def post_build(self, pkt: bytes, pay: bytes) -> bytes:
        if self.checksum is None:
            body = pkt[:-4]
            pkt = body + struct.pack("!I", zlib.crc32(body))
        return pkt + pay

    def checksum_ok(self) -> bool:
        raw = bytes(self)
        (trailer,) = struct.unpack("!I", raw[-4:])
        return zlib.crc32(raw[:-4]) == int(trailer)

    def mysummary(self) -> str:
        kind = _KINDS.get(self.kind, str(self.kind))
        if self.kind >= _FIRST_GROUP_KIND and _readable(self):
            return self.sprintf(f"rmsg {kind} group=%RMSG.group% ack=%RMSG.ack%")
        if self.kind == Kind.DATA:
            fragment = f"frag={int(self.frag_index) + 1}/%RMSG.frag_count%"  # 1-based
            more = f" +{len(self.bundle)} bundled" if self.bundle else ""
            return self.sprintf(f"rmsg {kind} seq=%RMSG.seq% {fragment}{more} ack=%RMSG.ack%")
        return self.sprintf(f"rmsg {kind} ack=%RMSG.ack% win=%RMSG.window%")


bind_layers(UDP, RMSG, dport=DEFAULT_PORT)
bind_layers(UDP, RMSG, sport=DEFAULT_PORT)

_HEURISTIC = struct.Struct("!HBBH")  # magic, version, kind, flags
_KNOWN_FLAGS = 0x001F | _AUTHENTICATED | _ENCRYPTED
_MIN_SIZE = 36  # header and CRC trailer


def looks_like_rmsg(payload: bytes) -> bool:
    """Whether a UDP payload starts like an rmsg v1 datagram (the heuristic)."""
    if len(payload) < _MIN_SIZE:
        return False
    magic, version, kind, flags = _HEURISTIC.unpack_from(payload)
    return magic == MAGIC and version == VERSION and kind in _KINDS and not flags & ~_KNOWN_FLAGS


_udp_guess_payload_class = UDP.guess_payload_class


def _guess_payload_class(self: UDP, payload: bytes) -> Any:
    """UDP's own guess (port bindings), then rmsg's heuristic for what it left as raw."""
    guessed = _udp_guess_payload_class(self, payload)
    if guessed is Raw and looks_like_rmsg(payload):
        return RMSG
    return guessed


UDP.guess_payload_class = _guess_payload_class  # type: ignore[method-assign,assignment]
