"""Mailboxes: where delivered messages wait for ``receive``, with OS message-queue semantics.

Pure data structures driven by the protocol core; no I/O, no clock reads.

Ordering
--------
A mailbox is a priority queue: higher ``priority`` first, first-in first-out
within a priority (POSIX ``mq_receive``). A receive may select (System V
``msgrcv``): by source, and by type — ``0`` the first message, ``t > 0`` the
first of type ``t`` (or, with ``except_type``, the first of any other type),
``t < 0`` the first of the lowest type ``<= |t|``. "First" always means first
in priority order. The source may be a set of senders: the first message
from any of them.

Size limit (``msgrcv``'s ``msgsz``): a selector with ``max_size`` never
hands out a longer message whole. The first message it chooses, if longer,
either stays queued and the receive fails (:class:`MessageTooBig`, as
``E2BIG``), or with ``truncate`` is handed out cut, ``Message.truncated``
saying how many bytes went (``MSG_NOERROR``). A waiting receive whose
arriving message is too long fails the same way, and the message goes on to
the next receiver or the queue.

Since the transport delivers each sender's messages in send order, a
mailbox holds them in send order within each priority: that is the ordering
guarantee, per (sender, mailbox, priority).

Capacity
--------
``capacity`` messages and/or ``max_bytes`` bytes (``None``: unlimited, then
only the node-wide memory cap applies). A message arriving at a full mailbox
is *parked*: the node holds it, its sender's transport is told so with a
``DEFERRED`` verdict, and it enters the mailbox when room appears, highest
priority first. While anything is parked, newer arrivals park behind it, so
parking never reorders a sender's messages. A mailbox of capacity 0 is a
*rendezvous*: every message parks until a receiver takes it, and its sender
learns which receiver did.

Durable mailboxes
-----------------
A mailbox with a ``log`` (:mod:`reliable.durable`) keeps its messages on
disk. A message that would enter it is *staged* instead: it holds its room
but is invisible to receivers until the store reports the commit that wrote
it (:meth:`Mailbox.committed`); only then does it enter, and its sender hear
that it did. Taking a message stages the deletion of its row.

Receivers
---------
Receivers that found nothing wait in a FIFO queue. An arriving message goes
to the longest-waiting receiver whose selection it matches, so no message
ever sits in a mailbox while a receiver that wants it waits (the invariant
the property tests check), and waiting receivers are served in arrival order.
"""

from __future__ import annotations

import bisect
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

from .durable import DurableLog, describe
from .errors import MessageTooBig, UsageError
from .message import Message
from .stats import MailboxStats
from .wire import MAX_MAILBOX_BYTES, MSG_TYPE_MAX, MSG_TYPE_MIN

__all__ = ["Mailbox", "MessageQueue", "Selector", "Sources", "check_mailbox_name", "selector_for"]

#: A receive's ``source``: one sender's address, or a list or set of them (any of those).
Sources = str | tuple[Any, ...] | list[Any] | set[Any] | frozenset[Any] | None


def check_mailbox_name(name: object) -> None:
    """Raise a :class:`UsageError` unless ``name`` is a valid mailbox name."""
    if not isinstance(name, str):
        raise UsageError(f"a mailbox name is a string, got {name!r}")
    if len(name.encode("utf-8")) > MAX_MAILBOX_BYTES:
        raise UsageError(f"mailbox name {name[:20]!r}... is over 255 bytes of UTF-8; shorten it")
    if "/" in name:
        raise UsageError(f"mailbox name {name!r} may not contain '/'")


def _limit(label: str, value: object) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise UsageError(f"{label} must be None (unbounded) or an integer >= 0, got {value!r}")
    return value


def check_limits(capacity: object, max_bytes: object) -> tuple[int | None, int | None]:
    """``(capacity, max_bytes)`` once checked; a :class:`UsageError` unless they are
    valid mailbox limits.

    The arguments are ``object``, not ``int | None``: the caller's values arrive
    here unchecked, and in the compiled core a declared type would be checked at
    the call, raising ``TypeError`` instead of this ``UsageError``.
    """
    cap, size = _limit("capacity", capacity), _limit("max_bytes", max_bytes)
    if size == 0 and cap != 0:
        raise UsageError("max_bytes=0 admits nothing; for a rendezvous mailbox use capacity=0")
    return cap, size


