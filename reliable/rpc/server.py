"""Serving calls: :class:`Server` (a :class:`reliable.Node` and a worker pool) and
:class:`AsyncServer` (a :class:`reliable.AsyncNode` and tasks).

Both are thin adapters around :class:`~reliable.rpc.protocol.ServerCore`: one
dispatcher takes requests from the service's port (``rpc`` or
``rpc.<service>``) in arrival order, feeds the core, starts the calls it
admits, and sends the replies it produces. Handlers are plain functions or an
object's public methods; arguments are bound to the handler's signature
before it is entered (a mismatch is INVALID_ARGUMENT, not executed). Inside a
handler, :func:`current_call` gives the call's deadline, time left and
cancellation.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .. import errors
from ..node import Node, SendHandle
from .codec import get_codec
from .protocol import CallId, ServerCore, StartCall, error_body, service_mailbox
from .status import MarshalError, RpcError, Status

if TYPE_CHECKING:
    from ..aio import AsyncNode

__all__ = ["AsyncServer", "CallContext", "Server", "current_call"]

_POLL = 0.1  # seconds: the longest a dispatcher sleeps before looking at its timers


@dataclass(slots=True, eq=False)
class CallContext:
    """What a handler may ask about the call it serves (:func:`current_call`)."""

    call_id: CallId
    peer: Any  #: the client node's address
    method: str
    deadline: float | None  #: on ``time.monotonic()``'s clock, or None
    _cancelled: threading.Event = field(default_factory=threading.Event)

    def time_remaining(self) -> float | None:
        """Seconds until the caller's deadline (negative once passed), or None if it set none."""
        return None if self.deadline is None else self.deadline - time.monotonic()

    @property
    def cancelled(self) -> bool:
        """The client cancelled the call, or its deadline passed: stop when you can."""
        return self._cancelled.is_set()

    def wait_cancelled(self, timeout: float | None = None) -> bool:
        """Block until the call is cancelled (True) or ``timeout`` passes (False)."""
        return self._cancelled.wait(timeout)


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


class _Registry:
    def __init__(self) -> None:
        self.methods: dict[str, tuple[Callable[..., Any], inspect.Signature | None]] = {}

    def register(self, fn: Callable[..., Any], name: str | None = None) -> None:
        name = name if name is not None else fn.__name__
        if not name or len(name.encode()) > 255:
            raise errors.UsageError(f"method name {name!r} must be 1 to 255 bytes")
        try:
            signature: inspect.Signature | None = inspect.signature(fn)
        except (TypeError, ValueError):
            signature = None  # a builtin without one: arguments are passed as they come
        self.methods[name] = (fn, signature)

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
        if signature is not None:
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


def _ignore_fate(handle: SendHandle) -> None:
    handle.exception()  # a reply that did not get through stays cached for the retry


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

    def _wait(self, now: float) -> float:
        timer = self.core.get_timer()
        return _POLL if timer is None else max(0.0, min(_POLL, timer - now))


class Server(_Base):
    """Serve a handler's methods (or registered functions) on a blocking :class:`Node`.

    Calls run in a pool of ``max_concurrency`` threads; ``max_queued`` more
    (default twice that) wait for a thread; beyond that a call is answered
    RESOURCE_EXHAUSTED without running. ``cache_entries`` and ``cache_age``
    (seconds) bound the reply cache that answers retried calls. Requests are
    taken from the port ``rpc`` (``service=""``) or ``rpc.<service>``.
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
        self._port = node.create_mailbox(self.mailbox, port=True)
        self._pool = ThreadPoolExecutor(max_concurrency, thread_name_prefix=f"rpc-{service}")
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=f"rpc-server-{service}", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop taking calls (the port is deleted: new calls get NOT_FOUND, not executed)
        and wait for running handlers to finish and their replies to go out."""
        if self._closed:
            return
        self._closed = True
        self._thread.join(2 * _POLL + 1.0)
        self._pool.shutdown(wait=True)
        with self._lock:
            self._send(time.monotonic())
        try:
            self._port.delete()
        except errors.ReliableError:
            pass

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _run(self) -> None:
        while not self._closed:
            try:
                msg = self._port.receive(timeout=self._wait(time.monotonic()))
            except errors.ReceiveTimeout:
                msg = None
            except (errors.NodeClosed, errors.MailboxDeleted):
                self._closed = True
                return
            with self._lock:
                now = time.monotonic()
                if msg is not None:
                    self.core.receive(msg.data, msg.source, now)
                self._step(now)

    def _step(self, now: float) -> None:
        core = self.core
        timer = core.get_timer()
        if timer is not None and timer <= now:
            core.handle_timer(now)
        while (cancel := core.next_event()) is not None:
            context = self._contexts.get(cancel.call_id)
            if context is not None:
                context._cancelled.set()
        while (start := core.start_next(now)) is not None:
            context = CallContext(start.call_id, start.peer, start.method, start.deadline)
            self._contexts[start.call_id] = context
            self._pool.submit(self._execute, start, context)
        self._send(now)

    def _send(self, now: float) -> None:
        for out in self.core.outgoing():
            try:
                handle = self.node.send_nowait(out.dest, out.data, mailbox=out.mailbox)
            except (errors.WouldBlock, errors.NodeClosed):
                continue  # the reply stays cached: the client's retry fetches it
            handle.add_done_callback(_ignore_fate)

    def _execute(self, start: StartCall, context: CallContext) -> None:
        executed = False
        try:
            fn, args, kwargs = self._registry.prepare(start)
            token = _current.set(context)
            executed = True
            try:
                result = fn(*args, **kwargs)
            finally:
                _current.reset(token)
            status, body = _outcome(start, result)
        except Exception as exc:
            status, body = _failure(exc)
        with self._lock:
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
            if not self._closed:
                self._step(now)


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
        self._closed = False

    async def start(self) -> AsyncServer:
        if self._dispatcher is None:
            self._port = self.node.create_mailbox(self.mailbox, port=True)
            self._dispatcher = asyncio.create_task(self._run(), name=f"rpc-server-{self.service}")
        return self

    async def __aenter__(self) -> AsyncServer:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Stop taking calls, let running ones finish, send their replies."""
        if self._closed or self._dispatcher is None:
            return
        self._closed = True
        self._dispatcher.cancel()
        await asyncio.gather(self._dispatcher, *self._tasks.values(), return_exceptions=True)
        self._send()
        try:
            self._port.delete()
        except errors.ReliableError:
            pass

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._closed:
            try:
                msg = await self._port.receive(timeout=self._wait(loop.time()))
            except errors.ReceiveTimeout:
                msg = None
            except (errors.NodeClosed, errors.MailboxDeleted):
                return
            now = loop.time()
            if msg is not None:
                self.core.receive(msg.data, msg.source, now)
            self._step(now)

    def _step(self, now: float) -> None:
        core = self.core
        timer = core.get_timer()
        if timer is not None and timer <= now:
            core.handle_timer(now)
        while (cancel := core.next_event()) is not None:
            context = self._contexts.get(cancel.call_id)
            if context is not None:
                context._cancelled.set()
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
