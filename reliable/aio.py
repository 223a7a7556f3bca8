"""The asyncio adapter: an :class:`Endpoint` driven by the running event loop.

It watches the socket with ``loop.add_reader`` and drains it until it would
block on every wake-up (asyncio's datagram transport reads one datagram per
loop iteration, which drops packets at high rates), keeps a single
``call_at`` handle armed at the core's next deadline, and uses ``loop.time()``
as the protocol clock. Requires a selector-based loop (the default on Unix,
and uvloop).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections import deque
from collections.abc import Callable
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

__all__ = ["AsyncNode"]


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
    ) -> None:
        self._bind = bind
        self._given_sock = sock
        self._endpoint = Endpoint(config, rng=rng)
        self.config = self._endpoint.config
        self._on_event = on_event
        self._sock: DatagramSocket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._handles: dict[int, asyncio.Future[Receipt]] = {}
        self._inbox = Inbox(self._endpoint)
        self._changed = asyncio.Event()
        self._backlog: deque[tuple[bytes, Address]] = deque()
        self._closed = False
        self._close_done: asyncio.Future[None] | None = None

    # ------------------------------------------------------------- lifecycle

    async def start(self) -> AsyncNode:
        """Open (or adopt) the socket and start serving on the running loop."""
        if self._loop is not None:
            return self
        self._loop = asyncio.get_running_loop()
        sock = self._given_sock if self._given_sock is not None else open_socket(self._bind)
        sock.setblocking(False)
        self._sock = sock
        self._close_done = self._loop.create_future()
        self._loop.add_reader(sock.fileno(), self._on_readable)
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
            await asyncio.wait_for(asyncio.shield(self._close_done), timeout + 1.0)
        except TimeoutError:  # pragma: no cover - the core always closes by its deadline
            pass
        self._shutdown()

    def _shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
        assert self._loop is not None and self._sock is not None
        self._loop.remove_reader(self._sock.fileno())
        self._loop.remove_writer(self._sock.fileno())
        self._sock.close()
        for future in self._handles.values():
            if not future.done():
                future.set_exception(errors.NodeClosed("the node closed"))
        self._handles.clear()
        self._changed.set()
        self._changed.clear()

    @property
    def address(self) -> Address:
        self._require_started()
        assert self._sock is not None
        return normalize(self._sock.getsockname())

    @property
    def incarnation(self) -> int:
        return self._endpoint.incarnation

    def stats(self) -> NodeStats:
        return self._endpoint.stats()

    # --------------------------------------------------------------- sending

    def send_nowait(
        self,
        dest: str | tuple[Any, ...],
        data: bytes,
        *,
        msg_type: int = 0,
        priority: int = 0,
        mailbox: str = "",
        timeout: float | None = None,
    ) -> asyncio.Future[Receipt]:
        """Queue ``data``; returns a future resolved with the receipt or the delivery error.

        Raises :class:`~reliable.errors.SendBufferFull` instead of waiting for space.
        """
        check_timeout(timeout, "timeout", positive=True)
        return self._submit(dest, data, msg_type, priority, mailbox, timeout, None)

    def _submit(
        self,
        dest: str | tuple[Any, ...],
        data: bytes,
        msg_type: int,
        priority: int,
        mailbox: str,
        timeout: float | None,
        deadline: float | None,
    ) -> asyncio.Future[Receipt]:
        loop = self._require_started()
        assert self._sock is not None
        addr = resolve_destination(dest, self._sock.family)
        ticket = self._endpoint.send(
            addr,
            data,
            now=loop.time(),
            msg_type=msg_type,
            priority=priority,
            mailbox=mailbox,
            timeout=timeout,
            deadline=deadline,
        )
        future: asyncio.Future[Receipt] = loop.create_future()
        self._handles[ticket] = future
        self._pump([])
        return future

    async def send(
        self,
        dest: str | tuple[Any, ...],
        data: bytes,
        *,
        msg_type: int = 0,
        priority: int = 0,
        mailbox: str = "",
        timeout: float | None = None,
    ) -> Receipt:
        """Send ``data`` and wait until ``dest`` acknowledged it; returns the receipt.

        Waits for send-buffer space if needed. With ``timeout`` an unacknowledged
        message is abandoned and :class:`~reliable.errors.SendTimeout` raised.
        """
        check_timeout(timeout, "timeout", positive=True)
        loop = self._require_started()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            remaining = None if deadline is None else deadline - loop.time()
            if remaining is not None and remaining <= 0:
                raise errors.SendTimeout(dest, timeout or 0.0)
            try:
                future = self._submit(dest, data, msg_type, priority, mailbox, timeout, deadline)
                break
            except errors.SendBufferFull:
                await self._wait_change(remaining)
        return await future

    # ------------------------------------------------------------- receiving

    def receive_nowait(self, *, source: str | tuple[Any, ...] | None = None) -> Message | None:
        """The next message if one is waiting, else ``None``."""
        self._require_started()
        assert self._sock is not None
        peer = None if source is None else resolve_destination(source, self._sock.family)
        message = self._take(peer)
        if message is None:
            self._check_open()
        return message

    async def receive(
        self, timeout: float | None = None, *, source: str | tuple[Any, ...] | None = None
    ) -> Message:
        """The next message (from ``source`` only, if given), waiting up to ``timeout`` seconds.

        Raises :class:`~reliable.errors.ReceiveTimeout`, or the peer's
        :class:`~reliable.errors.PeerUnreachable`/:class:`~reliable.errors.PeerClosed`
        if ``source`` was named and went away while we waited.
        """
        check_timeout(timeout, "timeout")
        loop = self._require_started()
        assert self._sock is not None
        peer = None if source is None else resolve_destination(source, self._sock.family)
        message = self._take(peer)
        if message is not None:
            return message
        self._check_open()
        if timeout == 0:
            raise errors.ReceiveTimeout("no message waiting")
        deadline = None if timeout is None else loop.time() + timeout
        mark = self._inbox.mark()
        if peer is not None:
            self._endpoint.watch(peer, loop.time())
            self._pump([])
        try:
            while True:
                message = self._take(peer)
                if message is not None:
                    return message
                self._check_open()
                if peer is not None and (gone := self._inbox.down_since(peer, mark)):
                    raise gone
                remaining = None if deadline is None else deadline - loop.time()
                if remaining is not None and remaining <= 0:
                    raise errors.ReceiveTimeout(f"no message within {timeout:g}s")
                await self._wait_change(remaining)
        finally:
            if peer is not None and not self._closed:
                self._endpoint.unwatch(peer, loop.time())

    def _take(self, peer: Address | None) -> Message | None:
        message = self._inbox.take(peer)
        if message is not None and not self._closed:
            self._pump([])  # a window update may be due
        return message

    # ------------------------------------------------------------------ I/O

    def _on_readable(self) -> None:
        assert self._sock is not None
        self._pump(drain_socket(self._sock))

    def _on_timer(self) -> None:
        self._timer = None
        self._pump([])

    def _pump(self, batch: list[tuple[bytes, Address]]) -> None:
        if self._closed:
            return
        assert self._loop is not None
        endpoint = self._endpoint
        now = self._loop.time()
        for data, addr in batch:
            endpoint.receive_datagram(data, addr, now)
        timer = endpoint.get_timer()
        if timer is not None and timer <= now:
            endpoint.handle_timer(now)
        self._transmit(endpoint.datagrams_to_send(now))
        route_events(endpoint, self, self._on_event)
        self._arm_timer()
        self._changed.set()
        self._changed.clear()

    def _arm_timer(self) -> None:
        assert self._loop is not None
        timer = self._endpoint.get_timer()
        if self._timer is not None:
            if timer is not None and self._timer.when() == timer:
                return
            self._timer.cancel()
            self._timer = None
        if timer is not None:
            self._timer = self._loop.call_at(timer, self._on_timer)

    def _transmit(self, out: list[tuple[bytes, Address]]) -> None:
        if self._backlog:
            self._backlog.extend(out)
            return
        assert self._sock is not None
        for i, (data, addr) in enumerate(out):
            try:
                self._sock.sendto(data, addr)
            except (BlockingIOError, InterruptedError):
                self._backlog.extend(out[i:])
                assert self._loop is not None
                self._loop.add_writer(self._sock.fileno(), self._on_writable)
                return
            except OSError:
                continue  # unroutable right now; the protocol retransmits

    def _on_writable(self) -> None:
        assert self._sock is not None and self._loop is not None
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
        self._loop.remove_writer(self._sock.fileno())

    async def _wait_change(self, timeout: float | None) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._changed.wait(), timeout)

    # EventSink
    def on_message(self, message: Message) -> None:
        self._inbox.add(message)

    def on_outcome(
        self, ticket: int, receipt: Receipt | None, error: errors.DeliveryFailed | None
    ) -> None:
        future = self._handles.pop(ticket, None)
        if future is None or future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(receipt)  # type: ignore[arg-type]

    def on_peer_down(self, peer: Any, error: errors.DeliveryFailed) -> None:
        self._inbox.peer_down(peer, error)

    def on_closed(self) -> None:
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