@dataclass(frozen=True, slots=True)
class Selector:
    """Which messages a receive accepts (``source`` None: any sender; a frozenset: any
    of those senders), and how long a message it may hand out whole (``max_size``)."""

    # Typed Any, not int/bool: the caller's values arrive here unchecked, and a compiled
    # core checks declared field types in __init__ (TypeError, or a bool passing as an
    # int) before __post_init__ can raise the UsageError that says what to pass.
    source: Any = None
    msg_type: Any = 0
    except_type: Any = False
    max_size: Any = None
    truncate: Any = False

    def __post_init__(self) -> None:
        if self.max_size is not None and (
            isinstance(self.max_size, bool)
            or not isinstance(self.max_size, int)
            or self.max_size < 0
        ):
            raise UsageError(f"max_size must be None or an integer >= 0, got {self.max_size!r}")
        if self.truncate and self.max_size is None:
            raise UsageError("truncate=True cuts messages to max_size: give max_size too")
        if isinstance(self.msg_type, bool) or not isinstance(self.msg_type, int):
            raise UsageError(f"msg_type must be an integer, got {self.msg_type!r}")
        if not MSG_TYPE_MIN <= self.msg_type <= MSG_TYPE_MAX:
            raise UsageError(f"msg_type must fit in a signed 32-bit integer, got {self.msg_type}")
        if self.except_type and self.msg_type <= 0:
            raise UsageError("except_type needs a positive msg_type (as msgrcv's MSG_EXCEPT)")

    @staticmethod
    def of(
        source: Any = None,
        msg_type: Any = 0,
        except_type: Any = False,
        max_size: Any = None,
        truncate: Any = False,
    ) -> Selector:
        """A selector; the shared "anything" one when nothing is selected (a fast path)."""
        if source is None and msg_type == 0 and not except_type and max_size is None:
            if truncate:  # the checks below are skipped on this path: this one must not be
                raise UsageError("truncate=True cuts messages to max_size: give max_size too")
            return ANY
        return Selector(source, msg_type, except_type, max_size, truncate)

    def admits(self, msg: Message) -> bool:
        """Whether ``msg`` alone could satisfy this selection (whatever its size)."""
        source = self.source
        if source is not None and (
            msg.source not in source if isinstance(source, frozenset) else msg.source != source
        ):
            return False
        t: int = self.msg_type  # checked an int in __post_init__
        if t == 0:
            return True
        if t > 0:
            return (msg.msg_type != t) if self.except_type else (msg.msg_type == t)
        return msg.msg_type <= -t

    def too_big(self, msg: Message) -> bool:
        """Whether ``msg`` is longer than ``max_size`` allows whole."""
        return self.max_size is not None and len(msg.data) > self.max_size

    def fit(self, msg: Message) -> Message:
        """``msg`` as this receive hands it out: cut to ``max_size`` if it is longer (the
        caller checked ``truncate``), else itself."""
        if self.max_size is None or len(msg.data) <= self.max_size:
            return msg
        cut = len(msg.data) - self.max_size
        return replace(msg, data=msg.data[: self.max_size], truncated=msg.truncated + cut)


ANY = Selector()


def selector_for(
    source: Any,
    msg_type: Any,
    except_type: Any,
    max_size: Any,
    truncate: Any,
    resolve: Callable[[Any], Any],
) -> Selector:
    """The selector of a receive call; ``resolve`` turns one source into an address.

    ``source`` is one address (a string, or a tuple: an address itself), or a
    list or set of them: the receive then takes the first message from any of
    those senders (a set of sources, not only one or any).
    """
    peer: Any = None
    if isinstance(source, (list, set, frozenset)):
        if not source:
            raise UsageError("source=[] selects no sender: name at least one, or None for any")
        peers = frozenset(resolve(s) for s in source)
        peer = next(iter(peers)) if len(peers) == 1 else peers
    elif source is not None:
        peer = resolve(source)
    return Selector.of(peer, msg_type, except_type, max_size, truncate)


