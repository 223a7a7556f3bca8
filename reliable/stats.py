"""Typed statistics snapshots, as returned by ``Endpoint.stats()`` and ``Node.stats()``."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

__all__ = ["MailboxStats", "NodeStats", "PeerStats"]


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
    shed: int  #: fragments dropped because the node's receive memory was full
    messages_sent: int
    messages_failed: int
    messages_received: int
    bytes_sent: int
    bytes_received: int
    unreachable: bool
    forged_acks: int = 0  #: acknowledgements of sequence numbers never sent (dropped)
    held_bytes: int = 0  #: held here for this peer: reorder buffer, partial message, parked
    os_errors: int = 0  #: reports from the operating system that the peer cannot be reached

    def as_dict(self) -> dict[str, Any]:
        """Every field, for JSON."""
        return asdict(self)


@dataclass(frozen=True, slots=True, kw_only=True)
class MailboxStats:
    """One mailbox, after System V's ``msqid_ds``.

    Times are ages in seconds before the snapshot (so they read the same on
    any host); ``None`` means it never happened.
    """

    name: str
    kind: str  #: "mailbox" or "port" (one receiving owner)
    state: str  #: "open" or "closed" (refusing new messages)
    capacity: int | None  #: most messages queued; 0 is a rendezvous, None unbounded
    max_bytes: int | None  #: most bytes queued; None unbounded
    messages: int  #: queued now (msg_qnum)
    bytes: int  #: queued now (msg_cbytes)
    parked: int  #: arrived while full, held until room appears (blocked senders)
    parked_bytes: int
    high_water: int  #: most messages ever queued at once
    total_in: int  #: messages that entered the mailbox
    total_out: int  #: messages taken by receivers
    deferred: int  #: arrivals that had to park
    refused: int  #: arrivals refused (closed, too large, out of memory)
    discarded: int  #: parked or queued messages dropped by close, delete or cancel
    waiting_receivers: int
    last_send_age: float | None  #: msg_stime
    last_sender: Any  #: msg_lspid: the source of the last arrival
    last_receive_age: float | None  #: msg_rtime
    last_receiver: str | None  #: msg_lrpid: the label of the last receiver
    locked: int = 0  #: taken under a lock, not yet acknowledged (see Mailbox.ack)
    durable: str | None = None  #: the store (its path) of a durable mailbox

    def as_dict(self) -> dict[str, Any]:
        """Every field, for JSON (``rmsg stats --json``)."""
        return asdict(self)


@dataclass(frozen=True, slots=True, kw_only=True)
class NodeStats:
    """The whole node: its incarnation, per-peer figures and node-wide drop counters."""

    incarnation: int
    peers: tuple[PeerStats, ...]
    mailboxes: tuple[MailboxStats, ...] = ()
    dropped: dict[str, int] = field(default_factory=dict)
    datagrams_received: int = 0
    datagrams_sent: int = 0
    send_buffer_bytes: int = 0
    mailbox_bytes: int = 0  #: held in all mailboxes, parked messages included
    mailbox_memory: int = 0  #: the node-wide cap on ``mailbox_bytes``
    receive_bytes: int = 0  #: held in reorder buffers and partial messages, all peers
    receive_memory: int = 0  #: the node-wide cap on ``receive_bytes``
    challenges_sent: int = 0  #: address-validation challenges sent to new addresses
    departed_retransmissions: int = 0  #: of peers no longer listed (closed)
    departed_duplicates: int = 0
    #: sessions forgotten, by reason: "idle", "unreachable", "evicted" (see SessionDropped)
    sessions_dropped: dict[str, int] = field(default_factory=dict)
    #: one dict per open group or anycast service: membership and repair counters
    groups: tuple[dict[str, Any], ...] = ()

    @property
    def retransmissions(self) -> int:
        """Node-wide, peers that have gone included."""
        return self.departed_retransmissions + sum(p.retransmissions for p in self.peers)

    @property
    def duplicates(self) -> int:
        return self.departed_duplicates + sum(p.duplicates for p in self.peers)

    @property
    def corrupt(self) -> int:
        return self.dropped.get("malformed.checksum", 0)

    def mailbox(self, name: str) -> MailboxStats:
        """The stats of mailbox ``name``; raises ``KeyError`` if the node has none."""
        for box in self.mailboxes:
            if box.name == name:
                return box
        raise KeyError(name)

    def as_dict(self) -> dict[str, Any]:
        """Every field, nested records included, for JSON (``rmsg stats --json``)."""
        d = asdict(self)
        d["retransmissions"] = self.retransmissions
        d["duplicates"] = self.duplicates
        d["corrupt"] = self.corrupt
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> NodeStats:
        """Rebuild a snapshot from :meth:`as_dict` output (e.g. a remote node's JSON)."""

        def addr(value: Any) -> Any:
            return tuple(value) if isinstance(value, list) else value

        def known(kind: type, values: dict[str, Any]) -> dict[str, Any]:
            # A newer node may report fields this one does not know: skip them.
            names = {f.name for f in fields(kind)}
            return {k: v for k, v in values.items() if k in names}

        peers = tuple(
            PeerStats(**known(PeerStats, {**p, "address": addr(p["address"])}))
            for p in d.get("peers", ())
        )
        boxes = tuple(
            MailboxStats(**known(MailboxStats, {**m, "last_sender": addr(m.get("last_sender"))}))
            for m in d.get("mailboxes", ())
        )
        names = {f.name for f in fields(cls)} - {"peers", "mailboxes", "groups"}
        return cls(
            peers=peers,
            mailboxes=boxes,
            groups=tuple(d.get("groups", ())),
            **{k: v for k, v in d.items() if k in names},
        )
