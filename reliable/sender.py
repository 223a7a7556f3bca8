"""The sending half of a peer session: sequencing, loss detection, retransmission.

Theory of operation
-------------------
Messages wait in ``queue`` until the windows allow their fragments out.
Node messages (node to node, see :mod:`reliable.node_messages`) wait in
``node_messages`` and go first, between two messages, and past the peer's flow
control window: they are small, never held by the receiver, and one of them
withdraws messages that are holding that window closed. A
fragment gets its sequence number when it is first transmitted, so messages
abandoned before that never consume sequence space, and a message's fragments
occupy increasing numbers (the receiver reassembles by walking them in
order). A retransmission reuses the sequence number, as in TCP.

Priority. The queue keeps send order; which message's fragment goes next is
chosen by priority (higher first, send order within a priority), at
fragment granularity but with one restriction the receiver's single
reassembly slot imposes: at most one multi-datagram message is in progress
(``current``), and only a message that fits in one datagram may *nest*
inside it, taking a sequence number between two of its fragments. So a
priority-65535 message that fits one datagram overtakes the rest of a
lower-priority 1 MiB message at once; a larger one overtakes every message
not yet started and begins when the one in progress ends. A message never
overtakes an older one of its own priority, so a one-datagram message does
not nest while an older message of its priority waits for the one in
progress to end. Nested fragments
carry :attr:`~reliable.wire.Flag.NESTED`, which receivers before it refuse
as malformed (loudly, never a silent misdelivery). Against starvation, a
weighted share: after ``PRIORITY_SHARE - 1`` application fragments of
other messages, the oldest queued message sends the next fragment (or, if
it cannot nest, goes next once the message in progress ends). With every
queued message at one priority, selection is the plain FIFO of before.

Every transmission also gets a ``tx`` number, strictly increasing. Loss
detection works in transmission order, RACK-style (RFC 8985, with RFC 9002's
thresholds): a packet in flight is lost when one sent at least
``K_PACKET_THRESHOLD`` datagrams later was acknowledged (fragments bundled
in one datagram are reordered together, so the threshold counts datagrams), or when it is
older than ``9/8 * RTT`` and a later transmission was acknowledged. Working in
transmission order rather than sequence order is what lets a retransmitted
packet be judged by its new transmission, not its old sequence position.

Invariants:

* ``unacked`` holds, in sequence order, every transmitted packet that is
  neither acknowledged (cumulatively or selectively) nor abandoned. Its first
  key is the *base* every DATA packet carries; the receiver may discard
  anything below it.
* ``flight`` holds, in transmission order, the packets of ``unacked`` that are
  in the network (not yet declared lost). Its size in bytes is bounded by
  the congestion window; new sequence numbers are bounded by the peer's
  cumulative ack plus its advertised window (flow control).
* A message is *delivered* only when the cumulative ack passes its last
  fragment, never on selective acks alone: a receiver that refuses a message
  includes the refusal in every ack from the moment the cumulative ack reaches
  it, so a refusal can never be overtaken by the ack that would complete it.
* The retransmission timer (RFC 6298's RTO, used as RFC 9002's probe
  timeout) runs from the last transmission or the last acknowledgement of
  anything, whichever is later, and backs off exponentially while nothing
  is acknowledged. The first wait is a tail loss probe, about two smoothed
  RTTs (see ``_probe_delay`` for its floor and how it avoids spurious probes).
  On expiry it
  *probes*: the oldest packets in flight are retransmitted at once, each in a
  datagram of its own, even past
  the congestion window, without shrinking it — a lost tail packet is the
  usual cause and deserves no congestion response. The RTO after a tail loss
  probe is not doubled (RFC 8985 7.3); later ones are. Only
  ``PERSISTENT_CONGESTION_PROBES`` consecutive expiries collapse the window
  (RFC 9002 section 7.6's persistent congestion).

A message's fate. Each :class:`OutgoingMessage` carries one
:class:`~reliable.fate.Fate`, changed only through the table in
:mod:`reliable.fate` (``OutgoingMessage.step``); an illegal (state, input)
pair raises. The stream itself only queues, numbers, retransmits and lets
go of messages (``on_ack`` completing them, ``abandon``); the session turns
that, the receiver's verdicts and the deadlines into inputs::

    SENDING ──ACKED──► DELIVERED          SENDING ──DEFER──► PARKED ──ADMIT──► DELIVERED
       │  └─REFUSE / TIMEOUT / LOST / WITHDRAW──► REFUSED / TIMED_OUT / LOST / CANCELLED
       └─CANCEL (wholly sent)─► CANCEL_PENDING ──DEFER──► RECLAIMING_CANCELLED
    PARKED ──TIMEOUT──► RECLAIMING ──RECLAIMED──► TIMED_OUT   (a Cancel went to the peer)

The terminal states have no way out: each send reaches exactly one, and
its outcome event is emitted then. The full table is in :mod:`reliable.fate`.

Timing a slow link. On a rate-limited link a round trip includes the
datagram's serialisation and the queue ahead of it: 64 KiB take 65 ms at
8 Mbit/s, while the round trip first timed (a tiny packet, the cookie
exchange) may be 1 ms. A probe that trusts the tiny round trip fires before
the first acknowledgement can return; the probe makes that acknowledgement
ambiguous, so no sample corrects the estimate, and the next probe fires
too: 1 MiB once took 6.8 s and 152 transmissions of 17 fragments. Three
rules keep the timer honest, none needing a rate estimate:

* a sample of ``t`` seconds on an ``s``-byte datagram proves the path
  carries ``s / t`` bytes per second, so a larger datagram at the head of
  the flight gets ``t * (1 + size / s)`` before a probe
  (:meth:`RttEstimator.serialization_bound`), and so do the bytes the peer
  dropped unread ahead of a resent first flight;
* the timer restarts on every acknowledgement (RFC 6298 5.3): a queue that
  drains one datagram at a time keeps it from firing;
* the tail loss probe waits at least the latest RTT, which the smoothed one
  lags while the queue grows.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
from collections import deque
from dataclasses import dataclass, field

from .config import K_GRANULARITY, K_PACKET_THRESHOLD, K_TIME_THRESHOLD, Config
from .congestion import NewReno
from .fate import DELIVERED_ON_ACK, TERMINAL, Fate, FateInput, advance
from .rtt import RttEstimator
from .wire import (
    FRAGMENT_OVERHEAD,
    HEADER_OVERHEAD,
    RECORD_HEAD,
    Flag,
    pack_record,
    record_size,
    unwrap,
)

__all__ = ["OutgoingMessage", "SendStream", "SentPacket"]

#: The packet threshold once the path has reordered: none (detection by time alone,
#: as RFC 8985 does once it has seen reordering), until the widening decays away.
#: Far beyond any flight (the receive window is at most thousands of packets), and a
#: short int for the compiled core.
_TIME_ONLY = 1 << 30
#: Most a proven-spurious loss history may stretch the time threshold (in RTTs).
_MAX_TIME_THRESHOLD = 4.0
#: Loss recoveries in a row with no spurious loss after which widened loss thresholds
#: return to RFC 9002's (RFC 8985 section 6.2 resets its reordering window after 16).
CALM_RECOVERIES = 16
#: Packets retransmitted when the probe timer fires (RFC 9002 sends one or two).
PROBE_PACKETS = 2
#: Consecutive probe timeouts that mean the path is congested or gone.
PERSISTENT_CONGESTION_PROBES = 3
#: The least a tail loss probe waits at first (seconds): two timer granularities, as
#: Linux adds two jiffies to its 2 x SRTT. Each probe proven spurious doubles it, up to
#: ``Config.min_rto``.
PROBE_FLOOR = 2 * K_GRANULARITY
# 32-bit serial arithmetic (wire.unwrap), inline on the per-acknowledgement path
_SERIAL_MOD = 1 << 32
_SERIAL_HALF = 1 << 31
_SERIAL_MASK = _SERIAL_MOD - 1
#: Of every this many application fragments, at least one belongs to the oldest queued
#: message (the weighted share that keeps priority from starving it).
PRIORITY_SHARE = 8
_NODE = int(Flag.NODE)
_NESTED = int(Flag.NESTED)
_pack_record_head = RECORD_HEAD.pack  # (wire.pack_record, default mailbox: see _next_fragment)


@dataclass(slots=True, eq=False)
class OutgoingMessage:
    """A message accepted by ``send`` and not yet delivered or failed."""

    ticket: int
    data: bytes
    msg_type: int
    priority: int
    mailbox: str
    created: float
    deadline: float | None
    timeout: float | None
    fragment_size: int
    count: int
    msg_id: int = -1  #: assigned at first transmission
    first_seq: int = -1  #: assigned at first transmission
    last_seq: int = -1  #: sequence number of its latest fragment sent for the first time
    next_index: int = 0  #: next fragment to transmit for the first time
    transmissions: int = 0
    for_node: bool = False  #: a node message, invisible to the application
    #: where it stands: changed only by :meth:`step` (see :mod:`reliable.fate`)
    fate: Fate = Fate.SENDING
    staged: bool = False  #: parked while a durable mailbox commits it (it had room)
    mailbox_bytes: int = field(init=False, default=0)  #: the mailbox name's UTF-8 length
    mailbox_raw: bytes = field(init=False, default=b"")  #: the mailbox name in UTF-8
    #: a view of ``data``, made at its first slice: fragments are cut from it without copies
    view: memoryview | None = field(init=False, default=None)

    # Written out, not generated: a dataclass's generated __init__ stays interpreted
    # code in the compiled core (about 5x the cost per object there). Same
    # signature and defaults as the generated one.
    def __init__(
        self,
        ticket: int,
        data: bytes,
        msg_type: int,
        priority: int,
        mailbox: str,
        created: float,
        deadline: float | None,
        timeout: float | None,
        fragment_size: int,
        count: int,
        msg_id: int = -1,
        first_seq: int = -1,
        last_seq: int = -1,
        next_index: int = 0,
        transmissions: int = 0,
        for_node: bool = False,
        fate: Fate = Fate.SENDING,
        staged: bool = False,
    ) -> None:
        self.ticket = ticket
        self.data = data
        self.msg_type = msg_type
        self.priority = priority
        self.mailbox = mailbox
        self.created = created
        self.deadline = deadline
        self.timeout = timeout
        self.fragment_size = fragment_size
        self.count = count
        self.msg_id = msg_id
        self.first_seq = first_seq
        self.last_seq = last_seq
        self.next_index = next_index
        self.transmissions = transmissions
        self.for_node = for_node
        self.fate = fate
        self.staged = staged
        if mailbox:
            self.mailbox_raw = mailbox.encode("utf-8")
            self.mailbox_bytes = len(self.mailbox_raw)
        else:  # the default mailbox (most messages): nothing to encode
            self.mailbox_raw = b""
            self.mailbox_bytes = 0
        self.view = None

    def record_bytes(self, index: int) -> int:
        """Bytes fragment ``index`` takes in a DATA body."""
        start = index * self.fragment_size
        payload = max(0, min(self.fragment_size, len(self.data) - start))
        return record_size(self.mailbox_bytes, payload)

    def step(self, event: FateInput) -> Fate:
        """Move its fate on by ``event`` (raises ``FateError`` on an illegal pair)."""
        self.fate = advance(self.fate, event)
        return self.fate

    @property
    def settled(self) -> bool:
        """Whether it reached its fate (and so had its outcome reported)."""
        return self.fate in TERMINAL

    @property
    def started(self) -> bool:
        """Whether any fragment has been transmitted (and so may have been received)."""
        return self.next_index > 0

    @property
    def fully_sent(self) -> bool:
        """Whether its last fragment was transmitted: until then it cannot be delivered
        (the receiver discards a partial message once the sender's base passes it)."""
        return self.next_index >= self.count

    def fragment_payload(self, index: int) -> bytes | memoryview:
        """A view, not a copy: the datagram's encoding copies it once."""
        start = index * self.fragment_size
        view = self.view
        if view is None:
            view = self.view = memoryview(self.data)
        return view[start : start + self.fragment_size]


@dataclass(slots=True, eq=False)
class SentPacket:
    """One transmitted fragment awaiting acknowledgement."""

    seq: int
    message: OutgoingMessage
    index: int
    size: int  #: record bytes: what it counts against the congestion window
    tx: int = 0
    datagram: int = 0  #: the datagram it went out in (its fragments share the number)
    datagram_size: int = 0  #: that datagram's bytes: header and records (not ack state, sealing)
    sent_time: float = 0.0
    retransmitted: bool = False
    lost: bool = False
    #: dropped unread by a peer that first validated our address (resend_now): its resend
    #: is part of first contact, not a retransmission, and is not counted as one
    unread: bool = False
    #: a one-datagram message sent between two fragments of another (Flag.NESTED)
    nested: bool = False

    # Written out, not generated: a dataclass's generated __init__ stays interpreted
    # code in the compiled core (about 5x the cost per object there). Same
    # signature and defaults as the generated one.
    def __init__(
        self,
        seq: int,
        message: OutgoingMessage,
        index: int,
        size: int,
        tx: int = 0,
        datagram: int = 0,
        datagram_size: int = 0,
        sent_time: float = 0.0,
        retransmitted: bool = False,
        lost: bool = False,
        unread: bool = False,
        nested: bool = False,
    ) -> None:
        self.seq = seq
        self.message = message
        self.index = index
        self.size = size
        self.tx = tx
        self.datagram = datagram
        self.datagram_size = datagram_size
        self.sent_time = sent_time
        self.retransmitted = retransmitted
        self.lost = lost
        self.unread = unread
        self.nested = nested


@dataclass(slots=True)
class AckOutcome:
    """What one acknowledgement did."""

    newly_acked: int = 0
    completed: list[OutgoingMessage] = field(default_factory=list)
    bogus: bool = False  #: it acknowledged sequence numbers never sent


#: What an acknowledgement that completes nothing returns (two of a round trip's four
#: packets): shared, so never changed; on_ack builds its own for any other.
_NO_NEWS = AckOutcome()


class SendStream:
    """Sender state for one peer incarnation."""

    __slots__ = (
        "backoff",
        "by_msg_id",
        "calm_recoveries",
        "cc",
        "cum_ack",
        "current",
        "cwnd_limited",
        "data_timed",
        "datagrams_sent",
        "dropped_ahead",
        "flight",
        "in_flight_bytes",
        "initial_peer_window",
        "largest_acked_datagram",
        "largest_acked_tx",
        "last_ack_time",
        "last_send_time",
        "levels",
        "loss_time",
        "lost",
        "low",
        "next_msg_id",
        "next_seq",
        "node_messages",
        "packets_sent",
        "passed",
        "peer_edge",
        "peer_window",
        "probe_allowance",
        "probe_base",
        "probe_floor",
        "probe_pending",
        "probe_time",
        "probed",
        "probes",
        "queue",
        "reorder_threshold",
        "retransmissions",
        "rtt",
        "spurious",
        "suspects",
        "time_threshold",
        "tx_counter",
        "unacked",
        "widen_tx",
    )

    def __init__(
        self,
        config: Config,
        rtt: RttEstimator,
        cc: NewReno,
        initial_seq: int,
        first_msg_id: int = 0,
    ) -> None:
        self.rtt = rtt
        self.cc = cc
        self.next_seq = initial_seq
        self.cum_ack = initial_seq
        self.next_msg_id = first_msg_id
        self.initial_peer_window = config.initial_peer_window
        self.peer_window = config.initial_peer_window
        self.peer_edge = initial_seq  # one past the highest sequence number the peer holds
        self.queue: deque[OutgoingMessage] = deque()
        self.node_messages: deque[OutgoingMessage] = deque()
        #: the application message whose fragments are being sent (started, not fully sent)
        self.current: OutgoingMessage | None = None
        self.levels: dict[int, int] = {}  # priority -> application messages queued at it
        self.passed = 0  # application fragments sent since the oldest queued one last sent
        self.unacked: dict[int, SentPacket] = {}
        #: no key of ``unacked`` is below it: where the search for the base starts. A dict
        #: emptied from the front keeps its deleted slots until it is resized, and iterating
        #: it (``next(iter(unacked))``) walks them all: microseconds a datagram in a bulk
        #: transfer, where thousands of packets are in flight.
        self.low = initial_seq
        self.flight: dict[int, SentPacket] = {}
        self.in_flight_bytes = 0  # sizes of the packets in flight
        self.dropped_ahead = 0  # bytes the peer dropped unread, still crossing before the flight
        self.lost: list[int] = []
        self.by_msg_id: dict[int, OutgoingMessage] = {}
        self.tx_counter = 0
        self.largest_acked_tx = -1
        self.datagrams_sent = 0  # numbers the datagrams fragments leave in
        self.largest_acked_datagram = -1
        self.loss_time: float | None = None
        self.last_send_time = 0.0
        self.last_ack_time = 0.0  # when an acknowledgement last acknowledged anything
        self.backoff = 0
        self.packets_sent = 0
        self.retransmissions = 0
        self.cwnd_limited = False
        self.probe_allowance = 0
        self.probe_time = float("-inf")  # when the retransmission timer last probed
        self.probes = 0  # probe timeouts that fired (tail loss probes and RTOs)
        self.probed: set[int] = set()  # sequence numbers the last probe declared lost
        self.probe_pending = 0  # of those, how many still leave, one per datagram
        self.probe_base = 0  # 1 if the first probe of this series was a tail loss probe
        self.probe_floor = PROBE_FLOOR  # the least a tail loss probe waits; spurious ones raise it
        self.data_timed = False  # an ack of data timed the path (not only the CHALLENGE)
        self.reorder_threshold = K_PACKET_THRESHOLD
        self.time_threshold = K_TIME_THRESHOLD
        self.spurious = 0
        #: the thresholds widen at most once per flight: again only for a packet sent at
        #: or after this transmission (the next one when they last widened)
        self.widen_tx = 0
        self.calm_recoveries = 0  # loss recoveries since the thresholds last widened
        #: sequence numbers declared lost in the current recovery and neither proven
        #: spurious nor retransmitted-and-acknowledged: when the last of them proves
        #: spurious, the recovery's window reduction is undone
        self.suspects: set[int] = set()

    # ----------------------------------------------------------------- queries

    @property
    def base(self) -> int:
        """Lowest sequence number neither acknowledged nor abandoned, held back at the
        first message whose verdict the peer may still owe us (see :meth:`_verdict_hold`)."""
        unacked = self.unacked
        if not unacked:
            self.low = low = self.next_seq
        else:
            low = self.low
            while low not in unacked:  # (it holds a key at or above low: this ends)
                low += 1
            self.low = low
        return low if low <= self.cum_ack else self._verdict_hold(low)

    def _verdict_hold(self, base: int) -> int:
        """``base``, or the last sequence number of a message below it that was wholly
        selectively acknowledged but neither passed by the cumulative ack nor given a
        verdict (the lowest such), if there is one.

        The receiver keeps a notice (a message parked in a full mailbox, or refused at
        delivery) on its acks until our base passes the message's last fragment: the
        base is its only sign that we heard it. It holds its cumulative ack below a
        message whose notice it did not carry, but a SACK may cover a message before it
        is delivered (its verdict does not exist yet: an earlier gap holds delivery
        back). A base moved past such a message by that SACK made the receiver drop a
        notice we never got, and the next cumulative ack then reported a parked (or
        refused) message delivered (found by the mailbox back-pressure property test: a
        rendezvous receipt with no receiver). Held at the message's last fragment, not
        lower, the base still passes anything abandoned below it. Called only when the
        base is above the cumulative ack, which loss or reordering must have caused.
        """
        held = base
        for msg in self.by_msg_id.values():  # in first_seq order (nested ones end sooner)
            if msg.first_seq >= held:
                break
            last = msg.last_seq
            if (
                last < held
                and msg.next_index >= msg.count  # wholly sent: the peer may judge it
                and msg.fate in DELIVERED_ON_ACK
                and not msg.for_node
            ):
                held = last
        return held

    def has_outstanding(self) -> bool:
        """Whether any accepted message still awaits its fate."""
        return bool(self.queue or self.node_messages or self.by_msg_id)

    def can_send(self) -> bool:
        """Whether :meth:`next_datagram` would return a datagram now."""
        if self.in_flight_bytes >= self.cc.window and not self.probe_allowance:
            return False
        if self.lost and self._has_lost():
            return True
        if (self.queue or self.node_messages) and self._next_message() is not None:
            return True
        if self.flight or not self.by_msg_id:
            return False  # (what _base_untold checks first)
        return self._base_untold() is not None

    def next_record_bytes(self) -> int:
        """Bytes of the record the next datagram starts with (0: nothing to send)."""
        if self._has_lost():
            return self.unacked[self.lost[0]].size
        msg = self._next_message()
        if msg is not None:
            return msg.record_bytes(msg.next_index)
        held = self._base_untold()
        return 0 if held is None else held.record_bytes(held.next_index - 1)

    def _base_untold(self) -> OutgoingMessage | None:
        """A message the receiver holds but cannot deliver, and nothing to tell it why.

        Only DATA fragments carry the base. When we abandon a message (a send
        timeout) after later ones went out, and every packet after it was
        selectively acknowledged, nothing is left to send: the receiver waits
        for the abandoned sequence numbers for ever and the later messages
        never complete. Then the last sent fragment of the oldest unfinished
        message goes again, carrying the base past the abandoned numbers (the
        probe timer covers its loss). Returns that message, or None.
        """
        if self.flight or not self.by_msg_id or self.cum_ack >= self.base:
            return None
        return next(iter(self.by_msg_id.values()))

    def _next_message(self) -> OutgoingMessage | None:
        """The message whose next fragment goes out first, if flow control allows it."""
        queue = self.queue
        if self.current is None and self.node_messages:
            return self.node_messages[0]  # between two messages
        if not queue:
            return None
        msg = queue[0] if len(self.levels) <= 1 else self._by_priority()
        return msg if self.next_seq < self.peer_edge + self.peer_window else None

    def _by_priority(self) -> OutgoingMessage:
        """The next message by priority, within the share rule (module docstring)."""
        queue = self.queue
        current = self.current
        oldest = queue[0]
        if self.passed >= PRIORITY_SHARE - 1:
            # The oldest message's turn: now if it can go now, else after the current one.
            if current is None or oldest.count == 1:
                return oldest
            return current
        top = max(self.levels)
        floor = -1 if current is None else current.priority
        best: OutgoingMessage | None = None
        waiting: set[int] = set()  # priorities whose oldest message cannot nest
        for msg in queue:
            if msg is current or msg.priority <= floor or msg.priority in waiting:
                continue
            if current is not None and msg.count > 1:
                # Only a one-datagram message may nest in the one in progress; and none
                # of this priority may overtake this one (FIFO within a priority).
                waiting.add(msg.priority)
                continue
            if best is None or msg.priority > best.priority:
                best = msg
                if msg.priority == top:
                    break
        if best is None:
            return current if current is not None else oldest
        return best

    def deadline(self) -> float | None:
        """When :meth:`on_timer` must run: time-threshold loss or retransmission timeout."""
        if self.loss_time is not None:
            return self.loss_time
        if self.flight:
            return self.probe_deadline()
        return None

    def messages(self) -> list[OutgoingMessage]:
        """Every unfinished message, transmitted ones first, in order."""
        waiting = [m for m in (*self.node_messages, *self.queue) if not m.started]
        return list(self.by_msg_id.values()) + waiting

    # ---------------------------------------------------------------- sending

    def next_datagram(
        self, now: float, budget: int
    ) -> tuple[list[bytes | memoryview], int, bool] | None:
        """The next DATA datagram's fragment records, packed (``wire.pack_record``), the
        flags they call for (``NODE``, ``NESTED``), and whether any is a
        retransmission.

        The first fragment goes whatever its size; more follow, in order, while
        their records fit in ``budget`` bytes and share the first's ``NODE`` flag
        (node-message and application fragments never share a datagram).
        """
        records: list[bytes | memoryview] = []
        queue = self.queue
        first = None
        if (
            queue
            and not self.lost
            and self.current is None
            and len(self.levels) <= 1
            and self.in_flight_bytes < self.cc.window
        ):
            # a small message first (a request, a reply, a bundle's first): _next_small
            # (what _next_fragment does for it; a larger one goes whatever its size, there)
            first = self._next_small(now, budget, records)
        if first is not None:
            retransmission, pkt = False, first
        else:
            step = self._next_fragment(now, None, False, records)
            if step is None:
                return None
            retransmission, pkt = step
        for_node = pkt.message.for_node
        nested = pkt.nested
        packets = [pkt]
        used = pkt.size
        # A probe's packets go in datagrams of their own: bundled, one loss would
        # take them all, and the next probe would wait a backed-off RTO.
        alone = bool(self.probe_pending) and retransmission and pkt.seq in self.probed
        self.probe_pending -= alone
        # A full-size fragment of a big message leaves no room for another record: skip
        # the search for one (the per-datagram path of a bulk transfer).
        if not alone and (
            # Nothing queued or lost: _next_fragment would find no second record (a request
            # or a reply, alone in its datagram)
            not (self.queue or self.node_messages or self.lost)
            or self._next_record_too_big(pkt, budget - used, retransmission)
        ):
            alone = True
        while not alone:
            if (
                queue
                and not for_node
                and not self.lost
                and self.current is None
                and len(self.levels) <= 1
                and self.in_flight_bytes < self.cc.window
            ):
                small = self._next_small(now, budget - used, records)
                if small is not None:
                    packets.append(small)
                    used += small.size
                    continue
            step = self._next_fragment(now, budget - used, for_node, records)
            if step is None:
                break
            again, pkt = step
            nested = nested or pkt.nested
            packets.append(pkt)
            retransmission = retransmission or again
            used += pkt.size
        size = HEADER_OVERHEAD + used
        for pkt in packets:
            pkt.datagram_size = size
        self.datagrams_sent += 1
        flags = _NODE if for_node else 0
        if nested:
            flags |= _NESTED
        return records, flags, retransmission

    def _next_small(
        self, now: float, room: int, records: list[bytes | memoryview]
    ) -> SentPacket | None:
        """:meth:`_next_fragment` for the commonest record to bundle: the queue's head is
        a one-fragment application message for the default mailbox that fits ``room``,
        and flow control lets it go. The caller checked the rest of what that case needs
        (an application record, nothing lost, no message in progress, one priority, the
        congestion window open); None, changing nothing, when the head is anything else,
        and :meth:`_next_fragment` decides. Same packet, same record, same state after
        (the bundle of small messages a stream sends: about half of its per-message
        calls and tests)."""
        msg = self.queue[0]
        data = msg.data
        size = FRAGMENT_OVERHEAD + len(data)
        if (
            msg.count != 1
            or msg.next_index
            or msg.mailbox_bytes
            or msg.for_node
            or size > room
            or self.node_messages  # (between two messages, they go first)
            or self.next_seq >= self.peer_edge + self.peer_window
        ):
            return None
        seq = self.next_seq
        msg.msg_id = msg_id = self.next_msg_id
        msg.first_seq = seq
        self.next_msg_id = msg_id + 1
        self.by_msg_id[msg_id] = msg
        tx = self.tx_counter
        pkt = SentPacket(seq, msg, 0, size, tx, self.datagrams_sent, 0, now)
        msg.last_seq = seq
        msg.next_index = 1
        msg.transmissions += 1
        self.queue.popleft()  # (_unqueue: the head leaves, the only one of its priority)
        self.passed = 0
        levels = self.levels
        left = levels[msg.priority] - 1
        if left:
            levels[msg.priority] = left
        else:
            del levels[msg.priority]
        self.next_seq = seq + 1
        unacked = self.unacked
        unacked[seq] = pkt
        self.tx_counter = tx + 1
        self.flight[tx] = pkt
        self.in_flight_bytes += size
        self.last_send_time = now
        self.packets_sent += 1
        base = self.low
        while base not in unacked:
            base += 1
        self.low = base
        if base > self.cum_ack:  # (rare: loss or reordering; see _verdict_hold)
            base = self._verdict_hold(base)
        records.append(
            _pack_record_head(
                seq & _SERIAL_MASK,
                base & _SERIAL_MASK,
                msg_id & _SERIAL_MASK,
                0,
                1,
                len(data),
                msg.msg_type,
                msg.priority,
                0,
                len(data),
            )
        )
        records.append(data)
        return pkt

    def _next_record_too_big(self, pkt: SentPacket, room: int, retransmission: bool) -> bool:
        """Whether no record can follow ``pkt`` in ``room`` bytes, known without the search.

        A bulk transfer's datagram holds one fragment: a record is at least
        ``FRAGMENT_OVERHEAD`` bytes, and while a message of one priority is in
        progress and nothing is lost, what comes next is its own next fragment,
        whose size is known (it does not fit when the message was cut for a
        smaller datagram than the path now carries). False means "search".
        """
        if room < FRAGMENT_OVERHEAD:
            return True
        msg = pkt.message
        if retransmission or self.lost or len(self.levels) > 1 or msg.for_node:
            return False
        index = msg.next_index
        if index >= msg.count or msg is not self.current or self.queue[0] is not msg:
            return False
        length = len(msg.data) - index * msg.fragment_size
        if length > msg.fragment_size:
            length = msg.fragment_size
        return FRAGMENT_OVERHEAD + msg.mailbox_bytes + length > room

    def _next_fragment(
        self, now: float, room: int | None, for_node: bool, records: list[bytes | memoryview]
    ) -> tuple[bool, SentPacket] | None:
        """Transmit the next fragment: its record goes on ``records``; returns whether it
        is a retransmission, and its packet.

        With ``room``, only one whose record fits in that many bytes and whose
        ``NODE`` flag is ``for_node``. Returns ``None``, changing nothing, when
        there is none.
        """
        if self.in_flight_bytes >= self.cc.window and not self.probe_allowance:
            self.cwnd_limited = True
            return None
        if self.lost and self._has_lost():
            pkt = self.unacked[self.lost[0]]
            if room is not None and (pkt.message.for_node != for_node or pkt.size > room):
                return None
            heapq.heappop(self.lost)
            self._use_window()
            pkt.lost = False
            pkt.retransmitted = True  # for Karn's rule, whatever the reason
            if pkt.unread:
                pkt.unread = False
                pkt.message.transmissions -= 1  # _transmit counts it again
            else:
                self.retransmissions += 1
            self._transmit(pkt, now)
            self._record(pkt, records)
            return True, pkt
        msg = self._next_message()
        if msg is None:
            held = self._base_untold() if room is None else None
            if held is None:
                return None
            index = held.next_index - 1
            pkt = SentPacket(
                seq=held.last_seq,
                message=held,
                index=index,
                size=held.record_bytes(index),
                retransmitted=True,
            )
            self.retransmissions += 1
            self.unacked[pkt.seq] = pkt  # the only one: the base it carries is its own seq
            if pkt.seq < self.low:
                self.low = pkt.seq
            self._transmit(pkt, now)
            self._record(pkt, records)
            return True, pkt
        index = msg.next_index
        if msg.count == 1:
            # One fragment: the whole message, no slicing (the common small message).
            payload: bytes | memoryview = msg.data
            size = FRAGMENT_OVERHEAD + msg.mailbox_bytes + len(payload)
            if room is not None and (msg.for_node != for_node or size > room):
                return None
        else:
            # record_bytes and fragment_payload, inline (per fragment of a big message),
            # and the slice taken only once the record is known to fit
            fragment_size = msg.fragment_size
            start = index * fragment_size
            length = len(msg.data) - start
            if length > fragment_size:
                length = fragment_size
            size = FRAGMENT_OVERHEAD + msg.mailbox_bytes + length
            if room is not None and (msg.for_node != for_node or size > room):
                return None
            view = msg.view
            if view is None:
                view = msg.view = memoryview(msg.data)
            payload = view[start : start + fragment_size]
        if self.in_flight_bytes >= self.cc.window:
            self.probe_allowance -= 1  # a probe may exceed the window
        seq = self.next_seq
        if index == 0:
            msg.msg_id = msg_id = self.next_msg_id
            msg.first_seq = seq
            self.next_msg_id = msg_id + 1
            self.by_msg_id[msg_id] = msg
        # _transmit, inline: this is the per-fragment path
        tx = self.tx_counter
        pkt = SentPacket(seq, msg, index, size, tx, self.datagrams_sent, 0, now)
        msg.last_seq = seq
        msg.next_index = index + 1
        msg.transmissions += 1
        if not msg.for_node:
            current = self.current
            if current is not None and current is not msg:
                pkt.nested = True
            if index + 1 == msg.count:
                # _unqueue, inline (every small message leaves the queue here)
                queue = self.queue
                if queue[0] is msg:
                    queue.popleft()
                    self.passed = 0
                else:
                    queue.remove(msg)
                    self.passed += 1
                if msg is current:
                    self.current = None
                levels = self.levels
                left = levels[msg.priority] - 1
                if left:
                    levels[msg.priority] = left
                else:
                    del levels[msg.priority]
            else:
                self.passed = 0 if msg is self.queue[0] else self.passed + 1
                if current is None:
                    self.current = msg
        elif index + 1 == msg.count:
            self.node_messages.popleft()
        self.next_seq = seq + 1
        unacked = self.unacked
        unacked[seq] = pkt
        self.tx_counter = tx + 1
        self.flight[tx] = pkt
        self.in_flight_bytes += size
        self.last_send_time = now
        self.packets_sent += 1
        # the base (not next(iter(unacked)): see ``low``); unacked holds this packet
        base = self.low
        while base not in unacked:
            base += 1
        self.low = base
        if base > self.cum_ack:  # (rare: loss or reordering; see _verdict_hold)
            base = self._verdict_hold(base)
        if not msg.mailbox_bytes:
            # pack_record's default-mailbox case, inline (a record per small message)
            records.append(
                _pack_record_head(
                    seq & _SERIAL_MASK,
                    base & _SERIAL_MASK,
                    msg.msg_id & _SERIAL_MASK,
                    index,
                    msg.count,
                    len(msg.data),
                    msg.msg_type,
                    msg.priority,
                    0,
                    len(payload),
                )
            )
            records.append(payload)
            return False, pkt
        pack_record(
            records,
            seq,
            base,
            msg.msg_id,
            index,
            msg.count,
            len(msg.data),
            msg.msg_type,
            msg.priority,
            msg.mailbox_raw,
            payload,
        )
        return False, pkt

    def _use_window(self) -> None:
        if self.in_flight_bytes >= self.cc.window:
            self.probe_allowance -= 1  # a probe may exceed the window

    def enqueue(self, msg: OutgoingMessage) -> None:
        """Queue an application message behind the others."""
        self.queue.append(msg)
        self.levels[msg.priority] = self.levels.get(msg.priority, 0) + 1

    def _unqueue(self, msg: OutgoingMessage) -> None:
        """``msg``, an application message, leaves the queue (fully sent or abandoned)."""
        queue = self.queue
        if queue[0] is msg:
            queue.popleft()
            self.passed = 0  # a new oldest message: its wait starts now
        else:
            queue.remove(msg)
        if msg is self.current:
            self.current = None
        left = self.levels[msg.priority] - 1
        if left:
            self.levels[msg.priority] = left
        else:
            del self.levels[msg.priority]

    def _has_lost(self) -> bool:
        while self.lost:
            pkt = self.unacked.get(self.lost[0])
            if pkt is not None and pkt.lost:
                return True
            heapq.heappop(self.lost)
        return False

    def _transmit(self, pkt: SentPacket, now: float) -> None:
        pkt.tx = self.tx_counter
        self.tx_counter += 1
        pkt.sent_time = now
        pkt.datagram = self.datagrams_sent
        self.flight[pkt.tx] = pkt
        self.in_flight_bytes += pkt.size
        pkt.message.transmissions += 1
        self.last_send_time = now
        self.packets_sent += 1

    def _record(self, pkt: SentPacket, records: list[bytes | memoryview]) -> None:
        """``pkt``'s record again (a retransmission), carrying today's base."""
        msg = pkt.message
        pack_record(
            records,
            pkt.seq,
            self.base,
            msg.msg_id,
            pkt.index,
            msg.count,
            len(msg.data),
            msg.msg_type,
            msg.priority,
            msg.mailbox_raw,
            msg.fragment_payload(pkt.index),
        )

    # ------------------------------------------------------- acknowledgements

    def on_ack(
        self,
        ack: int,
        sacks: tuple[tuple[int, int], ...],
        ack_delay: float,
        window: int,
        now: float,
    ) -> AckOutcome:
        """Process the peer's acknowledgement state (32-bit wire values)."""
        delta = (ack - self.next_seq) & _SERIAL_MASK  # unwrap(ack, next_seq), inline
        cum = self.next_seq + (delta - _SERIAL_MOD if delta >= _SERIAL_HALF else delta)
        if cum > self.next_seq:
            return AckOutcome(bogus=True)
        if cum < self.cum_ack:
            return _NO_NEWS  # an older acknowledgement, overtaken in the network
        if cum == self.cum_ack and not sacks:
            # Nothing new (the ack state every DATA packet of a two-way exchange repeats):
            # what the full path below would change, and nothing else. No sample, no
            # completion; a loss only if the loss timer is already due.
            self.peer_window = window
            self.peer_edge = cum
            if self.loss_time is not None and now >= self.loss_time:
                self.detect_losses(now)
            return _NO_NEWS
        outcome = AckOutcome()
        self.cum_ack = cum
        self.peer_window = window
        edge = cum
        newest: SentPacket | None = None
        acked = acked_bytes = 0
        unacked = self.unacked
        flight = self.flight
        # Every key below cum leaves; none is below low (and walking the dict from its
        # start would cross every slot emptied since it was last resized)
        low = self.low
        if cum > low:
            self.low = cum
        for seq in range(low, cum):
            pkt = unacked.pop(seq, None)  # (gone already if selectively acknowledged)
            if pkt is None:
                continue
            acked += 1
            size = pkt.size
            acked_bytes += size
            if pkt.lost or pkt.retransmitted:
                newest = self._forget(pkt, newest, now)
                continue
            # _forget's common case, inline: it leaves the flight, and is the newest
            # if it went out last
            if flight.pop(pkt.tx, None) is not None:
                self.in_flight_bytes -= size
            if newest is None or pkt.tx > newest.tx:
                newest = pkt
        for start_w, end_w in sacks:
            start = max(unwrap(start_w, cum), cum)
            end = min(unwrap(end_w, cum), self.next_seq)
            edge = max(edge, end)
            if end - start <= len(unacked):
                seqs: list[int] | range = range(start, end)
            else:
                seqs = [s for s in unacked if start <= s < end]
            for seq in seqs:
                sacked = unacked.pop(seq, None)
                if sacked is not None:
                    acked += 1
                    acked_bytes += sacked.size
                    newest = self._forget(sacked, newest, now)
        self.peer_edge = edge
        outcome.newly_acked = acked
        if newest is not None:
            # Karn: never time an ambiguous ack. Nor one that may answer a probe sent
            # after the packet: its own acks may have been lost, and the sample would
            # measure the probe timeout (seconds, at startup), not the path.
            if not newest.retransmitted and newest.sent_time > self.probe_time:
                self.rtt.on_sample(now - newest.sent_time, ack_delay, newest.datagram_size)
                self.data_timed = True
            self.backoff = 0
            self.dropped_ahead = 0
            self.last_ack_time = now
            # Grow the window only if it was in use (RFC 7661): an application-limited
            # sender has not shown the path can carry more.
            if self.cwnd_limited or 2 * (self.in_flight_bytes + acked_bytes) >= self.cc.window:
                self.cc.on_acked(acked_bytes, newest.sent_time)
            self.cwnd_limited = False
            if newest.tx > self.largest_acked_tx:
                self.largest_acked_tx = newest.tx
            if newest.datagram > self.largest_acked_datagram:
                self.largest_acked_datagram = newest.datagram
        for msg in self.by_msg_id.values():
            if msg.first_seq >= cum:
                break  # nor any later: they began later
            if msg.next_index == msg.count and msg.last_seq < cum:
                # (one with a message nested in it completes after the nested one)
                outcome.completed.append(msg)
        for msg in outcome.completed:
            del self.by_msg_id[msg.msg_id]
        if self.flight:
            self.detect_losses(now)
        else:
            self.loss_time = None  # (detect_losses with nothing in flight)
        return outcome

    def _forget(self, pkt: SentPacket, newest: SentPacket | None, now: float) -> SentPacket | None:
        if pkt.lost:
            # Declared lost, yet acknowledged before any retransmission went out.
            self._spurious_loss(pkt)
            suspects = self.suspects
            if suspects:
                suspects.discard(pkt.seq)
                if not suspects:
                    self.cc.undo()  # every loss of this recovery was the network's reordering
        else:
            self._leave_flight(pkt)
            if pkt.retransmitted and now - pkt.sent_time < self.rtt.min_rtt / 2:
                # Acknowledged sooner after the retransmission than any round trip
                # takes: the ack was for the original, which was only reordered.
                self._spurious_loss(pkt)
        if newest is None or pkt.tx > newest.tx:
            return pkt
        return newest

    def _spurious_loss(self, pkt: SentPacket) -> None:
        """The network reordered more than we allowed for: allow more, within bounds.

        The thresholds widen as RFC 8985's reordering window does (RFC 9002
        section 6.1.1 permits it): the packet threshold is dropped, and
        detection goes by time alone, whose threshold grows by a quarter, at
        most once per round trip (for a packet sent since it last grew), up to
        4 RTTs. Jitter comparable to the RTT would otherwise make every burst
        look lossy and halve the window for nothing; a packet threshold alone
        would not do, since how many datagrams a delay lets pass grows with the
        window. After ``CALM_RECOVERIES`` loss recoveries with no spurious loss
        half the widening goes (:meth:`_recovered`).

        Widening once per packet, and never narrowing, let one reordered 64 KiB
        datagram (some 60 bundled messages, each found spurious) take the time
        threshold to its cap at once, for good: on loopback, where the scheduler
        now and then delays a datagram past a few later ones, every later loss
        then waited four round trips to be detected.

        A probe proved spurious (the peer was only slow to answer) doubles the
        probe floor instead, up to ``min_rto``.
        """
        self.spurious += 1
        if pkt.seq in self.probed:
            self.probed.clear()
            self.probe_floor = min(2 * self.probe_floor, self.rtt.min_rto)
            return
        self.calm_recoveries = 0
        self.reorder_threshold = _TIME_ONLY
        if pkt.tx < self.widen_tx:
            return  # sent before the last widening: judged by the old threshold
        self.widen_tx = self.tx_counter
        self.time_threshold = min(self.time_threshold * 1.25, _MAX_TIME_THRESHOLD)

    def _recovered(self) -> None:
        """A loss recovery began. After ``CALM_RECOVERIES`` of them with no spurious loss,
        half the time threshold's widening goes, and the packet threshold returns with
        the last of it. Only half: without duplicate SACKs a spurious loss is proven
        only when the original's acknowledgement beats the copy's, so a calm stretch
        may be reordering that went unproven."""
        if self.time_threshold == K_TIME_THRESHOLD and self.reorder_threshold == K_PACKET_THRESHOLD:
            return
        self.calm_recoveries += 1
        if self.calm_recoveries >= CALM_RECOVERIES:
            self.calm_recoveries = 0
            time_threshold = (self.time_threshold + K_TIME_THRESHOLD) / 2
            if time_threshold - K_TIME_THRESHOLD < 0.05:
                time_threshold = K_TIME_THRESHOLD
                self.reorder_threshold = K_PACKET_THRESHOLD
            self.time_threshold = time_threshold

    def detect_losses(self, now: float) -> int:
        """Declare packets overtaken by later acknowledged transmissions lost."""
        self.loss_time = None
        if self.largest_acked_tx < 0 or not self.flight:
            return 0  # (nothing in flight: nothing to declare lost)
        delay: float | None = None  # asked of the estimator only when a packet needs it
        lost: list[SentPacket] = []
        for tx, pkt in self.flight.items():
            if tx >= self.largest_acked_tx:
                break
            # The packet threshold counts datagrams: a bundle is reordered as one.
            if self.largest_acked_datagram - pkt.datagram < self.reorder_threshold:
                if delay is None:
                    delay = self.rtt.loss_delay(self.time_threshold)
                # the same expression as loss_time below, so a timer firing at loss_time
                # always finds its packet lost (now - delay could round the other way and
                # livelock)
                if pkt.sent_time + delay > now:
                    self.loss_time = pkt.sent_time + delay
                    break
            lost.append(pkt)
        for pkt in lost:
            self._declare_lost(pkt)
        if lost:
            cc = self.cc
            began = cc.recovery_start
            cc.on_lost(lost[-1].sent_time, now)
            if cc.recovery_start != began:
                self._recovered()
                self.suspects = {pkt.seq for pkt in lost}
            elif cc.prior_cwnd:  # the reduction may still be undone: these count too
                self.suspects.update(pkt.seq for pkt in lost)
        return len(lost)

    def _leave_flight(self, pkt: SentPacket) -> None:
        if self.flight.pop(pkt.tx, None) is not None:
            self.in_flight_bytes -= pkt.size

    def _declare_lost(self, pkt: SentPacket) -> None:
        self._leave_flight(pkt)
        pkt.lost = True
        heapq.heappush(self.lost, pkt.seq)

    def handshake_sample(self, now: float) -> None:
        """The peer challenged our first flight: time the round trip from it.

        No acknowledgement can time that flight (it is all resent, so Karn's
        rule rejects every sample), and until a sample arrives the timer
        waits ``initial_rto`` (1 s) on any loss. The challenge answers one of
        the flight's datagrams, so ``now`` minus the oldest send time bounds
        the RTT from above: a safe first estimate.
        """
        if self.rtt.samples or self.backoff or not self.flight:
            return
        oldest = next(iter(self.flight.values()))
        if not oldest.retransmitted and oldest.sent_time > self.probe_time:
            self.rtt.on_sample(now - oldest.sent_time, size=oldest.datagram_size)

    def resend_now(self, now: float) -> None:
        """Everything in flight was dropped unread (the peer had no state for us):
        send it again at once, with no congestion response. The copies queue behind
        what the peer will yet drop: until an acknowledgement, the probe timer
        allows for those bytes too."""
        self.probe_time = now
        self.dropped_ahead = self.in_flight_bytes
        for pkt in list(self.flight.values()):
            self._declare_lost(pkt)
            pkt.unread = True

    def probe_deadline(self) -> float:
        """When the tail has gone unacknowledged too long: a probe delay after the last
        transmission or the last acknowledgement of anything, whichever is later."""
        last = self.last_send_time
        if self.last_ack_time > last:
            last = self.last_ack_time
        return last + self._probe_delay()

    def _probe_delay(self) -> float:
        """How long the flight may go unacknowledged before a probe.

        The first probe is a tail loss probe (RFC 8985): two smoothed RTTs,
        not the RTO, whose four RTT variances make it several times longer
        on a jittery path. The tail of every burst asks for an immediate
        ack, so no delayed-ack allowance is needed. Nor less than the
        latest RTT: the smoothed one lags a queue that is growing. Later
        probes back off from the RTO.

        Its floor is ``probe_floor`` (``PROBE_FLOOR``, 2 ms, as Linux adds
        two jiffies) once an acknowledgement of data has timed the path, and
        ``min_rto`` (10 ms) before: a path timed only by the CHALLENGE (a
        stateless answer, microseconds on loopback) says nothing of how long
        the peer takes to handle data, and a busy AEAD receiver once drew a
        spurious probe there. A probe the original's acknowledgement proves
        spurious doubles ``probe_floor``, up to ``min_rto``.

        Whatever the backoff, it is never shorter than the next datagram
        (the flight's head, behind anything the peer dropped unread) may
        take to cross at the rate the samples have shown
        (:meth:`RttEstimator.serialization_bound`), plus the peer's ack
        delay if more datagrams follow the head (only a burst's tail asks
        for an immediate ack).
        """
        rtt = self.rtt
        srtt = rtt.srtt
        if self.backoff == 0 and srtt is not None:
            # min(rtt.rto, max(2 * srtt, rtt.latest, floor)), compared in place: this runs
            # for every timer query while data is in flight (twice per round trip)
            floor = self.probe_floor
            if not self.data_timed and rtt.min_rto > floor:
                floor = rtt.min_rto
            delay = 2 * srtt
            if rtt.latest > delay:
                delay = rtt.latest
            if floor > delay:
                delay = floor
            rttvar4 = 4 * rtt.rttvar
            rto = srtt + (rttvar4 if rttvar4 > rtt.granularity else rtt.granularity)
            rto += rtt.max_ack_delay
            if rto < rtt.min_rto:
                rto = rtt.min_rto
            if rto > rtt.max_rto:
                rto = rtt.max_rto
            if rto < delay:
                delay = rto
        else:
            # A tail loss probe is not an RTO: the RTO after it is not doubled (RFC 8985 7.3).
            delay = rtt.backed_off(self.backoff - self.probe_base)
        flight = self.flight
        if flight:
            head = next(iter(flight.values()))
            size = self.dropped_ahead + head.datagram_size
            if size > rtt.sampled_size:  # (serialization_bound is 0 for a size timed)
                crossing = rtt.serialization_bound(size)
                if crossing and head.datagram != next(reversed(flight.values())).datagram:
                    crossing += rtt.max_ack_delay  # more follows: the head's ack may be delayed
                if crossing > delay:
                    delay = crossing
        return delay

    def on_timer(self, now: float) -> None:
        """Run the loss-detection or retransmission timer if it is due."""
        if self.loss_time is not None:
            if now >= self.loss_time:
                self.detect_losses(now)
            return
        if self.flight and now >= self.probe_deadline():
            if self.backoff == 0:
                self.probe_base = int(self.rtt.srtt is not None)  # this one is a TLP
            self.backoff += 1
            self.probes += 1
            self.probe_time = now
            oldest = list(itertools.islice(self.flight.values(), PROBE_PACKETS))
            self.probed = {pkt.seq for pkt in oldest}
            self.probe_pending = len(oldest)
            for pkt in oldest:
                self._declare_lost(pkt)
            self.probe_allowance = len(oldest)
            if self.backoff >= PERSISTENT_CONGESTION_PROBES:
                self.cc.on_timeout(now)

    # ------------------------------------------------------------ abandoning

    def message_by_wire_id(self, wire_id: int) -> OutgoingMessage | None:
        """The unfinished transmitted message a reject notice names, if any."""
        return self.by_msg_id.get(unwrap(wire_id, self.next_msg_id))

    def abandon(self, msg: OutgoingMessage) -> None:
        """Stop sending ``msg``: its sequence numbers are skipped, never retransmitted.

        Its fate is the session's to settle: the stream only lets go of it.
        """
        if msg.started:
            self.by_msg_id.pop(msg.msg_id, None)
            unacked = self.unacked
            for seq in range(msg.first_seq, msg.last_seq + 1):
                pkt = unacked.get(seq)
                if pkt is not None and pkt.message is msg:  # (not one nested in it)
                    del unacked[seq]
                    if not pkt.lost:
                        self._leave_flight(pkt)
        if msg.next_index < msg.count:
            if msg.for_node:
                with contextlib.suppress(ValueError):
                    self.node_messages.remove(msg)
            elif msg in self.queue:
                self._unqueue(msg)

    def peer_restarted(self) -> list[OutgoingMessage]:
        """The peer lost its state: abandon what it may have seen, keep numbering.

        Returns the abandoned messages. Messages never transmitted stay queued.
        The sequence space is *not* restarted: datagrams from before the
        restart may still be in flight (some addressed to no incarnation in
        particular), and the peer's new life may build its receive state from
        one of them. Because our numbering only moves forward, the base carried
        by every newer packet then simply advances that state; a fresh random
        start could instead leave the two sides disagreeing forever.
        """
        started = [m for m in self.messages() if m.started]
        for msg in started:
            self.abandon(msg)
        # Node messages speak of the old incarnation's messages: meaningless now.
        for msg in self.node_messages:
            msg.step(FateInput.LOST)
        self.node_messages.clear()
        self.current = None
        self.unacked.clear()
        self.low = self.next_seq
        self.flight.clear()
        self.dropped_ahead = 0
        self.in_flight_bytes = 0
        self.lost.clear()
        self.suspects.clear()
        self.cum_ack = self.peer_edge = self.next_seq
        self.peer_window = self.initial_peer_window
        self.loss_time = None
        self.backoff = 0
        self.largest_acked_tx = -1
        self.largest_acked_datagram = -1
        self.probe_allowance = 0
        return started

    def abandon_below(self, fence: int) -> list[OutgoingMessage]:
        """The peer dropped everything we sent below ``fence`` (an unbounded sequence
        number): abandon every transmitted message that began there; returns them.

        Idempotent: a message that begins at or above ``fence`` is untouched, so a
        repeated notice cannot take messages sent after the first one.
        """
        lost = [m for m in self.by_msg_id.values() if m.first_seq < fence]
        for msg in lost:
            self.abandon(msg)
        return lost

    def abandon_all(self) -> list[OutgoingMessage]:
        """Abandon every unfinished message; returns them, transmitted ones first."""
        msgs = self.messages()
        for msg in msgs:
            self.abandon(msg)
        return msgs
