"""Path MTU discovery for one peer: DPLPMTUD (RFC 8899), sans-I/O.

Theory of operation
-------------------
A datagram larger than the path's MTU is dropped somewhere (the adapters
send with DF set and without the kernel's path MTU cache:
``IP_PMTUDISC_PROBE``), and ICMP "too big" messages are often filtered, so
the packetization layer finds the size itself, as RFC 8899 describes: it
starts at ``BASE_PLPMTU`` (``Config.max_datagram_size``, 1200, which any
path carries) and sends *probes*, PROBE packets padded to a candidate size
that carry no data, so losing one costs no retransmission and no congestion
response. The peer answers each with a PROBE_ACK naming its number. An
answered probe confirms its size: data datagrams grow to it. A probe
unanswered within ``timeout`` (the RTO) counts as lost; ``MAX_PROBES``
losses of one size mark it too big.

The search (state ``SEARCHING``) tries ``Config.pmtu_max`` first (1472, an
Ethernet MTU of 1500 less the IPv4 and UDP headers: the usual answer, found
in one round trip), then halves the interval between the largest size
confirmed and the smallest found too big until it is narrower than
``SEARCH_GRANULARITY``; then ``SEARCH_COMPLETE``. After
``PMTU_RAISE_TIMER`` seconds a complete search starts again (a path may
have grown), lazily: when the session next has something to send, never on
a timer of its own.

Black holes (RFC 8899 section 4.3): a path that shrank under a confirmed
size loses every full-size datagram. The session reports that
(:meth:`PathMtu.on_black_hole`: persistent congestion, several probe
timeouts in a row, while using more than the base size) and the size falls
back to ``BASE_PLPMTU`` at once; the search resumes after
``PMTU_RAISE_TIMER``. A message's fragments are fixed once its first one is
sent (the receiver reassembles by their count); queued messages not yet started
are cut again for the base size (``PeerSession._recut``), as they are for a
larger size when a probe confirms one. A message already started at the
larger size keeps it and, on a path that really shrank, fails
(``PeerUnreachable`` with a ``cause``: see ``PeerSession._fail_cut_too_big``,
which judges that from probe timeouts after the fall while the peer is
still heard, confirmed by probes of the size it needs: :meth:`PathMtu.confirm`).

There is no ERROR state: a path that does not carry ``BASE_PLPMTU`` is an
unreachable peer, as before. ``DISABLED`` is for paths whose size is known
(loopback) or when ``Config.pmtu_max`` is None or not above the base.

This module reads no clock and sends nothing: the session asks
:meth:`PathMtu.next_probe` what to send, hands over answers and timeouts,
and reads :attr:`PathMtu.size`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

__all__ = [
    "MAX_PROBES",
    "PMTU_RAISE_TIMER",
    "SEARCH_GRANULARITY",
    "PathMtu",
    "PmtuState",
    "Probe",
]

#: Losses of one probe size that mark it too big (RFC 8899's MAX_PROBES).
MAX_PROBES = 3
#: Seconds after a completed search (or a black hole) before searching again.
PMTU_RAISE_TIMER = 600.0
#: The search ends when the sizes confirmed and refused are this close (bytes).
SEARCH_GRANULARITY = 16


class PmtuState(enum.Enum):
    """RFC 8899 section 5.2's states, less ERROR (see the module docstring)."""

    DISABLED = "disabled"
    SEARCHING = "searching"
    SEARCH_COMPLETE = "search_complete"


@dataclass(slots=True)
class Probe:
    """One probe in flight."""

    number: int
    size: int  #: the datagram size it tests, in bytes (as ``Config.max_datagram_size``)
    deadline: float  #: when it counts as lost


