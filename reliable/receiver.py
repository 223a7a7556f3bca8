"""The receiving half of a peer session: dedupe, reordering, reassembly, acks.

Theory of operation
-------------------
``expected`` is the next sequence number to deliver; everything below it was
delivered, refused or skipped, so a packet below it is a duplicate and costs
nothing to remember (dedupe with bounded memory). Packets in
``[expected, expected + max_window)`` wait in ``ooo`` until the gap before
them fills; anything further out is dropped, so the reorder buffer holds at
most ``max_window`` datagrams. Together, all peers' reorder buffers leave one
``max_message_size`` of the node's receive memory free, so the message a
stream waits for can always reserve its length (see ``_over_budget``).
In-order packets feed reassembly, which holds at most one partial message of
at most ``max_message_size`` bytes. A message of one fragment marked
``nested`` (``Flag.NESTED``: the sender's higher priority) may arrive between
two fragments of the partial one: it is delivered at once and the partial
message goes on. Any other new message ends the partial one (its sender
abandoned it).

The first packet of a new peer incarnation sets ``expected`` to the *base* it
carries (the sender's lowest outstanding sequence number), so a session may
start anywhere in sequence space. A later base above ``expected`` means the
sender abandoned what lies between (a send timeout, an unreachable verdict):
complete messages there are still delivered, partial ones dropped.

Acknowledgements are delayed (up to ``max_ack_delay``, or ``ack_every``
packets) unless something calls for one at once: a gap, a duplicate, a
request from the sender, a verdict. The sender's request alone may wait a
little (:meth:`ReceiveStream.await_reply`, up to ``reply_ack_delay``) when the
message went straight to a waiting receiver of a peer we also send to: its
reply is about to leave, and the ack rides on it instead of costing a
datagram of its own. A message the node refused or deferred
(see :class:`~reliable.wire.Verdict`) produces a notice that rides on every
ack until the sender's base passes it; the cumulative ack is held back so
that it never covers such a message whose notice did not fit in the same
packet. The sender therefore always learns the verdict no later than the
acknowledgement itself.

Verdicts come from outside: ``screen`` judges a message by its first
fragment (so a message for a missing mailbox is refused before it is
buffered), and the session records the node's verdict on each delivery
with :meth:`ReceiveStream.add_notice` before any ack can go out.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable
from dataclasses import dataclass, field

from .config import Config
from .wire import ACK_DELAY_TICK, MAX_NOTICES, MAX_SACK_RANGES, Fragment, Verdict, unwrap

__all__ = ["AckState", "Delivery", "ReceiveStream"]

# 32-bit serial arithmetic (wire.unwrap), inline on the per-fragment path
_SERIAL_MOD = 1 << 32
_SERIAL_HALF = 1 << 31
_SERIAL_MASK = _SERIAL_MOD - 1


@dataclass(slots=True)
class Delivery:
    """A reassembled message, ready for the application (one per message: not frozen,
    which would cost more to build than the rest of its life)."""

    msg_id: int
    data: bytes
    msg_type: int
    priority: int
    mailbox: str
    last_seq: int  #: sequence number of its last fragment (where a verdict notice attaches)
    for_node: bool = False  #: a message for the node, not for a mailbox

    # Written out, not generated: a dataclass's generated __init__ stays interpreted
    # code in the compiled core (about 5x the cost per object there). Same
    # signature and defaults as the generated one.
    def __init__(
        self,
        msg_id: int,
        data: bytes,
        msg_type: int,
        priority: int,
        mailbox: str,
        last_seq: int,
        for_node: bool = False,
    ) -> None:
        self.msg_id = msg_id
        self.data = data
        self.msg_type = msg_type
        self.priority = priority
        self.mailbox = mailbox
        self.last_seq = last_seq
        self.for_node = for_node


#: Judges a message by its first fragment: a refusal, or None to receive it.
Screen = Callable[[Fragment], Verdict | None]


@dataclass(slots=True)
class AckState:
    """The acknowledgement fields for the next outgoing packet (wire values).

    Treat it as immutable (not frozen: one is built per datagram sent, see
    :class:`~reliable.wire.Packet`)."""

    ack: int
    ack_delay: int
    sacks: tuple[tuple[int, int], ...]
    notices: tuple[tuple[int, int], ...]


@dataclass(slots=True)
class _Partial:
    msg_id: int
    count: int
    total_len: int
    msg_type: int
    priority: int
    mailbox: str
    for_node: bool
    rejected: Verdict | None
    chunks: list[bytes | memoryview] = field(default_factory=list)
    size: int = 0
    reserved: int = 0  # bytes of the node's receive memory set aside for it
    first_seq: int = 0
    next_index: int = 0
    wire_id: int = 0  # msg_id as its fragments carry it (32 bits)


class MemoryBudget:
    """Bytes that all receive streams of a node may hold waiting (reorder buffers and
    partial messages), shared so that many peers cannot add up to too much."""

    __slots__ = ("limit", "used")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0


@dataclass(slots=True)
class _Notice:
    reason: Verdict
    first_seq: int


class ReceiveStream:
    """Receiver state for one peer incarnation."""

    __slots__ = (
        "ack_deadline",
        "ack_every",
        "ack_now",
        "ack_pending",
        "ack_requested",
        "beyond_window",
        "budget",
        "covered",
        "duplicates",
        "expected",
        "first_unacked_time",
        "held",
        "last_msg_id",
        "max_ack_delay",
        "max_message_size",
        "max_window",
        "no_room",
        "notices",
        "ooo",
        "partial",
        "protocol_errors",
        "ranges",
        "reassembly_errors",
        "refused",
        "reply_wait",
        "screen",
        "share",
        "shed",
    )

    def __init__(
        self, config: Config, screen: Screen | None = None, budget: MemoryBudget | None = None
    ) -> None:
        self.screen = screen
        self.budget = budget if budget is not None else MemoryBudget(config.receive_memory)
        self.share = config.peer_receive_share  # the most of the budget this peer may hold
        self.held = 0  # bytes charged to the budget: reorder buffer and reservation
        self.covered: set[int] = set()  # reorder-buffer seqs inside the reservation
        self.shed = 0  # fragments dropped because the node's receive memory was full
        self.max_window = config.max_window
        self.max_message_size = config.max_message_size
        self.ack_every = config.ack_every
        self.max_ack_delay = config.max_ack_delay
        self.expected: int | None = None
        self.ooo: dict[int, Fragment] = {}
        self.ranges: list[list[int]] = []  # sorted, disjoint [start, end) runs of ooo keys
        self.partial: _Partial | None = None
        self.last_msg_id: int | None = None
        self.notices: dict[int, _Notice] = {}
        self.ack_pending = 0
        self.ack_now = False
        self.ack_requested = False  # the sender asked for an ack at once, and only that
        self.reply_wait = False  # ... and it waits (until ack_deadline) for a reply to carry it
        self.ack_deadline: float | None = None
        self.first_unacked_time: float | None = None
        self.duplicates = 0
        self.beyond_window = 0
        self.no_room = 0
        self.protocol_errors = 0
        self.reassembly_errors = 0
        self.refused = 0

    # ------------------------------------------------------------- receiving

    def on_fragment(
        self, frag: Fragment, now: float, *, has_room: bool, ack_now: bool, counts: bool = True
    ) -> list[Delivery]:
        """Take one DATA fragment; returns the messages it completed, in order.

        ``counts`` is false for all but the last fragment of a bundle: the
        every-``ack_every``-packets rule counts datagrams.
        """
        expected = self.expected
        if expected is None:
            seq = frag.seq
            base = unwrap(frag.base, seq)
            if base > seq:
                self.protocol_errors += 1
                return []
            self.expected = expected = base
        else:
            # unwrap(frag.seq, expected), then unwrap(frag.base, seq), inline (per fragment)
            delta = (frag.seq - expected) & _SERIAL_MASK
            seq = expected + (delta - _SERIAL_MOD if delta >= _SERIAL_HALF else delta)
            delta = (frag.base - seq) & _SERIAL_MASK
            if delta and delta < _SERIAL_HALF:  # base > seq
                self.protocol_errors += 1
                return []
            base = seq + (delta - _SERIAL_MOD if delta else 0)
        delivered: list[Delivery] = []
        if self.notices:
            self._expire_notices(base)
        if base > expected:
            self._skip_to(base, delivered, frag if seq == base else None)
            expected = self.expected
            assert expected is not None
        ooo = self.ooo
        # The next fragment with nothing held out of order (the common case) is neither a
        # duplicate nor beyond the window: the two tests below are for the others.
        if seq != expected or ooo or self.max_window <= 0:
            if seq < expected or seq in ooo:
                self.duplicates += 1
                self.ack_now = True
                return delivered
            if seq >= expected + self.max_window:
                self.beyond_window += 1
                self.ack_now = True
                return delivered
        if seq == expected and not has_room and not frag.for_node:
            # Node messages pass: they are never held, and a withdrawal (CANCEL)
            # must get through precisely when parked messages have closed the window.
            self.no_room += 1
            self.ack_now = True
            return delivered
        if seq == expected and not ooo:
            # In order with nothing waiting (the common case): reassembled at once, without
            # a round trip through the reorder buffer and its ranges (both stay empty).
            payload = frag.payload
            if (
                frag.count == 1
                and self.partial is None
                and len(payload) == frag.total_len <= self.max_message_size
            ):
                # A whole message (_reassemble's one-fragment case, inline): its id is
                # unwrapped next to the last one's, and it is delivered as it is.
                last = self.last_msg_id
                if last is None:
                    msg_id = frag.msg_id
                else:
                    delta = (frag.msg_id - last - 1) & _SERIAL_MASK
                    msg_id = last + 1 + (delta - _SERIAL_MOD if delta >= _SERIAL_HALF else delta)
                self.last_msg_id = msg_id
                delivered.append(
                    Delivery(
                        msg_id,
                        payload if type(payload) is bytes else bytes(payload),
                        frag.msg_type,
                        frag.priority,
                        frag.mailbox,
                        seq,
                        frag.for_node,
                    )
                )
            # The next fragment of the message in progress, not its last (_reassemble's
            # common case for a big message, inline: its bytes were reserved at its start)
            elif (
                (partial := self.partial) is not None
                and frag.index == partial.next_index
                and partial.next_index + 1 < partial.count
                and partial.rejected is None
                and frag.count == partial.count
                and frag.total_len == partial.total_len
                and frag.msg_id == partial.wire_id
                and partial.size + len(payload) <= partial.total_len
            ):
                partial.next_index += 1
                partial.chunks.append(payload)
                partial.size += len(payload)
            # Only a fragment starting a multi-datagram message can be over budget here
            # (_over_budget: in order, anything else is delivered or already reserved).
            elif (
                frag.index == 0
                and frag.count > 1
                and not self._in_reservation(frag, seq)
                and self._over_budget(frag, seq)
            ):
                self.shed += 1
                self.ack_now = True
                return delivered
            else:
                self._reassemble(frag, seq, delivered)
            self.expected = seq + 1
        else:
            if self._in_reservation(frag, seq):
                self.covered.add(seq)  # its bytes are already set aside
            elif self._over_budget(frag, seq):
                self.shed += 1  # the node is full: the sender will retransmit it later
                self.ack_now = True
                return delivered
            else:
                self._hold(len(frag.payload))
            self.ooo[seq] = frag
            self._add_range(seq)
            if seq == self.expected:
                self._advance(delivered)
            else:
                self.ack_now = True  # a gap: report it at once so the sender can repair it
        self.ack_pending += counts
        if self.first_unacked_time is None:
            self.first_unacked_time = now
        if self.ack_pending >= self.ack_every:
            self.ack_now = True
        elif ack_now:
            self.ack_requested = True  # at once, unless await_reply lets a reply carry it
        elif self.ack_deadline is None:
            self.ack_deadline = now + self.max_ack_delay
        return delivered

    def take_middle(
        self,
        seq_w: int,
        base_w: int,
        msg_id: int,
        index: int,
        count: int,
        total_len: int,
        payload: bytes | memoryview,
        now: float,
        ack_now: bool,
    ) -> bool:
        """:meth:`on_fragment` for the commonest fragment of all (wire values), if it is one:
        the next in sequence, in the middle of the message being reassembled (not its
        last), nothing out of order, no notice owed. Returns False, having changed
        nothing, for any other; the caller then builds the fragment and calls
        ``on_fragment``, which does exactly what this does for this case.

        (The session has checked the rest of on_fragment's preconditions: there is
        room, and the packet counts as a datagram of its own.)
        """
        expected = self.expected
        partial = self.partial
        if (
            expected is None
            or partial is None
            or partial.rejected is not None
            or self.ooo
            or self.notices
            or (seq_w - expected) & _SERIAL_MASK  # (not the one expected)
        ):
            return False
        delta = (base_w - expected) & _SERIAL_MASK
        if delta and delta < _SERIAL_HALF:
            return False  # base > seq: malformed, for on_fragment to count
        if (
            index != partial.next_index
            or index + 1 >= partial.count
            or count != partial.count
            or total_len != partial.total_len
            or msg_id != partial.wire_id
            or partial.size + len(payload) > total_len
        ):
            return False
        partial.next_index = index + 1
        partial.chunks.append(payload)
        partial.size += len(payload)
        self.expected = expected + 1
        self.ack_pending += 1
        if self.first_unacked_time is None:
            self.first_unacked_time = now
        if self.ack_pending >= self.ack_every:
            self.ack_now = True
        elif ack_now:
            self.ack_requested = True
        elif self.ack_deadline is None:
            self.ack_deadline = now + self.max_ack_delay
        return True

    def skip_to(self, base: int) -> list[Delivery]:
        """The sender gave up on everything below ``base`` (a group stream's GSYNC says so).

        ``base`` is unbounded (already unwrapped). A stream that has seen nothing starts there.
        """
        delivered: list[Delivery] = []
        if self.expected is None:
            self.expected = base
        elif base > self.expected:
            self._expire_notices(base)
            self._skip_to(base, delivered)
        return delivered

    def missing(self, high: int, limit: int) -> list[tuple[int, int]]:
        """Gaps below ``high`` (one past the newest seq the sender says it sent), oldest first."""
        if self.expected is None or high <= self.expected:
            return []
        gaps: list[tuple[int, int]] = []
        start = self.expected
        for run_start, run_end in self.ranges:
            if len(gaps) >= limit or run_start >= high:
                break
            if run_start > start:
                gaps.append((start, run_start))
            start = max(start, run_end)
        if start < high and len(gaps) < limit:
            gaps.append((start, high))
        return gaps

    def _advance(self, delivered: list[Delivery]) -> None:
        assert self.expected is not None
        while True:
            frag = self.ooo.pop(self.expected, None)
            if frag is None:
                break
            self._unstore(frag, self.expected)
            self._reassemble(frag, self.expected, delivered)
            self.expected += 1
        self._trim_ranges()

    def _skip_to(
        self, base: int, delivered: list[Delivery], at_base: Fragment | None = None
    ) -> None:
        """The sender abandoned everything below ``base``: deliver what is whole, drop the rest.

        A gap ends the message in progress unless the fragment after it is that
        message's next one: what was abandoned in between was a message nested in it
        (a higher priority's, timed out or cut too big for the path), and the message
        in progress is whole without it. Ending it anyway lost it while its
        fragments were acknowledged, so its sender was told it was delivered.
        ``at_base`` is the fragment at ``base`` being received, if that is the one.
        """
        assert self.expected is not None
        for seq in sorted(s for s in self.ooo if s < base):
            if seq != self.expected and not self._continues(self.ooo[seq]):
                self._end_partial()  # a gap: the message in progress can never complete
            frag = self.ooo.pop(seq)
            self._unstore(frag, seq)
            self._reassemble(frag, seq, delivered)
            self.expected = seq + 1
        if self.expected < base:
            nxt = self.ooo.get(base, at_base)
            if nxt is None or not self._continues(nxt):
                self._end_partial()
            self.expected = base
        self._trim_ranges()
        self._advance(delivered)

    def _continues(self, frag: Fragment) -> bool:
        """Whether ``frag`` is the next fragment of the message in progress."""
        partial = self.partial
        return (
            partial is not None
            and frag.index == partial.next_index
            and frag.index > 0
            and frag.count == partial.count
            and frag.total_len == partial.total_len
            and frag.msg_id == partial.msg_id & 0xFFFFFFFF
        )

    def _reassemble(self, frag: Fragment, seq: int, delivered: list[Delivery]) -> None:
        partial = self.partial
        if frag.index == 0:
            if partial is not None and (frag.count > 1 or not frag.nested):
                self.reassembly_errors += 1
                self._end_partial()
            reference = frag.msg_id if self.last_msg_id is None else self.last_msg_id + 1
            msg_id = unwrap(frag.msg_id, reference)
            self.last_msg_id = msg_id
            if frag.count == 1:
                # The common case, without the bookkeeping of a partial and without the
                # screen: a whole message is judged where it is delivered, at once (a
                # screen exists to refuse a long message before its other fragments).
                if frag.total_len > self.max_message_size:
                    self.add_notice(msg_id, Verdict.TOO_LARGE, seq)
                    self.refused += 1
                elif len(frag.payload) != frag.total_len:
                    self.reassembly_errors += 1
                else:
                    payload = frag.payload
                    delivered.append(
                        Delivery(
                            msg_id,
                            payload if type(payload) is bytes else bytes(payload),
                            frag.msg_type,
                            frag.priority,
                            frag.mailbox,
                            seq,
                            frag.for_node,
                        )
                    )
                return
            rejected = None
            if frag.total_len > self.max_message_size:
                rejected = Verdict.TOO_LARGE
            elif self.screen is not None and not frag.for_node:
                rejected = self.screen(frag)
            if rejected is not None:
                self.add_notice(msg_id, rejected, seq)
                self.refused += 1
            partial = self.partial = _Partial(
                msg_id=msg_id,
                count=frag.count,
                total_len=frag.total_len,
                msg_type=frag.msg_type,
                priority=frag.priority,
                mailbox=frag.mailbox,
                for_node=frag.for_node,
                rejected=rejected,
            )
            partial.first_seq = seq
            partial.wire_id = msg_id & 0xFFFFFFFF
            if rejected is None and frag.count > 1:
                # Its whole length is reserved now, so a started message can always
                # finish: partial messages never deadlock over the shared budget. Its
                # fragments already waiting here move into the reservation.
                partial.reserved = frag.total_len
                self._hold(partial.reserved)
                for later, waiting in self.ooo.items():
                    if later not in self.covered and self._in_reservation(waiting, later):
                        self.covered.add(later)
                        self._hold(-len(waiting.payload))
        elif (
            partial is None
            or frag.index != partial.next_index
            or frag.count != partial.count
            or frag.total_len != partial.total_len
            or frag.msg_id != partial.msg_id & 0xFFFFFFFF
        ):
            # The tail of a message whose start was skipped, or a broken sender.
            self.reassembly_errors += 1
            self._end_partial()
            return
        partial.next_index += 1
        if partial.rejected is None:
            partial.chunks.append(frag.payload)
            partial.size += len(frag.payload)
            if partial.size > partial.total_len:
                self.reassembly_errors += 1
                self._end_partial()
                return
        if partial.next_index < partial.count:
            return
        self._end_partial()
        if partial.rejected is not None:
            return
        if partial.size != partial.total_len:
            self.reassembly_errors += 1
            return
        data = bytes(partial.chunks[0]) if partial.count == 1 else b"".join(partial.chunks)
        delivered.append(
            Delivery(
                partial.msg_id,
                data,
                partial.msg_type,
                partial.priority,
                partial.mailbox,
                seq,
                partial.for_node,
            )
        )

    def _over_budget(self, frag: Fragment, seq: int) -> bool:
        """Whether storing ``frag`` would take the node past its receive memory, or
        this peer past its share of it (``Config.peer_receive_share``).

        In-order fragments of a message already started never are (its length
        was reserved); neither is an in-order single-datagram message (it is
        delivered at once) or a node message. A fragment that starts a
        multi-datagram message needs room for the whole message.
        """
        if frag.for_node or frag.total_len > self.max_message_size:
            return False  # (one too large is refused without storing a byte)
        starts = frag.index == 0 and frag.count > 1
        if seq == self.expected and not starts:
            return False
        need = frag.total_len if starts else len(frag.payload)
        if starts and seq == self.expected:
            # Its own later fragments, already waiting here, move into the reservation:
            # counting them twice would let them lock out the message they belong to.
            wire_id = frag.msg_id
            need -= sum(
                len(f.payload)
                for later, f in self.ooo.items()
                if f.msg_id == wire_id and seq < later < seq + frag.count + self.max_window
            )
        if self.budget.used + need > self.budget.limit:
            return True
        if seq != self.expected and self.budget.used + need > self._ooo_limit():
            # What waits out of order leaves room for one message's reservation, or
            # every peer's reorder buffer could fill the node while each waits for a
            # start fragment with no room to reserve: a deadlock (three senders did).
            return True
        # The share bounds what waits out of order. The fragment the stream is
        # waiting for is exempt: refusing it because later fragments fill the
        # share would leave them waiting for it forever (they were selectively
        # acknowledged, so the sender will not send them again).
        return seq != self.expected and self.held + need > self.share

    def _ooo_limit(self) -> int:
        """Bytes of the node's receive memory out-of-order fragments may fill: all of it
        but one largest message, kept for the reservation of a message that is next."""
        return self.budget.limit - self.max_message_size

    def resume(self, expected: int, last_msg_id: int | None) -> None:
        """Continue where a dropped session of the same peer incarnation stopped.

        Everything below ``expected`` was delivered (or skipped) then, so a
        retransmission of it is a duplicate now, never a second delivery.
        """
        self.expected = expected
        self.last_msg_id = last_msg_id

    def fence(self) -> int | None:
        """One past every sequence number this stream holds data for, or None if it
        holds none: what a peer must give up on if this stream is discarded.

        A partial message counts up to its last fragment: its remaining
        fragments, arriving at a stream that no longer has its start, would be
        acknowledged without ever being delivered.
        """
        if self.expected is None or not (self.ooo or self.partial is not None):
            return None
        fence = self.expected
        if self.ooo:
            fence = max(fence, max(self.ooo) + 1)
        if self.partial is not None:
            fence = max(fence, self.partial.first_seq + self.partial.count)
        return fence

    def before_fence(self, frag: Fragment, fence: int) -> bool:
        """Whether ``frag``'s packet still comes from before the sender gave up below ``fence``."""
        assert self.expected is not None
        seq = unwrap(frag.seq, self.expected)
        return unwrap(frag.base, seq) < fence

    def _in_reservation(self, frag: Fragment, seq: int) -> bool:
        """Whether ``frag`` belongs to the message in progress, whose bytes are reserved."""
        partial = self.partial
        return (
            partial is not None
            and partial.reserved > 0
            and frag.msg_id == partial.msg_id & 0xFFFFFFFF
            and partial.first_seq < seq < partial.first_seq + partial.count + self.max_window
        )

    def _unstore(self, frag: Fragment, seq: int) -> None:
        """``frag`` left the reorder buffer: return its bytes unless a reservation covers them."""
        if seq in self.covered:
            self.covered.discard(seq)
        else:
            self._hold(-len(frag.payload))

    def _hold(self, nbytes: int) -> None:
        self.held += nbytes
        self.budget.used += nbytes

    def _end_partial(self) -> None:
        """The message in progress is complete, refused or broken: release its reservation."""
        if self.partial is not None:
            self._hold(-self.partial.reserved)
            self.partial = None
            for seq in self.covered:  # still waiting: their bytes count on their own again
                frag = self.ooo.get(seq)
                if frag is not None:
                    self._hold(len(frag.payload))
            self.covered.clear()

    def release(self) -> None:
        """This stream is being discarded (peer restarted or gone): return what it held."""
        self._hold(-self.held)
        self.ooo.clear()
        self.covered.clear()
        self.partial = None

    def add_notice(self, msg_id: int, verdict: Verdict, seq: int) -> None:
        """Report ``verdict`` on message ``msg_id``, whose last fragment so far is ``seq``."""
        self.notices[msg_id] = _Notice(verdict, seq)
        self.ack_now = True

    def _add_range(self, seq: int) -> None:
        ranges = self.ranges
        i = bisect.bisect_right(ranges, seq, key=lambda r: r[0])
        if i > 0 and ranges[i - 1][1] == seq:
            ranges[i - 1][1] = seq + 1
            if i < len(ranges) and ranges[i][0] == seq + 1:
                ranges[i - 1][1] = ranges[i][1]
                del ranges[i]
        elif i < len(ranges) and ranges[i][0] == seq + 1:
            ranges[i][0] = seq
        else:
            ranges.insert(i, [seq, seq + 1])

    def _trim_ranges(self) -> None:
        assert self.expected is not None
        ranges = self.ranges
        while ranges and ranges[0][1] <= self.expected:
            del ranges[0]
        if ranges and ranges[0][0] < self.expected:
            ranges[0][0] = self.expected

    def _expire_notices(self, base: int) -> None:
        """The sender's base passed these messages: it has seen their notices.

        Notices are kept in the order of their messages' sequence numbers (what
        ``ack_state`` relies on too), so this stops at the first the base has not
        passed rather than scan them all for every fragment: a durable mailbox's
        messages each owe a ``STAGED`` notice until the base passes them, about 76
        at a time at a window of 256. A notice replaced later in its message (a
        verdict after ``DEFERRED``) may sit out of order: it only delays the
        expiry of those behind it, which are then carried a little longer.
        """
        notices = self.notices
        while notices:
            msg_id = next(iter(notices))
            if notices[msg_id].first_seq >= base:
                break
            del notices[msg_id]

    # -------------------------------------------------------- acknowledging

    def wants_ack(self, now: float) -> bool:
        """Whether an acknowledgement should go out now."""
        return (
            self.ack_now
            or (self.ack_requested and not self.reply_wait)
            or (self.ack_deadline is not None and now >= self.ack_deadline)
        )

    def await_reply(self, until: float) -> None:
        """A message just went straight to a waiting receiver: an ack that only the
        sender's request calls for may wait until ``until`` for the reply to carry it."""
        if self.ack_requested and not self.ack_now:
            self.reply_wait = True
            if self.ack_deadline is None or until < self.ack_deadline:
                self.ack_deadline = until

    def ack_state(
        self, now: float, max_sacks: int = MAX_SACK_RANGES, max_notices: int = MAX_NOTICES
    ) -> AckState:
        """Acknowledgement fields as of ``now``, with at most the given SACKs and notices."""
        return AckState(*self.ack_fields(now, max_sacks, max_notices))

    def ack_fields(
        self, now: float, max_sacks: int = MAX_SACK_RANGES, max_notices: int = MAX_NOTICES
    ) -> tuple[int, int, tuple[tuple[int, int], ...], tuple[tuple[int, int], ...]]:
        """:meth:`ack_state`'s fields as a plain tuple (ack, ack_delay, sacks, notices):
        what a session packs into each packet it sends, without an object per packet."""
        if self.expected is None:
            return 0, 0, (), ()
        cum = self.expected
        carried: tuple[tuple[int, int], ...] = ()
        if self.notices:
            notices = list(self.notices.items())
            if len(notices) > max_notices:
                # Never acknowledge past a refused message whose notice is not in this packet.
                cum = min(cum, notices[max_notices][1].first_seq)
                notices = notices[:max_notices]
            carried = tuple([(m, int(n.reason)) for m, n in notices])
        delay = 0
        if self.first_unacked_time is not None:
            delay = int((now - self.first_unacked_time) / ACK_DELAY_TICK)
            if delay < 0:
                delay = 0
        ranges = self.ranges
        sacks = tuple([(s, e) for s, e in ranges[:max_sacks]]) if ranges else ()
        return cum, delay, sacks, carried

    def held_span(self) -> int:
        """Sequence numbers from ``expected`` to one past the highest fragment held out of
        order (0 if none): how much of ``max_window`` the reorder buffer spans."""
        if not self.ranges or self.expected is None:
            return 0
        return self.ranges[-1][1] - self.expected

    def ack_sent(self) -> None:
        """An outgoing packet carried the current acknowledgement state.

        (PeerSession.datagrams makes these same assignments in place for each DATA
        datagram: change both together.)"""
        self.ack_pending = 0
        self.ack_now = False
        self.ack_requested = False
        self.reply_wait = False
        self.ack_deadline = None
        self.first_unacked_time = None
