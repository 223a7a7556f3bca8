"""Protocol configuration: one frozen dataclass, validated on construction.

Defaults aim at a LAN or loopback first and stay safe on the Internet: the
datagram size fits the IPv6 minimum MTU with room for tunnels, the RTO floor
is low because our receivers bound their own ack delay (``max_ack_delay``,
included in the RTO, is what forces TCP's 200 ms-1 s floors), and every buffer
has a byte cap so no peer can make a node grow without bound.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

from .errors import UsageError
from .wire import FRAGMENT_OVERHEAD, HEADER_OVERHEAD, MAX_NOTICES, MAX_SACK_RANGES

__all__ = ["K_GRANULARITY", "K_PACKET_THRESHOLD", "K_TIME_THRESHOLD", "Config"]

#: Timer granularity assumed by RTO and loss-delay computations (RFC 9002 kGranularity).
K_GRANULARITY = 0.001
#: Packets sent after one that must be acknowledged before it is declared lost (RFC 9002).
K_PACKET_THRESHOLD = 3
#: RTT multiple after which an unacknowledged packet is declared lost (RFC 9002).
K_TIME_THRESHOLD = 9 / 8

# Room for the largest header, a full ack section, a 255-byte mailbox name and some payload.
_MIN_DATAGRAM = (
    HEADER_OVERHEAD + FRAGMENT_OVERHEAD + 255 + 8 * MAX_SACK_RANGES + 5 * MAX_NOTICES + 64
)


_MAY_BE_ZERO = frozenset({"inbox_capacity", "reply_ack_delay"})  # 0: a rendezvous; at once
#: The choices of ``Config.os_errors``.
OS_ERROR_POLICIES = ("fail", "ignore")


@dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    """Tunables of one node. All durations are in seconds, all sizes in bytes."""

    max_datagram_size: int = 1200
    """Largest UDP payload the node sends. 1200 is safe on any path (QUIC's
    choice); raise it on a known LAN for fewer, larger datagrams."""
    loopback_datagram_size: int | None = 65000
    """Largest UDP payload sent to a peer at a loopback address (127.0.0.0/8,
    ::1), whose path carries 64 KiB datagrams whole. ``None`` uses
    ``max_datagram_size`` there too."""
    pmtu_max: int | None = 1472
    """Largest datagram path MTU discovery probes for (reliable/pmtud.py, RFC 8899)
    on paths that are not loopback: datagrams start at ``max_datagram_size`` and
    grow to what probes confirm. 1472 is an Ethernet MTU less the IPv4 and UDP
    headers; raise it for jumbo frames. ``None`` (or a value not above
    ``max_datagram_size``) keeps datagrams at ``max_datagram_size``."""
    max_message_size: int = 16 * 1024 * 1024
    """Largest message accepted by ``send`` and by the receiver's reassembly."""

    max_window: int = 4096
    """Most packets a receiver buffers beyond its cumulative ack (advertised cap)."""

    receive_backlog: int = 32 * 1024 * 1024
    """Bytes per peer parked here (arrived while their mailbox was full) before
    the advertised window closes: the transport's end-to-end back-pressure."""

    inbox_capacity: int | None = None
    """Messages the default mailbox ("") holds; None for no count limit."""

    inbox_bytes: int | None = 32 * 1024 * 1024
    """Bytes the default mailbox holds before arrivals wait for room
    (back-pressuring their senders); None for no byte limit."""

    receive_memory: int = 64 * 1024 * 1024
    """Bytes all peers' reorder buffers and partial messages may hold together.
    Past it, fragments that would wait are dropped (and retransmitted later);
    in-order single-datagram messages still pass, so established peers keep going."""

    mailbox_memory: int = 256 * 1024 * 1024
    """Bytes all mailboxes together may hold, parked messages included.
    Arrivals beyond it are refused, and their senders told why."""

    serve_stats: bool = True
    """Answer other nodes' statistics queries (``rmsg stats HOST:PORT``)."""

    validate_addresses: bool = True
    """Keep no state for a new peer until it echoes a cookie sent to its address
    (one extra round trip on first contact; spoofed sources never get state)."""

    max_challenges_per_second: int = 10_000
    """Cookie challenges a node sends per second at most, to all addresses together."""

    send_buffer: int = 64 * 1024 * 1024
    """Bytes of accepted, unacknowledged messages the node holds across peers."""

    initial_rto: float = 1.0
    """Retransmission timeout before any RTT sample (RFC 6298 section 2.1)."""

    min_rto: float = 0.01
    """Floor of the retransmission (probe) timeout. Low, because an expiry only
    probes with one or two packets; the window shrinks on persistent silence.
    The first probe, a tail loss probe at two smoothed RTTs, may fire sooner
    once an acknowledgement of data has timed the path (docs/protocol.md)."""

    max_rto: float = 10.0
    """Ceiling of the retransmission timeout, exponential backoff included."""

    max_ack_delay: float = 0.005
    """Longest a receiver holds an acknowledgement hoping to coalesce it."""

    reply_ack_delay: float = 0.001
    """Longest an acknowledgement the sender asked for at once waits for a reply to
    carry it, when its message went straight to a waiting receiver and we sent that
    peer data within the last second (request/reply: the reply leaves in
    microseconds, with the ack on it; a one-way stream is acked at once). Without a
    reply, the ack leaves alone this much later; 0 acknowledges at once."""

    ack_every: int = 2
    """Acknowledge at once after this many unacknowledged in-order packets."""

    initial_cwnd: int = 10
    """Initial congestion window, in packets (RFC 6928)."""

    min_cwnd: int = 2
    """Congestion window floor, in packets."""

    initial_peer_window: int = 256
    """Receive window assumed for a peer before its first acknowledgement."""

    peer_timeout: float = 5.0
    """Silence, while waiting on a peer, after which it is declared unreachable."""

    max_probe_interval: float = 1.0
    """Longest gap between liveness probes of a silent peer we are waiting on."""

    os_errors: str = "fail"
    """What the node does when the operating system says a peer we wait on
    cannot be reached: an ICMP port, host or network unreachable for a datagram
    we sent (read from the socket's error queue, on Linux), or a send refused
    at once for want of a route. ``"fail"`` fails the peer's pending messages
    there and then with ``PeerUnreachable`` naming the OS's reason; ``"ignore"``
    rides such errors out, and the peer fails only after ``peer_timeout`` of
    silence. Even with ``"fail"``, a peer we have heard from fails on a report
    only if it is a port or protocol unreachable and we have waited a
    retransmission timeout without an answer; network and host unreachables
    (routing, which may recover) fail only a peer never heard from. See
    docs/security.md on forged ICMP."""

    wait_for_peer: bool = False
    """Let sends wait for a peer that has not started yet, as ZeroMQ does, so
    either side may start first. While a peer has never been heard from, its
    silence and the operating system's refusals (a closed port) are ridden
    out: a send waits until the peer answers or its own ``timeout`` passes
    (without one, until it answers). Off: a new peer is held to
    ``peer_timeout`` and a refusal fails the send at once. A peer once heard
    from is held to ``peer_timeout`` either way."""

    max_peers: int = 4096
    """Most peers a node keeps state for. When it is reached, a new peer (once
    its address is validated) takes the place of the least recently heard idle
    session; only when no session is idle is it dropped (``peer_limit``)."""

    idle_timeout: float = 30.0
    """Silence after which an idle session (nothing to send, nothing held for
    the peer, nobody waiting on it) is dropped, as QUIC's idle timeout. A
    peer heard from again resumes where it was (one validation round trip).
    A session that holds receive or mailbox memory for its peer is checked
    like one with messages in flight: probed, and dropped with what it held
    after ``peer_timeout`` of silence."""

    peer_receive_memory: int | None = None
    """Bytes of ``receive_memory`` one peer may hold (reorder buffer and partial
    message). ``None``: a fair share, a quarter of ``receive_memory`` but at
    least ``max_message_size``, so one peer can always send a message of the
    largest size and no single peer can take everything."""

    remembered_sessions: int = 16384
    """Dropped sessions whose sequence numbers are remembered, so that a peer
    heard from again after its session was dropped resumes exactly where it
    was: nothing delivered twice, nothing sent into a stale window."""

    remembered_incarnations: int = 1024
    """Ended peer incarnations remembered so their late datagrams are rejected."""

    group_window: int = 128
    """Group-message fragments a sender keeps in flight to a group before waiting for
    its slowest expected member to acknowledge (group flow control)."""

    group_timeout: float = 10.0
    """Default time a group send waits for each expected member to acknowledge;
    the receipt lists members that did not as missing."""

    announce_interval: float = 1.0
    """Seconds between a group member's JOIN (and a service's ANNOUNCE) heartbeats.
    Members and services silent for ``peer_timeout`` are dropped."""

    nak_delay: float = 0.02
    """Upper bound of the random delay before a member reports a gap to its group;
    a report heard from another member meanwhile suppresses its own."""

    multicast_ttl: int = 1
    """IP TTL of multicast datagrams; the adapters refuse more than 1 on loopback."""

    @property
    def peer_receive_share(self) -> int:
        """The receive memory one peer may hold: ``peer_receive_memory`` or its default."""
        if self.peer_receive_memory is not None:
            return self.peer_receive_memory
        return max(self.max_message_size, self.receive_memory // 4)

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None or isinstance(value, (bool, str)):
                continue
            if isinstance(value, float) and not math.isfinite(value):
                raise UsageError(f"Config.{f.name} must be finite, got {value}")
            if f.name in _MAY_BE_ZERO:
                if value < 0:
                    raise UsageError(f"Config.{f.name} must be >= 0 or None, got {value}")
            elif value <= 0:
                raise UsageError(f"Config.{f.name} must be positive, got {value}")
        if self.os_errors not in OS_ERROR_POLICIES:
            raise UsageError(
                f"Config.os_errors must be one of {', '.join(map(repr, OS_ERROR_POLICIES))}, "
                f"got {self.os_errors!r}"
            )
        if not _MIN_DATAGRAM <= self.max_datagram_size <= 65507:
            raise UsageError(
                f"Config.max_datagram_size must be between {_MIN_DATAGRAM} and 65507 "
                f"(the largest UDP payload), got {self.max_datagram_size}"
            )
        loopback = self.loopback_datagram_size
        if loopback is not None and not _MIN_DATAGRAM <= loopback <= 65507:
            raise UsageError(
                f"Config.loopback_datagram_size must be between {_MIN_DATAGRAM} and 65507 "
                f"(the largest UDP payload) or None, got {loopback}"
            )
        pmtu_max = self.pmtu_max
        if pmtu_max is not None and not _MIN_DATAGRAM <= pmtu_max <= 65507:
            raise UsageError(
                f"Config.pmtu_max must be between {_MIN_DATAGRAM} and 65507 "
                f"(the largest UDP payload) or None, got {pmtu_max}"
            )
        if self.max_window > 0xFFFF:
            raise UsageError(f"Config.max_window must be at most 65535, got {self.max_window}")
        if self.min_rto > self.max_rto:
            raise UsageError("Config.min_rto must not exceed Config.max_rto")
        if self.min_cwnd > self.initial_cwnd:
            raise UsageError("Config.min_cwnd must not exceed Config.initial_cwnd")
        share = self.peer_receive_memory
        if share is not None and not self.max_message_size <= share <= self.receive_memory:
            raise UsageError(
                "Config.peer_receive_memory must hold a message of max_message_size "
                f"({self.max_message_size}) and fit in receive_memory ({self.receive_memory}), "
                f"got {share}"
            )
        if self.receive_memory < self.max_message_size:
            raise UsageError(
                "Config.receive_memory must hold at least one message of max_message_size "
                f"({self.max_message_size} bytes), got {self.receive_memory}"
            )
        if self.send_buffer < self.max_message_size:
            raise UsageError(
                "Config.send_buffer must hold at least one message of max_message_size "
                f"({self.max_message_size} bytes), got {self.send_buffer}"
            )
