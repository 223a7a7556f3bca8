"""The receiving half of reliable multicast: one member's view of one sender's stream.

Ordering, dedupe, reassembly and bounded buffering are the unicast
receiver's (:class:`~reliable.receiver.ReceiveStream`, sharing the node's
receive memory); what differs in a group is *how a member talks back*,
because every member talking back at once is the classic way to swamp a
multicast sender (ack/NAK implosion):

* **Gaps go to the group, late and once.** A member that sees a gap waits
  a random time in ``[0, nak_delay)`` and then sends one GNAK to the group
  address. Every other member hears it; one whose first gap it covers
  treats it as its own and backs off, so a loss upstream of all members
  costs about one NAK, not one per member. Unanswered NAKs repeat with
  exponential backoff. The sender's GSYNC heartbeat tells members how far
  the stream goes, which reveals losses at its tail.
* **Progress goes to the sender, coalesced.** GACKs (cumulative ack plus
  SACK ranges plus refusal notices) go unicast to the sender when a message
  completes, every few fragments, after a short delay, or when a duplicate
  shows the sender missed an earlier one. Never immediately on a gap: that
  is the NAK's job.
* **Never more out than in.** Each stream keeps a byte credit: what it
  received from the sender, capped. GACKs and NAKs spend it and wait when
  it runs out, so no datagram sent to a group ever draws a bigger answer
  than itself from a member, whoever forged its source address.
"""

from __future__ import annotations

import random

from .config import Config
from .receiver import AckState, Delivery, MemoryBudget, ReceiveStream, Screen
from .wire import MAX_SACK_RANGES, Fragment

__all__ = ["MemberStream"]

_GACK_EVERY = 8  # acknowledge after this many fragments at the latest
_GACK_DELAY = 0.02  # ... or this long after the first unacknowledged one
_CREDIT_CAP = 64 * 1024  # bytes of reply credit a stream may bank
_NAK_RANGES = 16  # gaps one GNAK names at most
_NAK_BACKOFF_MAX = 1.0


class MemberStream:
    """One sender incarnation's group stream, as a member receives it."""

    __slots__ = (
        "_rng",
        "credit",
        "gack_deadline",
        "gack_due",
        "high",
        "incarnation",
        "last_heard",
        "nak_at",
        "nak_delay",
        "nak_interval",
        "naks_sent",
        "naks_suppressed",
        "pending",
        "receive",
    )

    def __init__(
        self,
        incarnation: int,
        config: Config,
        rng: random.Random,
        *,
        screen: Screen | None,
        budget: MemoryBudget,
        now: float,
    ) -> None:
        self.incarnation = incarnation
        self.receive = ReceiveStream(config, screen, budget)
        self._rng = rng
        self.nak_delay = config.nak_delay
        self.nak_interval = config.nak_delay * 4
        self.credit = 0
        self.high: int | None = None  # one past the newest seq known to exist
        self.last_heard = now
        self.nak_at: float | None = None
        self.naks_sent = 0
        self.naks_suppressed = 0
        self.gack_due = False
        self.gack_deadline: float | None = None
        self.pending = 0

    def heard(self, size: int, now: float) -> None:
        """A datagram of ``size`` bytes came from the sender: it earns reply credit."""
        self.credit = min(_CREDIT_CAP, self.credit + size)
        self.last_heard = now

    def on_fragment(self, frag: Fragment, now: float) -> list[Delivery]:
        stream = self.receive
        before = stream.duplicates
        delivered = stream.on_fragment(frag, now, has_room=True, ack_now=False)
        stream.ack_now = False  # a gap is reported by NAK, to the group; see the module doc
        if stream.expected is not None:
            seq = stream.expected if not stream.ranges else stream.ranges[-1][1]
            self.high = seq if self.high is None else max(self.high, seq)
        self.pending += 1
        if delivered or stream.duplicates > before or self.pending >= _GACK_EVERY:
            self.gack_due = True
        elif self.gack_deadline is None:
            self.gack_deadline = now + _GACK_DELAY
        self._schedule_nak(now)
        return delivered

    def on_sync(self, base: int, high: int, now: float) -> list[Delivery]:
        """The sender's heartbeat: it holds ``[base, high)``; below is given up."""
        expected = self.receive.expected
        delivered = self.receive.skip_to(base)
        self.high = high if self.high is None else max(self.high, high)
        if delivered or (expected is not None and base < expected):
            # It still holds what we have: our acknowledgement was lost. Say it again
            # (its retransmissions may be backed off for seconds, or lost as well).
            self.gack_due = True
        self._schedule_nak(now)
        return delivered

    def _schedule_nak(self, now: float) -> None:
        if self.gaps():
            if self.nak_at is None:
                self.nak_at = now + self._rng.uniform(0, self.nak_delay)
        else:
            self.nak_at = None
            self.nak_interval = self.nak_delay * 4

    def gaps(self) -> list[tuple[int, int]]:
        if self.high is None:
            return []
        return self.receive.missing(self.high, _NAK_RANGES)

    def overheard_nak(self, ranges: list[tuple[int, int]], now: float) -> None:
        """Another member reported gaps of this stream: if it named ours, wait for the repair."""
        gaps = self.gaps()
        if gaps and self.nak_at is not None:
            first = gaps[0][0]
            if any(start <= first < end for start, end in ranges):
                self.nak_at = now + self.nak_interval
                self.naks_suppressed += 1

    def nak_due(self, now: float) -> list[tuple[int, int]] | None:
        """The gaps to report now, or None; reschedules the next report with backoff."""
        if self.nak_at is None or now < self.nak_at:
            return None
        gaps = self.gaps()
        if not gaps:
            self.nak_at = None
            return None
        self.nak_at = now + self.nak_interval
        self.nak_interval = min(self.nak_interval * 2, _NAK_BACKOFF_MAX)
        return gaps

    def wants_gack(self, now: float) -> bool:
        return self.gack_due or (self.gack_deadline is not None and now >= self.gack_deadline)

    def gack_sent(self) -> None:
        self.gack_due = False
        self.gack_deadline = None
        self.pending = 0
        self.receive.ack_sent()

    def spend(self, size: int) -> bool:
        """Pay ``size`` bytes of reply credit; False (and nothing spent) if it is short."""
        if size > self.credit:
            return False
        self.credit -= size
        return True

    def deadline(self) -> float | None:
        times = [t for t in (self.nak_at, self.gack_deadline) if t is not None]
        return min(times, default=None)

    def ack_state(self, now: float) -> AckState:
        return self.receive.ack_state(now, MAX_SACK_RANGES // 2)
