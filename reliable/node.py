"""The blocking adapter: calling threads drive an :class:`Endpoint` themselves.

Leader/follower. Every public call takes the node lock and, while inside,
drives the core: it feeds the datagrams waiting in the socket, runs the
timers that are due, and sends what the core produced (all under the lock,
so the order of datagrams and the order of events are the core's). A call
that must wait (a receive with nothing queued, ``SendHandle.result``, a send
waiting for buffer space) becomes the *leader* if nobody leads: it sleeps in
``poll`` on the node's sockets, without the lock, until a datagram, the core's
next timer or its own deadline, then drives again and checks whether its wait
is over. Other waiting threads are *followers*: they sleep on a condition
variable and are woken when the leader's driving changed something; when the
leader leaves, a follower takes its place. So the thread that wanted a
message reads it off the socket itself: no hand-off, no wake-up pipe.

A background thread keeps the protocol running while no caller is inside
(acks and retransmissions must not wait for the application): it leads
only after ``IDLE_AFTER`` seconds without calls; otherwise it naps, and on
waking runs timers that callers left due and flushes sends that were held
back to share a datagram. A caller that must wait while the background
thread leads asks it to step aside (one byte on a wake-up pipe).

Receipts cost nothing unless someone asks: a :class:`SendHandle` is a slotted
record the driving thread fills in; only a thread that waits on it sleeps,
on the node's one condition. ``add_done_callback`` callbacks run on the
thread that drove when the outcome arrived (any caller, or the background
thread), after it released the lock: a callback may call back into the node.

Closing: the datagrams the core produces once it has closed (final acks, the
CLOSE to every peer) are sent under the node lock, waiting for the socket to
take them if it is full, and the socket is closed under the same lock, so no
final datagram is lost to a socket closed beneath it. ``close()`` drives the
flush itself, so a background thread held up in a callback cannot delay it.
"""

from __future__ import annotations

import os
import random
import select
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any, Generic, Self, TypeVar

from . import errors, events
from ._groupsock import GroupSockets
from .addressing import (
    Address,
    GroupAddress,
    is_group_url,
    normalize,
    parse_group,
)
from .config import Config
from .consumer import DEFAULT_LOCK, Consumer
from .driver import (
    CLOSE_GRACE,
    DISCOVERY_MAX,
    DISCOVERY_WAIT,
    DRIVE_GAP,
    HOLD_MAX,
    Backlog,
    BatchOutcomes,
    Data,
    DatagramSocket,
    Departures,
    Dest,
    Destinations,
    Int,
    MailboxHandle,
    OutboxTarget,
    Seconds,
    StoredBatch,
    Target,
    Unreachable,
    batch_destination,
    check_count,
    check_seconds,
    checked_message,
    delete_abandoned_ports,
    drain_socket,
    enqueue,
    give_up_receive,
    group_destination,
    group_target,
    mailbox_set,
    manage_mailbox,
    manage_request,
    no_answer,
    open_socket,
    outbox_batch,
    outbox_message,
    parse_manage_reply,
    parse_stats,
    post_local,
    receipt_of,
    receive_buffer,
    receive_failure,
    receive_selector,
    refuse_group,
    remote_mailbox_address,
    replay_target,
    report_unreachable,
    resolve_destination,
    route_events,
)
from .endpoint import (
    DEFAULT_MAILBOX,
    Endpoint,
    Withdrawal,
    check_lock,
)
from .handle import Mailbox
from .localpost import PostQueue
from .mailbox import ANY, Selector, Sources
from .message import GroupReceipt, Message, Receipt
from .outbox import Outbox, OutboxStore, settle_outbox_send
from .security import Security
from .stats import NodeStats
from .store import Committer, open_store  # durable mailboxes (issue 19)

__all__ = ["BatchHandle", "GroupSendHandle", "Mailbox", "Node", "SendHandle"]

#: Seconds without calls after which the background thread leads (reads the socket).
IDLE_AFTER = 0.002
#: Longest nap of the background thread while callers drive (seconds): how late a
#: send held back to share a datagram, or a timer a busy caller left due, can run.
NAP = 0.002
#: Longest nap of the background thread while a caller leads (seconds); once the
#: callers leave, it takes over within this plus IDLE_AFTER.
BUSY_NAP = 0.01
#: How stale the node's copy of the core's next timer may get between waits (seconds).
TIMER_SLACK = 0.001

_POLL_IN = select.POLLIN | select.POLLPRI | select.POLLERR | select.POLLHUP
#: A receive's or a wait's timeout that needs no check_timeout call: a finite int or
#: float >= 0 (NaN, a bool or a negative one goes to check_timeout, which says why).
_PLAIN = (int, float)
_INF = float("inf")

Outcome = Receipt | GroupReceipt
T = TypeVar("T")
R = TypeVar("R", Receipt, GroupReceipt)


class _PendingSend(Generic[R]):
    """What :class:`SendHandle` and :class:`GroupSendHandle` share: a record the
    node fills in with the outcome; nothing waits unless you do."""

    __slots__ = ("_callbacks", "_done", "_error", "_node", "_receipt", "destination", "ticket")

    def __init__(self, node: Node, ticket: int, destination: Any) -> None:
        self._node = node
        self.ticket = ticket
        self.destination = destination
        self._done = False
        # The receipt, or the core's MessageDelivered event until someone asks for it
        # (most sends are never asked: the Receipt is made by the first result()).
        self._receipt: R | events.MessageDelivered | None = None
        self._error: errors.ReliableError | None = None
        self._callbacks: list[Callable[[Any], None]] | None = None

    def done(self) -> bool:
        return self._done

    def cancel(self) -> bool:
        """Withdraw the message if it can still be withdrawn; never blocks.

        ``True``: withdrawn, certainly not delivered; :meth:`result` raises
        :class:`~reliable.errors.SendCancelled` (``delivered=False``).
        ``False``: the outcome was already known, or the message could not be
        withdrawn at once, and :meth:`result` reports its real fate: a receipt
        (it got in), a :class:`~reliable.errors.DeliveryFailed`, or
        ``SendCancelled`` when it was waiting at the receiver's full mailbox
        and the receiver gave it back (the request to do so went out now).
        A message wholly sent and awaiting its acknowledgement cannot be
        withdrawn; a group send is never withdrawn.
        """
        if self._done:
            return False
        return self._node._withdraw([self.ticket]) == [Withdrawal.WITHDRAWN]

    def wait(self, timeout: Seconds = None) -> bool:
        """Block until the outcome is known (or ``timeout``); returns :meth:`done`."""
        if timeout is not None and not (type(timeout) in _PLAIN and 0 <= timeout < _INF):
            check_seconds(timeout, "timeout")
        return self._done or self._node._await(lambda: self._done, timeout)

    def result(self, timeout: Seconds = None) -> R:
        """The receipt; raises the delivery error, or ``TimeoutError`` if not known in time."""
        if not self._done and not self.wait(timeout):
            raise TimeoutError(f"send #{self.ticket} still pending after {timeout:g}s")
        if self._error is not None:
            raise self._error
        receipt = self._receipt
        if isinstance(receipt, events.MessageDelivered):
            receipt = self._receipt = receipt_of(receipt)  # type: ignore[assignment]
        assert receipt is not None
        return receipt  # type: ignore[return-value]  # the node routes each kind

    def exception(self, timeout: Seconds = None) -> BaseException | None:
        """The delivery error, ``None`` once delivered; ``TimeoutError`` if not known in time."""
        if not self.wait(timeout):
            raise TimeoutError(f"send #{self.ticket} still pending after {timeout:g}s")
        return self._error

    def add_done_callback(self, fn: Callable[[Self], None]) -> None:
        """Call ``fn(handle)`` once the outcome is known (at once if it already is).

        It runs on the thread that was driving the node when the outcome
        arrived (a caller of the node, or its background thread), outside the
        node lock: keep it short; it may call the node.
        """
        if not self._node._add_callback(self, fn):
            fn(self)

    def _resolve(
        self,
        ticket: int,
        receipt: Outcome | events.MessageDelivered | None,
        error: errors.ReliableError | None,
    ) -> bool:
        """Record the outcome (the node lock is held); whether callbacks are due."""
        self._receipt = receipt  # type: ignore[assignment]  # the node routes each kind
        self._error = error
        self._done = True
        return self._callbacks is not None

    def _run_callbacks(self) -> None:
        callbacks, self._callbacks = self._callbacks or [], None
        for fn in callbacks:
            fn(self)

    def __repr__(self) -> str:
        state = "done" if self._done else "pending"
        kind = type(self).__name__
        return f"<{kind} #{self.ticket} to {errors.format_address(self.destination)} {state}>"


class SendHandle(_PendingSend[Receipt]):
    """The pending outcome of a :meth:`Node.send_nowait` to one node (or an anycast
    service's member).

    ``result()`` returns the :class:`~reliable.Receipt` once the destination
    acknowledged the message, or raises the
    :class:`~reliable.errors.DeliveryFailed` that explains why it will not.
    Cheap: a record the node fills in; nothing waits unless you do.
    """

    __slots__ = ()


