"""Making calls: :class:`Client` (blocking, over a :class:`reliable.Node`) and
:class:`AsyncClient` (over a :class:`reliable.AsyncNode`), with stubs made by
introspection from a class or Protocol.

Both are thin adapters around :class:`~reliable.rpc.protocol.ClientCore`: a
call is marshalled (failing before anything is sent, naming the argument),
handed to the core, and its messages sent with ``send_nowait``; every send's
fate goes back to the core, and replies are taken from the client's reply
port. The core decides each call's one outcome; the adapter turns it into the
result or an :class:`~reliable.rpc.RpcError`.

Theory of operation (blocking)
------------------------------
The thread that waits for a result reads the reply port itself, so a reply
reaches its caller without a thread hand-off; it takes every reply waiting,
ending other callers' calls too (with many calls out, one read serves
several). One thread reads at a time;
the others sleep, each on a condition of its own, and are woken alone: when
their call ends (a reader that takes another call's reply finishes that call)
or, one of them, when the reading role is free. A reader waits up to the
core's next timer (a retry, a deadline), and, while one of the client's sends
still awaits its fate (looked up on its handle whenever the client steps: it
cannot interrupt a receive), at most ``FATE_WAIT`` seconds. A background
thread reads only while calls are pending that no thread waits for
(:meth:`Client.invoke` without :meth:`Call.result`), and then hands the role
to a caller within ``FATE_WAIT``.

Destinations: ``"host:port"`` (the default service, mailbox ``rpc``),
``"host:port/service"`` (mailbox ``rpc.<service>``), or
``"anycast://service"`` (one member from ``node.service_members(service)``,
taken in turn; another is tried only when the call provably did not run on
the previous one). A client resolves each destination name once and keeps
the address (a lookup per call would cost more than the call).
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import itertools
import socket
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar, cast

from .. import errors
from ..addressing import resolve_address
from ..message import Message
from ..node import Node, SendHandle
from ._adapter import PORT_GONE as _PORT_GONE
from ._adapter import LoopTimer
from .codec import Codec, get_codec, marshal_call
from .protocol import CallDone, ClientCore, service_mailbox
from .status import RemoteError, RpcError, Status

if TYPE_CHECKING:
    from ..aio import AsyncNode, AsyncSendHandle

__all__ = ["AsyncClient", "Call", "Client"]

T = TypeVar("T")
#: Seconds: the longest a reader waits on the reply port while a send's fate is pending.
FATE_WAIT = 0.02
#: Destination names a client remembers resolved (the table is emptied when full).
RESOLVED_MAX = 256
_reply_ports = itertools.count(1)
_DEFAULT = object()


def _outcome(done: CallDone, method: str) -> Any:
    """The result of a finished call, or raise its error."""
    if done.status is Status.OK:
        try:
            return get_codec(done.codec).decode(done.body)
        except (ValueError, errors.UsageError) as exc:
            raise RpcError(
                Status.INTERNAL,
                f"undecodable result: {exc}",
                executed=True,
                peer=done.peer,
                method=method,
            ) from None
    if done.executed is True and done.type_name:
        raise RemoteError(done.status, done.type_name, done.details, peer=done.peer, method=method)
    raise RpcError(done.status, done.details, executed=done.executed, peer=done.peer, method=method)


class _Target:
    __slots__ = ("anycast", "mailbox", "members", "service")

    def __init__(self, members: list[Any], service: str, anycast: bool) -> None:
        self.members = members
        self.service = service
        self.mailbox = service_mailbox(service)
        self.anycast = anycast


class _ClientBase:
    def __init__(
        self,
        address: Any,
        incarnation: int,
        codec: str | Codec,
        timeout: float | None,
        retry_interval: float,
    ) -> None:
        if timeout is not None and timeout <= 0:
            raise errors.UsageError(f"timeout must be more than 0 seconds, got {timeout}")
        self.codec = get_codec(codec)
        self.timeout = timeout
        self._family = socket.AF_INET6 if ":" in str(address[0]) else socket.AF_INET
        self.reply_mailbox = f"rpc.reply.{next(_reply_ports)}"
        self.core = ClientCore(incarnation, self.reply_mailbox, retry_interval=retry_interval)
        self._turn = 0
        self._sent = 0  # messages handed to the node since the blocking reader last read
        self._resolved: dict[str, _Target] = {}  # destination text -> where it goes

    def _target(self, node: Any, dest: str | tuple[Any, ...]) -> _Target:
        if isinstance(dest, str) and dest.startswith("anycast://"):
            service = dest[len("anycast://") :].strip("/")
            members = list(node.service_members(service))
            if not members:
                raise RpcError(
                    Status.UNAVAILABLE,
                    f"no member of service {service!r} is known (discover() or "
                    "add_service_members() first)",
                    executed=False,
                )
            self._turn += 1
            start = self._turn % len(members)
            return _Target(members[start:] + members[:start], service, True)
        if isinstance(dest, str):
            known = self._resolved.get(dest)
            if known is not None:
                return known  # never mutated: ClientCore.start copies the members
        key = dest
        service = ""
        if isinstance(dest, str) and "/" in dest:
            dest, service = dest.split("/", 1)
        text: str | tuple[str, int] = (dest[0], dest[1]) if isinstance(dest, tuple) else dest
        target = _Target([resolve_address(text, family=self._family)[1]], service, False)
        if isinstance(key, str):
            # A name is resolved once per client (a lookup per call would cost more
            # than the call), in a bounded table.
            if len(self._resolved) >= RESOLVED_MAX:
                self._resolved.clear()
            self._resolved[key] = target
        return target

    def _deadline(self, timeout: Any, now: float) -> float | None:
        timeout = self.timeout if timeout is _DEFAULT else timeout
        if timeout is None:
            return None
        if timeout <= 0:
            raise errors.UsageError(f"timeout must be more than 0 seconds, got {timeout}")
        return float(now + timeout)

    def _drive(
        self,
        node: Any,
        handles: dict[int, Any],
        now: float,
        withdraw: Callable[[Any], object],
        on_fate: Callable[[int, Any], None] | None,
    ) -> None:
        """What both adapters do after anything happened: run the core's due timer,
        withdraw the sends it gave up on (``withdraw(handle)``, each adapter's way) and
        send what it queued, calling ``on_fate(key, handle)`` once each send's fate is
        known (``None``: the adapter looks at ``handles`` itself)."""
        core = self.core
        timer = core.get_timer()
        if timer is not None and timer <= now:
            core.handle_timer(now)
        for key in core.withdrawals():
            pending = handles.get(key)
            if pending is not None:
                withdraw(pending)
        for out in core.outgoing():
            try:
                handle = node.send_nowait(
                    out.dest, out.data, mailbox=out.mailbox, timeout=out.timeout
                )
            except (errors.WouldBlock, errors.NodeClosed) as exc:
                core.send_failed(out.key, exc, now)
                continue
            handles[out.key] = handle
            self._sent += 1
            if on_fate is not None:
                handle.add_done_callback(functools.partial(on_fate, out.key))


def _unavailable(counter: int, why: str) -> CallDone:
    """The outcome of a call the client gave up on without an answer: it may have run."""
    return CallDone(
        counter=counter,
        status=Status.UNAVAILABLE,
        executed=None,
        codec="json",
        body=b"",
        peer=None,
        details=why,
    )


def _stub_methods(interface: Any) -> dict[str, inspect.Signature]:
    methods: dict[str, inspect.Signature] = {}
    for name, member in inspect.getmembers(interface, callable):
        if name.startswith("_") or inspect.isclass(member):
            continue
        signature = inspect.signature(member)
        params = list(signature.parameters.values())
        if params and params[0].name in ("self", "cls"):
            params = params[1:]
        methods[name] = signature.replace(parameters=params)
    if not methods:
        raise errors.UsageError(f"{interface.__name__} has no public methods to call")
    return methods


def _bind(
    signature: inspect.Signature, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[list[Any], dict[str, Any], list[str]]:
    try:
        bound = signature.bind(*args, **kwargs)
    except TypeError as exc:
        raise errors.UsageError(f"{method}(): {exc}") from None
    names = [
        p.name
        for p in signature.parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    return list(bound.args), dict(bound.kwargs), names


class Call:
    """A call in progress (:meth:`Client.invoke`): ``result()``, ``cancel()``, ``done()``."""

    __slots__ = ("_client", "_done", "counter", "method")

    def __init__(self, client: Client, counter: int, method: str) -> None:
        self._client = client
        self.counter = counter
        self.method = method
        self._done: CallDone | None = None

    @property
    def call_id(self) -> tuple[int, int]:
        return (self._client.core.incarnation, self.counter)

    def done(self) -> bool:
        return self._done is not None

    def result(self, timeout: float | None = None) -> Any:
        """The handler's return value, or raise the call's :class:`RpcError`.

        ``timeout`` only bounds this wait (``TimeoutError``); the call's own
        deadline was set when it was made.
        """
        return _outcome(self.outcome(timeout), self.method)

    def outcome(self, timeout: float | None = None) -> CallDone:
        """The raw outcome: status, executed, body."""
        done = self._done
        return done if done is not None else self._client._wait_for(self, timeout)

    def cancel(self) -> None:
        """Cancel the call: withdrawn if it has not wholly left, else the server is asked
        to stop it. :meth:`result` then raises CANCELLED, saying whether it ran; a
        result that arrived before the cancel is kept."""
        self._client._cancel(self.counter)


class Client(_ClientBase):
    """Make calls from a blocking :class:`Node`.

    ``codec``: ``"json"`` (default) or ``"msgpack"`` or a :class:`Codec`.
    ``timeout``: each call's default deadline in seconds (None: none).
    ``retry_interval``: how often a call already at the server is re-sent as a
    retry while it waits (which fetches a lost reply from the server's cache
    and notices a server that died or restarted). Thread-safe.
    """

    def __init__(
        self,
        node: Node,
        *,
        codec: str | Codec = "json",
        timeout: float | None = 30.0,
        retry_interval: float = 1.0,
    ) -> None:
        super().__init__(node.address, node.incarnation, codec, timeout, retry_interval)
        self.node = node
        self._lock = threading.RLock()
        self._idle = threading.Condition(self._lock)  # the background reader
        self._calls: dict[int, Call] = {}
        self._handles: dict[int, SendHandle] = {}
        self._reading = False  # a thread waits on the reply port
        self._waiting = 0  # threads waiting for a result
        # Of those, the ones asleep, by call: each is woken alone, when its call ends or
        # (one of them) when the reading role is free - not all on every reply.
        self._asleep: dict[int, list[threading.Condition]] = {}
        self._port = node.create_mailbox(self.reply_mailbox, port=True)
        self._closed = False
        self._reader = threading.Thread(target=self._run, name="rpc-client", daemon=True)
        self._reader.start()

    def call(self, dest: str | tuple[Any, ...], method: str, /, *args: Any, **kwargs: Any) -> Any:
        """Call ``method`` at ``dest`` with these arguments; block for its result.

        Raises :class:`MarshalError` before sending anything if an argument
        cannot be marshalled, :class:`RpcError` (:class:`RemoteError` if the
        handler raised) when the call does not return a result.
        """
        with self._lock:
            self._waiting += 1  # this thread will wait: the background reader stays out
        try:
            return self.invoke(dest, method, args, kwargs).result()
        finally:
            self._stop_waiting()

    def invoke(
        self,
        dest: str | tuple[Any, ...],
        method: str,
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
        *,
        timeout: float | object | None = _DEFAULT,
        names: Sequence[str] = (),
    ) -> Call:
        """Start a call and return its :class:`Call` at once. ``timeout`` overrides the
        client's default deadline; ``names`` names the positional arguments in errors."""
        if self._closed:
            raise errors.NodeClosed("the RPC client is closed")
        target = self._target(self.node, dest)
        payload = marshal_call(self.codec, method, args, kwargs or {}, names)
        with self._lock:
            now = time.monotonic()
            counter = self.core.start(
                target.members,
                target.mailbox,
                method,
                self.codec.name,
                payload,
                deadline=self._deadline(timeout, now),
                now=now,
                anycast=target.anycast,
            )
            call = Call(self, counter, method)
            self._calls[counter] = call
            self._step(now)
            if not self._waiting:
                self._idle.notify()  # nobody waits for it (yet): the background thread reads
        return call

    def stub(
        self, interface: Callable[..., T], dest: str | tuple[Any, ...], *, timeout: Any = _DEFAULT
    ) -> T:
        """An object with ``interface``'s public methods that call them at ``dest``.

        ``interface`` is a class or a ``typing.Protocol`` (typed ``Callable[..., T]``
        rather than ``type[T]``, which mypy refuses for a Protocol); the stub has its
        type, so a type checker checks the calls.

        Arguments are checked against each method's signature and marshalled
        before anything is sent (``UsageError``/``MarshalError``).
        """
        client = self

        def make(name: str, signature: inspect.Signature) -> Callable[..., Any]:
            def method(*args: Any, **kwargs: Any) -> Any:
                a, kw, names = _bind(signature, name, args, kwargs)
                return client.invoke(dest, name, a, kw, timeout=timeout, names=names).result()

            method.__name__ = name
            method.__signature__ = signature  # type: ignore[attr-defined]
            return method

        namespace = {
            name: staticmethod(make(name, sig)) for name, sig in _stub_methods(interface).items()
        }
        return cast(T, type(f"{interface.__name__}Stub", (), namespace)())

    def close(self) -> None:
        """Stop the reader and delete the reply port; calls still waiting fail UNAVAILABLE."""
        if self._closed:
            return
        with self._lock:
            self._closed = True
            self._idle.notify_all()
        try:
            self._port.delete()  # wakes a reader
        except errors.ReliableError:
            pass
        self._reader.join(5.0)
        self._abandon("the RPC client closed")

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # --------------------------------------------------------------- internals

    def _cancel(self, counter: int) -> None:
        with self._lock:
            now = time.monotonic()
            self.core.cancel(counter, now)
            self._step(now)

    def _wait_for(self, call: Call, timeout: float | None) -> CallDone:
        """Wait for ``call``'s outcome, reading the reply port when nobody else does."""
        deadline = None if timeout is None else time.monotonic() + timeout
        lock = self._lock
        with lock:
            self._waiting += 1
            try:
                while call._done is None:
                    now = time.monotonic()
                    if deadline is not None and now >= deadline:
                        raise TimeoutError(f"no outcome for call {call.counter} in {timeout} s")
                    if self._reading or self._closed:
                        wake = threading.Condition(lock)
                        sleepers = self._asleep.setdefault(call.counter, [])
                        sleepers.append(wake)
                        try:
                            wake.wait(None if deadline is None else deadline - now)
                        finally:
                            sleepers.remove(wake)
                            if not sleepers:
                                del self._asleep[call.counter]
                        continue
                    self._read(now, deadline)
                return call._done
            finally:
                self._stop_waiting()

    def _stop_waiting(self) -> None:
        with self._lock:
            self._waiting -= 1
            if not self._waiting and self._calls:
                self._idle.notify()  # calls nobody waits for: the background thread reads

    def _read(self, now: float, deadline: float | None) -> None:
        """Lock held once, the reading role free: take it, wait on the reply port up to the
        core's next timer (or ``deadline``, or ``FATE_WAIT`` while a fate is pending),
        feed what came, give the role back."""
        timer = self.core.get_timer()
        times = [t for t in (timer, deadline) if t is not None]
        if self._handles:
            times.append(now + FATE_WAIT)
        wait = max(0.0, min(times) - now) if times else None
        # Every reply waiting is taken at once (at most one per pending call, at least
        # one: a late reply still has to be read): with many calls out, one read ends
        # several of them.
        count = max(1, len(self._calls))
        # With other calls out, the node may hold a request back a moment (up to its
        # NAP) to share a datagram with the next; a reader about to sleep sends none,
        # and the server waits for it. So first a look that does not wait: it sends.
        flush = self._sent > 0 and count > 1
        self._sent = 0
        self._reading = True
        self._lock.release()
        msgs: list[Message] = []
        gone = False
        try:
            if flush:
                msgs = self._port.receive_many(count, timeout=0)
            if not msgs:
                msgs = self._port.receive_many(count, timeout=wait)
        except _PORT_GONE:
            gone = True
        finally:
            self._lock.acquire()
            self._reading = False
        if gone:
            why = "the RPC client closed" if self._closed else "its node or reply port is gone"
            self._closed = True
            self._abandon(why)
            return
        now = time.monotonic()
        for msg in msgs:
            self.core.receive(msg.data, msg.source, now)
        self._step(now)
        for counter, sleepers in self._asleep.items():
            if counter in self._calls:  # still pending: it takes the free reading role
                sleepers[0].notify()
                break

    def _run(self) -> None:
        """The background reader: reads only while calls are pending that no thread
        waits for, handing over to a caller within ``FATE_WAIT``."""
        with self._lock:
            while not self._closed:
                if self._waiting or self._reading or not self._calls:
                    self._idle.wait()
                    continue
                now = time.monotonic()
                self._read(now, now + FATE_WAIT)

    def _fates(self, now: float) -> None:
        """Lock held: hand the core the fates of the sends that have one."""
        handles = self._handles
        for key in [key for key, handle in handles.items() if handle.done()]:
            handle = handles.pop(key)
            error = handle.exception()
            if error is None:
                self.core.sent(key, handle.result().incarnation, now)
            else:
                self.core.send_failed(key, error, now)

    def _step(self, now: float) -> None:
        """Lock held: hand fates to the core, drive it, end the calls it finished.

        Fates are looked up here, not delivered by callbacks: every thread that
        waits on the port steps at least every ``FATE_WAIT`` while sends are pending.
        """
        core = self.core
        handles = self._handles
        if handles:
            self._fates(now)
        self._drive(self.node, handles, now, SendHandle.cancel, None)
        if handles and any(handle.done() for handle in handles.values()):
            self._fates(now)  # withdrawn (or failed at once) just now
            self._drive(self.node, handles, now, SendHandle.cancel, None)
        while (done := core.next_event()) is not None:
            call = self._calls.pop(done.counter, None)
            if call is not None:
                call._done = done
                for wake in self._asleep.get(done.counter, ()):
                    wake.notify()

    def _abandon(self, why: str) -> None:
        with self._lock:
            calls, self._calls = self._calls, {}
            for call in calls.values():
                call._done = _unavailable(call.counter, why)
            for sleepers in self._asleep.values():
                for wake in sleepers:
                    wake.notify()


class AsyncClient(_ClientBase):
    """Make calls from an :class:`reliable.AsyncNode` (``async with AsyncClient(node):``).

    As :class:`Client`; ``await client.call(dest, "method", ...)``. Cancelling
    the awaiting task cancels the call (withdrawn, or the server asked to stop).
    """

    def __init__(
        self,
        node: AsyncNode,
        *,
        codec: str | Codec = "json",
        timeout: float | None = 30.0,
        retry_interval: float = 1.0,
    ) -> None:
        super().__init__(node.address, node.incarnation, codec, timeout, retry_interval)
        self.node = node
        self._futures: dict[int, asyncio.Future[CallDone]] = {}
        self._handles: dict[int, AsyncSendHandle] = {}
        self._reader: asyncio.Task[None] | None = None
        self._timer: LoopTimer | None = None
        self._closed = False

    async def start(self) -> AsyncClient:
        if self._reader is None:
            loop = asyncio.get_running_loop()
            self._timer = LoopTimer(loop, lambda: self._step(loop.time()))
            self._port = self.node.create_mailbox(self.reply_mailbox, port=True)
            self._reader = asyncio.create_task(self._run(), name="rpc-client")
        return self

    async def __aenter__(self) -> AsyncClient:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._closed or self._reader is None:
            return
        self._closed = True
        self._reader.cancel()
        await asyncio.gather(self._reader, return_exceptions=True)
        if self._timer is not None:
            self._timer.cancel()
        self._abandon("the RPC client closed")
        try:
            self._port.delete()
        except errors.ReliableError:
            pass

    async def call(
        self, dest: str | tuple[Any, ...], method: str, /, *args: Any, **kwargs: Any
    ) -> Any:
        """As :meth:`Client.call`, awaited."""
        return await self.invoke(dest, method, args, kwargs)

    async def invoke(
        self,
        dest: str | tuple[Any, ...],
        method: str,
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
        *,
        timeout: float | object | None = _DEFAULT,
        names: Sequence[str] = (),
    ) -> Any:
        """As :meth:`Client.invoke`, awaited to the result."""
        if self._reader is None:
            raise errors.UsageError("start the AsyncClient first (async with, or await start())")
        if self._closed:
            raise errors.NodeClosed("the RPC client is closed")
        loop = asyncio.get_running_loop()
        target = self._target(self.node, dest)
        payload = marshal_call(self.codec, method, args, kwargs or {}, names)
        now = loop.time()
        counter = self.core.start(
            target.members,
            target.mailbox,
            method,
            self.codec.name,
            payload,
            deadline=self._deadline(timeout, now),
            now=now,
            anycast=target.anycast,
        )
        future: asyncio.Future[CallDone] = loop.create_future()
        self._futures[counter] = future
        self._step(now)
        try:
            # Not shielded: a cancel of this task cancels the future too, which only
            # means the core's outcome for the call, when it comes, finds it done.
            done = await future
        except asyncio.CancelledError:
            self.core.cancel(counter, loop.time())
            self._step(loop.time())
            raise
        return _outcome(done, method)

    def stub(
        self, interface: Callable[..., T], dest: str | tuple[Any, ...], *, timeout: Any = _DEFAULT
    ) -> T:
        """As :meth:`Client.stub`; its methods are coroutines (declare them ``async def``
        in the interface)."""
        client = self

        def make(name: str, signature: inspect.Signature) -> Callable[..., Any]:
            async def method(*args: Any, **kwargs: Any) -> Any:
                a, kw, names = _bind(signature, name, args, kwargs)
                return await client.invoke(dest, name, a, kw, timeout=timeout, names=names)

            method.__name__ = name
            return method

        namespace = {
            name: staticmethod(make(name, sig)) for name, sig in _stub_methods(interface).items()
        }
        return cast(T, type(f"{interface.__name__}Stub", (), namespace)())

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        core = self.core
        while True:
            try:
                # The core's timers: self._timer. Every waiting reply at once, as the
                # blocking client takes them.
                msgs = await self._port.receive_many(max(1, len(self._futures)))
            except _PORT_GONE:
                self._abandon("the node closed")
                return
            now = loop.time()
            for msg in msgs:
                core.receive(msg.data, msg.source, now)
            self._step(loop.time())

    def _on_fate(self, key: int, handle: asyncio.Future[Any]) -> None:
        self._handles.pop(key, None)
        now = asyncio.get_running_loop().time()
        if handle.cancelled():
            self.core.send_failed(key, errors.SendCancelled(None), now)
        elif (error := handle.exception()) is not None:
            self.core.send_failed(key, error, now)
        else:
            self.core.sent(key, handle.result().incarnation, now)
        self._step(now)

    def _step(self, now: float) -> None:
        core = self.core
        self._drive(self.node, self._handles, now, lambda h: h.withdraw(), self._on_fate)
        while (done := core.next_event()) is not None:
            future = self._futures.pop(done.counter, None)
            if future is not None and not future.done():
                future.set_result(done)
        if self._timer is not None:
            self._timer.arm(core.get_timer())

    def _abandon(self, why: str) -> None:
        futures, self._futures = self._futures, {}
        for counter, future in futures.items():
            if not future.done():
                future.set_result(_unavailable(counter, why))
