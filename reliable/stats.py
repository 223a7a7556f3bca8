"""Typed statistics snapshots, as returned by ``Endpoint.stats()`` and ``Node.stats()``."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["NodeStats", "PeerStats"]


@dataclass(frozen=True, slots=True, kw_only=True)
class PeerStats:
    """One peer as this node sees it. Times in seconds; ``None`` before any RTT sample."""

    address: Any
    incarnation: int | None
    srtt: float | None
    rttvar: float
    rto: float
    min_rtt: float | None
    cwnd: int
    peer_window: int
    in_flight: int
    queued_messages: int
    packets_sent: int
    retransmissions: int
    packets_received: int
    duplicates: int
    corrupt: int
    messages_sent: int
    messages_failed: int
    messages_received: int
    bytes_sent: int
    bytes_received: int
    unreachable: bool

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, slots=True, kw_only=True)
class NodeStats:
    """The whole node: its incarnation, per-peer figures and node-wide drop counters."""

    incarnation: int
    peers: tuple[PeerStats, ...]
    dropped: dict[str, int] = field(default_factory=dict)
    datagrams_received: int = 0
    datagrams_sent: int = 0
    send_buffer_bytes: int = 0

    @property
    def retransmissions(self) -> int:
        return sum(p.retransmissions for p in self.peers)

    @property
    def duplicates(self) -> int:
        return sum(p.duplicates for p in self.peers)

    @property
    def corrupt(self) -> int:
        return self.dropped.get("malformed.checksum", 0)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["retransmissions"] = self.retransmissions
        d["duplicates"] = self.duplicates
        d["corrupt"] = self.corrupt
        return d
