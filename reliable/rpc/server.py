"""Serving calls: :class:`Server` (a :class:`reliable.Node` and worker threads) and
:class:`AsyncServer` (a :class:`reliable.AsyncNode` and tasks).

Both are thin adapters around :class:`~reliable.rpc.protocol.ServerCore`: they
take requests from the service's port (``rpc`` or ``rpc.<service>``) in
arrival order, feed the core, run the calls it admits, and send the replies
it produces. Handlers are plain functions or an object's public methods;
arguments are bound to the handler's signature before it is entered (a
mismatch is INVALID_ARGUMENT, not executed). Inside a handler,
:func:`current_call` gives the call's deadline, time left and cancellation.

Theory of operation (blocking)
------------------------------
No dispatcher hands requests to a pool: a worker that reads a request runs it
itself and sends its reply, so a call costs no thread hand-off. One worker at
a time *reads* (waits on the port, up to the core's next timer, then takes
every request waiting, as many as may queue, feeds them to the core, runs its
due timers and routes cancellations); the others sleep on a condition. Under
load one read serves several calls, and their replies, sent one after another
to the same client, share datagrams. A reader that gets a call to run leaves the reading role to an
idle worker (started on demand, at most ``max_concurrency + 1`` threads): the
*standby* worker takes it if the handler is still running ``HANDOVER``
seconds later (see ``Server._sleep``), so a short call wakes no other thread,
and requests, cancellations and back-pressure answers are held up behind a
long handler for about ``HANDOVER`` at most. The core admits at most
``max_concurrency`` running calls, so one thread is always free to read.

A handler's deadline needs no timer: :class:`CallContext` compares it with
the clock whenever asked.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .. import errors
from ..message import Message
from ..node import Node
from ._adapter import PORT_GONE as _PORT_GONE
from ._adapter import LoopTimer
from .codec import get_codec
from .protocol import CallId, ServerCore, StartCall, error_body, service_mailbox
from .status import MarshalError, RpcError, Status

if TYPE_CHECKING:
    from ..aio import AsyncNode

__all__ = ["AsyncServer", "CallContext", "Server", "current_call"]

#: Seconds a blocking server's standby worker sleeps before it looks whether the
#: reader went off to run a call (and reads in its place): see Server._sleep.
HANDOVER = 0.005
#: Seconds after a call started during which a standby worker keeps looking; after
#: that it sleeps until notified (an idle server does not wake).
ACTIVE = 0.05

_signal_lock = threading.Lock()  # creates a CallContext's event the first time it is needed


@dataclass(slots=True, eq=False)
class CallContext:
    """What a handler may ask about the call it serves (:func:`current_call`)."""

    call_id: CallId
    peer: Any  #: the client node's address
    method: str
    deadline: float | None  #: on ``time.monotonic()``'s clock, or None
    _signalled: bool = False
    _event: threading.Event | None = field(default=None, repr=False)

    def time_remaining(self) -> float | None:
        """Seconds until the caller's deadline (negative once passed), or None if it set none."""
        return None if self.deadline is None else self.deadline - time.monotonic()

    @property
    def cancelled(self) -> bool:
        """The client cancelled the call, or its deadline passed: stop when you can."""
        return self._signalled or (self.deadline is not None and time.monotonic() >= self.deadline)

    def wait_cancelled(self, timeout: float | None = None) -> bool:
        """Block until the call is cancelled or its deadline passes (True), or
        ``timeout`` seconds pass (False)."""
        if self.deadline is not None:
            left = max(0.0, self.deadline - time.monotonic())
            timeout = left if timeout is None else min(timeout, left)
        with _signal_lock:
            if self._event is None:
                self._event = threading.Event()
                if self._signalled:
                    self._event.set()
            event = self._event
        event.wait(timeout)
        return self.cancelled

    def _signal(self) -> None:
        with _signal_lock:
            self._signalled = True
            if self._event is not None:
                self._event.set()


_current: contextvars.ContextVar[CallContext] = contextvars.ContextVar("rmsg_rpc_call")


def current_call() -> CallContext:
    """The call the running handler serves; ``UsageError`` outside a handler."""
    try:
        return _current.get()
    except LookupError:
        raise errors.UsageError("current_call() is only meaningful inside an RPC handler") from None