class MessageQueue:
    """Messages in priority order (highest first), FIFO within a priority."""

    __slots__ = ("_levels", "_priorities", "bytes", "count")

    def __init__(self) -> None:
        self._levels: dict[int, deque[Message]] = {}
        self._priorities: list[int] = []  # ascending; iterate reversed
        self.count = 0
        self.bytes = 0

    def __len__(self) -> int:
        return self.count

    def __iter__(self) -> Iterator[Message]:
        for priority in reversed(self._priorities):
            yield from self._levels[priority]

    def push(self, msg: Message) -> None:
        level = self._levels.get(msg.priority)
        if level is None:
            level = self._levels[msg.priority] = deque()
            bisect.insort(self._priorities, msg.priority)
        level.append(msg)
        self.count += 1
        self.bytes += len(msg.data)

    def take(self, selector: Selector = ANY) -> Message | None:
        """Remove and return the first message ``selector`` chooses, or ``None``."""
        if selector is ANY:  # the head of the highest priority, without a search
            if not self.count:
                return None
            level = self._levels[self._priorities[-1]]
            msg = level.popleft()
            self._settle(msg, level)
            return msg
        found = self._find(selector)
        return None if found is None else self._remove(*found)

    def peek(self, selector: Selector = ANY) -> Message | None:
        """The message :meth:`take` would return, left where it is."""
        found = self._find(selector)
        return None if found is None else self._levels[found[0]][found[1]]

    def _find(self, selector: Selector) -> tuple[int, int] | None:
        """(priority, index in its level) of the first message ``selector`` chooses."""
        if not self.count:
            return None
        if selector is ANY or (selector.source is None and selector.msg_type == 0):
            return self._priorities[-1], 0
        best: tuple[int, int] | None = None
        best_type = 0
        for priority in reversed(self._priorities):
            for i, msg in enumerate(self._levels[priority]):
                if not selector.admits(msg):
                    continue
                if selector.msg_type >= 0:
                    return priority, i
                if best is None or msg.msg_type < best_type:
                    best, best_type = (priority, i), msg.msg_type
        return best

    def push_front(self, msg: Message) -> None:
        """Put ``msg`` back at the head of its priority (a lock released or expired)."""
        self.push(msg)
        level = self._levels[msg.priority]
        level.rotate(1)  # the message just appended becomes the first

    def remove_where(self, predicate: Callable[[Message], bool]) -> list[Message]:
        """Remove and return every message ``predicate`` picks, in queue order."""
        removed = [m for m in self if predicate(m)]
        for msg in removed:
            level = self._levels[msg.priority]
            level.remove(msg)
            self._settle(msg, level)
        return removed

    def _remove(self, priority: int, index: int) -> Message:
        level = self._levels[priority]
        msg = level.popleft() if index == 0 else level[index]
        if index:
            del level[index]
        self._settle(msg, level)
        return msg

    def _settle(self, msg: Message, level: deque[Message]) -> None:
        self.count -= 1
        self.bytes -= len(msg.data)
        if not level:
            del self._levels[msg.priority]
            self._priorities.remove(msg.priority)


@dataclass(slots=True)
class _Waiter:
    selector: Selector
    receiver: str
    lock: float | None = None  #: receive under a lock of this many seconds


