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
"""

from __future__ import annotations

import random
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
    Inbox,
    drain_socket,
    open_socket,
    resolve_destination,
    route_events,
)
from .addressing import Address, normalize
from .config import Config
from .endpoint import Endpoint, check_timeout
from .message import Message, Receipt
from .stats import NodeStats

__all__ = ["Node", "SendHandle"]

_CLOSE_GRACE = 1.0  # seconds the I/O thread may take beyond the flush timeout to exit


class SendHandle:
    """The pending outcome of a :meth:`Node.send_nowait`.

    ``result()`` returns the :class:`~reliable.Receipt` once the destination
    acknowledged the message, or raises the
    :class:`~reliable.errors.DeliveryFailed` that explains why it will not.
    """

    __slots__ = ("_future", "destination", "ticket")

    def __init__(self, ticket: int, destination: Address) -> None:
        self.ticket = ticket
        self.destination = destination
        self._future: Future[Receipt] = Future()

    def done(self) -> bool:
        return self._future.done()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the outcome is known (or ``timeout``); returns :meth:`done`."""
        check_timeout(timeout, "timeout")
        try:
            self._future.exception(timeout)
        except TimeoutError:
            return False
        return True

    def result(self, timeout: float | None = None) -> Receipt:
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
    """

    def __init__(
        self,
        bind: str | tuple[str, int] = "127.0.0.1:0",
        *,
        config: Config | None = None,
        sock: DatagramSocket | None = None,
        rng: random.Random | None = None,
        on_event: Callable[[events.Event], None] | None = None,
    ) -> None:
        self._sock: DatagramSocket = sock if sock is not None else open_socket(bind)
        if sock is not None:
            sock.setblocking(False)
        self._endpoint = Endpoint(config, rng=rng)
        self.config = self._endpoint.config
        self._on_event = on_event
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._handles: dict[int, SendHandle] = {}
        self._inbox = Inbox(self._endpoint)
        self._closed = False
        self._failure: BaseException | None = None
        self._sleep_until: float | None = None
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._backlog: deque[tuple[bytes, Address]] = deque()
        self._resolved: list[tuple[SendHandle, Receipt | None, errors.DeliveryFailed | None]] = []
        self._thread = threading.Thread(target=self._run, name="rmsg-node-io", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------ properties

    @property
    def address(self) -> Address:
        """The bound socket address, e.g. ``('127.0.0.1', 40123)``."""
        return normalize(self._sock.getsockname())

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
        mailbox: str = "",
        timeout: float | None = None,
    ) -> Receipt:
        """Send ``data`` and block until ``dest`` acknowledged it; returns the receipt.

        With ``timeout`` (seconds) a message not acknowledged in time is
        abandoned and :class:`~reliable.errors.SendTimeout` raised; without it
        the call ends when the peer acknowledges or is declared unreachable.
        Waits for send-buffer space if the buffer is full.
        """
        check_timeout(timeout, "timeout", positive=True)
        deadline = None if timeout is None else time.monotonic() + timeout
        handle = self._submit(dest, data, msg_type, priority, mailbox, timeout, deadline)
        return handle.result()

    def send_nowait(
        self,
        dest: str | tuple[Any, ...],
        data: bytes,
        *,
        msg_type: int = 0,
        priority: int = 0,
        mailbox: str = "",
        timeout: float | None = None,
    ) -> SendHandle:
        """Queue ``data`` for ``dest`` and return at once with a :class:`SendHandle`.

        Raises :class:`~reliable.errors.SendBufferFull` instead of waiting for space.
        """
        check_timeout(timeout, "timeout", positive=True)
        return self._submit(dest, data, msg_type, priority, mailbox, timeout, None, block=False)

    def _submit(
        self,
        dest: str | tuple[Any, ...],
        data: bytes,
        msg_type: int,
        priority: int,
        mailbox: str,
        timeout: float | None,
        deadline: float | None,
        *,
        block: bool = True,
    ) -> SendHandle:
        addr = resolve_destination(dest, self._sock.family)
        with self._lock:
            while True:
                self._check_open()
                now = time.monotonic()
                remaining = None if deadline is None else deadline - now
                try:
                    ticket = self._endpoint.send(
                        addr,
                        data,
                        now=now,
                        msg_type=msg_type,
                        priority=priority,
                        mailbox=mailbox,
                        timeout=timeout,
                        deadline=deadline,
                    )
                    break
                except errors.SendBufferFull:
                    if not block:
                        raise
                    if remaining is not None and remaining <= 0:
                        raise errors.SendTimeout(addr, timeout or 0.0) from None
                    self._changed.wait(remaining)
            handle = SendHandle(ticket, addr)
            self._handles[ticket] = handle
            out = self._endpoint.datagrams_to_send(now)
            wake = self._timer_moved_earlier()
        self._transmit(out)
        if wake:
            self._wake()
        return handle

    # ------------------------------------------------------------- receiving

    def receive(
        self, timeout: float | None = None, *, source: str | tuple[Any, ...] | None = None
    ) -> Message:
        """The next message (from ``source`` only, if given), waiting up to ``timeout`` seconds.

        Raises :class:`~reliable.errors.ReceiveTimeout` when none came in time, and
        :class:`~reliable.errors.PeerUnreachable`/:class:`~reliable.errors.PeerClosed`
        if ``source`` was named and went away while we waited.
        """
        check_timeout(timeout, "timeout")
        peer = None if source is None else resolve_destination(source, self._sock.family)
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            message = self._inbox.take(peer)
            if message is None:
                message = self._wait_for(peer, timeout, deadline)
            out = self._endpoint.datagrams_to_send(time.monotonic())  # a window update may be due
        self._transmit(out)
        return message

    def _wait_for(
        self, peer: Address | None, timeout: float | None, deadline: float | None
    ) -> Message:
        """Wait (lock held, released while blocked) for a message from ``peer`` or anyone."""
        self._check_open()
        if timeout == 0:
            raise errors.ReceiveTimeout("no message waiting")
        mark = self._inbox.mark()
        if peer is not None:
            # Probe the named peer while we wait, so a dead one cannot leave us blocked.
            self._endpoint.watch(peer, time.monotonic())
            self._wake()
        try:
            while True:
                message = self._inbox.take(peer)
                if message is not None:
                    return message
                self._check_open()
                if peer is not None and (gone := self._inbox.down_since(peer, mark)):
                    raise gone
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise errors.ReceiveTimeout(f"no message within {timeout:g}s")
                self._changed.wait(remaining)
        finally:
            if peer is not None:
                self._endpoint.unwatch(peer, time.monotonic())

    def receive_nowait(self, *, source: str | tuple[Any, ...] | None = None) -> Message | None:
        """The next message if one is waiting, else ``None``; never blocks."""
        peer = None if source is None else resolve_destination(source, self._sock.family)
        with self._lock:
            message = self._inbox.take(peer)
            if message is None:
                self._check_open()
                return None
            out = self._endpoint.datagrams_to_send(time.monotonic())
        self._transmit(out)
        return message

    # ----------------------------------------------------------- management

    def stats(self) -> NodeStats:
        with self._lock:
            return self._endpoint.stats()

    def close(self, timeout: float = 2.0) -> None:
        """Flush outstanding sends for up to ``timeout`` seconds, tell peers, release the socket."""
        check_timeout(timeout, "timeout")
        with self._lock:
            if not self._closed and not self._endpoint.closing:
                self._endpoint.close(time.monotonic(), timeout)
        self._wake()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout + _CLOSE_GRACE)
        with self._lock:
            self._closed = True
            self._changed.notify_all()
        self._sock.close()
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
                    closed = self._endpoint.closed
                    timer = self._endpoint.get_timer()
                    self._sleep_until = timer
                if closed:
                    self._pump([])  # the final CLOSE packets and the last events
                    self._flush_backlog()
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
                for key, _ in ready:
                    if key.data == "wake":
                        try:
                            while self._wake_r.recv(4096):
                                pass
                        except (BlockingIOError, InterruptedError):
                            pass
                batch = drain_socket(self._sock)
                self._pump(batch)
                if self._backlog:
                    self._flush_backlog()
        except BaseException as exc:  # pragma: no cover - a bug; never leave waiters hanging
            self._failure = exc
            raise
        finally:
            selector.close()
            with self._lock:
                self._closed = True
                self._fail_handles(errors.NodeClosed("the node's I/O thread stopped"))
                self._changed.notify_all()

    def _pump(self, batch: list[tuple[bytes, Address]]) -> None:
        with self._lock:
            resolved = self._resolved = []
            now = time.monotonic()
            endpoint = self._endpoint
            for data, addr in batch:
                endpoint.receive_datagram(data, addr, now)
            timer = endpoint.get_timer()
            if timer is not None and timer <= now:
                endpoint.handle_timer(now)
            out = endpoint.datagrams_to_send(now)
            route_events(endpoint, self, self._on_event)
            self._changed.notify_all()
        self._transmit(out)
        for handle, receipt, error in resolved:
            if error is not None:
                handle._future.set_exception(error)
            else:
                handle._future.set_result(receipt)  # type: ignore[arg-type]

    # EventSink, called under the lock from route_events
    def on_message(self, message: Message) -> None:
        self._inbox.add(message)

    def on_outcome(
        self, ticket: int, receipt: Receipt | None, error: errors.DeliveryFailed | None
    ) -> None:
        handle = self._handles.pop(ticket, None)
        if handle is not None:
            self._resolved.append((handle, receipt, error))

    def on_peer_down(self, peer: Any, error: errors.DeliveryFailed) -> None:
        self._inbox.peer_down(peer, error)

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
        for i, (data, addr) in enumerate(out):
            try:
                sock.sendto(data, addr)
            except (BlockingIOError, InterruptedError):
                self._backlog.extend(out[i:])
                self._wake()
                return
            except OSError:
                continue  # unroutable right now; the protocol retransmits

    def _flush_backlog(self) -> None:
        backlog = self._backlog
        while backlog:
            data, addr = backlog[0]
            try:
                self._sock.sendto(data, addr)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                pass
            backlog.popleft()

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
