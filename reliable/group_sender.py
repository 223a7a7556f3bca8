"""The sending half of reliable multicast and broadcast: one stream per group.

Theory of operation
-------------------
A group stream numbers fragments in one sequence space per (sender
incarnation, group) and sends each fragment *once* to the group address;
the network copies it to every member. Each message records the members
*expected* to receive it: the live members when it was sent (a later
joiner gets the messages sent after it joined, and is credited if it
acknowledges an earlier one it happened to hear).

Members acknowledge progress with GACKs (unicast, cumulative plus SACK
ranges, like the unicast receiver; a refusal rides on them as a verdict
notice) and report gaps with GNAKs, which they send to the group after a
random delay so one member's report suppresses the others' (see
:mod:`reliable.group_member`). Repairs:

* a GNAK makes the sender resend the named fragments to the group, at most
  once per ``holdoff`` (half a smoothed RTT) each, however many members ask;
* a fragment unacknowledged by an expected member one RTO after it was sent
  goes again, with exponential backoff: unicast to that member when it is
  the only one missing it, to the group otherwise. This also repairs tail
  losses, which no later fragment reveals.

A message is *resolved* when every expected member has acknowledged it,
refused it, left or become unreachable, or when its timeout passes; its
receipt lists who has it and why the others do not. Fragments then leave
the stream. ``base`` (the first fragment of the oldest unresolved message)
rides on every GDATA and GSYNC, so members skip what the sender gave up
on. At most ``group_window`` fragments are in flight unacknowledged by
some expected member: the slowest member paces the group, and nothing
grows without bound.
"""

from __future__ import annotations

import heapq
import random
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from .config import K_GRANULARITY, Config
from .rtt import RttEstimator
from .wire import Fragment, Verdict, unwrap

__all__ = ["GroupMessage", "GroupSendStream"]

_WIRE_MASK = 0xFFFFFFFF
_MEMBER_ACK_DELAY = 0.02  # members coalesce GACKs up to this long (see group_member)


@dataclass(slots=True, eq=False)
class GroupMessage:
    """One message sent to a group, and what each expected member said about it."""

    ticket: int
    data: bytes
    msg_type: int
    priority: int
    mailbox: str
    msg_id: int
    first_seq: int
    count: int
    fragment_size: int
    created: float
    deadline: float
    expected: dict[Any, int]  #: member -> incarnation when the message was sent
    acked: dict[Any, int] = field(default_factory=dict)
    refused: dict[Any, Verdict] = field(default_factory=dict)
    gone: dict[Any, str] = field(default_factory=dict)  #: expected members that left, and why
    transmissions: int = 0
    unsent: int = 0  #: fragments not yet sent once (every message goes out at least once)
    timed_out: bool = False
    resolved: bool = False

    def waiting_on(self) -> list[Any]:
        """Expected members that have not answered yet."""
        return [
            m
            for m in self.expected
            if m not in self.acked and m not in self.refused and m not in self.gone
        ]

    def payload(self, seq: int) -> bytes:
        index = seq - self.first_seq
        return self.data[index * self.fragment_size : (index + 1) * self.fragment_size]


@dataclass(slots=True)
class _Progress:
    """What one member acknowledged of this stream: everything below ``cum``, plus SACKs."""

    incarnation: int
    cum: int | None = None
    sacks: tuple[tuple[int, int], ...] = ()

    def covers(self, seq: int) -> bool:
        if self.cum is None:
            return False
        if seq < self.cum:
            return True
        return any(start <= seq < end for start, end in self.sacks)


