"""Consuming callbacks (``mq_notify``-style): a callback that takes messages instead of
``receive``, for the blocking and the asyncio adapter.

Theory of operation
-------------------
``on_event`` only observes: a message it sees must still be received. A
*consumer* (``node.on_message(mailbox, callback)``) receives for you and
hands each message to ``callback``. It is an ordinary receiver, so the
mailbox's rules hold unchanged: **each message goes to exactly one taker**,
whether a ``receive`` call or a consumer takes it, waiting receivers
(consumers among them) are served in turn, and selection (``msg_type``,
``source``) works as for ``receive``. As POSIX ``mq_notify`` with
``SIGEV_THREAD``, the callback runs on a thread of its own (blocking
``Node``), or as a task on the loop (``AsyncNode``, where it may be a
coroutine function); never with the node's lock held, so it may call the
node (send, receive, post).

A consumer takes each message *under a lock* (a visibility timeout, see
``receive(lock=)``) and acknowledges it only when the callback returns.
What happens when the callback raises: the message is **released** — back
at the head of its priority, whole, for the next receiver — so it is not
lost (in a durable mailbox it never left the disk), and the consumer
**stops**, keeping the exception in :attr:`Consumer.error` (and logging it):
a message that makes the callback fail would otherwise come back to it
forever. If the process dies during the callback, the lock expires (or, for
a durable mailbox, the restart finds the row): at least once, never lost.
A callback that outlives its lock loses the message to the next receiver;
the late acknowledgement then removes nothing and is counted in
:attr:`Consumer.lost_locks`. Give ``lock`` a margin over the callback's
longest run.
"""

from __future__ import annotations

import inspect
import logging
import threading
from collections.abc import Awaitable, Callable
from typing import Any

from . import errors
from .message import Message

__all__ = ["AsyncConsumer", "Consumer"]

_log = logging.getLogger(__name__)

#: Seconds a blocking consumer waits per receive, so that a cancel is seen this soon.
POLL = 0.2
#: Default lock (visibility timeout) on a message while its callback runs, seconds.
DEFAULT_LOCK = 60.0


class _Stats:
    __slots__ = ("consumed", "error", "lost_locks")

    def __init__(self) -> None:
        self.consumed = 0  #: messages the callback returned from (and were acknowledged)
        self.lost_locks = 0  #: callbacks that outlived their lock (the message went on)
        self.error: BaseException | None = None  #: what stopped the consumer, if anything


class Consumer(_Stats):
    """A callback consuming a mailbox of a blocking :class:`~reliable.Node` on its own thread."""

    __slots__ = ("_callback", "_handle", "_lock", "_selection", "_stop", "_thread")

    def __init__(
        self,
        handle: Any,
        callback: Callable[[Message], object],
        selection: dict[str, Any],
        lock: float,
    ) -> None:
        super().__init__()
        self._handle = handle
        self._callback = callback
        self._selection = selection
        self._lock = lock
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name=f"rmsg-consumer-{handle.name or 'default'}", daemon=True
        )
        self._thread.start()

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def cancel(self, timeout: float = 5.0) -> bool:
        """Stop taking messages (one being handled finishes first); True once stopped."""
        self._stop.set()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)
        return not self._thread.is_alive() or threading.current_thread() is self._thread

    def _run(self) -> None:
        handle = self._handle
        while not self._stop.is_set():
            try:
                msg = handle.receive(POLL, lock=self._lock, **self._selection)
            except errors.ReceiveTimeout:
                continue
            except errors.ReliableError as exc:  # node closed, mailbox deleted
                self.error = exc
                return
            if self._stop.is_set():
                handle.release(msg)
                return
            try:
                self._callback(msg)
            except Exception as exc:
                self._failed(msg, exc)
                return
            self._done(msg)

    def _done(self, msg: Message) -> None:
        try:
            acked = self._handle.ack(msg)
        except errors.ReliableError as exc:
            self.error = exc
            self._stop.set()
            return
        self.consumed += 1
        if not acked:
            self.lost_locks += 1

    def _failed(self, msg: Message, exc: Exception) -> None:
        self.error = exc
        _log.error(
            "consumer of mailbox %r stopped: its callback raised %r; the message is back "
            "in the mailbox",
            self._handle.name,
            exc,
        )
        try:
            self._handle.release(msg)
        except errors.ReliableError:
            pass  # the node closed: a durable message is still on disk, others are gone


class AsyncConsumer(_Stats):
    """A callback (plain or coroutine function) consuming a mailbox of an
    :class:`~reliable.AsyncNode`, as a task on its loop."""

    __slots__ = ("_callback", "_handle", "_lock", "_selection", "_task")

    def __init__(
        self,
        handle: Any,
        callback: Callable[[Message], object | Awaitable[object]],
        selection: dict[str, Any],
        lock: float,
    ) -> None:
        import asyncio  # here: the blocking Node must not import asyncio

        super().__init__()
        self._handle = handle
        self._callback = callback
        self._selection = selection
        self._lock = lock
        self._task = asyncio.get_running_loop().create_task(
            self._run(), name=f"rmsg-consumer-{handle.name or 'default'}"
        )

    @property
    def running(self) -> bool:
        return not self._task.done()

    async def cancel(self) -> None:
        """Stop taking messages; a message whose callback was cut short is released."""
        import asyncio

        self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            pass

    async def _run(self) -> None:
        import asyncio

        handle = self._handle
        while True:
            try:
                msg = await handle.receive(None, lock=self._lock, **self._selection)
            except errors.ReliableError as exc:
                self.error = exc
                return
            try:
                result = self._callback(msg)
                if inspect.isawaitable(result):
                    await result
            except asyncio.CancelledError:
                handle.release(msg)
                raise
            except Exception as exc:
                self.error = exc
                _log.error(
                    "consumer of mailbox %r stopped: its callback raised %r; the message is "
                    "back in the mailbox",
                    handle.name,
                    exc,
                )
                handle.release(msg)
                return
            self.consumed += 1
            if not handle.ack(msg):
                self.lost_locks += 1