class GroupSendHandle(_PendingSend[GroupReceipt]):
    """The pending outcome of a :meth:`Node.send_group_nowait`: ``result()`` returns
    the :class:`~reliable.GroupReceipt` (which members have it, and why the
    others do not) once every member answered or the group timeout passed."""

    __slots__ = ()


class BatchHandle:
    """The pending outcome of a :meth:`Node.send_many`: one handle for many messages.

    ``tickets[i]`` is the ticket of message ``i``. :meth:`failures` says which
    messages failed and why; :meth:`result` returns every receipt, or raises
    the first failure (by index).
    """

    __slots__ = ("_node", "_outcomes", "destination")

    def __init__(self, node: Node, destination: Any) -> None:
        self._node = node
        self.destination = destination
        self._outcomes = BatchOutcomes()

    @property
    def tickets(self) -> list[int]:
        return self._outcomes.tickets

    def _add(self, ticket: int) -> None:
        self._outcomes.add(ticket)

    def __len__(self) -> int:
        return len(self._outcomes.tickets)

    def done(self) -> bool:
        """Whether every message of the batch has its outcome."""
        return self._outcomes.pending == 0

    def pending(self) -> int:
        """How many messages still await their outcome."""
        return self._outcomes.pending

    def wait(self, timeout: Seconds = None) -> bool:
        """Block until every outcome is known (or ``timeout``); returns :meth:`done`."""
        check_seconds(timeout, "timeout")
        return self.done() or self._node._await(self.done, timeout)

    def failures(self, timeout: Seconds = None) -> dict[int, errors.ReliableError]:
        """Index -> error for each message that failed (waits for every outcome first)."""
        if not self.wait(timeout):
            raise TimeoutError(f"{self.pending()} of {len(self)} sends still pending")
        return dict(self._outcomes.errors)

    def result(self, timeout: Seconds = None) -> list[Outcome]:
        """Every receipt, in message order; raises the first failure, if any."""
        failed = self.failures(timeout)
        if failed:
            raise failed[min(failed)]
        return self._outcomes.delivered()

    def cancel(self) -> int:
        """Withdraw every message that can still be withdrawn; returns how many were."""
        answers = self._node._withdraw(self._outcomes.unresolved())
        return sum(a is Withdrawal.WITHDRAWN for a in answers)

    def _resolve(
        self,
        ticket: int,
        receipt: Outcome | events.MessageDelivered | None,
        error: errors.ReliableError | None,
    ) -> bool:
        if isinstance(receipt, events.MessageDelivered):
            receipt = receipt_of(receipt)
        self._outcomes.resolve(ticket, receipt, error)
        return False

    def __repr__(self) -> str:
        where = errors.format_address(self.destination)
        return f"<BatchHandle {len(self)} to {where}, {self.pending()} pending>"


def _wait_for(handle: _PendingSend[R]) -> R:
    """The outcome of a blocking send; interrupted (``KeyboardInterrupt`` in the waiting
    thread), the message is withdrawn if it still can be."""
    try:
        return handle.result()
    except BaseException:
        handle.cancel()
        raise


