"""Round-trip time estimation and the retransmission timeout (RFC 6298).

SRTT and RTTVAR follow RFC 6298 section 2 exactly. Two refinements come from
RFC 9002 section 5: the peer reports how long it held each acknowledgement
(``ack_delay``), which is subtracted when that does not take the sample below
the minimum RTT seen, and the RTO adds the peer's ``max_ack_delay`` so a
delayed ack never looks like a loss. Karn's rule is the caller's job: only
acknowledgements of packets transmitted once are offered as samples.

A sample also records the size of the datagram it timed. On a rate-limited
link the round trip grows with the datagram (its serialisation is part of
it), so the largest datagram timed bounds how long a larger one may take:
:meth:`RttEstimator.serialization_bound`.
"""

from __future__ import annotations

import math

__all__ = ["RttEstimator"]

_ALPHA = 1 / 8
_BETA = 1 / 4


class RttEstimator:
    """SRTT/RTTVAR/RTO for one peer. Times in seconds."""

    __slots__ = (
        "granularity",
        "initial_rto",
        "latest",
        "max_ack_delay",
        "max_rto",
        "min_rto",
        "min_rtt",
        "rttvar",
        "sampled_size",
        "samples",
        "srtt",
    )

    def __init__(
        self,
        *,
        initial_rto: float,
        min_rto: float,
        max_rto: float,
        max_ack_delay: float,
        granularity: float,
    ) -> None:
        self.initial_rto = initial_rto
        self.min_rto = min_rto
        self.max_rto = max_rto
        self.max_ack_delay = max_ack_delay
        self.granularity = granularity
        self.srtt: float | None = None
        self.rttvar = 0.0
        self.min_rtt = float("inf")
        self.latest = 0.0
        self.samples = 0
        self.sampled_size = 0  # bytes of the largest datagram a sample timed

    def on_sample(self, rtt: float, ack_delay: float = 0.0, size: int = 0) -> None:
        """Fold in one measurement: ``rtt`` from send to ack, ``ack_delay`` held by the peer,
        ``size`` the bytes of the datagram timed."""
        if rtt < 0:
            return
        self.samples += 1
        # (compared in place, not with min() and max(): once per acknowledgement)
        if size > self.sampled_size:
            self.sampled_size = size
        self.latest = rtt
        if rtt < self.min_rtt:
            self.min_rtt = rtt
        if ack_delay > self.max_ack_delay:
            ack_delay = self.max_ack_delay
        elif ack_delay < 0.0:
            ack_delay = 0.0
        adjusted = rtt - ack_delay if rtt - ack_delay >= self.min_rtt else rtt
        if self.srtt is None:
            self.srtt = adjusted
            self.rttvar = adjusted / 2
        else:
            self.rttvar = (1 - _BETA) * self.rttvar + _BETA * abs(self.srtt - adjusted)
            self.srtt = (1 - _ALPHA) * self.srtt + _ALPHA * adjusted

    @property
    def rto(self) -> float:
        """Current retransmission timeout, before backoff."""
        if self.srtt is None:
            return min(max(self.initial_rto, self.min_rto), self.max_rto)
        rto = self.srtt + max(self.granularity, 4 * self.rttvar) + self.max_ack_delay
        return min(max(rto, self.min_rto), self.max_rto)

    def serialization_bound(self, size: int) -> float:
        """Longest a ``size``-byte datagram may take to be acknowledged (0: one as large was timed).

        A round trip of ``t`` seconds timed on an ``s``-byte datagram shows that
        the path carries at least ``s / t`` bytes per second, so ``size`` bytes
        are acknowledged within ``t * (1 + size / s)``. On a slow link a round
        trip timed with small datagrams says little about a large one: 64 KiB
        take 65 ms to serialise at 8 Mbit/s, sixty times a tiny packet's round
        trip on loopback. Never more than ``initial_rto``, what a timer waits
        knowing nothing; ``t`` is the smoothed RTT.
        """
        if self.srtt is None or size <= self.sampled_size:
            return 0.0
        if not self.sampled_size:
            return self.initial_rto
        return min(self.srtt * (1 + size / self.sampled_size), self.initial_rto)

    def backed_off(self, count: int) -> float:
        """The RTO doubled ``count`` times (exponential backoff), capped at ``max_rto``."""
        return min(math.ldexp(self.rto, min(count, 30)), self.max_rto)

    def loss_delay(self, threshold: float) -> float:
        """Age after which an unacked packet overtaken by a later ack is lost (RFC 9002 6.1.2).

        ``threshold`` is the RTT multiple: ``K_TIME_THRESHOLD`` (9/8) unless the sender
        widened it after reordering proved its losses spurious.
        """
        base = self.initial_rto if self.srtt is None else max(self.srtt, self.latest)
        return max(base * threshold, self.granularity)