class Mailbox:
    """One named mailbox (or port) on a node.

    ``on_unpark(message, receiver)`` is called when a parked message leaves
    parking (into the queue, or with ``receiver`` set, straight to that
    receiver); ``on_handoff(ticket, message)`` when a waiting receiver is served;
    ``on_fail(ticket, error)`` when a waiting receiver's receive fails (a message
    longer than its ``max_size``).
    """

    def __init__(
        self,
        name: str,
        *,
        capacity: object,
        max_bytes: object,
        owner: int | None,
        on_unpark: Callable[[Message, str | None], None],
        on_handoff: Callable[[int, Message], None],
        now: float,
        on_fail: Callable[[int, Exception], None] | None = None,
    ) -> None:
        self.capacity, self.max_bytes = check_limits(capacity, max_bytes)
        self._on_fail = on_fail
        self.name = name
        self.owner = owner
        self.open = True
        self.queue = MessageQueue()
        self.parked = MessageQueue()
        self.waiters: OrderedDict[int, _Waiter] = OrderedDict()
        self._on_unpark = on_unpark
        self._on_handoff = on_handoff
        self.created = now
        self.high_water = 0
        self.total_in = 0
        self.total_out = 0
        self.deferred = 0
        self.refused = 0
        self.discarded = 0
        self.last_send: tuple[float, Any] | None = None
        self.last_receive: tuple[float, str] | None = None
        self.log: DurableLog | None = None  #: set for a durable mailbox
        self.staged = 0  #: durable: admitted messages waiting for their commit
        self.staged_bytes = 0
        self.locked: dict[Message, float] = {}  #: taken under a lock, until this deadline
        self.locked_bytes = 0
        #: rendezvous: messages put back (:meth:`put_back`) into parking after their
        #: sender was told they were taken; taken again, the sender is not told twice
        self.returned: set[Message] = set()

    @property
    def rendezvous(self) -> bool:
        return self.capacity == 0

    def fits(self, size: int) -> bool:
        """Whether a message of ``size`` bytes could ever enter (else refuse it at once)."""
        return self.max_bytes is None or self.rendezvous or size <= self.max_bytes

    # ----------------------------------------------------------------- arrivals

    def offer(self, msg: Message, now: float) -> bool:
        """Take an arriving message; returns False if it was parked (deferred)."""
        self.last_send = (now, msg.source)
        if not self.parked.count and self.capacity != 0:  # (not a rendezvous)
            if self.log is not None:
                if self._has_room(len(msg.data)):
                    self._stage(msg)
                    return True
            elif self.waiters and self._hand_to_waiter(msg, None, now):
                return True
            else:
                queue = self.queue  # _has_room and _enqueue, inline: once per message
                size = len(msg.data)
                if (self.capacity is None or queue.count + self.staged < self.capacity) and (
                    self.max_bytes is None
                    or queue.bytes + self.staged_bytes + size <= self.max_bytes
                ):
                    self.total_in += 1
                    level = queue._levels.get(msg.priority)  # (queue.push, inline)
                    if level is None:
                        queue.push(msg)
                    else:
                        level.append(msg)
                        queue.count += 1
                        queue.bytes += size
                    if queue.count > self.high_water:
                        self.high_water = queue.count
                    return True
        self.deferred += 1
        self.parked.push(msg)
        if self.rendezvous:
            self._hand_to_waiter_from_parking(msg, now)
        return False

    def _has_room(self, size: int) -> bool:
        if self.capacity is not None and self.queue.count + self.staged >= self.capacity:
            return False
        return (
            self.max_bytes is None or self.queue.bytes + self.staged_bytes + size <= self.max_bytes
        )

    def _stage(self, msg: Message) -> None:
        """Durable: ``msg`` has room; it enters once the store has committed it."""
        assert self.log is not None
        self.staged += 1
        self.staged_bytes += len(msg.data)
        self.log.staged.append(msg)  # (DurableLog.stage, inline: once per message)

    def committed(self, msgs: list[Message], now: float) -> None:
        """Durable: the store committed staged ``msgs``; they enter, in order.

        Their senders' receipts are the caller's (``PostOffice.writes_done``
        makes them for the whole commit in one pass), not ``on_unpark``'s one
        message at a time."""
        queue = self.queue
        nbytes = 0
        for msg in msgs:
            nbytes += len(msg.data)
            if self.waiters and self._hand_to_waiter(msg, None, now):
                continue
            self.total_in += 1  # (_enqueue, inline: once per message)
            queue.push(msg)
        self.staged -= len(msgs)
        self.staged_bytes -= nbytes
        if queue.count > self.high_water:
            self.high_water = queue.count

    def uncommitted(self, msgs: list[Message]) -> None:
        """Durable: the store failed to commit staged ``msgs``; they never enter."""
        for msg in msgs:
            self.staged -= 1
            self.staged_bytes -= len(msg.data)
        self.discarded += len(msgs)

    def restore(self, msg: Message) -> None:
        """Durable: a message the store held when the mailbox was opened."""
        self.queue.push(msg)
        self.high_water = max(self.high_water, self.queue.count)

    def adopt(self, msg: Message, now: float) -> None:
        """A message moved here with the mailbox's ownership (remote_mailbox.py): it
        enters whatever the limits, as a restored one does; a waiting receiver first."""
        if not self._hand_to_waiter(msg, None, now):
            self._enqueue(msg)

    def _enqueue(self, msg: Message) -> None:
        self.total_in += 1
        self.queue.push(msg)
        self.high_water = max(self.high_water, self.queue.count)

    def _waiter_for(self, msg: Message) -> tuple[int, _Waiter] | None:
        """The longest-waiting receiver ``msg`` goes to, removed from the line. Receivers
        it selects but is too long for (``max_size`` without ``truncate``) fail on the way."""
        found = None
        refused: list[tuple[int, Selector]] = []
        for ticket, waiter in self.waiters.items():
            if waiter.selector.admits(msg):
                if waiter.selector.too_big(msg) and not waiter.selector.truncate:
                    refused.append((ticket, waiter.selector))
                    continue
                found = ticket, waiter
                break
        for ticket, selector in refused:
            del self.waiters[ticket]
            if self._on_fail is not None:
                assert selector.max_size is not None
                self._on_fail(ticket, MessageTooBig(len(msg.data), selector.max_size, self.name))
        if found is not None:
            del self.waiters[found[0]]
        return found

    def _hand_to_waiter(self, msg: Message, receiver: str | None, now: float) -> bool:
        waiters = self.waiters
        if not waiters:
            return False
        # The common case: the longest-waiting receive takes any message whole (no
        # source, type or size in its selection), so it is the one _waiter_for finds.
        ticket, waiter = next(iter(waiters.items()))
        selector = waiter.selector
        if (
            selector.source is None
            and selector.msg_type == 0
            and selector.max_size is None
            and waiter.lock is None
            and self.log is None
        ):
            del waiters[ticket]
            self.total_in += 1
            self.total_out += 1  # (_served, inline)
            self.last_receive = (now, waiter.receiver)
            self._on_handoff(ticket, msg)  # (selector.fit(msg) is msg: no max_size)
            return True
        found = self._waiter_for(msg)
        if found is None:
            return False
        ticket, waiter = found
        self.total_in += 1
        self._served(waiter.receiver, now)
        if waiter.lock is not None:
            self._lock(msg, now + waiter.lock)
        elif self.log is not None:
            self.log.remove(msg)
        self._on_handoff(ticket, waiter.selector.fit(msg))
        return True

    def _hand_to_waiter_from_parking(self, msg: Message, now: float) -> None:
        found = self._waiter_for(msg) if self.waiters else None
        if found is None:
            return
        ticket, waiter = found
        self.parked.remove_where(lambda m: m is msg)
        self.total_in += 1
        self._served(waiter.receiver, now)
        if not self.returned or not self._was_returned(msg):
            self._on_unpark(msg, waiter.receiver)
        self._on_handoff(ticket, waiter.selector.fit(msg))

    def _was_returned(self, msg: Message) -> bool:
        """Whether ``msg`` was put back after its sender heard it was taken (forgotten now)."""
        if msg in self.returned:
            self.returned.discard(msg)
            return True
        return False

    # ---------------------------------------------------------------- receiving

    def take(
        self, selector: Selector, receiver: str, now: float, lock: float | None = None
    ) -> Message | None:
        """The first message ``selector`` chooses, if any, without waiting.

        With ``lock`` (seconds) the message is not removed but locked: no
        other receive sees it until :meth:`ack` removes it, :meth:`release`
        returns it, or the lock expires (:meth:`expire_locks`) and it is
        back at the head of its priority.

        Raises :class:`MessageTooBig`, removing nothing, if the message is longer
        than ``selector.max_size`` and ``selector.truncate`` is false. The message
        returned is whole; the caller cuts it (``selector.fit``) once it is counted.
        """
        if selector.max_size is not None and not selector.truncate:
            head = (self.parked if self.rendezvous and lock is None else self.queue).peek(selector)
            if head is not None and selector.too_big(head):
                raise MessageTooBig(len(head.data), selector.max_size, self.name)
        if lock is not None:
            msg = self.queue.take(selector)
            if msg is not None:
                self._lock(msg, now + lock)
                self._served(receiver, now)
            return msg
        if self.capacity == 0:  # a rendezvous
            msg = self.parked.take(selector)
            if msg is not None:
                self.total_in += 1
                self._served(receiver, now)
                if not self.returned or not self._was_returned(msg):
                    self._on_unpark(msg, receiver)
            return msg
        msg = self.queue.take(selector)
        if msg is not None:
            if self.log is not None:
                self.log.remove(msg)
            self._served(receiver, now)
            if self.parked.count:
                self._refill(now)
        return msg

    def take_head(self, receiver: str, now: float) -> Message | None:
        """:meth:`take` with the ``ANY`` selector and no lock: the head of the highest
        priority, or None. The plain mailbox's case (not a rendezvous, not durable,
        nothing parked) is inline, one call where it was four; the rest goes to take."""
        queue = self.queue
        if self.parked.count or self.capacity == 0 or self.log is not None:
            return self.take(ANY, receiver, now)
        if not queue.count:
            return None
        level = queue._levels[queue._priorities[-1]]
        msg = level.popleft()
        queue.count -= 1  # (MessageQueue._settle, inline)
        queue.bytes -= len(msg.data)
        if not level:
            del queue._levels[msg.priority]
            queue._priorities.pop()  # (the highest: the one taken from)
        self.total_out += 1  # (_served, inline)
        self.last_receive = (now, receiver)
        return msg

    def wait(
        self, ticket: int, selector: Selector, receiver: str, lock: float | None = None
    ) -> None:
        """Queue a receiver that found nothing; it is served by :meth:`offer` or a refill."""
        self.waiters[ticket] = _Waiter(selector, receiver, lock)

    # ------------------------------------------------------------ locks, peek

    def peek(self, selector: Selector) -> Message | None:
        """The message a receive would take now, left in the mailbox (and unlocked)."""
        return self.queue.peek(selector)

    def _lock(self, msg: Message, deadline: float) -> None:
        self.locked[msg] = deadline
        self.locked_bytes += len(msg.data)

    def _unlock(self, msg: Message) -> bool:
        if self.locked.pop(msg, None) is None:
            return False
        self.locked_bytes -= len(msg.data)
        return True

    def ack(self, msg: Message, now: float) -> bool:
        """Remove locked ``msg`` for good; False if its lock had expired (or it was acked)."""
        if not self._unlock(msg):
            return False
        if self.log is not None:
            self.log.remove(msg)
        self._refill(now)
        return True

    def release(self, msg: Message, now: float) -> bool:
        """Give locked ``msg`` back: a waiting receiver gets it, or the head of its priority."""
        if not self._unlock(msg):
            return False
        self.total_out -= 1  # it was not consumed after all
        if self._hand_to_waiter(msg, None, now):
            self.total_in -= 1  # it entered once, when it first arrived
        else:
            self.queue.push_front(msg)
        return True

    def put_back(self, msg: Message, now: float, locked: bool = False) -> bool:
        """Return ``msg``, handed to a receive that gave up in the same instant, as if
        it had never been taken: the longest-waiting receiver it suits gets it, or it
        goes back to the head of its priority. Taken under a lock (``locked``), it is
        released (False if that lock expired meanwhile: it is back already). Durable,
        its row is written again, first in the mailbox (:meth:`DurableLog.put_back`). A
        rendezvous message waits in parking again; its sender, told it was taken, is not
        told again.
        """
        if locked:
            return self.release(msg, now)
        self.total_out -= 1  # it was not consumed after all
        if self.log is not None:
            self.log.put_back(msg)
        if self.rendezvous:
            self.total_in -= 1  # it enters (is taken) again
            self.returned.add(msg)
            self.parked.push_front(msg)
            self._hand_to_waiter_from_parking(msg, now)
            return True
        if self._hand_to_waiter(msg, None, now):
            self.total_in -= 1  # it entered once, when it first arrived
        else:
            self.queue.push_front(msg)
        return True

    def remove(self, msg: Message, now: float) -> bool:
        """Explicit delete: remove ``msg``, queued (peeked) or locked; False if it is gone."""
        if msg in self.locked:
            return self.ack(msg, now)
        if not self.queue.remove_where(lambda m: m is msg):
            return False
        if self.log is not None:
            self.log.remove(msg)
        self.total_out += 1
        self._refill(now)
        return True

    def lock_deadline(self) -> float | None:
        return min(self.locked.values(), default=None)

    def expire_locks(self, now: float) -> int:
        """Locks past their deadline end: those messages are receivable again."""
        expired = [m for m, deadline in self.locked.items() if deadline <= now]
        for msg in reversed(expired):  # so they end up in their earlier order
            self.release(msg, now)
        return len(expired)

    def cancel_wait(self, ticket: int) -> bool:
        return self.waiters.pop(ticket, None) is not None

    def _served(self, receiver: str, now: float) -> None:
        self.total_out += 1
        self.last_receive = (now, receiver)

    def _refill(self, now: float) -> None:
        """Room appeared: admit parked messages, highest priority first."""
        while self.parked and self._has_room(self._next_parked_size()):
            msg = self.parked.take()
            assert msg is not None
            if self.log is not None:
                self._stage(msg)
                continue
            self._on_unpark(msg, None)
            if not self._hand_to_waiter(msg, None, now):
                self._enqueue(msg)

    def _next_parked_size(self) -> int:
        return len(next(iter(self.parked)).data)

    # ------------------------------------------------------------- management

    def set_limits(self, capacity: object, max_bytes: object, now: float) -> None:
        """Change the limits at run time (``mq_setattr``, ``IPC_SET``'s ``msg_qbytes``).

        Lowering them keeps what is queued (new arrivals park until it drains
        below); raising them admits parked messages at once. A rendezvous stays
        one, and only a rendezvous has capacity 0.
        """
        cap, size = check_limits(capacity, max_bytes)
        if (cap == 0) != self.rendezvous:
            raise UsageError(
                f"mailbox {self.name!r}: a rendezvous (capacity 0) cannot become a buffered "
                "mailbox or the other way round; create another mailbox"
            )
        self.capacity, self.max_bytes = cap, size
        if not self.rendezvous:
            self._refill(now)

    def remove_parked(self, predicate: Callable[[Message], bool]) -> list[Message]:
        """Withdraw parked messages (cancelled, or their sender ended); returns them."""
        if self.returned:  # put back after their senders heard they were taken: kept
            returned = self.returned
            removed = self.parked.remove_where(lambda m: m not in returned and predicate(m))
        else:
            removed = self.parked.remove_where(predicate)
        self.discarded += len(removed)
        return removed

    def drop_queued(self) -> int:
        """Discard every queued message (the mailbox is being deleted); returns how many."""
        dropped = self.queue.remove_where(lambda _m: True)
        self.discarded += len(dropped)
        if self.log is not None:
            for msg in dropped:
                self.log.remove(msg)
        return len(dropped)

    def stats(self, now: float) -> MailboxStats:
        def age(when: tuple[float, Any] | None) -> float | None:
            return None if when is None else max(0.0, now - when[0])

        return MailboxStats(
            name=self.name,
            kind="port" if self.owner is not None else "mailbox",
            state="open" if self.open else "closed",
            capacity=self.capacity,
            max_bytes=self.max_bytes,
            messages=self.queue.count,
            bytes=self.queue.bytes,
            parked=self.parked.count,
            parked_bytes=self.parked.bytes,
            high_water=self.high_water,
            total_in=self.total_in,
            total_out=self.total_out,
            deferred=self.deferred,
            refused=self.refused,
            discarded=self.discarded,
            waiting_receivers=len(self.waiters),
            last_send_age=age(self.last_send),
            last_sender=None if self.last_send is None else self.last_send[1],
            last_receive_age=age(self.last_receive),
            last_receiver=None if self.last_receive is None else self.last_receive[1],
            locked=len(self.locked),
            durable=None if self.log is None else describe(self.log.store),
        )