def _methods_of(handler: object) -> dict[str, Callable[..., Any]]:
    return {
        name: member
        for name, member in inspect.getmembers(handler, callable)
        if not name.startswith("_") and not inspect.isclass(member)
    }


def _positional_range(signature: inspect.Signature) -> tuple[int, int] | None:
    """How many positional arguments bind without keywords, as (fewest, most); None
    when binding needs a closer look (a required keyword-only parameter)."""
    fewest = most = 0
    for p in signature.parameters.values():
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            most += 1
            if p.default is p.empty:
                fewest += 1
        elif p.kind is p.VAR_POSITIONAL:
            most = 1 << 30
        elif p.kind is p.KEYWORD_ONLY and p.default is p.empty:
            return None
    return fewest, most


class _Registry:
    def __init__(self) -> None:
        self.methods: dict[str, tuple[Callable[..., Any], inspect.Signature | None]] = {}
        self._positional: dict[str, tuple[int, int] | None] = {}

    def register(self, fn: Callable[..., Any], name: str | None = None) -> None:
        name = name if name is not None else fn.__name__
        if not name or len(name.encode()) > 255:
            raise errors.UsageError(f"method name {name!r} must be 1 to 255 bytes")
        try:
            signature: inspect.Signature | None = inspect.signature(fn)
        except (TypeError, ValueError):
            signature = None  # a builtin without one: arguments are passed as they come
        self.methods[name] = (fn, signature)
        self._positional[name] = None if signature is None else _positional_range(signature)

    def register_object(self, handler: object) -> None:
        for name, member in _methods_of(handler).items():
            self.register(member, name)

    def prepare(self, start: StartCall) -> tuple[Callable[..., Any], list[Any], dict[str, Any]]:
        """Decode and bind the arguments; raises RpcError(INVALID_ARGUMENT) if they do not fit."""
        fn, signature = self.methods[start.method]
        try:
            codec = get_codec(start.codec)
        except errors.UsageError as exc:
            raise RpcError(Status.INVALID_ARGUMENT, str(exc)) from None
        try:
            value = codec.decode(start.payload)
        except ValueError as exc:
            raise RpcError(Status.INVALID_ARGUMENT, f"undecodable arguments: {exc}") from None
        if (
            not isinstance(value, list)
            or len(value) != 2
            or not isinstance(value[0], list)
            or not isinstance(value[1], dict)
        ):
            raise RpcError(Status.INVALID_ARGUMENT, "arguments are not [args, kwargs]")
        args, kwargs = value
        fits = self._positional.get(start.method)
        if fits is not None and not kwargs and fits[0] <= len(args) <= fits[1]:
            pass  # positional arguments only, as many as it takes: they bind
        elif signature is not None:
            try:
                signature.bind(*args, **kwargs)
            except TypeError as exc:
                raise RpcError(Status.INVALID_ARGUMENT, f"{start.method}(): {exc}") from None
        return fn, args, kwargs


def _outcome(start: StartCall, result: Any) -> tuple[Status, bytes]:
    try:
        return Status.OK, get_codec(start.codec).encode(result)
    except MarshalError as exc:
        return Status.INTERNAL, error_body("MarshalError", f"the result cannot be sent: {exc}")


def _failure(exc: BaseException) -> tuple[Status, bytes]:
    if isinstance(exc, RpcError):
        return exc.status, error_body(type(exc).__name__, exc.details)
    if isinstance(exc, asyncio.CancelledError):
        return Status.CANCELLED, error_body("CancelledError", "the handler was cancelled")
    return Status.INTERNAL, error_body(type(exc).__qualname__, str(exc))


class _Base:
    def __init__(
        self,
        handler: object | None,
        service: str,
        max_concurrency: int,
        max_queued: int | None,
        cache_entries: int,
        cache_age: float,
        incarnation: int,
    ) -> None:
        self.service = service
        self._registry = _Registry()
        if handler is not None:
            self._registry.register_object(handler)
        self.core = ServerCore(
            self._registry.methods.__contains__,
            max_concurrency=max_concurrency,
            max_queued=2 * max_concurrency if max_queued is None else max_queued,
            cache_entries=cache_entries,
            cache_age=cache_age,
            incarnation=incarnation,
        )
        self.mailbox = service_mailbox(service)
        self._contexts: dict[CallId, CallContext] = {}

    def register(self, fn: Callable[..., Any], name: str | None = None) -> None:
        """Serve ``fn`` as method ``name`` (default: its ``__name__``)."""
        self._registry.register(fn, name)

    def register_object(self, handler: object) -> None:
        """Serve every public method of ``handler`` under its own name."""
        self._registry.register_object(handler)

    def _wait(self, now: float) -> float | None:
        """Seconds until the core's next timer (None: none is set)."""
        timer = self.core.get_timer()
        return None if timer is None else max(0.0, timer - now)


