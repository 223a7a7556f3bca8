"""The asyncio adapter: an :class:`Endpoint` driven by the running event loop.

It watches the socket with ``loop.add_reader`` and drains it until it would
block on every wake-up (asyncio's datagram transport reads one datagram per
loop iteration, which drops packets at high rates), keeps a single
``call_at`` handle armed at the core's next deadline, and uses ``loop.time()``
as the protocol clock. Requires a selector-based loop (the default on Unix,
and uvloop).

Every application call ends with a pump of the core, so the events a call
caused are routed before the call returns: when the core says a waiting
receive cannot be withdrawn, its future is already resolved. Two exceptions
keep a coroutine that calls in a loop (without awaiting) cheap and its peers
well served: sends to a busy peer are pumped once per loop turn or every
``HOLD_MAX`` sends, whichever comes first, and a receive that finds a message
queued pumps only if the core has something to say; both read the socket
themselves unless it was read within ``DRIVE_GAP`` (the loop cannot run the
reader callback while the coroutine runs).

Cancellation follows asyncio's convention and the core's withdrawal rules:
cancelling ``await node.send(...)`` (or the :class:`AsyncSendHandle` a
``send_nowait`` returned) raises ``CancelledError`` and withdraws the message
if it can still be withdrawn. :meth:`AsyncSendHandle.withdraw` does the same
without cancelling the future, which then reports the message's real fate.
Closing waits (briefly) for the socket to take the final datagrams (CLOSE)
before releasing it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import time
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

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
from .consumer import DEFAULT_LOCK, AsyncConsumer
from .driver import (
    CLOSE_GRACE,
    DISCOVERY_MAX,
    DISCOVERY_WAIT,
    DRIVE_GAP,
    HOLD_MAX,
    Backlog,
    BatchOutcomes,
    DatagramSocket,
    Departures,
    Destinations,
    MailboxHandle,
    OutboxTarget,
    StoredBatch,
    Target,
    Unreachable,
    batch_destination,
    check_count,
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
    check_timeout,
)
from .localpost import PostQueue
from .mailbox import ANY, Selector, Sources
from .message import GroupReceipt, Message, Receipt
from .outbox import AsyncOutbox, OutboxStore, settle_outbox_send
from .security import Security
from .stats import NodeStats
from .store import Committer, open_store  # durable mailboxes (issue 19)

__all__ = [
    "AsyncBatchHandle",
    "AsyncGroupSendHandle",
    "AsyncMailbox",
    "AsyncNode",
    "AsyncSendHandle",
]


R = TypeVar("R", Receipt, GroupReceipt)
H = TypeVar("H", bound="_AsyncPendingSend[Any]")
#: A receive's timeout that needs no check_timeout call: a finite int or float >= 0
#: (NaN, a bool or a negative one goes to check_timeout, which says why).
_PLAIN = (int, float)
_INF = float("inf")


class _AsyncPendingSend(asyncio.Future[R]):
    """What :class:`AsyncSendHandle` and :class:`AsyncGroupSendHandle` share: an
    ``asyncio.Future`` resolved with the receipt or the delivery error.

    ``ticket`` is the number the node's ``MessageDelivered``/``MessageFailed``
    events carry for it. Cancelling it (``cancel()``, or cancelling a task
    awaiting it) withdraws the message if it can still be withdrawn; the
    future is cancelled either way, so a message that could not be withdrawn
    reports its fate only to ``on_event``. To keep that fate, call
    :meth:`withdraw` instead.
    """

    def __init__(self, node: AsyncNode, ticket: int, destination: Any) -> None:
        super().__init__(loop=node._loop)
        self._node = node
        self.ticket = ticket
        self.destination = destination

    def withdraw(self) -> bool:
        """Withdraw the message if it can still be withdrawn; the future stays live.

        ``True``: withdrawn, certainly not delivered; the future now holds
        :class:`~reliable.errors.SendCancelled` (``delivered=False``).
        ``False``: the outcome was already known, or the message could not be
        withdrawn at once; the future will hold its real fate (a receipt, a
        ``DeliveryFailed``, or ``SendCancelled`` if it was waiting at the
        receiver's full mailbox and the receiver gave it back).
        """
        if self.done():
            return False
        return self._node._withdraw(self.ticket) is Withdrawal.WITHDRAWN

    def cancel(self, msg: Any | None = None) -> bool:
        """Cancel the future (asyncio's meaning) and withdraw the message if it can be."""
        cancelled = super().cancel(msg)
        if cancelled:
            self._node._withdraw(self.ticket)  # its outcome event still reaches on_event
        return cancelled


class AsyncSendHandle(_AsyncPendingSend[Receipt]):
    """The pending outcome of :meth:`AsyncNode.send_nowait` to one node (or an anycast
    service's member): an ``asyncio.Future`` resolved with the
    :class:`~reliable.Receipt` or the delivery error. Cancelling and
    :meth:`withdraw` work as described on its base class."""


class AsyncGroupSendHandle(_AsyncPendingSend[GroupReceipt]):
    """The pending outcome of :meth:`AsyncNode.send_group_nowait`: resolved with the
    :class:`~reliable.GroupReceipt` once every member answered or the group
    timeout passed. A group send is never withdrawn."""


class AsyncBatchHandle(asyncio.Future[list[Receipt | GroupReceipt]]):
    """The pending outcome of :meth:`AsyncNode.send_many`: one future for many messages.

    Resolved once every message has its outcome: with the receipts, in
    message order, or with the first failure (by index). ``tickets[i]`` is
    message ``i``'s ticket; :meth:`failures` says which failed and why.
    """

    def __init__(self, node: AsyncNode, destination: Any) -> None:
        super().__init__(loop=node._loop)
        self._node = node
        self.destination = destination
        self._outcomes = BatchOutcomes()
        self._sealed = False

    @property
    def tickets(self) -> list[int]:
        return self._outcomes.tickets

    def __len__(self) -> int:
        return len(self._outcomes.tickets)

    def pending(self) -> int:
        """How many messages still await their outcome."""
        return self._outcomes.pending

    def failures(self) -> dict[int, errors.ReliableError]:
        """Index -> error for each message that failed; call once the batch is done
        (``await asyncio.wait([batch])``), else ``asyncio.InvalidStateError``."""
        if not self.done():
            raise asyncio.InvalidStateError("the batch is still pending")
        if not self.cancelled():
            self.exception()  # retrieved: asyncio need not log it
        return dict(self._outcomes.errors)

    def withdraw(self) -> int:
        """Withdraw every message that can still be withdrawn; returns how many were.
        The future stays live and reports every message's real fate."""
        answers = [self._node._withdraw(t) for t in self._outcomes.unresolved()]
        return sum(a is Withdrawal.WITHDRAWN for a in answers)

    def cancel(self, msg: Any | None = None) -> bool:
        """Cancel the future (asyncio's meaning) and withdraw what can be withdrawn."""
        cancelled = super().cancel(msg)
        if cancelled:
            for ticket in self.tickets:
                self._node._withdraw(ticket)  # outcomes still reach on_event
        return cancelled

    def _add(self, ticket: int) -> None:
        self._outcomes.add(ticket)

    def _resolve(
        self,
        ticket: int,
        receipt: Receipt | GroupReceipt | None,
        error: errors.ReliableError | None,
    ) -> None:
        self._outcomes.resolve(ticket, receipt, error)
        self._settle()

    def _seal(self) -> None:
        """Every message of the batch is queued: resolve once their outcomes are in."""
        self._sealed = True
        self._settle()

    def _settle(self) -> None:
        outcomes = self._outcomes
        if not self._sealed or outcomes.pending or self.done():
            return
        if outcomes.errors:
            self.set_exception(outcomes.errors[min(outcomes.errors)])
        else:
            self.set_result(outcomes.delivered())


class AsyncNode:
    """A reliable-messaging node with an asyncio API.

    Use ``async with AsyncNode("127.0.0.1:7000") as node:`` or
    ``node = await AsyncNode(...).start()`` ... ``await node.close()``.
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
        self._bind = bind
        self._given_sock = sock
        self._endpoint = Endpoint(config, rng=rng, security=security)
        self.config = self._endpoint.config
        self._on_event = on_event
        self._sock: DatagramSocket | None = None
        self._family = 0  # the socket's address family, once started
        self._loop: asyncio.AbstractEventLoop | None = None
        # The loop's clock (loop.time), read a dozen times per message: asyncio's own
        # loop reads time.monotonic through a Python method; we read it directly.
        self._clock: Callable[[], float] = time.monotonic
        self._timer: asyncio.TimerHandle | None = None
        # One loop timer for the deadlines of every waiting coroutine (see _wake_by).
        self._wake_timer: asyncio.TimerHandle | None = None
        self._wake_at = _INF  # when _wake_timer fires (inf: none), read without a call
        self._deadline: float | None = None  # the core's next timer, as of the last pump
        self._timer_stale = False  # a pump left the loop timer to be re-armed (_arm_later)
        self._arm_scheduled = False
        self._woke = False  # the running pump resolved a waiting coroutine's future
        self._pump_soon = False  # a pump is scheduled for this loop turn (sends batch up)
        self._held = 0  # sends to a busy peer made since the last pump (at most HOLD_MAX)
        self._read_at = 0.0  # when the socket was last read (loop time)
        self._handles: dict[int, _AsyncPendingSend[Any] | AsyncBatchHandle] = {}
        self._destinations = Destinations()
        self._groups: GroupSockets | None = None
        # Receives waiting for the core's answer (tickets), and the answers routed to them.
        self._receives: set[int] = set()
        self._taken: dict[int, Message | errors.ReliableError] = {}
        self._stats_replies: dict[int, asyncio.Future[bytes]] = {}
        self._manage_replies: dict[int, asyncio.Future[tuple[int, bytes]]] = {}  # manage, transfer
        self._departures = Departures()
        # Futures of coroutines waiting for "something changed". Registered synchronously,
        # right after their condition was checked, so no change can slip in between
        # (an Event pulsed with set()+clear() loses a wake-up to a waiter that has not run yet).
        self._waiters: list[asyncio.Future[None]] = []
        self._backlog = Backlog()
        self._drained: asyncio.Future[None] | None = None  # close() waits for the backlog
        self._closed = False
        self._close_done: asyncio.Future[None] | None = None
        self._abandoned: list[tuple[str, int]] = []  # ports whose owner handles are gone
        self._outboxes: list[OutboxStore] = []  # durable outboxes, closed with the node
        self._committer = Committer(self._commit_finished)  # durable mailboxes
        # Whether a durable mailbox was ever made here (sticky): until then, no commit
        # can be owed, and the per-message checks for one are skipped.
        self._durable = False
        self._posts = PostQueue(self._commit_finished)  # local posts, admitted by _pump

    # ------------------------------------------------------------- lifecycle

    async def start(self) -> AsyncNode:
        """Open (or adopt) the socket and start serving on the running loop."""
        if self._loop is not None:
            return self
        self._loop = loop = asyncio.get_running_loop()
        if type(loop).time is not asyncio.BaseEventLoop.time:
            self._clock = loop.time  # another loop's own clock (e.g. a test's virtual time)
        sock = (
            self._given_sock
            if self._given_sock is not None
            else open_socket(self._bind, error_queue=True, offload=True)
        )
        sock.setblocking(False)
        self._sock = sock
        self._family = sock.family
        self._endpoint.remote.local_address = normalize(sock.getsockname())
        self._endpoint.set_receive_buffer(receive_buffer(sock))
        self._close_done = self._loop.create_future()
        self._loop.add_reader(sock.fileno(), self._on_reader)
        self._groups = GroupSockets(sock, self.config)
        return self

    async def __aenter__(self) -> AsyncNode:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self, timeout: float = 2.0) -> None:
        """Flush outstanding sends for up to ``timeout`` seconds, tell peers, release the socket."""
        check_timeout(timeout, "timeout")
        if self._loop is None or self._closed:
            return
        if not self._endpoint.closing:
            self._endpoint.close(self._loop.time(), timeout)
            self._pump([])
        assert self._close_done is not None
        try:
            await asyncio.wait_for(asyncio.shield(self._close_done), timeout + CLOSE_GRACE)
        except TimeoutError:  # pragma: no cover - the core always closes by its deadline
            self._endpoint.close(self._loop.time(), 0)  # end it now: CLOSE before the socket goes
            self._pump([])
        if self._backlog and not self._closed:
            # The socket was full: the final datagrams (CLOSE) wait in the backlog.
            self._drained = self._loop.create_future()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._drained), CLOSE_GRACE)
        self._shutdown()

    def _shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
        if self._wake_timer is not None:
            self._wake_timer.cancel()
        assert self._loop is not None and self._sock is not None
        self._loop.remove_reader(self._sock.fileno())
        self._loop.remove_writer(self._sock.fileno())
        self._sock.close()
        self._committer.close(self._endpoint, self._loop.time())
        for store in self._outboxes:
            store.close()  # sends the close cut short stay in it, for the next open
        if self._groups is not None:
            for group_sock in self._groups.sockets():
                self._loop.remove_reader(group_sock.fileno())
            self._groups.close()
        futures: list[asyncio.Future[Any]] = [
            *self._handles.values(),
            *self._stats_replies.values(),
            *self._manage_replies.values(),
        ]
        for future in futures:
            if not future.done():
                future.set_exception(errors.NodeClosed("the node closed"))
        self._handles.clear()
        self._stats_replies.clear()
        self._manage_replies.clear()
        self._notify()

    @property
    def address(self) -> Address:
        self._require_started()
        assert self._sock is not None
        return normalize(self._sock.getsockname())

    @property
    def incarnation(self) -> int:
        return self._endpoint.incarnation

    def stats(self) -> NodeStats:
        """This node's statistics: per peer, per mailbox and node-wide."""
        now = self._loop.time() if self._loop is not None else None
        return self._endpoint.stats(now)

    async def query_stats(self, dest: str | tuple[Any, ...], timeout: float = 5.0) -> NodeStats:
        """Ask the node at ``dest`` for its statistics over the network."""
        check_timeout(timeout, "timeout", positive=True)
        loop = self._require_started()
        assert self._sock is not None
        addr = resolve_destination(dest, self._sock.family)
        self._check_open()
        request = self._endpoint.query_stats(addr, loop.time())
        future: asyncio.Future[bytes] = loop.create_future()
        self._stats_replies[request] = future
        self._pump([])
        try:
            body = await asyncio.wait_for(future, timeout)
        except TimeoutError:
            raise no_answer(addr, timeout, stats=True) from None
        finally:
            self._stats_replies.pop(request, None)
        return parse_stats(body)

    async def manage(
        self,
        dest: str | tuple[Any, ...],
        action: str,
        mailbox: str,
        *,
        capacity: int | None = None,
        max_bytes: int | None = None,
        node: str = "",
        timeout: float = 5.0,
    ) -> dict[str, Any]:
        """As :meth:`reliable.Node.manage`: ask the node at ``dest`` to ``inspect``,
        ``set_limits``, ``delete``, ``grant`` or ``revoke`` its mailbox ``mailbox``
        (what ``rmsg ctl`` does), without blocking the loop while it answers."""
        check_timeout(timeout, "timeout", positive=True)
        request = manage_request(action, mailbox, capacity, max_bytes, node)
        self._require_started()
        assert self._sock is not None
        addr = resolve_destination(dest, self._sock.family)
        return await self._managed_call(
            addr, lambda now: self._endpoint.manage(addr, request, now), timeout
        )

    async def _managed_call(
        self, addr: Address, start: Callable[[float], int], timeout: float
    ) -> dict[str, Any]:
        """Run ``start(now)`` (a management request or a transfer; it returns the
        request number) and await its answer."""
        loop = self._require_started()
        self._check_open()
        number = start(loop.time())
        future: asyncio.Future[tuple[int, bytes]] = loop.create_future()
        self._manage_replies[number] = future
        self._pump([])
        try:
            status, body = await asyncio.wait_for(future, timeout)
        except TimeoutError:
            raise no_answer(addr, timeout) from None
        finally:
            self._manage_replies.pop(number, None)
        return parse_manage_reply(addr, status, body)

    async def _transfer(
        self, name: str, to: str | tuple[Any, ...], timeout: float
    ) -> dict[str, Any]:
        check_timeout(timeout, "timeout", positive=True)
        self._require_started()
        assert self._sock is not None
        addr = resolve_destination(to, self._sock.family)
        return await self._managed_call(
            addr, lambda now: self._endpoint.remote.transfer(name, addr, now), timeout
        )

    # ------------------------------------------------------------- mailboxes

    def create_mailbox(
        self,
        name: str,
        capacity: int | None = None,
        *,
        max_bytes: int | None = None,
        port: bool = False,
        durable: str | os.PathLike[str] | None = None,
        sync: str = "grouped",
    ) -> AsyncMailbox:
        """As :meth:`reliable.Node.create_mailbox`; returns the owner's handle."""
        loop = self._require_started()
        self._check_open()
        store = open_store(durable, name, sync)
        if store is not None:
            self._durable = True
        try:
            owner = self._endpoint.create_mailbox(
                name,
                capacity=capacity,
                max_bytes=max_bytes,
                port=port,
                store=store,
                now=loop.time(),
            )
        except BaseException:
            if store is not None:
                store.close()
            raise
        return AsyncMailbox(self, name, owner if port else None)  # only a port dies with it

    async def open_outbox(
        self, path: str | os.PathLike[str], *, sync: str = "message"
    ) -> AsyncOutbox:
        """As :meth:`reliable.Node.open_outbox`: a durable outbox in the SQLite file
        ``path``; the sends it still holds are sent again before this returns
        (queued: their handles are ``outbox.replayed``)."""
        self._require_started()
        self._check_open()
        store = OutboxStore(path, sync=sync)
        self._outboxes.append(store)
        outbox = AsyncOutbox(self, store)
        for row in store.restored:
            target = replay_target(store, row)
            outbox.replayed.append(
                await self._outbox_submit(
                    store, row.row, target, row.data, row.msg_type, row.priority, None, block=True
                )
            )
        return outbox

    async def _outbox_send(
        self,
        store: OutboxStore,
        dest: str | tuple[Any, ...],
        data: bytes,
        msg_type: int,
        priority: int,
        mailbox: str | None,
        timeout: float | None,
        *,
        block: bool,
    ) -> AsyncSendHandle:
        """Check, store (accepted: the commit runs on a worker thread), then send."""
        check_timeout(timeout, "timeout", positive=True)
        self._require_started()
        assert self._sock is not None
        self._check_open()
        addr, name, data = outbox_message(
            self._endpoint, dest, data, msg_type, priority, mailbox, self._family
        )
        row, tag = await asyncio.to_thread(store.add, addr, name, msg_type, priority, data)
        target = OutboxTarget(addr, name, tag)
        return await self._outbox_submit(
            store, row, target, data, msg_type, priority, timeout, block=block
        )

    async def _outbox_send_many(
        self,
        store: OutboxStore,
        dest: str | tuple[Any, ...],
        messages: list[bytes],
        msg_type: int,
        priority: int,
        mailbox: str | None,
        timeout: float | None,
    ) -> list[AsyncSendHandle]:
        """Check all, store all in one commit (on a worker thread), then send each."""
        check_timeout(timeout, "timeout", positive=True)
        self._require_started()
        assert self._sock is not None
        self._check_open()
        addr, name, checked = outbox_batch(
            self._endpoint, dest, messages, msg_type, priority, mailbox, self._family
        )
        if not checked:
            return []
        stored = await asyncio.to_thread(store.add_many, addr, name, msg_type, priority, checked)
        with StoredBatch(store, addr, name, stored, checked) as batch:
            return [
                await self._outbox_submit(
                    store, row, target, data, msg_type, priority, timeout, block=True
                )
                for row, target, data in batch
            ]

    async def _outbox_submit(
        self,
        store: OutboxStore,
        row: int,
        target: OutboxTarget,
        data: bytes,
        msg_type: int,
        priority: int,
        timeout: float | None,
        *,
        block: bool,
    ) -> AsyncSendHandle:
        loop = self._require_started()
        deadline = None if timeout is None else loop.time() + timeout
        try:
            while True:
                try:
                    future = self._submit(
                        target,
                        data,
                        msg_type,
                        priority,
                        None,
                        timeout,
                        deadline,
                        "",
                        AsyncSendHandle(self, 0, None),
                    )
                    break
                except errors.WouldBlock:
                    if not block:
                        raise
                    remaining = None if deadline is None else deadline - loop.time()
                    if remaining is not None and remaining <= 0:
                        raise errors.SendTimeout(
                            target.addr, timeout or 0.0, stage="queued"
                        ) from None
                    self._check_open()
                    await self._wait_change(remaining)
        except BaseException:
            store.settle(row)  # never queued: nothing to retry
            raise

        def settle(done: asyncio.Future[Receipt]) -> None:
            settle_outbox_send(store, row, None if done.cancelled() else done.exception())

        future.add_done_callback(settle)
        return future

    def remote_mailbox(self, address: str) -> AsyncRemoteMailbox:
        """A handle to receive from mailbox ``host:port/name`` on another node (see
        :meth:`reliable.Node.remote_mailbox`)."""
        node, name = remote_mailbox_address(address)
        self._require_started()
        assert self._sock is not None
        return AsyncRemoteMailbox(self, resolve_destination(node, self._sock.family), name)

    async def _receive_remote(
        self,
        owner: Address,
        name: str,
        msg_type: int,
        except_type: bool,
        receiver: str | None,
        timeout: float | None,
    ) -> Message:
        check_timeout(timeout, "timeout")
        loop = self._require_started()
        self._check_open()
        endpoint = self._endpoint
        mark = self._departures.mark()
        selector = Selector.of(None, msg_type, except_type)
        task = asyncio.current_task()
        label = receiver if receiver is not None else task.get_name() if task else "asyncio"
        deadline = None if timeout is None else loop.time() + timeout
        ticket = endpoint.pull(owner, name, selector, receiver=label, now=loop.time())
        self._receives.add(ticket)
        self._pump([])
        return await self._await_message(ticket, None, mark, timeout, deadline, local=False)

    def on_message(
        self,
        mailbox: str | AsyncMailbox,
        callback: Callable[[Message], object],
        *,
        source: Sources = None,
        msg_type: int = 0,
        except_type: bool = False,
        lock: float = DEFAULT_LOCK,
    ) -> AsyncConsumer:
        """Consume ``mailbox`` (a name, or a handle: a port's owner handle) with
        ``callback(message)``, as ``mq_notify`` with ``SIGEV_THREAD``: the callback
        (a function or a coroutine function) runs as a task on the loop.

        The consumer is one more receiver: each message goes to exactly one
        taker, a ``receive`` call or a consumer. It takes each message under a
        ``lock`` (seconds) and acknowledges it when the callback returns; if the
        callback raises, the message is released (back at the head of its
        priority: not lost) and the consumer stops, keeping the exception in
        ``consumer.error``. See :mod:`reliable.consumer`. ``source``,
        ``msg_type``, ``except_type`` select as :meth:`receive` does.
        """
        self._require_started()
        check_lock(lock)
        Selector.of(None, msg_type, except_type)  # argument errors now, not in the task
        handle = self.mailbox(mailbox) if isinstance(mailbox, str) else mailbox
        selection = {"source": source, "msg_type": msg_type, "except_type": except_type}
        return AsyncConsumer(handle, callback, selection, lock)

    def mailbox(self, name: str) -> AsyncMailbox:
        """A handle on existing mailbox ``name`` (a port's handle cannot receive)."""
        if not self._endpoint.has_mailbox(name):
            raise errors.UnknownMailbox(f"no mailbox {name!r} on this node")
        return AsyncMailbox(self, name, None)

    def _manage(self, name: str, action: str, owner: int | None) -> None:
        loop = self._require_started()
        self._check_open()
        manage_mailbox(self._endpoint, name, action, owner, loop.time())
        self._pump([])

    def _core(self, call: Callable[[Endpoint, float], Any]) -> Any:
        """Run ``call(endpoint, now)`` (a mailbox handle's peek, ack, ...), commit, pump."""
        loop = self._require_started()
        self._check_open()
        result = call(self._endpoint, loop.time())
        self._committer.flush(self._endpoint, loop.time())  # durable: committed first
        self._pump([])
        return result

    def _port_abandoned(self, name: str, owner: int) -> None:
        """A port's owner handle was garbage collected: delete the port on the loop.

        Called by the garbage collector, on whatever thread dropped the handle.
        """
        loop = self._loop
        if loop is None or self._closed or loop.is_closed():
            return
        self._abandoned.append((name, owner))
        loop.call_soon_threadsafe(self._delete_abandoned)

    def _delete_abandoned(self) -> None:
        if self._closed or self._loop is None:
            return
        delete_abandoned_ports(self._endpoint, self._abandoned, self._loop.time())
        self._pump([])

    # --------------------------------------------------------------- sending

    def send_nowait(
        self,
        dest: str | tuple[Any, ...],
        data: bytes,
        *,
        msg_type: int = 0,
        priority: int = 0,
        mailbox: str | None = None,
        timeout: float | None = None,
        policy: str = "round-robin",
    ) -> AsyncSendHandle:
        """Queue ``data``; returns an :class:`AsyncSendHandle`, a future resolved with
        the receipt or the delivery error.

        Raises a :class:`~reliable.errors.WouldBlock` (``SendBufferFull``,
        ``MailboxFull``) instead of waiting; nothing was sent then. A multicast
        or broadcast group goes through :meth:`send_group_nowait`.
        """
        if timeout is not None:
            check_timeout(timeout, "timeout", positive=True)
        if type(dest) is not tuple:  # (an address tuple is never a group: no call for it)
            refuse_group(dest, "_nowait")
        future = AsyncSendHandle(self, 0, None)
        return self._submit(dest, data, msg_type, priority, mailbox, timeout, None, policy, future)

    def send_group_nowait(
        self,
        group: str | GroupAddress,
        data: bytes,
        *,
        msg_type: int = 0,
        priority: int = 0,
        mailbox: str | None = None,
        timeout: float | None = None,
    ) -> AsyncGroupSendHandle:
        """Queue ``data`` for a multicast or broadcast group; returns an
        :class:`AsyncGroupSendHandle`. The group should be open already
        (:meth:`members` opens one, and starts discovery): members not yet heard
        from are not waited for. :meth:`send_group` opens it and waits."""
        check_timeout(timeout, "timeout", positive=True)
        target = group_target(group, mailbox)
        future = AsyncGroupSendHandle(self, 0, None)
        return self._submit(target, data, msg_type, priority, None, timeout, None, "", future)

    def _submit(
        self,
        dest: str | tuple[Any, ...] | GroupAddress | OutboxTarget,
        data: bytes,
        msg_type: int,
        priority: int,
        mailbox: str | None,
        timeout: float | None,
        deadline: float | None,
        policy: str,
        future: H,
    ) -> H:
        loop = self._loop if self._loop is not None else self._require_started()
        assert self._sock is not None
        target: Target
        peer: Any = None
        endpoint = self._endpoint
        known = self._destinations.get(dest, mailbox)
        if known is not None:
            target, peer = known  # a node's address parsed before; the core checks the message
        elif isinstance(dest, GroupAddress):  # send_group: checked before discovery
            data = checked_message(data, msg_type, priority)
            target = self._open_group(dest, join=False)
        elif isinstance(dest, str) and is_group_url(dest):  # anycast://
            data = checked_message(data, msg_type, priority)
            target = group_destination(dest, mailbox)
        elif isinstance(dest, OutboxTarget):  # a durable outbox's send, checked by the outbox
            target, peer = dest, dest.addr
        else:
            target, peer = self._destinations.resolve(dest, mailbox, self._sock.family)
        busy = peer is not None and endpoint.in_flight(peer)
        ticket = enqueue(
            endpoint,
            target,
            data,
            now=self._clock(),
            msg_type=msg_type,
            priority=priority,
            timeout=timeout,
            deadline=deadline,
            policy=policy,
        )
        future.ticket = ticket
        future.destination = peer if peer is not None else str(target)
        self._handles[ticket] = future
        if not busy or self._held >= HOLD_MAX - 1:
            self._drive()  # an idle peer: send at once; a busy one: every HOLD_MAX sends
        else:
            # To a busy peer, one pump per loop turn (or per HOLD_MAX sends) for the sends
            # made in it: a coroutine sending in a loop gets its messages packed into
            # datagrams, yet a long burst still leaves as several (see HOLD_MAX).
            self._held += 1
            if not self._pump_soon:
                self._pump_soon = True
                loop.call_soon(self._deferred_pump)
        return future

    async def send_many(
        self,
        dest: str | tuple[Any, ...],
        messages: Iterable[bytes],
        *,
        msg_type: int = 0,
        priority: int = 0,
        mailbox: str | None = None,
        timeout: float | None = None,
    ) -> AsyncBatchHandle:
        """Queue every message of ``messages`` for ``dest`` (a node, not a group), in
        order; returns one :class:`AsyncBatchHandle` for all of them.

        As :meth:`reliable.Node.send_many`: waits while the send buffer (or the
        destination mailbox) is full, not for the outcomes; await the handle
        for those. With ``timeout``, a buffer still full at its end raises
        ``SendTimeout`` (the handle of what was queued is its ``batch``).
        """
        check_timeout(timeout, "timeout", positive=True)
        loop = self._require_started()
        assert self._sock is not None
        peer, name, datas = batch_destination(
            dest, messages, msg_type, priority, mailbox, self._sock.family
        )
        batch = AsyncBatchHandle(self, peer)
        deadline = None if timeout is None else loop.time() + timeout
        try:
            for data in datas:
                while True:
                    self._check_open()
                    try:
                        ticket = self._endpoint.send(
                            peer,
                            data,
                            now=loop.time(),
                            msg_type=msg_type,
                            priority=priority,
                            mailbox=name,
                            timeout=timeout,
                            deadline=deadline,
                        )
                        break
                    except errors.WouldBlock:
                        remaining = None if deadline is None else deadline - loop.time()
                        if remaining is not None and remaining <= 0:
                            exc = errors.SendTimeout(peer, timeout or 0.0, stage="queued")
                            exc.batch = batch  # type: ignore[attr-defined]
                            raise exc from None
                        self._pump([])  # what is queued goes out: room comes from acks
                        await self._wait_change(remaining)
                batch._add(ticket)
                self._handles[ticket] = batch
        finally:
            batch._seal()
            if not self._closed:
                self._pump([])
        return batch

    def _deferred_pump(self) -> None:
        self._pump_soon = False
        self._pump([])

    async def send(
        self,
        dest: str | tuple[Any, ...],
        data: bytes,
        *,
        msg_type: int = 0,
        priority: int = 0,
        mailbox: str | None = None,
        timeout: float | None = None,
        policy: str = "round-robin",
    ) -> Receipt:
        """Send ``data`` and wait until it entered its mailbox; returns the receipt.

        As :meth:`reliable.Node.send`: waits for send-buffer space and for
        room in a full mailbox; with ``timeout`` a message not in by then is
        withdrawn and :class:`~reliable.errors.SendTimeout` raised. Anycast
        destinations work as there; a multicast or broadcast group goes
        through :meth:`send_group`.

        Cancelling the call withdraws the message if it can still be
        withdrawn (not wholly sent yet, or waiting at the receiver's full
        mailbox) and raises ``CancelledError`` either way. A message that
        could not be withdrawn goes on, and its fate reaches only
        ``on_event``; to keep it, use :meth:`send_nowait` and
        ``AsyncSendHandle.withdraw`` (docs/usage.md, "Cancellation").
        """
        check_timeout(timeout, "timeout", positive=True)
        refuse_group(dest, "")
        data = checked_message(data, msg_type, priority)
        return await self._send_waiting(
            dest, data, msg_type, priority, mailbox, timeout, policy, AsyncSendHandle
        )

    async def send_group(
        self,
        group: str | GroupAddress,
        data: bytes,
        *,
        msg_type: int = 0,
        priority: int = 0,
        mailbox: str | None = None,
        timeout: float | None = None,
    ) -> GroupReceipt:
        """Send ``data`` to every member of a multicast or broadcast group; returns the
        :class:`~reliable.GroupReceipt`, as :meth:`reliable.Node.send_group`. A group
        not open yet is opened first and its members get a moment to answer."""
        check_timeout(timeout, "timeout", positive=True)
        target = group_target(group, mailbox)
        data = checked_message(data, msg_type, priority)
        self._require_started()
        resolved = self._resolve(target)
        if not self._endpoint.is_open_group(resolved):
            self._open_group(target, join=False)
            await asyncio.sleep(DISCOVERY_WAIT)  # members answer the SOLICIT
            loop = asyncio.get_running_loop()
            give_up = loop.time() + DISCOVERY_MAX - DISCOVERY_WAIT
            while not self._endpoint.group_members(resolved) and loop.time() < give_up:
                await asyncio.sleep(0.02)  # none yet: a loaded host answers late
        return await self._send_waiting(
            target, data, msg_type, priority, None, timeout, "", AsyncGroupSendHandle
        )

    async def _send_waiting(
        self,
        dest: str | tuple[Any, ...] | GroupAddress,
        data: bytes,
        msg_type: int,
        priority: int,
        mailbox: str | None,
        timeout: float | None,
        policy: str,
        kind: type[_AsyncPendingSend[R]],
    ) -> R:
        """Queue (waiting for room while the send buffer is full), then await the fate."""
        loop = self._require_started()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            remaining = None if deadline is None else deadline - loop.time()
            if remaining is not None and remaining <= 0:
                raise errors.SendTimeout(dest, timeout or 0.0, stage="queued")
            try:
                future = self._submit(
                    dest,
                    data,
                    msg_type,
                    priority,
                    mailbox,
                    timeout,
                    deadline,
                    policy,
                    kind(self, 0, None),
                )
                break
            except errors.WouldBlock:
                self._check_open()
                await self._wait_change(remaining)
        return await future  # cancelled: the handle's cancel withdraws it if it can

    # ---------------------------------------------------------------- groups

    def join(self, group: str) -> None:
        """Become a member of ``group``, as :meth:`reliable.Node.join`."""
        self._open_group(parse_group(group), join=True)

    def leave(self, group: str) -> None:
        """Stop being a member of ``group``, as :meth:`reliable.Node.leave`."""
        loop = self._require_started()
        self._endpoint.leave_group(self._resolve(parse_group(group)), loop.time())
        self._pump([])

    def members(self, group: str) -> dict[Address, int]:
        """Live members of ``group`` as heard here; opens it (and so starts discovery)."""
        return self._endpoint.group_members(self._open_group(parse_group(group), join=False))

    async def wait_for_members(self, group: str, count: int, timeout: float) -> dict[Address, int]:
        """Wait until ``group`` has at least ``count`` live members or ``timeout`` passes."""
        check_timeout(timeout, "timeout")
        loop = self._require_started()
        deadline = loop.time() + timeout
        while True:
            found = self.members(group)
            remaining = deadline - loop.time()
            if len(found) >= count or remaining <= 0:
                return found
            self._check_open()
            await self._wait_change(min(remaining, 0.05))

    def serve(self, service: str, *, announce: str | list[str]) -> None:
        """Serve anycast ``service``, announced on each group in ``announce``."""
        loop = self._require_started()
        groups = [announce] if isinstance(announce, str) else list(announce)
        targets = [self._open_group(parse_group(g), join=False) for g in groups]
        self._endpoint.serve(service, targets, loop.time())
        self._pump([])

    def unserve(self, service: str) -> None:
        """Stop serving anycast ``service`` (a WITHDRAW tells the discovery groups)."""
        self._endpoint.unserve(service)
        self._pump([])

    def discover(self, group: str) -> None:
        """Learn the anycast services announced on ``group``."""
        loop = self._require_started()
        self._endpoint.discover(self._open_group(parse_group(group), join=False), loop.time())
        self._pump([])

    def add_service_members(self, service: str, members: list[str | tuple[Any, ...]]) -> None:
        """Members of ``service`` known without announcements (``host:port`` each)."""
        self._require_started()
        assert self._sock is not None
        family = self._sock.family
        self._endpoint.add_service_members(
            service, [resolve_destination(m, family) for m in members]
        )

    def service_members(self, service: str) -> list[Address]:
        """The live members of anycast ``service`` known here."""
        return self._endpoint.service_members(service)

    def _resolve(self, group: GroupAddress) -> GroupAddress:
        self._require_started()
        assert self._groups is not None
        return self._groups.resolve(group)

    def _open_group(self, group: GroupAddress, *, join: bool) -> GroupAddress:
        loop = self._require_started()
        self._check_open()
        assert self._groups is not None
        target = self._groups.resolve(group)
        sock = self._groups.open(target)
        if sock is not None:
            loop.add_reader(sock.fileno(), self._on_group_readable, sock)
        self._endpoint.open_group(target, loop.time(), join=join)
        self._pump([])
        return target

    def _on_group_readable(self, sock: DatagramSocket) -> None:
        self._pump(drain_socket(sock))

    # ------------------------------------------------------------- receiving

    def post(self, mailbox: str, data: bytes, *, msg_type: int = 0, priority: int = 0) -> None:
        """Put ``data`` into this node's own ``mailbox``, without the network.

        From the loop, another thread, or a signal handler (prefer the loop's
        ``add_signal_handler``): it never blocks and never takes the node's lock
        (see :mod:`reliable.localpost`).
        The message is admitted at the node's next turn (at once if the node
        is idle) as an arriving message would be: same order, limits (a full
        mailbox parks it), memory cap and durability; ``msg.source`` is
        :attr:`address`. Argument errors raise :class:`~reliable.errors.UsageError`
        here; a refusal later (no such mailbox, closed, memory full) is counted
        in ``stats().dropped`` (``refused.*``) and logged, not raised.
        """
        self._require_started()
        post_local(self._endpoint, self._posts, self._closed, mailbox, data, msg_type, priority)

    def receive_nowait(
        self,
        *,
        mailbox: str = DEFAULT_MAILBOX,
        source: Sources = None,
        msg_type: int = 0,
        except_type: bool = False,
        receiver: str | None = None,
        max_size: int | None = None,
        truncate: bool = False,
    ) -> Message | None:
        """The next message if one is waiting (selected as :meth:`receive` does), else ``None``."""
        return self._take(
            mailbox,
            None,
            source,
            msg_type,
            except_type,
            receiver,
            max_size=max_size,
            truncate=truncate,
        )[0]

    async def receive(
        self,
        timeout: float | None = None,
        *,
        mailbox: str = DEFAULT_MAILBOX,
        source: Sources = None,
        msg_type: int = 0,
        except_type: bool = False,
        receiver: str | None = None,
        max_size: int | None = None,
        truncate: bool = False,
    ) -> Message:
        """The next message of ``mailbox``, waiting up to ``timeout`` seconds.

        Selection, ordering and errors as :meth:`reliable.Node.receive`;
        ``receiver`` defaults to the current task's name.
        """
        return await self._receive(
            mailbox,
            None,
            source,
            msg_type,
            except_type,
            receiver,
            timeout,
            max_size=max_size,
            truncate=truncate,
        )

    async def receive_many(
        self,
        max_count: int,
        timeout: float | None = None,
        *,
        mailbox: str = DEFAULT_MAILBOX,
        source: Sources = None,
        msg_type: int = 0,
        except_type: bool = False,
        receiver: str | None = None,
        max_size: int | None = None,
        truncate: bool = False,
    ) -> list[Message]:
        """Up to ``max_count`` messages, as :meth:`reliable.Node.receive_many`: what
        is waiting, or (waiting up to ``timeout``) the first to come and whatever
        else is waiting then; ``[]`` when the timeout passed."""
        return await self._receive_many(
            mailbox,
            None,
            max_count,
            timeout,
            source,
            msg_type,
            except_type,
            receiver,
            max_size=max_size,
            truncate=truncate,
        )

    async def receive_any(
        self,
        mailboxes: Iterable[str | MailboxHandle],
        timeout: float | None = None,
        *,
        source: Sources = None,
        msg_type: int = 0,
        except_type: bool = False,
        receiver: str | None = None,
        max_size: int | None = None,
        truncate: bool = False,
        lock: float | None = None,
    ) -> Message:
        """As :meth:`reliable.Node.receive_any`: the next message from any of several
        local ``mailboxes`` (a select over queues); ``msg.mailbox`` says which."""
        check_timeout(timeout, "timeout")
        boxes = mailbox_set(mailboxes)
        loop = self._require_started()
        assert self._sock is not None
        self._check_open()
        selector = receive_selector(source, msg_type, except_type, max_size, truncate, self._family)
        if receiver is None:
            task = asyncio.current_task(loop)
            receiver = task.get_name() if task is not None else "asyncio"
        endpoint = self._endpoint
        mark = self._departures.mark()
        now = loop.time()
        if self._posts:
            self._posts.admit(endpoint, normalize(self._sock.getsockname()), now)
        message = endpoint.take_any(boxes, selector, receiver=receiver, lock=lock, now=now)
        if message is not None:
            self._handed_out(lock is not None)
            return message
        if timeout == 0:
            raise errors.ReceiveTimeout("no message waiting")
        deadline = None if timeout is None else now + timeout
        peer = None if isinstance(selector.source, frozenset) else selector.source
        ticket = endpoint.wait_for_any(boxes, selector, receiver=receiver, lock=lock, now=now)
        self._receives.add(ticket)
        if peer is not None:
            endpoint.watch(peer, now)
        self._pump([])
        return await self._await_message(
            ticket, peer, mark, timeout, deadline, locked=lock is not None
        )

    async def _receive_many(
        self,
        mailbox: str,
        owner: int | None,
        max_count: int,
        timeout: float | None,
        source: Sources,
        msg_type: int,
        except_type: bool,
        receiver: str | None,
        lock: float | None = None,
        *,
        max_size: int | None = None,
        truncate: bool = False,
    ) -> list[Message]:
        check_count(max_count)
        args = (source, msg_type, except_type, receiver)
        got: list[Message] = []

        def take_more() -> None:
            while len(got) < max_count:
                message = self._take(
                    mailbox, owner, *args, lock, pump=False, max_size=max_size, truncate=truncate
                )[0]
                if message is None:
                    break
                got.append(message)

        take_more()
        if got:
            self._handed_out()  # one commit for the lot (durable), not one per message
            return got
        try:
            got.append(
                await self._receive(
                    mailbox, owner, *args, timeout, lock, max_size=max_size, truncate=truncate
                )
            )
        except errors.ReceiveTimeout:
            return []
        take_more()  # what came with it
        if len(got) > 1:
            self._handed_out()
        return got

    def _take(
        self,
        mailbox: str,
        owner: int | None,
        source: Sources,
        msg_type: int,
        except_type: bool,
        receiver: str | None,
        lock: float | None = None,
        *,
        pump: bool = True,
        max_size: int | None = None,
        truncate: bool = False,
    ) -> tuple[Message | None, Selector, str]:
        loop = self._loop if self._loop is not None else self._require_started()
        assert self._sock is not None
        self._check_open()
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
        if receiver is None:
            task = asyncio.current_task(loop)
            receiver = task.get_name() if task is not None else "asyncio"
        endpoint = self._endpoint
        now = self._clock()
        if self._posts and self._sock is not None:
            # Posts made before this receive are in the mailbox when it looks.
            self._posts.admit(endpoint, normalize(self._sock.getsockname()), now)
        message = endpoint.take(
            mailbox, selector, owner=owner, receiver=receiver, lock=lock, now=now
        )
        if message is not None and pump:
            self._handed_out(lock is not None)
        return message, selector, receiver

    def _handed_out(self, locked: bool = False) -> None:
        """After taking messages: durable, their deletions commit before they are handed
        out; and a parked message may have got in: its sender hears of it now."""
        assert self._loop is not None
        endpoint = self._endpoint
        now = self._clock()
        if self._durable:
            self._committer.flush(endpoint, now)
        if now - self._read_at >= DRIVE_GAP:
            self._on_readable()  # see _drive
        elif locked or endpoint.has_output() or endpoint.has_events():
            # A parked message may have got in: its sender hears now. A lock's expiry
            # is a new timer.
            self._pump([])

    async def _receive(
        self,
        mailbox: str,
        owner: int | None,
        source: Sources,
        msg_type: int,
        except_type: bool,
        receiver: str | None,
        timeout: float | None,
        lock: float | None = None,
        *,
        max_size: int | None = None,
        truncate: bool = False,
    ) -> Message:
        if timeout is not None and not (type(timeout) in _PLAIN and 0 <= timeout < _INF):
            check_timeout(timeout, "timeout")  # raises, saying why (a plain one skips the call)
        # Only a receive from one named source looks at departures (receive_failure).
        mark = 0 if source is None else self._departures.mark()
        message, selector, label = self._take(
            mailbox,
            owner,
            source,
            msg_type,
            except_type,
            receiver,
            lock,
            max_size=max_size,
            truncate=truncate,
        )
        if message is not None:
            return message
        if timeout == 0:
            raise errors.ReceiveTimeout("no message waiting")
        endpoint = self._endpoint
        deadline = None if timeout is None else self._clock() + timeout
        # One named source is watched while we wait; a set of them is not (others may send).
        peer = None if isinstance(selector.source, frozenset) else selector.source
        ticket = endpoint.wait_for_message(
            mailbox, selector, owner=owner, receiver=label, lock=lock, now=self._clock()
        )
        self._receives.add(ticket)
        if peer is not None:
            endpoint.watch(peer, self._clock())  # probes: a new timer
            self._pump([])
        elif endpoint.has_output() or endpoint.has_events():
            # The wait let a parked message in (a rendezvous): its sender hears now, and
            # the answer is routed. A plain wait changes nothing else (no timer): no pump,
            # which would look the core's timer up again just before the loop sleeps.
            self._pump([])
        return await self._await_message(
            ticket, peer, mark, timeout, deadline, locked=lock is not None
        )

    async def _await_message(
        self,
        ticket: int,
        peer: Address | None,
        mark: int,
        timeout: float | None,
        deadline: float | None,
        locked: bool = False,
        local: bool = True,
    ) -> Message:
        """Wait for the core's answer to the receive ``ticket`` (registered in
        ``_receives``); ``peer``, if named, was watched, and is unwatched after.
        ``locked``: a receive under a lock; ``local``: from a mailbox of this node.

        The same steps as :meth:`reliable.Node._await_message` with the event
        loop's wait: the pump that routes the answer (``_on_receive``) wakes us.
        Giving up (a timeout, the named peer gone, the node closed, or this
        coroutine cancelled, as by ``asyncio.wait_for``) withdraws the wait from
        the core, or the core would hand the next message to nobody; if the core
        answered first, the answer wins (the message was taken for us), except
        when this coroutine is cancelled: then the message goes back to its
        mailbox (:func:`reliable.driver.give_up_receive`), not with the receive.
        """
        endpoint = self._endpoint
        taken = self._taken
        loop = self._loop
        assert loop is not None
        try:
            # The first wait skips the checks below: the caller just made them (open,
            # a timeout above zero, the named peer not gone since ``mark``, or it is
            # watched now). Whatever changes meanwhile comes with a pump, which wakes us.
            first = peer is None and not self._closed
            while ticket not in taken:
                if first:
                    first = False
                    waiter: asyncio.Future[None] = loop.create_future()
                    self._waiters.append(waiter)
                    if deadline is not None and deadline < self._wake_at:
                        self._wake_by(deadline)
                    await waiter
                    continue
                remaining = None if deadline is None else deadline - self._clock()
                failure = receive_failure(
                    closed=self._closed or endpoint.closing,
                    departures=self._departures,
                    peer=peer,
                    mark=mark,
                    remaining=remaining,
                    timeout=timeout,
                )
                if failure is not None:
                    if self._closed or endpoint.cancel_wait(ticket):
                        self._pump([])  # e.g. a remote mailbox's owner hears of it now
                        raise failure
                    self._pump([])  # answered meanwhile: route the answer, then take it
                    if ticket not in taken:  # (the core said answered: never, but no spin)
                        raise failure
                    break
                # As _wait_change, inline (a coroutine frame less per wait, on the reply's path).
                waiter = loop.create_future()
                self._waiters.append(waiter)
                if deadline is not None and deadline < self._wake_at:
                    self._wake_by(deadline)
                await waiter
        except asyncio.CancelledError:
            if not self._closed:  # withdrawn; or answered just before: put back
                give_up_receive(
                    endpoint,
                    ticket,
                    taken,
                    locked=locked,
                    local=local,
                    route=lambda: self._pump([]),
                    now=self._clock(),
                )
            taken.pop(ticket, None)
            raise
        finally:
            self._receives.discard(ticket)
            if peer is not None and not self._closed:
                endpoint.unwatch(peer, self._clock())
        outcome = taken.pop(ticket)
        if isinstance(outcome, errors.ReliableError):
            raise outcome
        return outcome

    # ------------------------------------------------------------------ I/O

    def _on_readable(self, *, arm_later: bool = False) -> None:
        assert self._sock is not None and self._loop is not None
        self._read_at = self._clock()
        reports: list[Unreachable] = []
        batch = drain_socket(self._sock, reports=reports)
        if reports:
            self._take_reports(reports)
        self._pump(batch, arm_later=arm_later)

    def _on_reader(self) -> None:
        """The socket's reader callback (see :meth:`_arm_later`)."""
        self._on_readable(arm_later=True)

    def _drive(self) -> None:
        """Pump, reading the socket first unless it was read within ``DRIVE_GAP``.

        A coroutine that sends or takes queued messages in a loop does not yield
        to the event loop, so the reader callback does not run meanwhile: this
        reads what arrived, so that acks are heard (and sent) promptly and no
        peer's RTT estimate is stretched by how long the coroutine ran.
        """
        assert self._loop is not None
        if self._clock() - self._read_at >= DRIVE_GAP:
            self._on_readable()
        else:
            self._pump([])

    def _on_timer(self) -> None:
        self._timer = None
        self._pump([])

    def _pump(self, batch: list[tuple[bytes, Address]], *, arm_later: bool = False) -> None:
        if self._closed:
            return
        assert self._loop is not None
        endpoint = self._endpoint
        now = self._clock()
        self._held = 0
        self._woke = False
        if self._posts:
            assert self._sock is not None
            self._posts.admit(endpoint, normalize(self._sock.getsockname()), now)
        for data, addr in batch:
            endpoint.receive_datagram(data, addr, now)
        timer = self._deadline
        if timer is not None and timer <= now:
            endpoint.handle_timer(now)
        if endpoint.has_output() or endpoint.closing or self._backlog or self._committer.ready:
            if self._durable:
                self._committer.turn(endpoint, now)  # durable mailboxes: grouped commits
            out = endpoint.datagrams_to_send(now)
            if out or self._backlog:  # (none: an ack held for the reply to carry it)
                self._transmit(out)
        if endpoint.has_events():
            route_events(endpoint, self, self._on_event)
        if arm_later and (self._woke or self._waiters):
            self._arm_later()
        else:
            self._arm_timer()
        if self._waiters:
            self._notify()

    def _arm_later(self) -> None:
        """Re-arm the loop timer after the coroutines this pump wakes have run.

        The reader callback's pump resolves the receive a coroutine awaits; that
        coroutine runs next in this loop turn, and what it does with the message
        (a reply, another receive) pumps and arms the timer again. Arming here
        too would look the core's next timer up twice, once on the reply's
        critical path. So the callback only schedules a check, after those
        coroutines (call_soon keeps order), which arms the timer unless a pump
        did meanwhile. Only when a coroutine was woken: otherwise the check
        would cost the loop an extra turn.
        """
        self._timer_stale = True
        if not self._arm_scheduled:
            assert self._loop is not None
            self._arm_scheduled = True
            self._loop.call_soon(self._arm_if_stale)

    def _arm_if_stale(self) -> None:
        self._arm_scheduled = False
        if self._timer_stale and not self._closed:
            self._arm_timer()

    def _commit_finished(self) -> None:
        """From another thread (a durable mailbox's commit finished, a local post came):
        run a pump on the loop soon."""
        loop = self._loop
        if loop is not None and not self._closed:
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(self._pump, [])

    def _arm_timer(self) -> None:
        """Keep one loop timer at the core's next deadline (looked up once per pump).

        Moved at once, later as well as earlier. (Moving it only earlier, so that a
        later deadline leaves it to fire early once per probe interval, saved the
        handle, the cancellation and the heap work per request in request/reply,
        some 20 Python-level calls per round trip; but it woke the process about once
        every five round trips for nothing, and interleaved runs showed no gain.)
        """
        assert self._loop is not None
        self._timer_stale = False
        timer = self._deadline = self._endpoint.get_timer()
        if self._timer is not None:
            if timer is not None and self._timer.when() == timer:
                return
            self._timer.cancel()
            self._timer = None
        if timer is not None:
            self._timer = self._loop.call_at(timer, self._on_timer)

    def _transmit(self, out: list[tuple[bytes, Address]]) -> None:
        """Send ``out``; called by :meth:`_pump`, which routes what OS reports cause."""
        assert self._sock is not None
        waiting = bool(self._backlog)
        reports: list[Unreachable] = []
        if self._backlog.transmit(self._sock, out, reports) and not waiting:
            assert self._loop is not None
            self._loop.add_writer(self._sock.fileno(), self._on_writable)
        if reports:
            self._take_reports(reports)

    def _on_writable(self) -> None:
        assert self._sock is not None and self._loop is not None
        reports: list[Unreachable] = []
        if self._backlog.flush(self._sock, reports):
            self._loop.remove_writer(self._sock.fileno())
            if self._drained is not None and not self._drained.done():
                self._drained.set_result(None)
        if self._take_reports(reports):
            self._pump([])  # route what they caused

    def _take_reports(self, reports: list[Unreachable]) -> bool:
        """Hand the OS's word on unreachable peers to the core; whether there was any."""
        if not reports or self._closed:
            return False
        assert self._loop is not None
        report_unreachable(self._endpoint, reports, self._loop.time())
        return True

    def _withdraw(self, ticket: int) -> Withdrawal:
        """Withdraw send ``ticket`` in the core and route its outcome at once."""
        if self._closed or self._loop is None:
            return Withdrawal.UNKNOWN
        answer = self._endpoint.withdraw(ticket, self._loop.time())
        self._pump([])
        return answer

    def _notify(self) -> None:
        waiters, self._waiters = self._waiters, []
        self._woke = self._woke or bool(waiters)
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def _wait_change(self, timeout: float | None) -> None:
        """Until the next pump (or ``timeout``): the waiting coroutine is resumed by the
        pump's own callback, in the same step that read the datagram (no wait_for hop).
        Callers check their own deadline when woken (a wake-up may come early)."""
        loop = self._loop if self._loop is not None else self._require_started()
        waiter: asyncio.Future[None] = loop.create_future()
        self._waiters.append(waiter)
        if timeout is not None:
            self._wake_by(self._clock() + timeout)
        await waiter

    def _wake_by(self, when: float) -> None:
        """See that the waiting coroutines are woken by ``when`` (loop time).

        One loop timer serves every waiter's deadline: it is moved only to an
        earlier time, and when it fires it wakes them all; each looks at its own
        deadline and, still waiting, asks again for its own. A receive with a
        timeout that gets its message in time (the common case) thus costs no
        timer of its own: a timer per wait, cancelled a moment later, cost a
        handle, a heap push and a cancelled heap entry each.
        """
        timer = self._wake_timer
        if timer is not None:
            if self._wake_at <= when:
                return
            timer.cancel()
        assert self._loop is not None
        self._wake_timer = self._loop.call_at(when, self._on_wake_timer)
        self._wake_at = when

    def _on_wake_timer(self) -> None:
        self._wake_timer = None
        self._wake_at = _INF
        self._notify()

    # EventSink
    def _on_receive(
        self, waiter: int, message: Message | None, error: errors.ReliableError | None
    ) -> None:
        if waiter not in self._receives or waiter in self._taken:
            return
        outcome = message if message is not None else error
        assert outcome is not None
        self._taken[waiter] = outcome
        self._notify()

    def _on_manage(self, request: int, status: int, body: bytes) -> None:
        future = self._manage_replies.get(request)
        if future is not None and not future.done():
            future.set_result((status, body))

    def _on_stats(self, peer: Any, request: int, body: bytes) -> None:
        future = self._stats_replies.get(request)
        if future is not None and not future.done():
            future.set_result(body)

    def _on_outcome(
        self,
        ticket: int,
        receipt: Receipt | GroupReceipt | events.MessageDelivered | None,
        error: errors.DeliveryFailed | None,
    ) -> None:
        if isinstance(receipt, events.MessageDelivered):  # (routed without lazy_receipts)
            receipt = receipt_of(receipt)
        future = self._handles.pop(ticket, None)
        if isinstance(future, AsyncBatchHandle):
            if not future.done():
                future._resolve(ticket, receipt, error)
            return
        if future is None or future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(receipt)  # the node routes each kind of receipt to its kind of handle

    def _on_peer_down(self, peer: Any, error: errors.DeliveryFailed) -> None:
        self._departures.peer_down(peer, error)

    def _on_closed(self) -> None:
        if self._close_done is not None and not self._close_done.done():
            self._close_done.set_result(None)

    # --------------------------------------------------------------- helpers

    def _require_started(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            raise errors.UsageError(
                "start the node first: 'async with AsyncNode(...)' or 'await node.start()'"
            )
        return self._loop

    def _check_open(self) -> None:
        if self._closed or self._endpoint.closing:
            raise errors.NodeClosed("the node is closed")


class AsyncMailbox(MailboxHandle):
    """A handle on one mailbox of an :class:`AsyncNode` (see :class:`reliable.Mailbox`)."""

    def __init__(self, node: AsyncNode, name: str, owner: int | None) -> None:
        super().__init__(node, name, owner)
        self._node = node

    async def receive(
        self,
        timeout: float | None = None,
        *,
        source: Sources = None,
        msg_type: int = 0,
        except_type: bool = False,
        receiver: str | None = None,
        max_size: int | None = None,
        truncate: bool = False,
        lock: float | None = None,
    ) -> Message:
        """As :meth:`AsyncNode.receive`, from this mailbox (``lock``: see
        :meth:`reliable.Mailbox.receive`)."""
        return await self._node._receive(
            self.name,
            self._owner,
            source,
            msg_type,
            except_type,
            receiver,
            timeout,
            lock,
            max_size=max_size,
            truncate=truncate,
        )

    async def transfer(self, to: str | tuple[Any, ...], timeout: float = 5.0) -> dict[str, Any]:
        """As :meth:`reliable.Mailbox.transfer`: move this mailbox (queued messages,
        grants, the right to manage it) to the node at ``to``, which consented by
        creating an empty mailbox of the same name."""
        return await self._node._transfer(self.name, to, timeout)

    def receive_nowait(
        self,
        *,
        source: Sources = None,
        msg_type: int = 0,
        except_type: bool = False,
        receiver: str | None = None,
        max_size: int | None = None,
        truncate: bool = False,
    ) -> Message | None:
        """As :meth:`AsyncNode.receive_nowait`, from this mailbox."""
        args = (source, msg_type, except_type, receiver)
        return self._node._take(
            self.name, self._owner, *args, max_size=max_size, truncate=truncate
        )[0]

    async def receive_many(
        self,
        max_count: int,
        timeout: float | None = None,
        *,
        source: Sources = None,
        msg_type: int = 0,
        except_type: bool = False,
        receiver: str | None = None,
        max_size: int | None = None,
        truncate: bool = False,
        lock: float | None = None,
    ) -> list[Message]:
        """As :meth:`AsyncNode.receive_many`, from this mailbox; with ``lock`` (seconds)
        each message is taken under its own lock (see :meth:`reliable.Mailbox.receive`)."""
        return await self._node._receive_many(
            self.name,
            self._owner,
            max_count,
            timeout,
            source,
            msg_type,
            except_type,
            receiver,
            lock,
            max_size=max_size,
            truncate=truncate,
        )


class AsyncRemoteMailbox:
    """A handle to receive from a mailbox on another node (``AsyncNode.remote_mailbox``);
    see :class:`reliable.RemoteMailbox`."""

    def __init__(self, node: AsyncNode, owner: Address, name: str) -> None:
        self._node = node
        self.owner = owner
        self.name = name

    async def receive(
        self,
        timeout: float | None = None,
        *,
        msg_type: int = 0,
        except_type: bool = False,
        receiver: str | None = None,
    ) -> Message:
        """As :meth:`reliable.RemoteMailbox.receive`."""
        return await self._node._receive_remote(
            self.owner, self.name, msg_type, except_type, receiver, timeout
        )

    def __repr__(self) -> str:
        return f"<AsyncRemoteMailbox {errors.format_address(self.owner)}/{self.name}>"
