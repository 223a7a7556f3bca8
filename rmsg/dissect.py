"""``rmsg dissect``: a readable timeline of the rmsg traffic in a pcap file.

scapy reads the capture (any link type it knows, IPv4 or IPv6); every UDP
payload that starts with rmsg's magic is decoded by the library's own
decoder, so a line says exactly what a node would have made of the datagram —
including "MALFORMED (checksum)" for one the link corrupted. A DATA packet
whose (sender incarnation, sequence number) was already seen is marked RETX.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reliable import wire
from reliable.errors import format_address

__all__ = ["TimelineEntry", "dissect_file", "timeline"]

_MAGIC = struct.pack("!H", wire.MAGIC)


@dataclass(frozen=True, slots=True)
class TimelineEntry:
    time: float  #: seconds since the first packet of the capture
    source: tuple[Any, ...]
    destination: tuple[Any, ...]
    packet: wire.Packet | None  #: None when the datagram did not decode (or is encrypted)
    error: str | None
    retransmission: bool
    sealed: str = ""  #: "AUTHENTICATED pn=N" or "ENCRYPTED pn=N" for sealed datagrams

    def as_dict(self) -> dict[str, Any]:
        """The entry as JSON-ready data; fragments numbered from 1, like :meth:`format`."""
        record: dict[str, Any] = {
            "time": self.time,
            "source": format_address(self.source),
            "destination": format_address(self.destination),
            "retransmission": self.retransmission,
        }
        if self.sealed:
            record["sealed"] = self.sealed
        if self.packet is None:
            record["error"] = self.error
            return record
        p = self.packet
        record.update(
            kind=p.kind.name,
            flags=[f.name for f in wire.Flag if f and f.name and p.flags & f],
            src_incarnation=p.src_incarnation,
            dst_incarnation=p.dst_incarnation,
            ack=p.ack,
            window=p.window,
            sacks=[[s, e] for s, e in p.sacks],
            notices=[[m, wire.Verdict(r).name] for m, r in p.notices],
            fragments=[
                {
                    "seq": f.seq,
                    "base": f.base,
                    "msg_id": f.msg_id,
                    "number": f.index + 1,
                    "count": f.count,
                    "length": len(f.payload),
                    "total_len": f.total_len,
                    "mailbox": f.mailbox,
                }
                for f in p.fragments
            ],
        )
        if p.group:
            record["group"] = p.group
        return record

    def format(self) -> str:
        where = f"{format_address(self.source)} > {format_address(self.destination)}"
        head = f"{self.time:10.6f}  {where:<45}"
        if self.packet is None:
            if self.sealed:
                return f"{head} {self.sealed} (body encrypted)"
            return f"{head} MALFORMED ({self.error})"
        p = self.packet
        parts = [self.sealed, p.kind.name] if self.sealed else [p.kind.name]
        if p.fragment is not None:
            f = p.fragment
            parts += [
                f"seq={f.seq}",
                f"base={f.base}",
                f"msg={f.msg_id}",
                f"frag={f.index + 1}/{f.count}",
            ]
            parts.append(f"len={len(f.payload)}/{f.total_len}")
            if f.mailbox:
                parts.append(f"mailbox={f.mailbox!r}")
            if f.for_node:
                parts.append("NODE")
            if p.bundle:
                parts.append(f"+{len(p.bundle)} bundled (seq {p.bundle[-1].seq} last)")
        if p.flags & wire.Flag.ACK:
            parts += [f"ack={p.ack}", f"win={p.window}"]
        if p.sacks:
            parts.append("sack=" + ",".join(f"{s}-{e - 1}" for s, e in p.sacks))
        if p.notices:
            parts.append("verdict=" + ",".join(f"{m}:{wire.Verdict(r).name}" for m, r in p.notices))
        if p.flags & wire.Flag.ACK_NOW:
            parts.append("ACK_NOW")
        if self.retransmission:
            parts.append("RETX")
        return f"{head} " + " ".join(parts)


def timeline(
    records: Iterable[tuple[float, tuple[Any, ...], tuple[Any, ...], bytes]],
) -> Iterator[TimelineEntry]:
    """Decode ``(time, source, destination, udp_payload)`` records into timeline entries."""
    seen: set[tuple[Any, int, int]] = set()
    start: float | None = None
    for when, src, dst, payload in records:
        if not payload.startswith(_MAGIC):
            continue
        if start is None:
            start = when
        sealed = ""
        try:
            flags, pn = _seal_info(payload)
            if flags & wire.Flag.ENCRYPTED:
                kind = wire.Kind(payload[3]).name if payload[3] in _KINDS else str(payload[3])
                note = f"ENCRYPTED pn={pn} {kind}"
                yield TimelineEntry(when - start, src, dst, None, None, False, note)
                continue
            if flags & wire.Flag.AUTHENTICATED:
                # shown, not verified: a dissector has no key (and wants none)
                sealed = f"AUTHENTICATED pn={pn}"
                pkt = wire.decode_body(payload[:32] + payload[40:-20])
            else:
                pkt = wire.decode(payload)
        except (wire.MalformedPacket, ValueError) as exc:
            reason = exc.reason if isinstance(exc, wire.MalformedPacket) else str(exc)
            yield TimelineEntry(when - start, src, dst, None, reason, False)
            continue
        retx = False
        for frag in pkt.fragments:  # a datagram retransmits if any fragment it bundles does
            key = (src, pkt.src_incarnation, frag.seq)
            retx = retx or key in seen
            seen.add(key)
        yield TimelineEntry(when - start, src, dst, pkt, None, retx, sealed)


_KINDS = {int(k) for k in wire.Kind}


def _seal_info(payload: bytes) -> tuple[int, int]:
    """The flags, and the packet number of a sealed datagram (0 if unsealed)."""
    if len(payload) < 40:
        return 0, 0
    (flags,) = struct.unpack_from("!H", payload, 4)
    pn = struct.unpack_from("!Q", payload, 32)[0] if flags & wire.MODE_FLAGS else 0
    return flags, pn


def _udp_records(path: Path) -> Iterator[tuple[float, tuple[Any, ...], tuple[Any, ...], bytes]]:
    try:
        from scapy.layers.inet import IP, UDP
        from scapy.layers.inet6 import IPv6
        from scapy.utils import PcapReader
    except ImportError:  # pragma: no cover - scapy is in the test extra
        raise RuntimeError("rmsg dissect needs scapy: pip install 'rmsg[scapy]'") from None
    with PcapReader(str(path)) as reader:
        for pkt in reader:
            if UDP not in pkt:
                continue
            if IP in pkt:
                ip = pkt[IP]
            elif IPv6 in pkt:
                ip = pkt[IPv6]
            else:
                continue
            udp = pkt[UDP]
            yield (
                float(pkt.time),
                (ip.src, int(udp.sport)),
                (ip.dst, int(udp.dport)),
                bytes(udp.payload),
            )


def dissect_file(path: str | Path) -> Iterator[TimelineEntry]:
    """The rmsg timeline of a pcap file."""
    return timeline(_udp_records(Path(path)))