class Server(_Base):
    """Serve a handler's methods (or registered functions) on a blocking :class:`Node`.

    At most ``max_concurrency`` calls run at once, each in a worker thread;
    ``max_queued`` more (default twice that) wait for a worker; beyond that a
    call is answered RESOURCE_EXHAUSTED without running. ``cache_entries`` and
    ``cache_age`` (seconds) bound the reply cache that answers retried calls.
    Requests are taken from the port ``rpc`` (``service=""``) or ``rpc.<service>``.
    """

    def __init__(
        self,
        node: Node,
        handler: object | None = None,
        *,
        service: str = "",
        max_concurrency: int = 8,
        max_queued: int | None = None,
        cache_entries: int = 10_000,
        cache_age: float = 300.0,
    ) -> None:
        super().__init__(
            handler,
            service,
            max_concurrency,
            max_queued,
            cache_entries,
            cache_age,
            node.incarnation,
        )
        self.node = node
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)  # workers with nothing to do
        self._drained = threading.Condition(self._lock)  # close(): the running calls ended
        self._sleeping = 0  # workers asleep on _idle
        self._standby = False  # one of them wakes every HANDOVER seconds (_sleep)
        self._active_at = -ACTIVE  # when a call last started
        self._left_unread: float | None = None  # when the reader went off to run a call
        self._reading = False  # a worker waits on the port
        self._sent = 0  # replies handed to the node since the last read
        self._closed = False  # close() began: no call starts any more
        self._stopped = False  # the port is gone: workers leave
        self._port = node.create_mailbox(self.mailbox, port=True)
        self._threads: list[threading.Thread] = []
        with self._lock:
            self._spawn()

    def close(self) -> None:
        """Stop taking calls and wait for the running ones.

        Calls still queued for a worker are answered UNAVAILABLE, not executed
        (their clients may call again, here or elsewhere), and so are calls that
        arrive from now on; running handlers finish (they can watch
        ``current_call().cancelled``) and their replies go out. Then the port is
        deleted: later calls get NOT_FOUND, not executed.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            now = time.monotonic()
            self.core.close(now)
            self._send(now)
            while self.core.running and not self._stopped:
                self._drained.wait()
        try:
            self._port.delete()  # wakes the reader
        except errors.ReliableError:
            pass
        with self._lock:
            self._stopped = True
            self._idle.notify_all()
            threads = list(self._threads)
        for thread in threads:
            if thread is not threading.current_thread():
                thread.join(5.0)

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _spawn(self) -> None:
        """Lock held: start one more worker thread."""
        thread = threading.Thread(
            target=self._work,
            name=f"rpc-{self.service or 'server'}-{len(self._threads)}",
            daemon=True,
        )
        self._threads.append(thread)
        thread.start()

    def _work(self) -> None:
        """A worker: run the call the core starts next, else read (one reader at a
        time), else sleep until the reading role is free."""
        lock = self._lock
        core = self.core
        woke = False  # from _sleep: a reader that went off to run a call has HANDOVER
        with lock:
            while not self._stopped:
                now = time.monotonic()
                start = core.start_next(now)
                if start is not None:
                    self._run_call(start)
                    woke = False
                    continue
                left = self._left_unread
                if self._reading or (woke and left is not None and now < left + HANDOVER):
                    self._sleep(now)
                    woke = True
                    continue
                woke = False
                self._reading = True
                self._left_unread = None
                wait = self._wait(now)
                # Every request waiting is taken at once (as many as may queue, at least
                # one: a retry, a cancel or a refusal needs no room): under load one read
                # serves many calls, and their replies leave together.
                count = max(1, core.room())
                # The node holds a send to a busy peer back a moment (up to NAP) to
                # share a datagram with the next; a reader about to sleep has no next
                # send, and its clients wait for those replies. So after several
                # replies, a look at the port that does not wait first: it sends them.
                flush = self._sent >= 2
                self._sent = 0
                lock.release()
                msgs: list[Message] = []
                try:
                    if flush:
                        msgs = self._port.receive_many(count, timeout=0)
                    if not msgs:
                        msgs = self._port.receive_many(count, timeout=wait)
                except _PORT_GONE:
                    self._stopped = True
                finally:
                    lock.acquire()
                    self._reading = False
                now = time.monotonic()
                for msg in msgs:
                    core.receive(msg.data, msg.source, now)
                self._step(now)
                if self._stopped:
                    self._idle.notify_all()
                    self._drained.notify_all()

    def _sleep(self, now: float) -> None:
        """Lock held, someone reads: sleep until the reading role may be free.

        While calls come (within ``ACTIVE`` seconds of the last start), one
        sleeping worker is the *standby*: it wakes every ``HANDOVER`` seconds and,
        if the reader went off to run a call ``HANDOVER`` seconds ago or more,
        reads in its place. So a reader that takes a call wakes nobody - a wake-up
        per call costs more than a short call (a context switch, and on a busy
        machine a wait for a CPU while the other thread holds the GIL) - and a long
        one holds up the port about ``HANDOVER``. The other workers, and the
        standby once calls stop, sleep until notified; a reader that takes a call
        with no standby looking wakes one at once.
        """
        self._sleeping += 1
        try:
            left = self._left_unread
            if not self._standby and (left is not None or now - self._active_at < ACTIVE):
                self._standby = True
                try:
                    self._idle.wait(HANDOVER if left is None else max(0.0, left + HANDOVER - now))
                finally:
                    self._standby = False
            else:
                self._idle.wait()
        finally:
            self._sleeping -= 1

    def _run_call(self, start: StartCall) -> None:
        """Lock held: run ``start`` on this thread (the lock released meanwhile)."""
        context = CallContext(start.call_id, start.peer, start.method, start.deadline)
        self._contexts[start.call_id] = context
        self._active_at = now = time.monotonic()
        if not self._reading:
            self._left_unread = now
            if not self._standby:
                # Someone must read while this handler runs, and no standby worker
                # looks within HANDOVER: wake an idle worker, or start one.
                if self._sleeping:
                    self._idle.notify()
                elif len(self._threads) <= self.core.max_concurrency:
                    self._spawn()
        self._lock.release()
        try:
            status, body, executed = _execute(self._registry, start, context)
        finally:
            self._lock.acquire()
        now = time.monotonic()
        self._contexts.pop(start.call_id, None)
        self.core.finish(
            start.call_id,
            status,
            body,
            now,
            executed=executed,
            codec=start.codec if status is Status.OK else "json",
        )
        self._step(now)
        if self._closed and not self.core.running:
            self._drained.notify_all()  # close() waits for the running calls

    def _step(self, now: float) -> None:
        """Lock held: run the core's due timers, signal cancellations, send replies."""
        core = self.core
        timer = core.get_timer()
        if timer is not None and timer <= now:
            core.handle_timer(now)
        while (cancel := core.next_event()) is not None:
            context = self._contexts.get(cancel.call_id)
            if context is not None:
                context._signal()
        self._send(now)

    def _send(self, now: float) -> None:
        for out in self.core.outgoing():
            try:
                # Its fate is not watched: a reply that does not get through stays
                # cached, and the client's retry fetches it.
                self.node.send_nowait(out.dest, out.data, mailbox=out.mailbox)
                self._sent += 1
            except (errors.WouldBlock, errors.NodeClosed):
                continue