class Node:
    """A reliable-messaging node on one UDP socket, with a blocking API.

    ``bind`` is ``host:port`` (``127.0.0.1:0`` picks a free port). ``sock``
    may supply an already bound socket-like object instead, e.g. a
    :class:`netem.socket.FaultySocket`. ``on_event`` observes every protocol
    event, on whichever thread drives the node at the time (keep it short; it
    must not call the node). ``security`` selects the mode
    (:func:`reliable.security.make_security`; default: integrity only); both
    ends must use the same mode and key.

    Every method is thread-safe; many threads may send and receive at once.

    Every node has a default mailbox (``""``) for direct naming; more are
    made with :meth:`create_mailbox` and addressed as ``host:port/name``.
    Group addressing (:meth:`join`, :meth:`serve`, sends to ``multicast://``,
    ``broadcast://`` and ``anycast://``) needs the node bound to one specific
    IPv4 address; see docs/groups.md.
    """

    def __init__(
        self,
        bind: str | tuple[str, int] = "127.0.0.1:0",
        *,
        config: Config | None = None,
        sock: DatagramSocket | None = None,
        rng: random.Random | None = None,
        on_event: Callable[[events.Event], None] | None = None,
        security: Security | None = None,
    ) -> None:
        self._sock: DatagramSocket = (
            sock if sock is not None else open_socket(bind, error_queue=True, offload=True)
        )
        if sock is not None:
            sock.setblocking(False)
        self._address = normalize(self._sock.getsockname())
        self._family: int = self._sock.family
        self._destinations = Destinations()
        self._endpoint = Endpoint(config, rng=rng, security=security)
        self._endpoint.remote.local_address = self._address  # management: same host only
        self.config = self._endpoint.config
        self._endpoint.set_receive_buffer(receive_buffer(self._sock))
        self._on_event = on_event
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)  # followers sleep here
        self._nap = threading.Event()  # the background thread naps on it (set: closing)
        self._handles: dict[int, _PendingSend[Any] | BatchHandle] = {}
        self._taken: dict[int, Message | errors.ReliableError] = {}
        self._stats_replies: dict[int, bytes | None] = {}  # pending queries: None until answered
        self._manage_replies: dict[int, tuple[int, bytes] | None] = {}  # rmsg ctl requests
        self._departures = Departures()
        self._closed = False
        self._failure: BaseException | None = None
        self._callbacks: deque[_PendingSend[Any]] = deque()  # handles whose callbacks are due
        # Leader/follower state (under the lock).
        self._leader: int | None = None  # the thread that leads (sleeps in poll), if any
        self._polling = False  # the leader is in poll, without the lock: wake it to tell it
        self._followers = 0
        self._inside = 0  # callers inside the node
        self._last_call = 0.0  # when a caller last left (monotonic seconds)
        self._changes = 0  # bumped whenever driving routed an event
        self._held = 0  # sends held back to share a datagram (flushed by HOLD_MAX, waits, NAP)
        self._held_since = 0.0
        self._rounds = 0  # bumped whenever driving fed datagrams or ran timers
        self._poll_until: float | None = None  # when the polling leader wakes by itself
        self._timer: float | None = None  # the core's next timer, as of the last drive
        self._driven = 0.0  # when a thread last drove (monotonic seconds)
        self._read_at = 0.0  # when a thread last looked at the socket (monotonic seconds)
        self._timer_checked = 0.0  # when _timer was last looked up
        self._wake_r, self._wake_w = socket.socketpair()
        self._committer = Committer(self._wake)  # durable mailboxes: grouped commits
        # Whether a durable mailbox was ever made here (sticky): until then, no commit
        # can be owed, and the per-message checks for one are skipped.
        self._durable = False
        self._posts = PostQueue(self._wake)  # local posts (node.post), admitted by _drive
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._backlog = Backlog()
        self._groups = GroupSockets(self._sock, self.config)
        self._group_socks: list[socket.socket] = []
        self._unregistered: list[socket.socket] = []  # group sockets the leader's poll lacks
        self._abandoned: list[tuple[str, int]] = []  # ports whose owner handles are gone
        self._outboxes: list[OutboxStore] = []  # durable outboxes, closed with the node
        self._ready = select.poll()  # non-blocking readability checks, under the lock
        self._ready.register(self._sock.fileno(), _POLL_IN)
        self._poller = select.poll()  # the leader's blocking wait (one leader at a time)
        self._poller.register(self._sock.fileno(), _POLL_IN)
        self._poller.register(self._wake_r.fileno(), select.POLLIN)
        self._io_thread = threading.Thread(target=self._run, name="rmsg-node-io", daemon=True)
        self._io_thread.start()

    # ------------------------------------------------------------ properties

    @property
    def address(self) -> Address:
        """The bound socket address, e.g. ``('127.0.0.1', 40123)`` (still known after close)."""
        return self._address

    @property
    def incarnation(self) -> int:
        return self._endpoint.incarnation

    def __repr__(self) -> str:
        return f"<Node {errors.format_address(self.address)} incarnation={self.incarnation:#x}>"

    # --------------------------------------------------------------- sending

    def send(
        self,
        dest: Dest,
        data: Data,
        *,
        msg_type: Int = 0,
        priority: Int = 0,
        mailbox: str | None = None,
        timeout: Seconds = None,
        policy: str = "round-robin",
    ) -> Receipt:
        """Send ``data`` and block until it entered its mailbox; returns the receipt.

        ``dest`` is ``host:port`` (the default mailbox) or ``host:port/name``,
        or ``anycast://service/name``, delivered to one live member chosen by
        ``policy`` (``round-robin`` or ``lowest-rtt``), failing over to another
        if that one fails (docs/groups.md). A multicast or broadcast group
        goes through :meth:`send_group` (a ``UsageError`` here says so).
        A full mailbox makes this wait for room (for a rendezvous mailbox,
        until a receiver takes the message). With ``timeout`` (seconds) a
        message not in by then is withdrawn and
        :class:`~reliable.errors.SendTimeout` raised; without it the call ends
        when the message got in or failed (the peer became unreachable, the
        mailbox does not exist or closed, ...). If the wait is interrupted
        (``KeyboardInterrupt``), the message is withdrawn if it still can be
        (see :meth:`SendHandle.cancel`); otherwise it goes on, and its fate is
        reported only to ``on_event``. Use :meth:`send_nowait` to keep a handle.
        """
        check_seconds(timeout, "timeout", positive=True)
        deadline = None if timeout is None else time.monotonic() + timeout
        target, label, data = self._target(dest, data, msg_type, priority, mailbox)
        handle = SendHandle(self, 0, label)
        self._submit(target, [data], handle, msg_type, priority, timeout, deadline, policy)
        return _wait_for(handle)

    def send_nowait(
        self,
        dest: Dest,
        data: Data,
        *,
        msg_type: Int = 0,
        priority: Int = 0,
        mailbox: str | None = None,
        timeout: Seconds = None,
        policy: str = "round-robin",
    ) -> SendHandle:
        """Queue ``data`` for ``dest`` and return at once with a :class:`SendHandle`.

        Raises a :class:`~reliable.errors.WouldBlock` instead of waiting:
        :class:`~reliable.errors.SendBufferFull` when this node's send buffer
        is full, :class:`~reliable.errors.MailboxFull` when the destination
        mailbox is known to be full. Nothing was sent in either case.
        """
        if timeout is not None:
            check_seconds(timeout, "timeout", positive=True)
        known = self._destinations.get(dest, mailbox)
        if known is None:
            target, label, data = self._target(dest, data, msg_type, priority, mailbox, "_nowait")
            handle = SendHandle(self, 0, label)
            self._submit(
                target, [data], handle, msg_type, priority, timeout, None, policy, block=False
            )
            return handle
        # A node seen before (the common case): the one-message, non-blocking slice of
        # _submit, without its loops, so a stream of sends pays for no more than it uses.
        (peer, name), label = known
        handle = SendHandle(self, 0, label)
        endpoint = self._endpoint
        self._lock.acquire()
        self._inside += 1
        try:
            if self._failure is not None or self._closed or endpoint.closing:
                self._check_open()  # raises, saying why
            now = time.monotonic()
            ticket = handle.ticket = endpoint.send(
                peer, data, now=now, msg_type=msg_type, priority=priority, mailbox=name,
                timeout=timeout,
            )  # fmt: skip
            self._handles[ticket] = handle
            self._after_send(endpoint, peer, now)
        finally:
            self._leave()
        return handle

    def send_group(
        self,
        group: Dest,
        data: Data,
        *,
        msg_type: Int = 0,
        priority: Int = 0,
        mailbox: str | None = None,
        timeout: Seconds = None,
    ) -> GroupReceipt:
        """Send ``data`` to every member of a multicast or broadcast group; returns the
        :class:`~reliable.message.GroupReceipt` once each member answered or
        ``timeout`` (default ``Config.group_timeout``) passed.

        ``group`` is ``multicast://239.1.2.3:7000/name``, ``broadcast://:7000/name``
        or a :class:`~reliable.addressing.GroupAddress`. The receipt lists the
        members that have the message (``acked``) and, for every other member
        the message was meant for, why not (``missing``); a group send is
        never withdrawn. See docs/groups.md.
        """
        check_seconds(timeout, "timeout", positive=True)
        deadline = None if timeout is None else time.monotonic() + timeout
        target, label, data = self._group_target(group, data, msg_type, priority, mailbox)
        handle = GroupSendHandle(self, 0, label)
        self._submit(target, [data], handle, msg_type, priority, timeout, deadline, "")
        return _wait_for(handle)

    def send_group_nowait(
        self,
        group: Dest,
        data: Data,
        *,
        msg_type: Int = 0,
        priority: Int = 0,
        mailbox: str | None = None,
        timeout: Seconds = None,
    ) -> GroupSendHandle:
        """Queue ``data`` for a group and return at once with a :class:`GroupSendHandle`
        (as :meth:`send_group`, which waits, and :meth:`send_nowait` for one node)."""
        check_seconds(timeout, "timeout", positive=True)
        target, label, data = self._group_target(group, data, msg_type, priority, mailbox)
        handle = GroupSendHandle(self, 0, label)
        self._submit(target, [data], handle, msg_type, priority, timeout, None, "", block=False)
        return handle

    def send_many(
        self,
        dest: Dest,
        messages: Iterable[bytes],
        *,
        msg_type: Int = 0,
        priority: Int = 0,
        mailbox: str | None = None,
        timeout: Seconds = None,
    ) -> BatchHandle:
        """Queue every message of ``messages`` for ``dest`` (a node, not a group), in
        order; returns one :class:`BatchHandle` for all of them.

        Blocks while this node's send buffer (or the destination mailbox) is
        full, as :meth:`send` does, but not for the outcomes: wait on the
        handle for those. With ``timeout``, each message not in its mailbox
        that many seconds after the call fails with ``SendTimeout``; if the
        buffer stays full past it, the rest are not queued and the call
        raises ``SendTimeout`` (the handle of what was queued is on the
        exception as ``batch``). Every message is checked before any is sent.
        """
        check_seconds(timeout, "timeout", positive=True)
        label, name, datas = batch_destination(
            dest, messages, msg_type, priority, mailbox, self._family
        )
        batch = BatchHandle(self, label)
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            self._submit((label, name), datas, batch, msg_type, priority, timeout, deadline, "")
        except errors.SendTimeout as exc:
            exc.batch = batch  # type: ignore[attr-defined]
            raise
        return batch

    def _target(
        self,
        dest: Dest,
        data: Data,
        msg_type: Int,
        priority: Int,
        mailbox: str | None,
        method: str = "",
    ) -> tuple[Target, Any, Data]:
        """Where ``dest`` is, and the label its handle shows. A node's address is parsed
        once and remembered; its message is checked by the core before it is queued."""
        known = self._destinations.get(dest, mailbox)
        if known is not None:
            return known[0], known[1], data
        refuse_group(dest, method)
        if isinstance(dest, str) and is_group_url(dest):  # anycast://
            data = checked_message(data, msg_type, priority)
            service = group_destination(dest, mailbox)
            return service, str(service), data
        target, label = self._destinations.resolve(dest, mailbox, self._family)
        return target, label, data

    def _group_target(
        self,
        group: Dest,
        data: Data,
        msg_type: Int,
        priority: Int,
        mailbox: str | None,
    ) -> tuple[Target, Any, Data]:
        """The group ``send_group`` names, opened for sending (discovery started), and
        its label; the message is checked first, before the group's discovery."""
        target = group_target(group, mailbox)
        data = checked_message(data, msg_type, priority)
        opened = self._open_group(target, join=False, discover=True)
        return opened, str(opened), data

    def _submit(
        self,
        target: Target,
        datas: list[Data],
        handle: _PendingSend[Any] | BatchHandle,
        msg_type: Int,
        priority: Int,
        timeout: Seconds,
        deadline: float | None,
        policy: str,
        *,
        block: bool = True,
    ) -> None:
        endpoint = self._endpoint
        peer = target[0] if isinstance(target, tuple) else None
        self._enter()
        try:
            for data in datas:
                while True:
                    self._check_open()
                    now = time.monotonic()
                    try:
                        ticket = enqueue(
                            endpoint,
                            target,
                            data,
                            now=now,
                            msg_type=msg_type,
                            priority=priority,
                            timeout=timeout,
                            deadline=deadline,
                            policy=policy,
                        )
                        break
                    except errors.WouldBlock:
                        if not block:
                            raise
                        remaining = None if deadline is None else deadline - now
                        if remaining is not None and remaining <= 0:
                            label = handle.destination
                            raise errors.SendTimeout(
                                label, timeout or 0.0, stage="queued"
                            ) from None
                        self._drive()  # flush what is queued: room comes from acks
                        self._wait(self._progress_since(self._rounds), deadline)
                if isinstance(handle, _PendingSend):
                    handle.ticket = ticket
                else:
                    handle._add(ticket)
                self._handles[ticket] = handle
            self._after_send(endpoint, peer, now)
        finally:
            self._leave()

    def _after_send(self, endpoint: Endpoint, peer: Address | None, now: float) -> None:
        """Lock held, after queueing sends (to ``peer``, a node, else ``None``): hold
        them back or drive. To a busy peer, hold sends back a moment (up to HOLD_MAX
        sends or NAP seconds): those made meanwhile share datagrams, and one drive
        serves them all. To an idle one, send at once."""
        held = self._held
        if (
            peer is not None
            and held < HOLD_MAX
            and (not held or now - self._held_since < NAP)
            and endpoint.in_flight(peer)
        ):
            if not held:
                self._held_since = now
            self._held = held + 1
            if endpoint.has_events() or (self._polling and not held):
                # Events: e.g. a send that failed at once. Polling: another thread
                # sleeps in poll and must wake within NAP to flush what we hold.
                self._drive(read=False, flush=False)
        else:
            # Send now. A flush of held sends reads the socket first (acks make room);
            # a send to an idle peer only if nobody looked for DRIVE_GAP seconds: a
            # reply sent right after its request came in does not pay a system call.
            self._drive(read=bool(held) or now - self._read_at >= DRIVE_GAP)

    # ---------------------------------------------------------------- groups

    def join(self, group: str) -> None:
        """Become a member of ``group`` (``multicast://239.1.2.3:7000`` or
        ``broadcast://:7000``): its messages arrive in this node's mailboxes
        (the mailbox each names), and its senders' receipts count this node."""
        self._open_group(parse_group(group), join=True, discover=False)

    def leave(self, group: str) -> None:
        """Stop being a member of ``group``; its members and senders hear a LEAVE."""
        self._call(
            lambda now: self._endpoint.leave_group(self._groups.resolve(parse_group(group)), now)
        )

    def members(self, group: str) -> dict[Address, int]:
        """Live members of ``group`` as heard here (address -> incarnation); opens it."""
        target = self._open_group(parse_group(group), join=False, discover=False)
        return self._call(lambda now: self._endpoint.group_members(target))

    def wait_for_members(self, group: str, count: int, timeout: float) -> dict[Address, int]:
        """Block until ``group`` has at least ``count`` live members or ``timeout`` passes."""
        check_seconds(timeout, "timeout")
        target = self._open_group(parse_group(group), join=False, discover=False)
        self._await(lambda: len(self._endpoint.group_members(target)) >= count, timeout)
        return self._call(lambda now: self._endpoint.group_members(target))

    def serve(self, service: str, *, announce: str | list[str]) -> None:
        """Serve anycast ``service``: announce it on each discovery group in ``announce``."""
        groups = [announce] if isinstance(announce, str) else list(announce)
        targets = [self._open_group(parse_group(g), join=False, discover=False) for g in groups]
        self._call(lambda now: self._endpoint.serve(service, targets, now))

    def unserve(self, service: str) -> None:
        """Stop serving anycast ``service``: a WITHDRAW tells the discovery groups at once."""
        self._call(lambda now: self._endpoint.unserve(service))

    def discover(self, group: str) -> None:
        """Learn the anycast services announced on ``group``."""
        target = self._open_group(parse_group(group), join=False, discover=False)
        self._call(lambda now: self._endpoint.discover(target, now))

    def add_service_members(self, service: str, members: list[str | tuple[Any, ...]]) -> None:
        """Members of ``service`` known without announcements (``host:port`` each)."""
        addrs = [resolve_destination(m, self._family) for m in members]
        self._call(lambda now: self._endpoint.add_service_members(service, addrs), check=False)

    def service_members(self, service: str) -> list[Address]:
        """The live members of anycast ``service`` known here (announced or added)."""
        return self._call(lambda now: self._endpoint.service_members(service), check=False)

    def _open_group(self, group: GroupAddress, *, join: bool, discover: bool) -> GroupAddress:
        """Hear ``group`` (one socket per group) and open it in the core.

        With ``discover``, a group opened only now gets ``DISCOVERY_WAIT`` seconds
        for its members to answer the SOLICIT before the caller sends to it, and up to
        ``DISCOVERY_MAX`` in all while none has answered.
        """

        def open_it(now: float) -> tuple[GroupAddress, bool]:
            target = self._groups.resolve(group)
            fresh = not self._endpoint.is_open_group(target)
            sock = self._groups.open(target)
            if sock is not None:
                self._group_socks.append(sock)
                self._unregistered.append(sock)
                self._ready.register(sock.fileno(), _POLL_IN)
                if self._polling:
                    self._wake()  # the leader's poll must watch the new socket too
            self._endpoint.open_group(target, now, join=join)
            return target, fresh

        target, fresh = self._call(open_it)
        if discover and fresh:
            self._await(lambda: False, DISCOVERY_WAIT)  # driving meanwhile: answers come in
            members = self._endpoint.group_members
            if not members(target):  # none yet: a loaded host answers late
                self._await(lambda: bool(members(target)), DISCOVERY_MAX - DISCOVERY_WAIT)
        return target

    # ------------------------------------------------------------- receiving

    def post(self, mailbox: str, data: Data, *, msg_type: Int = 0, priority: Int = 0) -> None:
        """Put ``data`` into this node's own ``mailbox``, without the network.

        For another thread of this process, or a signal handler: it never
        blocks and never takes the node's lock (see :mod:`reliable.localpost`).
        The message is admitted at the node's next turn (at once if the node
        is idle) as an arriving message would be: same order, limits (a full
        mailbox parks it), memory cap and durability; ``msg.source`` is
        :attr:`address`. Argument errors raise :class:`~reliable.errors.UsageError`
        here; a refusal later (no such mailbox, closed, memory full) is counted
        in ``stats().dropped`` (``refused.*``) and logged, not raised.
        """
        post_local(self._endpoint, self._posts, self._closed, mailbox, data, msg_type, priority)

    def receive(
        self,
        timeout: Seconds = None,
        *,
        mailbox: str = DEFAULT_MAILBOX,
        source: Sources = None,
        msg_type: Int = 0,
        except_type: bool = False,
        receiver: str | None = None,
        max_size: int | None = None,
        truncate: bool = False,
    ) -> Message:
        """The next message of ``mailbox``, waiting up to ``timeout`` seconds (None: forever).

        Selects as System V ``msgrcv`` does: ``msg_type`` 0 takes the first
        message, ``> 0`` the first of that type (any other type with
        ``except_type``), ``< 0`` the first of the lowest type ``<= -msg_type``;
        "first" is highest priority first, oldest first within a priority.
        ``source`` takes only that peer's messages. ``receiver`` labels this
        receiver in stats and, for a rendezvous, in the sender's receipt
        (default: the thread's name).

        Raises :class:`~reliable.errors.ReceiveTimeout` when none came in time;
        :class:`~reliable.errors.PeerUnreachable`/:class:`~reliable.errors.PeerClosed`
        if ``source`` was named and went away while we waited;
        :class:`~reliable.errors.MailboxDeleted` if the mailbox was deleted.
        """
        if (
            source is None
            and msg_type == 0
            and not except_type
            and max_size is None
            and not truncate
            and (timeout is None or (type(timeout) in _PLAIN and 0 <= timeout < _INF))
        ):
            message = self._receive_plain(mailbox, receiver, timeout)
            if message is not None:
                return message
        got = self._receive(
            mailbox,
            None,
            source,
            msg_type,
            except_type,
            receiver,
            timeout,
            1,
            wait=True,
            max_size=max_size,
            truncate=truncate,
        )
        return got[0]

    def _receive_plain(
        self, mailbox: str, receiver: str | None, timeout: Seconds
    ) -> Message | None:
        """:meth:`_receive` for one message of ``mailbox``, selecting nothing (what a
        stream of receives asks each time), without its loops and choices. ``None``
        only for ``timeout == 0`` with nothing queued: ``_receive`` then looks again."""
        label = receiver if receiver is not None else threading.current_thread().name
        endpoint = self._endpoint
        self._lock.acquire()
        self._inside += 1
        try:
            if self._failure is not None or self._closed or endpoint.closing:
                self._check_open()  # raises, saying why
            now = time.monotonic()
            timer = self._timer
            # Messages already queued are handed out without a look at the socket if it
            # was read a moment ago (and no timer is due): one drive serves many receives.
            if now - self._driven >= DRIVE_GAP or (timer is not None and timer <= now):
                self._drive()  # (it also admits local posts)
            elif self._posts:
                self._posts.admit(endpoint, self._address, now)  # as _receive: own posts first
            message = endpoint.take(mailbox, ANY, owner=None, receiver=label, lock=None, now=now)
            if message is None:
                if timeout == 0:
                    return None
                # Wait (a receive that waits reads the socket first thing, in _lead).
                mark = self._departures.mark()
                deadline = None if timeout is None else now + timeout
                ticket = endpoint.wait_for_message(
                    mailbox, ANY, owner=None, receiver=label, lock=None, now=now
                )
                message = self._await_message(ticket, None, mark, timeout, deadline)
            elif self._durable:  # deletions commit before hand-out
                self._committer.flush(endpoint, now)
            if endpoint.has_output():
                self._drive()  # a parked message may have got in: its sender hears now
            return message
        finally:
            self._leave()

    def receive_nowait(
        self,
        *,
        mailbox: str = DEFAULT_MAILBOX,
        source: Sources = None,
        msg_type: Int = 0,
        except_type: bool = False,
        receiver: str | None = None,
        max_size: int | None = None,
        truncate: bool = False,
    ) -> Message | None:
        """The next message if one is waiting (selected as :meth:`receive` does), else ``None``."""
        got = self._receive(
            mailbox,
            None,
            source,
            msg_type,
            except_type,
            receiver,
            None,
            1,
            wait=False,
            max_size=max_size,
            truncate=truncate,
        )
        return got[0] if got else None

    def receive_many(
        self,
        max_count: int,
        timeout: Seconds = None,
        *,
        mailbox: str = DEFAULT_MAILBOX,
        source: Sources = None,
        msg_type: Int = 0,
        except_type: bool = False,
        receiver: str | None = None,
        max_size: int | None = None,
        truncate: bool = False,
    ) -> list[Message]:
        """Up to ``max_count`` messages, selected as :meth:`receive` does, in order.

        Returns what is waiting at once; if nothing is, waits up to
        ``timeout`` seconds (``None``: for ever, ``0``: not at all) for one,
        then adds whatever else is waiting by then. An empty list means the
        timeout passed. Errors as :meth:`receive`, except the timeout.
        """
        check_count(max_count)
        try:
            return self._receive(
                mailbox,
                None,
                source,
                msg_type,
                except_type,
                receiver,
                timeout,
                max_count,
                wait=True,
                max_size=max_size,
                truncate=truncate,
            )
        except errors.ReceiveTimeout:
            return []

    def receive_any(
        self,
        mailboxes: Iterable[str | MailboxHandle],
        timeout: Seconds = None,
        *,
        source: Sources = None,
        msg_type: Int = 0,
        except_type: bool = False,
        receiver: str | None = None,
        max_size: int | None = None,
        truncate: bool = False,
        lock: float | None = None,
    ) -> Message:
        """The next message from any of several local ``mailboxes`` (names, or handles:
        a port's owner handle), waiting up to ``timeout`` seconds: a select over queues.

        Takes the first message selected (as :meth:`receive` selects) among the
        mailboxes: the highest priority among their heads, and between equal
        priorities the mailbox listed first. ``msg.mailbox`` says which one it
        came from. A receive that waits stands in every mailbox's line at once
        and gets exactly one message, from whichever serves it first. ``lock``:
        as :meth:`Mailbox.receive` (ack or release on that mailbox's handle).

        Raises :class:`~reliable.errors.ReceiveTimeout`, and
        :class:`~reliable.errors.MailboxDeleted` if one of them is deleted while
        it waits.
        """
        check_seconds(timeout, "timeout")
        boxes = mailbox_set(mailboxes)
        selector = receive_selector(source, msg_type, except_type, max_size, truncate, self._family)
        peer = None if isinstance(selector.source, frozenset) else selector.source
        label = receiver if receiver is not None else threading.current_thread().name
        endpoint = self._endpoint
        self._enter()
        try:
            self._check_open()
            self._drive()
            now = time.monotonic()
            message = endpoint.take_any(boxes, selector, receiver=label, lock=lock, now=now)
            if message is None:
                if timeout == 0:
                    raise errors.ReceiveTimeout("no message waiting")
                mark = self._departures.mark()
                deadline = None if timeout is None else now + timeout
                ticket = endpoint.wait_for_any(boxes, selector, receiver=label, lock=lock, now=now)
                if peer is not None:
                    endpoint.watch(peer, now)
                try:
                    message = self._await_message(
                        ticket, peer, mark, timeout, deadline, locked=lock is not None
                    )
                finally:
                    if peer is not None and not self._closed:
                        endpoint.unwatch(peer, time.monotonic())
            else:
                if self._durable:  # deletion commits before hand-out
                    self._committer.flush(endpoint, now)
            if endpoint.has_output():
                self._drive()
            if lock is not None:
                self._lock_timer()
            return message
        finally:
            self._leave()

    def _receive(
        self,
        mailbox: str,
        owner: int | None,
        source: Sources,
        msg_type: Int,
        except_type: bool,
        receiver: str | None,
        timeout: Seconds,
        count: int,
        *,
        wait: bool,
        lock: float | None = None,
        max_size: int | None = None,
        truncate: bool = False,
    ) -> list[Message]:
        if timeout is not None and not (type(timeout) in _PLAIN and 0 <= timeout < _INF):
            check_seconds(timeout, "timeout")  # raises, saying why (a plain one skips the call)
        if (
            source is None
            and msg_type == 0
            and not except_type
            and max_size is None
            and not truncate
        ):
            selector = ANY  # the common receive selects nothing (as Selector.of; a fast path)
        else:
            selector = receive_selector(
                source, msg_type, except_type, max_size, truncate, self._family
            )
        # One named source is watched while we wait; a set of them is not (others may send).
        peer = None if isinstance(selector.source, frozenset) else selector.source
        label = receiver if receiver is not None else threading.current_thread().name
        endpoint = self._endpoint
        self._enter()
        try:
            self._check_open()
            now = time.monotonic()
            timer = self._timer
            # Messages already queued are handed out without a look at the socket if it
            # was read a moment ago (and no timer is due): one drive serves many receives.
            fresh = now - self._driven < DRIVE_GAP and (timer is None or timer > now)
            if not fresh:
                self._drive()
            elif self._posts:
                # Posts made before this receive are in the mailbox when it looks (a thread
                # that posts, then receives, sees its own posts), drive or no drive.
                self._posts.admit(endpoint, self._address, now)
            got: list[Message] = []
            while len(got) < count:
                message = endpoint.take(
                    mailbox, selector, owner=owner, receiver=label, lock=lock, now=now
                )
                if message is None:
                    if fresh and (not wait or timeout == 0):
                        fresh = False
                        self._drive()
                        continue
                    break  # a receive that waits reads the socket first thing (_lead)
                got.append(message)
            if got:
                if self._durable:  # deletions commit before hand-out
                    self._committer.flush(endpoint, now)
                if endpoint.has_output():
                    self._drive()  # a parked message may have got in: its sender hears now
                if lock is not None:
                    self._lock_timer()
                return got
            if not wait:
                return got
            if timeout == 0:
                raise errors.ReceiveTimeout("no message waiting")
            mark = self._departures.mark()
            deadline = None if timeout is None else now + timeout
            ticket = endpoint.wait_for_message(
                mailbox, selector, owner=owner, receiver=label, lock=lock, now=now
            )
            if peer is not None:
                # Probe the named peer while we wait, so a dead one cannot leave us blocked.
                endpoint.watch(peer, now)
            try:
                # Durable: the core answers the ticket only once the deletion is committed.
                first = self._await_message(
                    ticket, peer, mark, timeout, deadline, locked=lock is not None
                )
            finally:
                if peer is not None and not self._closed:
                    endpoint.unwatch(peer, time.monotonic())
            got.append(first)
            now = time.monotonic()
            while len(got) < count:
                message = endpoint.take(
                    mailbox, selector, owner=owner, receiver=label, lock=lock, now=now
                )
                if message is None:
                    break
                got.append(message)
            if len(got) > 1 and self._durable:
                self._committer.flush(endpoint, now)  # as above, for those taken
            if endpoint.has_output():
                self._drive()
            if lock is not None:
                self._lock_timer()
            return got
        finally:
            self._leave()

    def _lock_timer(self) -> None:
        """Lock held, after a receive under a lock: its expiry is a new timer of the
        core. Look the timer up again; wake a leader asleep in poll if it is due sooner."""
        self._timer = self._endpoint.get_timer()
        self._timer_checked = time.monotonic()
        if (
            self._polling
            and self._leader != threading.get_ident()
            and self._due_before(self._poll_until)
        ):
            self._wake()

    def _await_message(
        self,
        ticket: int,
        peer: Address | None,
        mark: int,
        timeout: Seconds,
        deadline: float | None,
        locked: bool = False,
        local: bool = True,
    ) -> Message:
        """Lock held: wait (leading or following) for the core's answer to ``ticket``
        (``locked``: a receive under a lock; ``local``: from a mailbox of this node)."""
        taken = self._taken
        departures = self._departures

        def over() -> bool:
            return (
                ticket in taken
                or self._closed
                or self._failure is not None
                or self._endpoint.closing
                or (peer is not None and departures.down_since(peer, mark) is not None)
            )

        while ticket not in taken:
            try:
                self._wait(over, deadline)
            except BaseException:
                # Interrupted while waiting (KeyboardInterrupt, an exception raised by a
                # signal handler): withdraw the wait, or the core would hand the next
                # message to this receive, which nobody will return. One answered in
                # the same instant (routed, or still in the core's events: routed now)
                # goes back to its mailbox: its sender already has its receipt.
                if not self._closed:
                    give_up_receive(
                        self._endpoint,
                        ticket,
                        taken,
                        locked=locked,
                        local=local,
                        route=lambda: self._drive(read=False),
                        now=time.monotonic(),
                    )
                taken.pop(ticket, None)
                raise
            if ticket in taken:
                break
            remaining = None if deadline is None else deadline - time.monotonic()
            failure = receive_failure(
                closed=self._closed or self._endpoint.closing or self._failure is not None,
                departures=departures,
                peer=peer,
                mark=mark,
                remaining=remaining,
                timeout=timeout,
            )
            if failure is None:
                continue
            if self._closed or self._endpoint.cancel_wait(ticket):
                raise failure
            self._drive(read=False)  # answered meanwhile: route its event, then take it
        outcome = taken.pop(ticket)
        if isinstance(outcome, errors.ReliableError):
            raise outcome
        return outcome

    # ------------------------------------------------------------- mailboxes

    def open_outbox(self, path: str | os.PathLike[str], *, sync: str = "message") -> Outbox:
        """Give this node a durable outbox in the SQLite file ``path``: sends made
        through it are stored before they go out, and retried by the next
        ``open_outbox`` on the file if this process dies first (see
        :mod:`reliable.outbox` for exactly what is guaranteed).

        Sends the file still holds (accepted before a crash, or cut short by
        a close) are sent again now, in the order accepted; their handles are
        ``outbox.replayed``. ``sync``: ``"message"`` fsyncs every accepted send,
        ``"os"`` leaves it to the OS (survives the process, not a power loss).
        """
        self._check_open()
        store = OutboxStore(path, sync=sync)
        self._outboxes.append(store)
        outbox = Outbox(self, store)
        for row in store.restored:
            target = replay_target(store, row)
            outbox.replayed.append(
                self._outbox_submit(
                    store,
                    row.row,
                    target,
                    row.data,
                    row.msg_type,
                    row.priority,
                    None,
                    row.dest,
                    block=True,
                )
            )
        return outbox

    def _outbox_send(
        self,
        store: OutboxStore,
        dest: Dest,
        data: Data,
        msg_type: Int,
        priority: Int,
        mailbox: str | None,
        timeout: Seconds,
        *,
        block: bool,
    ) -> SendHandle:
        """Check, store (accepted), then send: an outbox's send."""
        check_seconds(timeout, "timeout", positive=True)
        endpoint = self._endpoint
        addr, name, data = outbox_message(
            endpoint, dest, data, msg_type, priority, mailbox, self._family
        )
        row, tag = store.add(addr, name, msg_type, priority, data)
        target = OutboxTarget(addr, name, tag)
        return self._outbox_submit(
            store, row, target, data, msg_type, priority, timeout, addr, block=block
        )

    def _outbox_send_many(
        self,
        store: OutboxStore,
        dest: Dest,
        messages: list[bytes],
        msg_type: Int,
        priority: Int,
        mailbox: str | None,
        timeout: Seconds,
    ) -> list[SendHandle]:
        """Check all, store all in one commit, then send each: an outbox's send_many."""
        check_seconds(timeout, "timeout", positive=True)
        endpoint = self._endpoint
        addr, name, checked = outbox_batch(
            endpoint, dest, messages, msg_type, priority, mailbox, self._family
        )
        if not checked:
            return []
        stored = store.add_many(addr, name, msg_type, priority, checked)
        with StoredBatch(store, addr, name, stored, checked) as batch:
            return [
                self._outbox_submit(
                    store, row, target, data, msg_type, priority, timeout, addr, block=True
                )
                for row, target, data in batch
            ]

    def _outbox_submit(
        self,
        store: OutboxStore,
        row: int,
        target: OutboxTarget,
        data: Data,
        msg_type: Int,
        priority: Int,
        timeout: Seconds,
        label: Any,
        *,
        block: bool,
    ) -> SendHandle:
        handle = SendHandle(self, 0, label)
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            self._submit(
                target, [data], handle, msg_type, priority, timeout, deadline, "", block=block
            )
        except BaseException:
            store.settle(row)  # never queued: nothing to retry
            raise
        handle.add_done_callback(lambda done: settle_outbox_send(store, row, done.exception()))
        return handle

    def create_mailbox(
        self,
        name: str,
        capacity: int | None = None,
        *,
        max_bytes: int | None = None,
        port: bool = False,
        durable: str | os.PathLike[str] | None = None,
        sync: str = "grouped",
    ) -> Mailbox:
        """Create mailbox ``name`` on this node; returns its owner's handle.

        ``capacity``: most messages held (``0`` rendezvous: a send completes
        when a receiver takes the message; ``None``: unbounded, within the
        node's ``Config.mailbox_memory``). ``max_bytes`` bounds their bytes.
        A *port* (``port=True``) has one receiver, the returned handle, and
        any number of senders. Raises :class:`~reliable.errors.MailboxExists`.
        ``durable=PATH`` keeps its messages in an SQLite file that outlives the
        process; ``sync`` is its sync policy (see docs/mailboxes.md).
        """
        store = open_store(durable, name, sync)
        if store is not None:
            self._durable = True

        def create(now: float) -> int:
            return self._endpoint.create_mailbox(
                name, capacity=capacity, max_bytes=max_bytes, port=port, store=store, now=now
            )

        try:
            owner = self._call(create)
        except BaseException:
            if store is not None:
                store.close()
            raise
        return Mailbox(self, name, owner if port else None)  # only a port dies with it

    def on_message(
        self,
        mailbox: str | Mailbox,
        callback: Callable[[Message], object],
        *,
        source: Sources = None,
        msg_type: Int = 0,
        except_type: bool = False,
        lock: float = DEFAULT_LOCK,
    ) -> Consumer:
        """Consume ``mailbox`` (a name, or a handle: a port's owner handle) with
        ``callback(message)``, as ``mq_notify`` with ``SIGEV_THREAD``: the callback
        runs on a thread of its own, never with the node's lock held.

        The consumer is one more receiver: each message goes to exactly one
        taker, a ``receive`` call or a consumer. It takes each message under a
        ``lock`` (seconds) and acknowledges it when the callback returns; if the
        callback raises, the message is released (back at the head of its
        priority: not lost) and the consumer stops, keeping the exception in
        ``consumer.error``. See :mod:`reliable.consumer`. ``source``,
        ``msg_type``, ``except_type`` select as :meth:`receive` does.
        """
        check_lock(lock)
        Selector.of(None, msg_type, except_type)  # argument errors now, not on the thread
        handle = self.mailbox(mailbox) if isinstance(mailbox, str) else mailbox
        selection = {"source": source, "msg_type": msg_type, "except_type": except_type}
        return Consumer(handle, callback, selection, lock)

    def mailbox(self, name: str) -> Mailbox:
        """A handle on existing mailbox ``name`` (a port's handle cannot receive)."""
        if not self._call(lambda now: self._endpoint.has_mailbox(name), check=False):
            raise errors.UnknownMailbox(f"no mailbox {name!r} on this node")
        return Mailbox(self, name, None)

    def _manage(self, name: str, action: str, owner: int | None) -> None:
        # Senders of parked messages, and waiting receivers, learn at once.
        self._call(lambda now: manage_mailbox(self._endpoint, name, action, owner, now))

    def _core(self, call: Callable[[Endpoint, float], Any]) -> Any:
        """Run ``call(endpoint, now)`` (a mailbox handle's peek, ack, ...), commit, drive."""

        def run(now: float) -> Any:
            result = call(self._endpoint, now)
            self._committer.flush(self._endpoint, now)  # durable: committed before returning
            return result

        return self._call(run)

    def _port_abandoned(self, name: str, owner: int) -> None:
        """A port's owner handle was garbage collected: the node deletes the port.

        Called by the garbage collector, possibly on a thread that holds the
        node's lock, so it only records the port (``list.append`` is atomic)
        and wakes whoever leads; the next drive deletes it.
        """
        if not self._closed:
            self._abandoned.append((name, owner))
            self._wake()

    def remote_mailbox(self, address: str) -> RemoteMailbox:
        """A handle to receive from mailbox ``host:port/name`` hosted on another node.

        Its owner must have granted this node the receive right (``grant``).
        Each message goes to exactly one receiver, local or remote; see
        docs/mailboxes.md, "Receivers on other nodes".
        """
        node, name = remote_mailbox_address(address)
        return RemoteMailbox(self, resolve_destination(node, self._family), name)

    def _receive_remote(
        self,
        owner: Address,
        name: str,
        msg_type: Int,
        except_type: bool,
        receiver: str | None,
        timeout: Seconds,
    ) -> Message:
        check_seconds(timeout, "timeout")
        selector = Selector.of(None, msg_type, except_type)
        label = receiver if receiver is not None else threading.current_thread().name
        self._enter()
        try:
            self._check_open()
            now = time.monotonic()
            mark = self._departures.mark()
            deadline = None if timeout is None else now + timeout
            ticket = self._endpoint.pull(owner, name, selector, receiver=label, now=now)
            self._drive()
            try:
                return self._await_message(ticket, None, mark, timeout, deadline, local=False)
            except errors.ReceiveTimeout:
                if not self._closed:
                    self._drive(read=False)  # the owner hears the withdrawal now
                raise
        finally:
            self._leave()

    def manage(
        self,
        dest: Dest,
        action: str,
        mailbox: str,
        *,
        capacity: int | None = None,
        max_bytes: int | None = None,
        node: str = "",
        timeout: Seconds = 5.0,
    ) -> dict[str, Any]:
        """Ask the node at ``dest`` to ``inspect``, ``set_limits``, ``delete``, ``grant``
        or ``revoke`` (``node``) its mailbox ``mailbox`` (what ``rmsg ctl`` does).

        Returns the mailbox's description (as ``rmsg ctl inspect --json``). A node
        serves it only to callers on its own host, with ``Config.serve_stats``.
        """
        check_seconds(timeout, "timeout", positive=True)
        request = manage_request(action, mailbox, capacity, max_bytes, node)
        addr = resolve_destination(dest, self._family)
        return self._managed_call(
            addr, lambda now: self._endpoint.manage(addr, request, now), timeout
        )

    def _managed_call(
        self, addr: Address, start: Callable[[float], int], timeout: float
    ) -> dict[str, Any]:
        """Run ``start(now)`` (a management request or a transfer; it returns the
        request number) and wait for its ``ManageAnswered``."""
        deadline = time.monotonic() + timeout
        self._enter()
        try:
            self._check_open()
            number = start(time.monotonic())
            self._manage_replies[number] = None
            self._drive()
            try:
                while (reply := self._manage_replies[number]) is None:
                    self._check_open()
                    if time.monotonic() >= deadline:
                        raise no_answer(addr, timeout)
                    self._wait(
                        lambda: self._manage_replies[number] is not None or self._closed, deadline
                    )
            finally:
                del self._manage_replies[number]
        finally:
            self._leave()
        return parse_manage_reply(addr, *reply)

    def _transfer(self, name: str, to: str | tuple[Any, ...], timeout: float) -> dict[str, Any]:
        check_seconds(timeout, "timeout", positive=True)
        addr = resolve_destination(to, self._family)
        return self._managed_call(
            addr, lambda now: self._endpoint.remote.transfer(name, addr, now), timeout
        )

    # ----------------------------------------------------------- management

    def stats(self) -> NodeStats:
        """This node's statistics: per peer, per mailbox and node-wide."""
        return self._call(lambda now: self._endpoint.stats(now), check=False, drive=False)

    def query_stats(self, dest: Dest, timeout: Seconds = 5.0) -> NodeStats:
        """Ask the node at ``dest`` for its statistics over the network."""
        check_seconds(timeout, "timeout", positive=True)
        addr = resolve_destination(dest, self._family)
        deadline = time.monotonic() + timeout
        self._enter()
        try:
            self._check_open()
            request = self._endpoint.query_stats(addr, time.monotonic())
            self._stats_replies[request] = None
            self._drive()
            try:
                while (body := self._stats_replies[request]) is None:
                    self._check_open()
                    if time.monotonic() >= deadline:
                        raise no_answer(addr, timeout, stats=True)
                    self._wait(
                        lambda: self._stats_replies[request] is not None or self._closed, deadline
                    )
            finally:
                del self._stats_replies[request]  # a late reply is then ignored
        finally:
            self._leave()
        return parse_stats(body)

    def close(self, timeout: Seconds = 2.0) -> None:
        """Flush outstanding sends for up to ``timeout`` seconds, tell peers, release the socket."""
        check_seconds(timeout, "timeout")
        self._enter()
        try:
            if self._closed:
                return
            endpoint = self._endpoint
            if not endpoint.closing:
                endpoint.close(time.monotonic(), timeout)
            self._drive()
            if self._polling:
                self._wake()  # whoever leads drives the flush with us
            self._wait(
                lambda: endpoint.closed or self._closed, time.monotonic() + timeout + CLOSE_GRACE
            )
            if not self._closed:
                if not endpoint.closed:
                    # Not done in time: end the flush now, so the peers hear CLOSE (sent by
                    # the drive below) before the socket goes.
                    endpoint.close(time.monotonic(), 0)
                self._drive(read=False)
                self._shut(errors.NodeClosed("the node closed"))
        finally:
            self._leave()
        for store in self._outboxes:
            store.close()  # sends the close cut short stay in it, for the next open
        self._wake()  # the background thread sees the node closed and ends
        if threading.current_thread() is not self._io_thread:
            self._io_thread.join(0.5)

    def __enter__(self) -> Node:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # --------------------------------------------------------------- driving

    def _enter(self) -> None:
        self._lock.acquire()
        self._inside += 1

    def _leave(self) -> None:
        """Leave the node: release the lock; run the done-callbacks that came due."""
        self._inside -= 1
        self._last_call = time.monotonic()
        self._lock.release()
        if self._callbacks:
            self._run_callbacks()

    def _call(self, fn: Callable[[float], T], *, check: bool = True, drive: bool = True) -> T:
        """Run ``fn(now)`` on the core under the lock, then drive (events out at once)."""
        self._enter()
        try:
            if check:
                self._check_open()
            result = fn(time.monotonic())
            if drive and not self._closed:
                self._drive()
            return result
        finally:
            self._leave()

    def _await(self, ready: Callable[[], bool], timeout: Seconds) -> bool:
        """Drive or follow until ``ready()`` or ``timeout`` seconds; returns ``ready()``."""
        deadline = None if timeout is None else time.monotonic() + timeout
        self._enter()
        try:
            if not self._closed:
                self._drive()
            return self._wait(ready, deadline)
        finally:
            self._leave()

    def _wait(self, ready: Callable[[], bool], deadline: float | None) -> bool:
        """Lock held: lead (or follow) until ``ready()``, the node closes or ``deadline``."""
        me = threading.get_ident()
        while not ready():
            if self._closed or self._failure is not None:
                return ready()
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                return False
            if self._leader is None:
                self._lead(deadline)
                continue
            if self._leader != me and self._polling and self._leader == self._io_thread.ident:
                self._wake()  # the background thread leads: ask it to step aside
            self._followers += 1
            try:
                self._changed.wait(None if deadline is None else deadline - now)
            finally:
                self._followers -= 1
        return True

    def _lead(self, deadline: float | None) -> None:
        """Lock held, nobody leads: sleep in poll until there is something to do, then drive."""
        self._leader = threading.get_ident()
        try:
            for sock in self._unregistered:
                self._poller.register(sock.fileno(), _POLL_IN)
            self._unregistered.clear()
            self._timer = self._endpoint.get_timer()  # calls since the last drive may move it
            self._timer_checked = time.monotonic()
            until = deadline
            readable = False  # poll said a socket of the node has datagrams
            for due in (
                self._timer,
                self._held_since + NAP if self._held else None,
                time.monotonic() + NAP if self._backlog else None,
            ):
                if due is not None and (until is None or due < until):
                    until = due
            wait = None if until is None else max(0.0, until - time.monotonic())
            if wait is None or wait > 0:
                self._poll_until = until
                self._polling = True
                self._lock.release()
                try:
                    # (poll rounds a timeout up to whole ms: up to 1 ms late, so nothing
                    # added here; +0.5 ms made loss timers 1 ms late on average)
                    ready = self._poller.poll(None if wait is None else wait * 1000)
                finally:
                    self._lock.acquire()
                    self._polling = False
                wake_fd = self._wake_r.fileno()
                for fd, _ in ready:
                    if fd == wake_fd:
                        self._drain_wake()
                    else:
                        readable = True
            if not self._closed:
                self._drive(readable=readable)
        finally:
            self._leader = None
            if self._followers:
                self._changed.notify_all()  # one of them leads now

    def _drive(self, *, read: bool = True, flush: bool = True, readable: bool = False) -> None:
        """Lock held: feed waiting datagrams and due timers to the core, send what it
        produced, route its events. ``read``: unless another thread leads (it reads).
        ``flush``: send now; otherwise only if sends were held back long enough.
        ``readable``: poll has just said so (the leader): no need to ask again."""
        endpoint = self._endpoint
        now = time.monotonic()
        self._driven = now
        me = threading.get_ident()
        if self._abandoned:
            delete_abandoned_ports(endpoint, self._abandoned, now)
        if self._posts:
            self._posts.admit(endpoint, self._address, now)
        fed = False
        if read and (self._leader is None or self._leader == me):
            self._read_at = now
            read = readable or bool(self._ready.poll(0))
        else:
            read = False
        if read:
            reports: list[Unreachable] = []
            batch = drain_socket(self._sock, reports=reports)
            for sock in self._group_socks:
                batch.extend(drain_socket(sock))
            if reports and not endpoint.closed:
                report_unreachable(endpoint, reports, now)
            for data, addr in batch:
                endpoint.receive_datagram(data, addr, now)
            fed = True
        timer = self._timer
        if timer is not None and timer <= now:
            endpoint.handle_timer(now)
            fed = True
            self._timer_checked = 0.0  # look again below
        if fed:
            self._rounds += 1
        if (flush or fed or not self._held or now - self._held_since >= NAP) and (
            endpoint.has_output() or endpoint.closing or self._backlog or self._committer.ready
        ):
            self._held = 0
            if self._durable:
                self._committer.turn(endpoint, now)  # durable mailboxes: grouped commits
            out = endpoint.datagrams_to_send(now)
            if endpoint.closed:
                # The last datagrams (CLOSE): out before the lock goes, so close() cannot
                # release the socket while they are still on their way.
                self._send_final(out)
            elif out or self._backlog:
                self._transmit(out, now)
        before = self._changes
        if endpoint.has_events():
            route_events(endpoint, self, self._on_event, lazy_receipts=True)
        polled = self._polling and self._leader != me
        if polled or now - self._timer_checked >= TIMER_SLACK:
            # The core's next timer costs a walk of its sessions: looked up at most every
            # TIMER_SLACK seconds here (and before every wait, in _lead), since what a
            # drive adds is never due sooner than an ack delay. Except while another
            # thread sleeps in poll until the timer it looked up: what this drive sent
            # armed a retransmission timer it does not know of, and if the datagram is
            # lost nobody else will run it; look it up, so the check below wakes it.
            self._timer = endpoint.get_timer()
            self._timer_checked = now
        if self._changes != before and self._followers:
            self._changed.notify_all()
        # Another thread leads, asleep in poll: wake it if what we did concerns it.
        if polled and (self._changes != before or self._due_before(self._poll_until)):
            self._wake()

    def _progress_since(self, rounds: int) -> Callable[[], bool]:
        """A test of whether driving fed datagrams or ran timers since ``rounds``."""
        return lambda: self._rounds != rounds

    def _due_before(self, until: float | None) -> bool:
        """Lock held: whether a timer, a held send or the backlog needs driving before ``until``."""
        due = self._timer
        if self._held:
            due = self._held_since + NAP if due is None else min(due, self._held_since + NAP)
        if self._backlog:
            due = time.monotonic() + NAP if due is None else min(due, time.monotonic() + NAP)
        return due is not None and (until is None or due < until)

    def _transmit(self, out: list[tuple[bytes, Address]], now: float) -> None:
        """Lock held: send ``out`` after any backlog; hand the OS's reports to the core."""
        reports: list[Unreachable] = []
        if self._backlog:
            self._backlog.extend(out)
            self._backlog.flush(self._sock, reports)
        else:
            self._backlog.transmit(self._sock, out, reports)
        if reports and not self._endpoint.closed:
            report_unreachable(self._endpoint, reports, now)  # what it causes: routed next

    def _send_final(self, out: list[tuple[bytes, Address]]) -> None:
        """Send the closed core's last datagrams, after any backlog, waiting (up to
        ``CLOSE_GRACE`` seconds) for the socket to take them if it is full. The OS's word
        on a peer changes nothing now: reports are dropped."""
        backlog = self._backlog
        backlog.extend(out)
        give_up = time.monotonic() + CLOSE_GRACE
        while True:
            before = len(backlog)
            backlog.flush(self._sock, [])
            remaining = give_up - time.monotonic()
            if not backlog or remaining <= 0:
                backlog.clear()  # nothing more will be sent from this node
                return
            try:
                _, writable, _ = select.select([], [self._sock], [], min(remaining, 0.05))
            except (OSError, ValueError):
                return
            if writable and len(backlog) == before:
                time.sleep(0.001)  # writable, yet it took nothing: do not spin

    def _shut(self, error: errors.ReliableError) -> None:
        """Lock held: release the socket and fail whatever still waits."""
        if self._closed:
            return
        self._closed = True
        self._sock.close()  # under the lock: no final datagram is on its way (see _drive)
        self._committer.close(self._endpoint, time.monotonic())  # durable mailboxes (issue 19)
        self._groups.close()
        handles = list(self._handles.items())
        self._handles.clear()
        for ticket, handle in handles:
            if handle._resolve(ticket, None, error):
                assert isinstance(handle, _PendingSend)
                self._callbacks.append(handle)
        self._changes += 1
        self._changed.notify_all()
        self._nap.set()

    # EventSink, called under the lock from route_events
    def _on_outcome(
        self,
        ticket: int,
        receipt: Receipt | GroupReceipt | events.MessageDelivered | None,
        error: errors.DeliveryFailed | None,
    ) -> None:
        handle = self._handles.pop(ticket, None)
        if handle is not None:
            self._changes += 1
            if handle._resolve(ticket, receipt, error):
                assert isinstance(handle, _PendingSend)
                self._callbacks.append(handle)

    def _on_receive(
        self, waiter: int, message: Message | None, error: errors.ReliableError | None
    ) -> None:
        outcome = message if message is not None else error
        assert outcome is not None
        self._taken[waiter] = outcome
        self._changes += 1

    def _on_stats(self, peer: Any, request: int, body: bytes) -> None:
        if request in self._stats_replies:
            self._stats_replies[request] = body
            self._changes += 1

    def _on_manage(self, request: int, status: int, body: bytes) -> None:
        if request in self._manage_replies:
            self._manage_replies[request] = (status, body)
            self._changes += 1

    def _on_peer_down(self, peer: Any, error: errors.DeliveryFailed) -> None:
        self._departures.peer_down(peer, error)
        self._changes += 1

    def _on_closed(self) -> None:
        self._changes += 1

    # --------------------------------------------------------------- helpers

    def _add_callback(self, handle: _PendingSend[Any], fn: Callable[[Any], None]) -> bool:
        """Keep ``fn`` for when ``handle`` resolves; ``False`` if it already has."""
        with self._lock:
            if handle._done:
                return False
            if handle._callbacks is None:
                handle._callbacks = []
            handle._callbacks.append(fn)
            return True

    def _run_callbacks(self) -> None:
        callbacks = self._callbacks
        while callbacks:
            try:
                handle = callbacks.popleft()
            except IndexError:  # another thread took the last one
                return
            handle._run_callbacks()

    def _withdraw(self, tickets: list[int]) -> list[Withdrawal]:
        """:meth:`SendHandle.cancel`: withdraw in the core; outcomes are routed at once."""
        self._enter()
        try:
            if self._closed:
                return [Withdrawal.UNKNOWN for _ in tickets]
            now = time.monotonic()
            answers = [self._endpoint.withdraw(t, now) for t in tickets]
            self._drive()
            return answers
        finally:
            self._leave()

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except OSError:
            pass  # already full (a wake-up is pending) or closed

    def _drain_wake(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except (BlockingIOError, InterruptedError, OSError):
            pass

    def _check_open(self) -> None:
        if self._failure is not None:
            raise errors.NodeClosed(f"the node's background thread failed: {self._failure!r}")
        if self._closed or self._endpoint.closing:
            raise errors.NodeClosed("the node is closed")

    # ----------------------------------------------------- background thread

    def _run(self) -> None:
        """Keep the protocol running while no caller drives: lead when idle, else nap.

        It never waits for the node lock: a caller holding it drives the node,
        so the thread naps instead of queueing behind it (which would make
        every caller queue behind the thread in turn).
        """
        lock = self._lock
        try:
            while not self._closed:
                nap: float | None = NAP
                if lock.acquire(blocking=False):
                    try:
                        nap = self._background_turn()
                    finally:
                        lock.release()
                    if self._callbacks:
                        self._run_callbacks()
                    if nap is None:
                        continue  # it led: see whether it still should
                self._nap.wait(nap)
        except BaseException as exc:  # pragma: no cover - a bug; never leave waiters hanging
            self._failure = exc
            with lock:
                self._changed.notify_all()
            raise
        finally:
            if self._closed:
                self._wake_r.close()
                self._wake_w.close()

    def _background_turn(self) -> float | None:
        """Lock held, on the background thread: lead if no caller was inside for
        ``IDLE_AFTER`` seconds (then ``None``); else run what callers left due and
        say how long to nap: ``NAP``, or while a caller leads (reads the socket
        and runs timers itself) up to ``BUSY_NAP``, so a busy node's background
        thread hardly ever wakes (each wake-up costs its callers a context switch)."""
        if self._closed:
            return NAP
        now = time.monotonic()
        if self._leader is None:
            if self._inside == 0 and now - self._last_call >= IDLE_AFTER:
                self._lead(None)
                return None
            timer = self._timer
            stale = self._held and now - self._held_since >= NAP
            due = (timer is not None and timer <= now) or stale or self._committer.ready
            due = due or bool(self._posts)
            if due or self._backlog or self._abandoned:
                self._drive()
            return NAP
        if self._held or self._backlog or self._abandoned:
            return NAP
        timer = self._timer
        return BUSY_NAP if timer is None else max(NAP, min(BUSY_NAP, timer - now))


class RemoteMailbox:
    """A handle to receive from a mailbox hosted on another node (``Node.remote_mailbox``).

    Each receive sends the owner a credit for one message; the owner hands a
    message to this node, which acknowledges it before :meth:`receive`
    returns it. ``msg.mailbox`` is ``host:port/name``; ``msg.source`` the
    original sender.
    """

    def __init__(self, node: Node, owner: Address, name: str) -> None:
        self._node = node
        self.owner = owner
        self.name = name

    def receive(
        self,
        timeout: Seconds = None,
        *,
        msg_type: Int = 0,
        except_type: bool = False,
        receiver: str | None = None,
    ) -> Message:
        """The next message for this node, selected as :meth:`Node.receive` does.

        Raises :class:`~reliable.errors.ReceiveTimeout`;
        :class:`~reliable.errors.ReceiveRefused` (not granted, a port, no such
        mailbox or deleted, moved); :class:`~reliable.errors.MailboxGone` when the
        owner node closes; :class:`~reliable.errors.PeerUnreachable` if it goes silent.
        """
        return self._node._receive_remote(
            self.owner, self.name, msg_type, except_type, receiver, timeout
        )

    def __repr__(self) -> str:
        return f"<RemoteMailbox {errors.format_address(self.owner)}/{self.name}>"
