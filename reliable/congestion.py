"""Congestion control: NewReno in bytes (RFC 5681, RFC 6582, RFC 9002 section 7).

The window counts bytes, as RFC 9002's does, because a datagram may carry
one large fragment or dozens of small ones bundled: a window in packets
would let a few tiny messages close it. Slow start doubles the window each
round trip until the first loss, then congestion avoidance adds one
``max_datagram`` per round trip. A loss halves the window
once per round trip: losses of packets sent before the current recovery
period began do not reduce it again. A retransmission timeout means the path
may be gone, so the window collapses to ``min_cwnd`` and slow start resumes.

A reduction for losses that prove spurious (the network only reordered) is
taken back (:meth:`NewReno.undo`), as Linux TCP undoes one when duplicate
SACKs show that every retransmission of the recovery was needless (the
Eifel response, RFC 4015).
"""

from __future__ import annotations

__all__ = ["NewReno"]

_LOSS_REDUCTION = 0.5


class NewReno:
    """Congestion window for one peer, counted in bytes."""

    __slots__ = (
        "_cwnd",
        "max_datagram",
        "min_cwnd",
        "prior_cwnd",
        "prior_ssthresh",
        "recovery_start",
        "ssthresh",
        "window",
    )

    def __init__(self, *, initial_cwnd: int, min_cwnd: int, max_datagram: int = 1) -> None:
        """Windows in bytes; ``max_datagram`` is the additive-increase step (1: units)."""
        self._cwnd = float(initial_cwnd)
        #: Bytes that may be in flight: ``int(cwnd)``, kept as a plain attribute because
        #: the sender reads it several times a datagram and it changes only on acks.
        self.window = int(initial_cwnd)
        self.min_cwnd = float(min_cwnd)
        self.max_datagram = max_datagram
        self.ssthresh = float("inf")
        self.recovery_start = float("-inf")
        #: the window and threshold before the current recovery's reduction (0: no
        #: reduction to take back)
        self.prior_cwnd = 0.0
        self.prior_ssthresh = float("inf")

    @property
    def cwnd(self) -> float:
        """The congestion window, in bytes (fractional: congestion avoidance adds parts)."""
        return self._cwnd

    @cwnd.setter
    def cwnd(self, value: float) -> None:
        self._cwnd = value
        self.window = int(value)

    def on_acked(self, nbytes: int, newest_sent_time: float) -> None:
        """``nbytes`` were acknowledged; the newest was sent at ``newest_sent_time``."""
        if newest_sent_time <= self.recovery_start:
            return  # still recovering from a loss: no growth until new data is acked
        cwnd = self._cwnd
        if cwnd < self.ssthresh:
            cwnd += nbytes
        else:
            cwnd += self.max_datagram * nbytes / cwnd
        self._cwnd = cwnd
        self.window = int(cwnd)

    def on_lost(self, newest_lost_sent_time: float, now: float) -> None:
        """Packets were declared lost; the newest of them was sent at ``newest_lost_sent_time``."""
        if newest_lost_sent_time <= self.recovery_start:
            return
        self.recovery_start = now
        self.prior_cwnd = self._cwnd
        self.prior_ssthresh = self.ssthresh
        self.cwnd = max(self.cwnd * _LOSS_REDUCTION, self.min_cwnd)
        self.ssthresh = self.cwnd

    def undo(self) -> None:
        """Every loss the current recovery reduced the window for proved spurious: take
        the reduction back (the recovery period itself stands)."""
        if not self.prior_cwnd:
            return
        if self.prior_cwnd > self._cwnd:
            self.cwnd = self.prior_cwnd
        if self.prior_ssthresh > self.ssthresh:
            self.ssthresh = self.prior_ssthresh
        self.prior_cwnd = 0.0

    def on_timeout(self, now: float) -> None:
        """The retransmission timer fired with nothing acknowledged."""
        self.ssthresh = max(self.cwnd * _LOSS_REDUCTION, self.min_cwnd)
        self.cwnd = self.min_cwnd
        self.recovery_start = now
        self.prior_cwnd = 0.0  # not undone: the path may really be gone
