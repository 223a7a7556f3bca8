"""The blocking adapter: a UDP socket and one I/O thread around an :class:`Endpoint`.

The thread owns the socket's receive side and the clock: it sleeps in
``select`` until a datagram or the core's next timer, drains the socket, feeds
the core under the node lock, sends what the core produced and routes its
events. Application threads call into the core under the same lock and send
the datagrams their call produced themselves, so a ``send`` costs no thread
hand-off; they wake the I/O thread only when the next timer moved earlier
than the one it sleeps on.

Futures are resolved and user callbacks run outside the lock, so a callback
may call back into the node.

Receives that must wait register with the core (which serves waiting
receivers first come, first served, and hands a message straight to the
longest-waiting receiver that wants it) and sleep on a condition variable
until their message, their timeout, or their named peer's departure.

Closing: the datagrams the core produces once it has closed (final acks, the
CLOSE to every peer) are sent under the node lock, waiting for the socket to
take them if it is full, and the socket is closed under the same lock, so no
final datagram is lost to a socket closed beneath it. If the I/O thread cannot
finish the close in time (starved, or stuck in a callback), ``close()``
finishes it from the calling thread before releasing the socket.
"""

from __future__ import annotations

import os
import random
import select
import selectors
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from . import errors, events
from ._driver import (
    DatagramSocket,
    Departures,
    MailboxHandle,
    Target,
    Unreachable,
    checked_message,
    delete_abandoned_ports,
    drain_socket,
    enqueue,
    group_destination,
    manage_mailbox,
    open_socket,
    parse_stats,
    receive_buffer,
    report_unreachable,
    resolve_destination,
    route_events,
    send_datagram,
    split_destination,
)
from ._groupsock import GroupSockets
from .addressing import (
    Address,
    GroupAddress,
    is_group_url,
    normalize,
    parse_group,
)
from .config import Config
from .endpoint import DEFAULT_MAILBOX, Endpoint, Withdrawal, check_timeout
from .mailbox import Selector
from .message import GroupReceipt, Message, Receipt
from .security import Security
from .stats import NodeStats
from .store import close_stores, open_store, sync_stores  # durable mailboxes (issue 19)

__all__ = ["Mailbox", "Node", "SendHandle"]

_CLOSE_GRACE = 1.0  # seconds the I/O thread may take beyond the flush timeout to exit
#: After opening a group to send to it, how long members get to answer its SOLICIT.
DISCOVERY_WAIT = 0.2


