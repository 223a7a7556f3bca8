"""Minimal pcap and pcapng writers: UDP datagrams in synthetic IPv4/IPv6 + UDP headers.

:class:`PcapWriter` writes classic libpcap, link type ``LINKTYPE_RAW`` (101:
each record starts with an IP header), microsecond timestamps — readable by
tcpdump, tshark, Wireshark and scapy's ``rdpcap``. :class:`PcapngWriter`
writes pcapng with one interface per *leg* of a relayed conversation and a
comment and a direction flag on each packet (the proxy's ``capture=``: every
datagram once per leg, with its fault decision). Only the standard library is
used, so the proxy can capture without scapy installed. Headers carry real
checksums — except where ``checksum_of`` names the datagram as it was sent:
then the UDP checksum is that datagram's, as the sender's stack computed it,
so a datagram damaged on the way shows as a bad checksum. A datagram whose
two addresses are of different families is written as IPv6 with the IPv4 one
mapped (``::ffff:a.b.c.d``).
"""

from __future__ import annotations

import ipaddress
import struct
import threading
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO, Self

__all__ = ["LINKTYPE_RAW", "PcapWriter", "PcapngWriter", "udp_packet"]

LINKTYPE_RAW = 101
_GLOBAL = struct.Struct("<IHHiIII")
_RECORD = struct.Struct("<IIII")
_MAGIC = 0xA1B2C3D4
_SNAPLEN = 262_144
_UDP = 17


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return int(~total & 0xFFFF)


def udp_packet(
    src: tuple[Any, ...],
    dst: tuple[Any, ...],
    payload: bytes,
    checksum_of: bytes | None = None,
) -> bytes:
    """An IP + UDP packet carrying ``payload`` from ``src`` to ``dst`` (``(host, port)``).

    ``checksum_of``: the same-length payload the UDP checksum is computed over
    instead (what was sent before bits were flipped on the way).
    """
    summed = payload if checksum_of is None or len(checksum_of) != len(payload) else checksum_of
    s_ip = ipaddress.ip_address(src[0])
    d_ip = ipaddress.ip_address(dst[0])
    length = 8 + len(payload)
    if s_ip.version == 4 and d_ip.version == 4:
        pseudo = s_ip.packed + d_ip.packed + struct.pack("!BBH", 0, _UDP, length)
        udp = struct.pack("!HHHH", src[1], dst[1], length, 0) + summed
        csum = _checksum(pseudo + udp) or 0xFFFF
        udp = udp[:6] + struct.pack("!H", csum) + payload
        header = struct.pack(
            "!BBHHHBBH4s4s", 0x45, 0, 20 + length, 0, 0x4000, 64, _UDP, 0, s_ip.packed, d_ip.packed
        )
        header = header[:10] + struct.pack("!H", _checksum(header)) + header[12:]
        return header + udp
    if s_ip.version == 4:
        s_ip = ipaddress.IPv6Address(f"::ffff:{s_ip}")
    if d_ip.version == 4:
        d_ip = ipaddress.IPv6Address(f"::ffff:{d_ip}")
    pseudo = s_ip.packed + d_ip.packed + struct.pack("!I3xB", length, _UDP)
    udp = struct.pack("!HHHH", src[1], dst[1], length, 0) + summed
    csum = _checksum(pseudo + udp) or 0xFFFF
    udp = udp[:6] + struct.pack("!H", csum) + payload
    header = struct.pack("!IHBB16s16s", 6 << 28, length, _UDP, 64, s_ip.packed, d_ip.packed)
    return header + udp


class _CaptureFile:
    """What both capture formats share: a file written under a lock, records
    counted, nothing written once closed; a context manager."""

    def __init__(self, path: str | Path, header: bytes) -> None:
        self.path = Path(path)
        self._file: BinaryIO = open(self.path, "wb")  # noqa: SIM115 - closed by close()
        self._file.write(header)
        self._lock = threading.Lock()
        self.records = 0

    def _append(self, record: bytes) -> None:
        with self._lock:
            if not self._file.closed:
                self._file.write(record)
                self.records += 1

    def close(self) -> None:
        with self._lock:
            if not self._file.closed:
                self._file.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class PcapWriter(_CaptureFile):
    """Appends UDP datagrams to a pcap file; thread-safe; a context manager."""

    def __init__(self, path: str | Path) -> None:
        super().__init__(path, _GLOBAL.pack(_MAGIC, 2, 4, 0, 0, _SNAPLEN, LINKTYPE_RAW))

    def write(
        self,
        when: float,
        src: tuple[Any, ...],
        dst: tuple[Any, ...],
        payload: bytes,
        *,
        checksum_of: bytes | None = None,
    ) -> None:
        """Record ``payload`` sent from ``src`` to ``dst`` at wall-clock time ``when``
        (``checksum_of``: see :func:`udp_packet`)."""
        packet = udp_packet(src, dst, payload, checksum_of)
        seconds = int(when)
        micros = int((when - seconds) * 1_000_000)
        self._append(_RECORD.pack(seconds, micros, len(packet), len(packet)) + packet)


_SHB = 0x0A0D0D0A
_IDB = 0x00000001
_EPB = 0x00000006
_BYTE_ORDER = 0x1A2B3C4D
_OPT_COMMENT = 1
_OPT_IF_NAME = 2
_OPT_EPB_FLAGS = 2
INBOUND, OUTBOUND = 1, 2  #: ``epb_flags`` direction bits: into or out of the interface


def _option(code: int, value: bytes) -> bytes:
    pad = -len(value) % 4
    return struct.pack("<HH", code, len(value)) + value + b"\0" * pad


def _block(kind: int, body: bytes) -> bytes:
    length = 12 + len(body)
    return struct.pack("<II", kind, length) + body + struct.pack("<I", length)


class PcapngWriter(_CaptureFile):
    """Writes UDP datagrams to a pcapng file, one interface per name in ``interfaces``.

    Each packet records its interface, its direction (:data:`INBOUND` or
    :data:`OUTBOUND`) and an optional comment, which Wireshark shows as
    ``frame.comment`` and scapy as ``packet.comment``. Thread-safe; a context manager.
    """

    def __init__(self, path: str | Path, interfaces: tuple[str, ...]) -> None:
        end = _option(0, b"")
        header = _block(_SHB, struct.pack("<IHHq", _BYTE_ORDER, 1, 0, -1) + end)
        for name in interfaces:
            body = struct.pack("<HHI", LINKTYPE_RAW, 0, _SNAPLEN)
            body += _option(_OPT_IF_NAME, name.encode()) + end
            header += _block(_IDB, body)
        super().__init__(path, header)
        self.interfaces = interfaces

    def write(
        self,
        when: float,
        interface: int,
        src: tuple[Any, ...],
        dst: tuple[Any, ...],
        payload: bytes,
        *,
        direction: int = 0,
        comment: str | None = None,
        checksum_of: bytes | None = None,
    ) -> None:
        """Record ``payload`` from ``src`` to ``dst`` on ``interface`` at wall-clock ``when``
        (``checksum_of``: see :func:`udp_packet`)."""
        packet = udp_packet(src, dst, payload, checksum_of)
        micros = round(when * 1_000_000)
        body = struct.pack(
            "<IIIII", interface, micros >> 32, micros & 0xFFFFFFFF, len(packet), len(packet)
        )
        body += packet + b"\0" * (-len(packet) % 4)
        if comment is not None:
            body += _option(_OPT_COMMENT, comment.encode())
        if direction:
            body += _option(_OPT_EPB_FLAGS, struct.pack("<I", direction))
        body += _option(0, b"")
        self._append(_block(_EPB, body))