class PathMtu:
    """The datagram size one peer's path carries, discovered by probing."""

    __slots__ = (
        "base",
        "black_holes",
        "failures",
        "high",
        "low",
        "maximum",
        "next_number",
        "probe",
        "probes_acked",
        "probes_lost",
        "probes_sent",
        "raise_at",
        "size",
        "state",
        "verify",
    )

    def __init__(self, base: int, maximum: int | None) -> None:
        self.base = base
        self.maximum = base if maximum is None else max(base, maximum)
        self.size = base  #: the confirmed size: what data datagrams are filled to
        self.low = base  # largest size confirmed
        self.high = self.maximum + 1  # smallest size found too big (or one past the maximum)
        self.state = PmtuState.SEARCHING if self.maximum > base else PmtuState.DISABLED
        self.probe: Probe | None = None
        self.failures = 0  # consecutive losses of the current candidate
        self.next_number = 0
        self.raise_at: float | None = None
        self.probes_sent = 0
        self.probes_acked = 0
        self.probes_lost = 0
        self.black_holes = 0
        #: A size to confirm before messages cut for it are given up (see :meth:`confirm`).
        self.verify: int | None = None

    def _candidate(self) -> int | None:
        """The next size to try, or None when the search is done."""
        if self.high > self.maximum:
            return self.maximum if self.maximum > self.low else None
        if self.high - self.low <= SEARCH_GRANULARITY:
            return None
        return (self.low + self.high) // 2

    def next_probe(self, now: float, timeout: float) -> Probe | None:
        """The probe to send now (it counts as lost after ``timeout`` seconds), if any."""
        if self.state is PmtuState.DISABLED or self.probe is not None:
            return None
        verify = self.verify
        if verify is not None:  # asked by confirm(): one size, outside the search
            if self.high <= verify or self.low >= verify:
                self.verify = None  # settled meanwhile, either way
            else:
                self.probe = Probe(self.next_number, verify, now + timeout)
                self.next_number = (self.next_number + 1) & 0xFFFFFFFF
                self.probes_sent += 1
                return self.probe
        if self.state is PmtuState.SEARCH_COMPLETE:
            if self.raise_at is None or now < self.raise_at:
                return None
            self._restart_search()
        size = self._candidate()
        if size is None:
            self._complete(now)
            return None
        self.probe = Probe(self.next_number, size, now + timeout)
        self.next_number = (self.next_number + 1) & 0xFFFFFFFF
        self.probes_sent += 1
        return self.probe

    def on_ack(self, number: int, now: float) -> bool:
        """The peer answered probe ``number``; whether :attr:`size` changed.

        An answer to no probe in flight (late, duplicated or forged) changes nothing.
        """
        probe = self.probe
        if probe is None or probe.number != number:
            return False
        self.probe = None
        self.probes_acked += 1
        self.failures = 0
        self.low = max(self.low, probe.size)
        grew = probe.size > self.size
        if grew:
            self.size = probe.size
        if self._candidate() is None:
            self._complete(now)
        return grew

    def confirm(self, size: int) -> bool | None:
        """Whether the path carries ``size``-byte datagrams: True if a probe of that size
        (or larger) was answered, False once ``MAX_PROBES`` of them were lost, None while
        that is unknown; then a probe of ``size`` goes out with the next ones.

        A black hole is inferred from loss, and loss has other causes: a receiver out of
        memory drops full-size data too, while it answers the small datagrams. A probe
        carries no data, so only the path can lose it.
        """
        if self.low >= size:
            self.verify = None
            return True
        if self.high <= size:
            self.verify = None
            return False
        self.verify = size
        return None

    def deadline(self) -> float | None:
        """When :meth:`on_timer` must run: the probe in flight's loss deadline."""
        return None if self.probe is None else self.probe.deadline

    def on_timer(self, now: float) -> None:
        """Count the probe in flight lost if its deadline passed."""
        probe = self.probe
        if probe is None or now < probe.deadline:
            return
        self.probe = None
        self.probes_lost += 1
        self.failures += 1
        if self.failures >= MAX_PROBES:
            self.failures = 0
            self.high = probe.size  # too big
            if self._candidate() is None:
                self._complete(now)

    def on_black_hole(self, now: float) -> bool:
        """Full-size datagrams stopped arriving: back to the base size; whether it shrank."""
        if self.size <= self.base:
            return False
        self.black_holes += 1
        self.size = self.low = self.base
        self.high = self.maximum + 1
        self.probe = None
        self.failures = 0
        self._complete(now)  # and search again after PMTU_RAISE_TIMER
        return True

    def _complete(self, now: float) -> None:
        self.state = PmtuState.SEARCH_COMPLETE
        self.raise_at = now + PMTU_RAISE_TIMER

    def _restart_search(self) -> None:
        self.state = PmtuState.SEARCHING
        self.high = self.maximum + 1
        self.raise_at = None