class SendHandle:
    """The pending outcome of a :meth:`Node.send_nowait`.

    ``result()`` returns the :class:`~reliable.Receipt` once the destination
    acknowledged the message, or raises the
    :class:`~reliable.errors.DeliveryFailed` that explains why it will not.
    """

    __slots__ = ("_future", "_withdraw", "destination", "ticket")

    def __init__(
        self,
        ticket: int,
        destination: Any,
        withdraw: Callable[[int], Withdrawal] | None = None,
    ) -> None:
        self.ticket = ticket
        self.destination = destination
        self._withdraw = withdraw
        self._future: Future[Receipt | GroupReceipt] = Future()

    def done(self) -> bool:
        return self._future.done()

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
        if self._withdraw is None or self._future.done():
            return False
        return self._withdraw(self.ticket) is Withdrawal.WITHDRAWN

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the outcome is known (or ``timeout``); returns :meth:`done`."""
        check_timeout(timeout, "timeout")
        try:
            self._future.exception(timeout)
        except TimeoutError:
            return False
        return True

    def result(self, timeout: float | None = None) -> Receipt | GroupReceipt:
        """The receipt; raises the delivery error, or ``TimeoutError`` if not known in time."""
        check_timeout(timeout, "timeout")
        return self._future.result(timeout)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        check_timeout(timeout, "timeout")
        return self._future.exception(timeout)

    def add_done_callback(self, fn: Callable[[SendHandle], None]) -> None:
        """Call ``fn(handle)`` once the outcome is known (at once if it already is).

        Callbacks run on the node's I/O thread: keep them short and non-blocking.
        """
        self._future.add_done_callback(lambda _f: fn(self))

    def __repr__(self) -> str:
        state = "done" if self.done() else "pending"
        return f"<SendHandle #{self.ticket} to {errors.format_address(self.destination)} {state}>"


class Node:
    """A reliable-messaging node on one UDP socket, with a blocking API.

    ``bind`` is ``host:port`` (``127.0.0.1:0`` picks a free port). ``sock``
    may supply an already bound socket-like object instead, e.g. a
    :class:`netem.socket.FaultySocket`. ``on_event`` observes every protocol
    event on the I/O thread (peer restarts, unreachable peers, ...).
    ``security`` selects the mode (:func:`reliable.security.make_security`;
    default: integrity only); both ends must use the same mode and key.

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
            sock if sock is not None else open_socket(bind, error_queue=True)
        )
        if sock is not None:
            sock.setblocking(False)
        self._address = normalize(self._sock.getsockname())
        self._endpoint = Endpoint(config, rng=rng, security=security)
        self.config = self._endpoint.config
        self._endpoint.set_receive_buffer(receive_buffer(self._sock))
        self._on_event = on_event
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._handles: dict[int, SendHandle] = {}
        self._taken: dict[int, Message | errors.ReliableError] = {}
        self._stats_replies: dict[int, bytes | None] = {}  # pending queries: None until answered
        self._departures = Departures()
        self._closed = False
        self._failure: BaseException | None = None
        self._sleep_until: float | None = None
        self._io_busy = False  # the I/O thread is awake and will send before it sleeps
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._backlog: deque[tuple[bytes, Address]] = deque()
        self._resolved: list[
            tuple[SendHandle, Receipt | GroupReceipt | None, errors.DeliveryFailed | None]
        ] = []
        self._groups = GroupSockets(self._sock, self.config)
        self._unregistered: list[socket.socket] = []  # group sockets for the I/O thread
        self._abandoned: list[tuple[str, int]] = []  # ports whose owner handles are gone
        self._thread = threading.Thread(target=self._run, name="rmsg-node-io", daemon=True)
        self._thread.start()

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
        dest: str | tuple[Any, ...],
        data: bytes,
        *,
        msg_type: int = 0,
        priority: int = 0,
        mailbox: str | None = None,
        timeout: float | None = None,
        policy: str = "round-robin",
    ) -> Receipt | GroupReceipt:
        """Send ``data`` and block until it entered its mailbox; returns the receipt.

        ``dest`` is ``host:port`` (the default mailbox) or ``host:port/name``;
        or a group: ``multicast://239.1.2.3:7000/name`` or ``broadcast://:7000/name``,
        answered by a :class:`~reliable.message.GroupReceipt` listing which members
        have it once each answered or ``timeout`` (default ``Config.group_timeout``)
        passed; or ``anycast://service/name``, delivered to one live member chosen
        by ``policy`` (``round-robin`` or ``lowest-rtt``), failing over to another
        if that one fails (docs/groups.md).
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
        check_timeout(timeout, "timeout", positive=True)
        deadline = None if timeout is None else time.monotonic() + timeout
        handle = self._submit(dest, data, msg_type, priority, mailbox, timeout, deadline, policy)
        try:
            return handle.result()
        except BaseException:
            # Interrupted (KeyboardInterrupt in the waiting thread): withdraw what can be.
            handle.cancel()
            raise

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
    ) -> SendHandle:
        """Queue ``data`` for ``dest`` and return at once with a :class:`SendHandle`.

        Raises a :class:`~reliable.errors.WouldBlock` instead of waiting:
        :class:`~reliable.errors.SendBufferFull` when this node's send buffer
        is full, :class:`~reliable.errors.MailboxFull` when the destination
        mailbox is known to be full. Nothing was sent in either case.
        """
        check_timeout(timeout, "timeout", positive=True)
        return self._submit(
            dest, data, msg_type, priority, mailbox, timeout, None, policy, block=False
        )

    def _submit(
        self,
        dest: str | tuple[Any, ...],
        data: bytes,
        msg_type: int,
        priority: int,
        mailbox: str | None,
        timeout: float | None,
        deadline: float | None,
        policy: str,
        *,
        block: bool = True,
    ) -> SendHandle:
        data = checked_message(data, msg_type, priority)
        target: Target
        if isinstance(dest, str) and is_group_url(dest):
            target = group_destination(dest, mailbox)
            if isinstance(target, GroupAddress):
                target = self._open_group(target, join=False, discover=True)
            label: Any = str(target)
        else:
            node, name = split_destination(dest, mailbox)
            label = resolve_destination(node, self._sock.family)
            target = (label, name)
        with self._lock:
            while True:
                self._check_open()
                now = time.monotonic()
                remaining = None if deadline is None else deadline - now
                try:
                    ticket = enqueue(
                        self._endpoint,
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
                    if remaining is not None and remaining <= 0:
                        raise errors.SendTimeout(label, timeout or 0.0, stage="queued") from None
                    self._changed.wait(remaining)
            handle = SendHandle(ticket, label, self._withdraw)
            self._handles[ticket] = handle
            # To a busy peer, hand the send to the I/O thread: the sends made before it
            # runs share datagrams. To an idle one, send it from here, at once.
            defer = self._endpoint.in_flight(label)  # a group send's label names no peer
            if defer and not self._io_busy:
                self._io_busy = True
                self._wake()
        if not defer:
            self._pump([])
        return handle

    # ---------------------------------------------------------------- groups

    def join(self, group: str) -> None:
        """Become a member of ``group`` (``multicast://239.1.2.3:7000`` or
        ``broadcast://:7000``): its messages arrive in this node's mailboxes
        (the mailbox each names), and its senders' receipts count this node."""
        self._open_group(parse_group(group), join=True, discover=False)

    def leave(self, group: str) -> None:
        """Stop being a member of ``group``; its members and senders hear a LEAVE."""
        target = self._resolve_group(parse_group(group))
        with self._lock:
            self._endpoint.leave_group(target, time.monotonic())
        self._pump([])

    def members(self, group: str) -> dict[Address, int]:
        """Live members of ``group`` as heard here (address -> incarnation); opens it."""
        target = self._open_group(parse_group(group), join=False, discover=False)
        with self._lock:
            return self._endpoint.group_members(target)

    def wait_for_members(self, group: str, count: int, timeout: float) -> dict[Address, int]:
        """Block until ``group`` has at least ``count`` live members or ``timeout`` passes."""
        check_timeout(timeout, "timeout")
        target = self._open_group(parse_group(group), join=False, discover=False)
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                found = self._endpoint.group_members(target)
                remaining = deadline - time.monotonic()
                if len(found) >= count or remaining <= 0:
                    return found
                self._check_open()
                self._changed.wait(min(remaining, 0.05))

    def serve(self, service: str, *, announce: str | list[str]) -> None:
        """Serve anycast ``service``: announce it on each discovery group in ``announce``."""
        groups = [announce] if isinstance(announce, str) else list(announce)
        targets = [self._open_group(parse_group(g), join=False, discover=False) for g in groups]
        with self._lock:
            self._endpoint.serve(service, targets, time.monotonic())
        self._pump([])

    def unserve(self, service: str) -> None:
        with self._lock:
            self._endpoint.unserve(service)
        self._pump([])

    def discover(self, group: str) -> None:
        """Learn the anycast services announced on ``group``."""
        target = self._open_group(parse_group(group), join=False, discover=False)
        with self._lock:
            self._endpoint.discover(target, time.monotonic())
        self._pump([])

    def add_service_members(self, service: str, members: list[str | tuple[Any, ...]]) -> None:
        """Members of ``service`` known without announcements (``host:port`` each)."""
        addrs = [resolve_destination(m, self._sock.family) for m in members]
        with self._lock:
            self._endpoint.add_service_members(service, addrs)

    def service_members(self, service: str) -> list[Address]:
        with self._lock:
            return self._endpoint.service_members(service)

    def _resolve_group(self, group: GroupAddress) -> GroupAddress:
        with self._lock:
            return self._groups.resolve(group)

    def _open_group(self, group: GroupAddress, *, join: bool, discover: bool) -> GroupAddress:
        """Hear ``group`` (one socket per group) and open it in the core.

        With ``discover``, a group opened only now gets ``DISCOVERY_WAIT`` seconds
        for its members to answer the SOLICIT before the caller sends to it.
        """
        with self._lock:
            self._check_open()
            target = self._groups.resolve(group)
            fresh = not self._endpoint.is_open_group(target)
            sock = self._groups.open(target)
            if sock is not None:
                self._unregistered.append(sock)
            self._endpoint.open_group(target, time.monotonic(), join=join)
        self._wake()
        self._pump([])
        if discover and fresh:
            deadline = time.monotonic() + DISCOVERY_WAIT
            with self._lock:
                while (remaining := deadline - time.monotonic()) > 0:
                    self._changed.wait(remaining)
        return target

    # ------------------------------------------------------------- receiving

    def receive(
        self,
        timeout: float | None = None,
        *,
        mailbox: str = DEFAULT_MAILBOX,
        source: str | tuple[Any, ...] | None = None,
        msg_type: int = 0,
        except_type: bool = False,
        receiver: str | None = None,
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
        message = self._receive(
            mailbox, None, source, msg_type, except_type, receiver, timeout, wait=True
        )
        assert message is not None
        return message

    def receive_nowait(
        self,
        *,
        mailbox: str = DEFAULT_MAILBOX,
        source: str | tuple[Any, ...] | None = None,
        msg_type: int = 0,
        except_type: bool = False,
        receiver: str | None = None,
    ) -> Message | None:
        """The next message if one is waiting (selected as :meth:`receive` does), else ``None``."""
        return self._receive(
            mailbox, None, source, msg_type, except_type, receiver, None, wait=False
        )

    def _receive(
        self,
        mailbox: str,
        owner: int | None,
        source: str | tuple[Any, ...] | None,
        msg_type: int,
        except_type: bool,
        receiver: str | None,
        timeout: float | None,
        *,
        wait: bool,
        lock: float | None = None,
    ) -> Message | None:
        check_timeout(timeout, "timeout")
        peer = None if source is None else resolve_destination(source, self._sock.family)
        selector = Selector.of(peer, msg_type, except_type)
        label = receiver if receiver is not None else threading.current_thread().name
        deadline = None if timeout is None else time.monotonic() + timeout
        mark = self._departures.mark()
        with self._lock:
            self._check_open()
            now = time.monotonic()
            endpoint = self._endpoint
            message = endpoint.take(
                mailbox, selector, owner=owner, receiver=label, lock=lock, now=now
            )
            if message is not None:
                sync_stores(endpoint, now)  # durable: its deletion commits before we hand it out
            ticket = None
            if message is None and wait and timeout != 0:
                ticket = endpoint.wait_for_message(
                    mailbox, selector, owner=owner, receiver=label, lock=lock, now=now
                )
                if peer is not None:
                    # Probe the named peer while we wait, so a dead one cannot leave us blocked.
                    endpoint.watch(peer, now)
        self._pump([])  # a parked message may have got in: its sender hears of it now
        if lock is not None:
            self._wake()  # a lock's expiry is a new timer for the I/O thread
        if message is not None or not wait:
            return message
        if ticket is None:
            raise errors.ReceiveTimeout("no message waiting")
        try:
            return self._await_message(ticket, peer, mark, timeout, deadline)
        finally:
            if peer is not None:
                with self._lock:
                    self._endpoint.unwatch(peer, time.monotonic())

    def _await_message(
        self,
        ticket: int,
        peer: Address | None,
        mark: int,
        timeout: float | None,
        deadline: float | None,
    ) -> Message:
        with self._lock:
            while ticket not in self._taken:
                failure: errors.ReliableError | None = None
                if self._closed or self._endpoint.closing or self._failure is not None:
                    failure = errors.NodeClosed("the node closed while waiting to receive")
                elif peer is not None:
                    failure = self._departures.down_since(peer, mark)
                remaining = None if deadline is None else deadline - time.monotonic()
                if failure is None and remaining is not None and remaining <= 0:
                    failure = errors.ReceiveTimeout(f"no message within {timeout:g}s")
                if failure is not None:
                    if self._endpoint.cancel_wait(ticket) or self._closed:
                        raise failure
                    break  # answered meanwhile: its event is on the way; take it
                self._changed.wait(remaining)
        if ticket not in self._taken:
            self._pump([])
        with self._lock:
            outcome = self._taken.pop(ticket)
        if isinstance(outcome, errors.ReliableError):
            raise outcome
        return outcome

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
        with self._lock:
            self._check_open()
            store = open_store(durable, name, sync)
            try:
                owner = self._endpoint.create_mailbox(
                    name,
                    capacity=capacity,
                    max_bytes=max_bytes,
                    port=port,
                    store=store,
                    now=time.monotonic(),
                )
            except BaseException:
                if store is not None:
                    store.close()
                raise
        return Mailbox(self, name, owner)

    def mailbox(self, name: str) -> Mailbox:
        """A handle on existing mailbox ``name`` (a port's handle cannot receive)."""
        with self._lock:
            if not self._endpoint.has_mailbox(name):
                raise errors.UnknownMailbox(f"no mailbox {name!r} on this node")
        return Mailbox(self, name, None)

    def _manage(self, name: str, action: str, owner: int | None) -> None:
        with self._lock:
            self._check_open()
            manage_mailbox(self._endpoint, name, action, owner, time.monotonic())
        self._pump([])  # senders of parked messages, and waiting receivers, learn now

    def _core(self, call: Callable[[Endpoint, float], Any]) -> Any:
        """Run ``call(endpoint, now)`` (a mailbox handle's peek, ack, ...), commit, pump."""
        with self._lock:
            self._check_open()
            now = time.monotonic()
            result = call(self._endpoint, now)
            sync_stores(self._endpoint, now)
        self._pump([])
        return result

    def _port_abandoned(self, name: str, owner: int) -> None:
        """A port's owner handle was garbage collected: the I/O thread deletes the port.

        Called by the garbage collector, possibly on a thread that holds the
        node's lock, so it only records the port (``list.append`` is atomic)
        and wakes the I/O thread.
        """
        if not self._closed:
            self._abandoned.append((name, owner))
            self._wake()

    # ----------------------------------------------------------- management

    def stats(self) -> NodeStats:
        """This node's statistics: per peer, per mailbox and node-wide."""
        with self._lock:
            return self._endpoint.stats(time.monotonic())

    def query_stats(self, dest: str | tuple[Any, ...], timeout: float = 5.0) -> NodeStats:
        """Ask the node at ``dest`` for its statistics over the network."""
        check_timeout(timeout, "timeout", positive=True)
        addr = resolve_destination(dest, self._sock.family)
        deadline = time.monotonic() + timeout
        with self._lock:
            self._check_open()
            request = self._endpoint.query_stats(addr, time.monotonic())
            self._stats_replies[request] = None
        self._pump([])
        with self._lock:
            try:
                while (body := self._stats_replies[request]) is None:
                    self._check_open()
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise errors.ReceiveTimeout(
                            f"{errors.format_address(addr)} sent no stats within {timeout:g}s "
                            "(is an rmsg node running there, with Config.serve_stats?)"
                        )
                    self._changed.wait(remaining)
            finally:
                del self._stats_replies[request]  # a late reply is then ignored
        return parse_stats(body)

    def close(self, timeout: float = 2.0) -> None:
        """Flush outstanding sends for up to ``timeout`` seconds, tell peers, release the socket."""
        check_timeout(timeout, "timeout")
        with self._lock:
            if not self._closed and not self._endpoint.closing:
                self._endpoint.close(time.monotonic(), timeout)
            self._changed.notify_all()
        self._wake()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout + _CLOSE_GRACE)
        with self._lock:
            closed_here = not self._closed and not self._endpoint.closed
            if closed_here:
                # The I/O thread did not get to it in time: end the flush now, so the
                # peers hear CLOSE before the socket goes (the pump below sends it).
                self._endpoint.close(time.monotonic(), 0)
        if closed_here or self._thread.is_alive():
            self._pump([], force=True)
        with self._lock:
            self._closed = True
            self._changed.notify_all()
            self._sock.close()  # under the lock: no final datagram is on its way (see _pump)
            close_stores(self._endpoint, time.monotonic())
            self._groups.close()
        self._wake()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(0.1)
        if not self._thread.is_alive():
            self._wake_r.close()
            self._wake_w.close()

    def __enter__(self) -> Node:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ------------------------------------------------------------ I/O thread

    def _run(self) -> None:
        selector = selectors.DefaultSelector()
        selector.register(self._sock.fileno(), selectors.EVENT_READ, "sock")
        selector.register(self._wake_r, selectors.EVENT_READ, "wake")
        writing = False
        try:
            while True:
                with self._lock:
                    if self._abandoned:
                        delete_abandoned_ports(self._endpoint, self._abandoned, time.monotonic())
                    closed = self._endpoint.closed
                    timer = self._endpoint.get_timer()
                    self._sleep_until = timer
                    for group_sock in self._unregistered:
                        selector.register(group_sock, selectors.EVENT_READ, group_sock)
                    self._unregistered.clear()
                    # Calls made while we were busy left their output to us (see _pump).
                    self._io_busy = self._endpoint.has_output()
                if self._io_busy and not closed:
                    self._pump([])
                    continue
                if closed:
                    self._pump([])  # the final CLOSE packets and the last events
                    return
                if self._backlog and not writing:
                    both = selectors.EVENT_READ | selectors.EVENT_WRITE
                    selector.modify(self._sock.fileno(), both, "sock")
                    writing = True
                elif not self._backlog and writing:
                    selector.modify(self._sock.fileno(), selectors.EVENT_READ, "sock")
                    writing = False
                wait = None if timer is None else max(0.0, timer - time.monotonic())
                ready = selector.select(wait)
                self._io_busy = True
                batch = []
                for key, _ in ready:
                    if key.data == "wake":
                        try:
                            while self._wake_r.recv(4096):
                                pass
                        except (BlockingIOError, InterruptedError):
                            pass
                    elif isinstance(key.data, socket.socket):
                        batch.extend(drain_socket(key.data))
                reports: list[Unreachable] = []
                batch.extend(drain_socket(self._sock, reports=reports))
                self._take_reports(reports)
                self._pump(batch)
                if self._backlog:
                    self._flush_backlog()
        except BaseException as exc:  # pragma: no cover - a bug; never leave waiters hanging
            self._failure = exc
            raise
        finally:
            selector.close()
            with self._lock:
                closing = self._closed  # close() released the socket while we were held up
                self._closed = True
                self._fail_handles(errors.NodeClosed("the node's I/O thread stopped"))
                self._changed.notify_all()
            if closing:
                self._wake_r.close()  # close() left these to us: we were still running
                self._wake_w.close()

    def _pump(
        self,
        batch: list[tuple[bytes, Address]],
        *,
        force: bool = False,
        call: Callable[[float], object] | None = None,
    ) -> None:
        """Feed ``batch`` and due timers to the core, then send and report what it produced.

        Called by the I/O thread and, with an empty batch, after every
        application call, so what a call caused (datagrams, events) goes out at
        once. ``force``: pump even though the I/O thread is awake. ``call(now)``
        runs on the core first, under the same lock, so the events it causes
        are routed (and their futures resolved) before this returns.
        """
        on_io_thread = threading.current_thread() is self._thread
        with self._lock:
            endpoint = self._endpoint
            if self._closed:
                return  # the socket is gone
            if not (on_io_thread or force) and (self._io_busy or not endpoint.has_output()):
                # Nothing to send, or the I/O thread is awake and will send it before it
                # sleeps again: calls made meanwhile leave in one go, packed into datagrams.
                return
            resolved = self._resolved = []
            now = time.monotonic()
            if call is not None:
                call(now)
            for data, addr in batch:
                endpoint.receive_datagram(data, addr, now)
            if on_io_thread:  # timers are the I/O thread's; a call only wakes it (below)
                timer = endpoint.get_timer()
                if timer is not None and timer <= now:
                    endpoint.handle_timer(now)
            sync_stores(endpoint, now)  # durable mailboxes: one grouped commit per turn
            out = endpoint.datagrams_to_send(now)
            if endpoint.closed:
                # The last datagrams (CLOSE): out before the lock goes, so close() cannot
                # release the socket while they are still on their way.
                self._send_final(out)
                out = []
            route_events(endpoint, self, self._on_event)
            self._changed.notify_all()
            wake = not on_io_thread and self._timer_moved_earlier()
        self._transmit(out)
        if wake:
            self._wake()
        for handle, receipt, error in resolved:
            if error is not None:
                handle._future.set_exception(error)
            else:
                handle._future.set_result(receipt)  # type: ignore[arg-type]

    # EventSink, called under the lock from route_events
    def on_outcome(
        self,
        ticket: int,
        receipt: Receipt | GroupReceipt | None,
        error: errors.DeliveryFailed | None,
    ) -> None:
        handle = self._handles.pop(ticket, None)
        if handle is not None:
            self._resolved.append((handle, receipt, error))

    def on_receive(
        self, waiter: int, message: Message | None, error: errors.ReliableError | None
    ) -> None:
        outcome = message if message is not None else error
        assert outcome is not None
        self._taken[waiter] = outcome

    def on_stats(self, peer: Any, request: int, body: bytes) -> None:
        if request in self._stats_replies:
            self._stats_replies[request] = body

    def on_peer_down(self, peer: Any, error: errors.DeliveryFailed) -> None:
        self._departures.peer_down(peer, error)

    def on_closed(self) -> None:
        self._changed.notify_all()

    def _fail_handles(self, error: errors.ReliableError) -> None:
        handles = list(self._handles.values())
        self._handles.clear()
        for handle in handles:
            if not handle._future.done():
                handle._future.set_exception(error)

    # --------------------------------------------------------------- helpers

    def _transmit(self, out: list[tuple[bytes, Address]]) -> None:
        if self._backlog:
            self._backlog.extend(out)
            return
        sock = self._sock
        reports: list[Unreachable] = []
        for i, (data, addr) in enumerate(out):
            try:
                send_datagram(sock, data, addr, reports)
            except (BlockingIOError, InterruptedError):
                self._backlog.extend(out[i:])
                self._wake()
                break
        self._take_reports(reports)

    def _flush_backlog(self, *, reporting: bool = True) -> None:
        """Send what waited for room in the socket. Without ``reporting`` (the core is
        closed and the caller holds the lock), the OS's reports on peers are dropped."""
        backlog = self._backlog
        reports: list[Unreachable] = []
        while backlog:
            data, addr = backlog[0]
            try:
                send_datagram(self._sock, data, addr, reports)
            except (BlockingIOError, InterruptedError):
                break
            backlog.popleft()
        if reporting:
            self._take_reports(reports)

    def _take_reports(self, reports: list[Unreachable]) -> None:
        """Hand the OS's word on unreachable peers to the core.

        What it causes (failed sends, events) goes out with the I/O thread's
        next pump: at once, since the core then has output.
        """
        if not reports:
            return
        with self._lock:
            if self._endpoint.closed:
                return
            report_unreachable(self._endpoint, reports, time.monotonic())
        if threading.current_thread() is not self._thread:
            self._wake()

    def _send_final(self, out: list[tuple[bytes, Address]]) -> None:
        """Send the closed core's last datagrams, after any backlog, waiting (up to
        ``_CLOSE_GRACE`` seconds) for the socket to take them if it is full."""
        backlog = self._backlog
        backlog.extend(out)
        give_up = time.monotonic() + _CLOSE_GRACE
        while True:
            before = len(backlog)
            # Under the node lock, with the core closed: the OS's word on a peer changes
            # nothing now, and reporting it would take the lock again (a deadlock).
            self._flush_backlog(reporting=False)
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

    def _withdraw(self, ticket: int) -> Withdrawal:
        """:meth:`SendHandle.cancel`: withdraw in the core; its outcome is routed at once."""
        answers: list[Withdrawal] = []
        self._pump(
            [], force=True, call=lambda now: answers.append(self._endpoint.withdraw(ticket, now))
        )
        return answers[0] if answers else Withdrawal.UNKNOWN  # none: the node is closed

    def _timer_moved_earlier(self) -> bool:
        timer = self._endpoint.get_timer()
        return timer is not None and (self._sleep_until is None or timer < self._sleep_until)

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except OSError:
            pass  # already full (a wake-up is pending) or closed

    def _check_open(self) -> None:
        if self._failure is not None:
            raise errors.NodeClosed(f"the node's I/O thread failed: {self._failure!r}")
        if self._closed or self._endpoint.closing:
            raise errors.NodeClosed("the node is closed")


class Mailbox(MailboxHandle):
    """A handle on one mailbox of a :class:`Node`.

    The handle :meth:`Node.create_mailbox` returns is the owner's: for a
    port it is the only one that may receive. Senders on other nodes address
    the mailbox as ``host:port/name``.
    """

    def __init__(self, node: Node, name: str, owner: int | None) -> None:
        super().__init__(node, name, owner)
        self._node = node

    def receive(
        self,
        timeout: float | None = None,
        *,
        source: str | tuple[Any, ...] | None = None,
        msg_type: int = 0,
        except_type: bool = False,
        receiver: str | None = None,
        lock: float | None = None,
    ) -> Message:
        """As :meth:`Node.receive`, from this mailbox.

        ``lock`` (seconds): take the message under a lock instead of removing
        it; :meth:`ack` removes it, :meth:`release` gives it back, and if
        neither comes in time it is receivable again (a visibility timeout).
        """
        message = self._node._receive(
            self.name,
            self._owner,
            source,
            msg_type,
            except_type,
            receiver,
            timeout,
            wait=True,
            lock=lock,
        )
        assert message is not None
        return message

    def receive_nowait(
        self,
        *,
        source: str | tuple[Any, ...] | None = None,
        msg_type: int = 0,
        except_type: bool = False,
        receiver: str | None = None,
    ) -> Message | None:
        """As :meth:`Node.receive_nowait`, from this mailbox."""
        return self._node._receive(
            self.name, self._owner, source, msg_type, except_type, receiver, None, wait=False
        )