def _execute(
    registry: _Registry, start: StartCall, context: CallContext
) -> tuple[Status, bytes, bool]:
    """Run a blocking handler: its status, reply body and whether it was entered."""
    executed = False
    try:
        fn, args, kwargs = registry.prepare(start)
        token = _current.set(context)
        executed = True
        try:
            result = fn(*args, **kwargs)
        finally:
            _current.reset(token)
        status, body = _outcome(start, result)
    except Exception as exc:
        status, body = _failure(exc)
    return status, body, executed


class AsyncServer(_Base):
    """Serve a handler on an :class:`reliable.AsyncNode`: each call runs as a task.

    Coroutine handlers are awaited; plain functions run in a thread
    (``asyncio.to_thread``). Cancelling the call cancels its task. Limits as
    :class:`Server`. Use ``async with AsyncServer(node, handler):`` or
    ``await server.start()`` ... ``await server.close()``.
    """

    def __init__(
        self,
        node: AsyncNode,
        handler: object | None = None,
        *,
        service: str = "",
        max_concurrency: int = 64,
        max_queued: int | None = None,
        cache_entries: int = 10_000,
        cache_age: float = 300.0,
    ) -> None:
        super().__init__(
            handler,
            service,
            max_concurrency,
            max_queued,
            cache_entries,
            cache_age,
            node.incarnation,
        )
        self.node = node
        self._tasks: dict[CallId, asyncio.Task[None]] = {}
        self._dispatcher: asyncio.Task[None] | None = None
        self._timer: LoopTimer | None = None
        self._closed = False

    async def start(self) -> AsyncServer:
        if self._dispatcher is None:
            loop = asyncio.get_running_loop()
            self._timer = LoopTimer(loop, lambda: self._step(loop.time()))
            self._port = self.node.create_mailbox(self.mailbox, port=True)
            self._dispatcher = asyncio.create_task(self._run(), name=f"rpc-server-{self.service}")
        return self

    async def __aenter__(self) -> AsyncServer:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Stop taking calls: queued ones (and new ones) are answered UNAVAILABLE, not
        executed; running ones finish and their replies go out; then the port goes."""
        if self._closed or self._dispatcher is None:
            return
        self._closed = True
        self.core.close(asyncio.get_running_loop().time())
        self._send()
        # The dispatcher goes on reading meanwhile: retries and cancellations are answered.
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)
        self._dispatcher.cancel()
        await asyncio.gather(self._dispatcher, return_exceptions=True)
        if self._timer is not None:
            self._timer.cancel()
        self._send()
        try:
            self._port.delete()
        except errors.ReliableError:
            pass

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        core = self.core
        while True:
            try:
                # The core's timers: self._timer. Every waiting request at once, as the
                # blocking server takes them.
                msgs = await self._port.receive_many(max(1, core.room()))
            except _PORT_GONE:
                return
            now = loop.time()
            for msg in msgs:
                core.receive(msg.data, msg.source, now)
            self._step(loop.time())

    def _step(self, now: float) -> None:
        core = self.core
        timer = core.get_timer()
        if timer is not None and timer <= now:
            core.handle_timer(now)
        while (cancel := core.next_event()) is not None:
            context = self._contexts.get(cancel.call_id)
            if context is not None:
                context._signal()
                task = self._tasks.get(cancel.call_id)
                if task is not None:
                    task.cancel()
        while (start := core.start_next(now)) is not None:
            context = CallContext(start.call_id, start.peer, start.method, start.deadline)
            self._contexts[start.call_id] = context
            self._tasks[start.call_id] = asyncio.create_task(
                self._execute(start, context), name=f"rpc-{start.method}"
            )
        self._send()
        if self._timer is not None:
            self._timer.arm(core.get_timer())

    def _send(self) -> None:
        for out in self.core.outgoing():
            try:
                handle = self.node.send_nowait(out.dest, out.data, mailbox=out.mailbox)
            except (errors.WouldBlock, errors.NodeClosed):
                continue
            handle.add_done_callback(lambda h: h.cancelled() or h.exception())

    async def _execute(self, start: StartCall, context: CallContext) -> None:
        executed = False
        try:
            fn, args, kwargs = self._registry.prepare(start)
            token = _current.set(context)
            executed = True
            try:
                if inspect.iscoroutinefunction(fn):
                    result = await fn(*args, **kwargs)
                else:
                    result = await asyncio.to_thread(fn, *args, **kwargs)
            finally:
                _current.reset(token)
            status, body = _outcome(start, result)
        except (Exception, asyncio.CancelledError) as exc:
            status, body = _failure(exc)
        loop = asyncio.get_running_loop()
        self._contexts.pop(start.call_id, None)
        self._tasks.pop(start.call_id, None)
        self.core.finish(
            start.call_id,
            status,
            body,
            loop.time(),
            executed=executed,
            codec=start.codec if status is Status.OK else "json",
        )
        self._step(loop.time())