class GroupSendStream:
    """One node's outgoing stream to one group."""

    def __init__(self, group: str, config: Config, rng: random.Random) -> None:
        self.group = group
        self.config = config
        self.next_seq = rng.getrandbits(32)
        #: The stream's first (random) seq: an ack at or below it proves nothing was heard.
        self.initial_seq = self.next_seq
        self._next_msg_id = rng.getrandbits(32)
        self.messages: dict[int, GroupMessage] = {}  # ticket -> unresolved message, in send order
        self._by_seq: dict[int, GroupMessage] = {}  # unresolved messages' fragments
        self._pending: deque[int] = deque()  # seqs not yet sent once
        self._sent_at: dict[int, float] = {}  # seqs sent, not yet acked by every expected member
        self._tries: dict[int, int] = {}
        self._repairs: dict[int, Any] = {}  # seq -> None (to the group) or a member address
        self.progress: dict[Any, _Progress] = {}
        self._deadlines: list[tuple[float, int]] = []  # (deadline, ticket), resolved ones lazily
        self._expired: list[GroupMessage] = []  # timed out before all of it was sent
        self.rtt = RttEstimator(
            initial_rto=config.initial_rto,
            min_rto=config.min_rto,
            max_rto=config.max_rto,
            max_ack_delay=_MEMBER_ACK_DELAY,
            granularity=K_GRANULARITY,
        )
        self.buffered = 0
        self.transmissions = 0
        self.repairs_sent = 0
        self.naks_received = 0
        self.sync_due = False
        self._last_sync = 0.0

    # -------------------------------------------------------------- sending

    def send(
        self,
        ticket: int,
        data: bytes,
        *,
        msg_type: int,
        priority: int,
        mailbox: str,
        fragment_size: int,
        now: float,
        deadline: float,
        expected: dict[Any, int],
    ) -> GroupMessage:
        count = max(1, -(-len(data) // fragment_size))
        msg = GroupMessage(
            ticket=ticket,
            data=data,
            msg_type=msg_type,
            priority=priority,
            mailbox=mailbox,
            msg_id=self._next_msg_id,
            first_seq=self.next_seq,
            count=count,
            fragment_size=fragment_size,
            created=now,
            deadline=deadline,
            expected=dict(expected),
            unsent=count,
        )
        self._next_msg_id += 1
        for seq in range(self.next_seq, self.next_seq + count):
            self._by_seq[seq] = msg
            self._pending.append(seq)
        self.next_seq += count
        self.messages[ticket] = msg
        heapq.heappush(self._deadlines, (deadline, ticket))
        self.buffered += len(data)
        for member, incarnation in expected.items():
            if member not in self.progress or self.progress[member].incarnation != incarnation:
                self.progress[member] = _Progress(incarnation)
        return msg

    @property
    def base(self) -> int:
        """First fragment of the oldest unresolved message: members may skip what lies below."""
        for msg in self.messages.values():
            return msg.first_seq
        return self.next_seq

    def fragment(self, seq: int) -> Fragment:
        msg = self._by_seq[seq]
        return Fragment(
            seq=seq & _WIRE_MASK,
            base=self.base & _WIRE_MASK,
            msg_id=msg.msg_id & _WIRE_MASK,
            index=seq - msg.first_seq,
            count=msg.count,
            total_len=len(msg.data),
            msg_type=msg.msg_type,
            priority=msg.priority,
            mailbox=msg.mailbox,
            payload=msg.payload(seq),
        )

    def due(self, now: float) -> list[tuple[int, Any]]:
        """Fragments to send now: ``(seq, None)`` to the group, ``(seq, member)`` unicast."""
        out: list[tuple[int, Any]] = list(self._repairs.items())
        self._repairs.clear()
        for seq, _ in out:
            self._count_transmission(seq, now)
            self.repairs_sent += 1
        while self._pending and len(self._sent_at) < self.config.group_window:
            seq = self._pending.popleft()
            msg = self._by_seq.get(seq)
            if msg is None:
                continue  # its message was resolved (timed out) before it went out
            msg.unsent -= 1
            self._count_transmission(seq, now)
            out.append((seq, None))
        return out

    def _count_transmission(self, seq: int, now: float) -> None:
        msg = self._by_seq.get(seq)
        if msg is None:
            return
        self._sent_at[seq] = now
        self._tries[seq] = self._tries.get(seq, 0) + 1
        msg.transmissions += 1
        self.transmissions += 1

    # ------------------------------------------------------------ feedback

    def on_ack(
        self,
        member: Any,
        incarnation: int,
        ack: int,
        sacks: tuple[tuple[int, int], ...],
        notices: tuple[tuple[int, int], ...],
        ack_delay: float,
        now: float,
    ) -> None:
        """A member's GACK: fold its progress in; messages it completes may resolve."""
        progress = self.progress.get(member)
        if progress is None or progress.incarnation != incarnation:
            progress = self.progress[member] = _Progress(incarnation)
        reference = self.next_seq
        cum = unwrap(ack, reference)
        if not self.initial_seq <= cum <= self.next_seq:
            # Acknowledges fragments never sent: a confused or hostile member. (The first
            # seq is random, so a blind forger rarely names a real one.)
            return
        if progress.cum is None or cum > progress.cum:
            progress.cum = cum
        progress.sacks = tuple(
            (s, e)
            for s, e in ((unwrap(a, reference), unwrap(b, reference)) for a, b in sacks)
            if self.initial_seq <= s < e <= self.next_seq
        )
        self._sample_rtt(progress, ack_delay, now)
        for wire_id, verdict in notices:
            msg = self._by_wire_id(wire_id)
            if msg is not None and verdict != Verdict.DEFERRED:
                msg.refused[member] = Verdict(verdict)
        # Messages are in sequence order: none at or beyond what it acknowledged can be whole.
        reach = max([progress.cum or 0, *(end for _, end in progress.sacks)])
        for msg in self.messages.values():
            if msg.first_seq >= reach:
                break
            if member in msg.acked or member in msg.refused:
                continue
            if all(progress.covers(s) for s in range(msg.first_seq, msg.first_seq + msg.count)):
                msg.acked[member] = incarnation
                msg.gone.pop(member, None)  # it answered after all
        self._settle_fragments()

    def _sample_rtt(self, progress: _Progress, ack_delay: float, now: float) -> None:
        # Karn: only fragments sent once give an unambiguous sample; the newest is freshest.
        tries = self._tries
        once = [t for q, t in self._sent_at.items() if tries[q] == 1 and progress.covers(q)]
        newest = max(once, default=None)
        if newest is not None:
            self.rtt.on_sample(now - newest, ack_delay)

    def on_nak(self, ranges: tuple[tuple[int, int], ...], now: float) -> None:
        """A member's GNAK: resend what it names, at most once per holdoff per fragment."""
        self.naks_received += 1
        holdoff = self.holdoff
        reference = self.next_seq
        budget = self.config.group_window
        for start_w, end_w in ranges:
            start, end = unwrap(start_w, reference), unwrap(end_w, reference)
            for seq in range(max(start, self.base), min(end, self.next_seq)):
                if budget <= 0:
                    return
                sent = self._sent_at.get(seq)
                if sent is not None and now - sent >= holdoff:
                    self._repairs[seq] = None
                    budget -= 1

    @property
    def holdoff(self) -> float:
        srtt = self.rtt.srtt
        return max(0.002, (srtt if srtt is not None else self.config.nak_delay) / 2)

    def member_gone(self, member: Any, reason: str) -> None:
        """An expected member left or went silent: stop waiting on it."""
        self.progress.pop(member, None)
        for msg in self.messages.values():
            if member in msg.expected and member not in msg.acked and member not in msg.refused:
                msg.gone.setdefault(member, reason)
        self._settle_fragments()

    # -------------------------------------------------------------- timers

    def _earliest_deadline(self) -> float | None:
        heap = self._deadlines
        while heap and heap[0][1] not in self.messages:
            heapq.heappop(heap)  # resolved already
        return heap[0][0] if heap else None

    def deadline(self) -> float | None:
        first = self._earliest_deadline()
        times = [] if first is None else [first]
        for seq, sent in self._sent_at.items():
            times.append(sent + self.rtt.backed_off(self._tries[seq] - 1))
        if self.messages:
            times.append(self._last_sync + self.config.announce_interval)
        return min(times, default=None)

    def on_timer(self, now: float) -> None:
        while (first := self._earliest_deadline()) is not None and first <= now:
            msg = self.messages[heapq.heappop(self._deadlines)[1]]
            msg.timed_out = True
            self._expired.append(msg)
            for member in msg.waiting_on():
                msg.gone[member] = "timeout"
        for seq, sent in list(self._sent_at.items()):
            if seq in self._repairs or now < sent + self.rtt.backed_off(self._tries[seq] - 1):
                continue
            owner = self._by_seq.get(seq)
            if owner is None:
                continue
            missing = [m for m in owner.waiting_on() if not self._covered(m, seq)]
            if not missing:
                continue
            # Unicast only to a member that has acknowledged us, so proved it hears us at
            # that address: a forged JOIN must not aim repairs at someone else's host.
            alone = len(missing) == 1 and self._has_acked(missing[0])
            self._repairs[seq] = missing[0] if alone else None
        if self.messages and now >= self._last_sync + self.config.announce_interval:
            self.sync_due = True
        self._settle_fragments()

    def synced(self, now: float) -> None:
        self.sync_due = False
        self._last_sync = now

    # ------------------------------------------------------------ resolution

    def resolved(self) -> list[GroupMessage]:
        """Messages that every expected member has answered (or that timed out), oldest first.

        Removes them from the stream; the base moves past them.
        """
        # Only messages already sent can be answered; the rest wait behind the window.
        frontier = self._pending[0] if self._pending else self.next_seq
        done = []
        for m in self.messages.values():
            if m.first_seq >= frontier:
                break
            if m.timed_out or not (m.unsent or m.waiting_on()):
                done.append(m)
        done.extend(m for m in self._expired if not m.resolved and m.first_seq >= frontier)
        self._expired.clear()
        for msg in done:
            msg.resolved = True
            del self.messages[msg.ticket]
            self.buffered -= len(msg.data)
            for seq in range(msg.first_seq, msg.first_seq + msg.count):
                self._by_seq.pop(seq, None)
                self._sent_at.pop(seq, None)
                self._tries.pop(seq, None)
                self._repairs.pop(seq, None)
            if msg.gone or msg.refused:
                self.sync_due = True  # members that missed it must learn the new base
        return done

    def _has_acked(self, member: Any) -> bool:
        """Whether ``member`` acknowledged a fragment we sent: proof it hears us there.

        An acknowledgement of nothing (the stream's first seq) proves nothing: anyone
        can send that, so it must not aim unicast repairs at an address.
        """
        progress = self.progress.get(member)
        return progress is not None and progress.cum is not None and progress.cum > self.initial_seq

    def _covered(self, member: Any, seq: int) -> bool:
        progress = self.progress.get(member)
        return progress is not None and progress.covers(seq)

    def _settle_fragments(self) -> None:
        """Forget send times of fragments every expected member has, freeing the window."""
        for seq in list(self._sent_at):
            msg = self._by_seq.get(seq)
            if msg is None or all(self._covered(m, seq) for m in msg.waiting_on()):
                del self._sent_at[seq]

    def _by_wire_id(self, wire_id: int) -> GroupMessage | None:
        for msg in self.messages.values():
            if msg.msg_id & _WIRE_MASK == wire_id:
                return msg
        return None

    def abandon_all(self, reason: str) -> list[GroupMessage]:
        for msg in self.messages.values():
            msg.timed_out = True
            self._expired.append(msg)
            for member in msg.waiting_on():
                msg.gone[member] = reason
        return self.resolved()
