"""asyncio carrier: a datagram transport whose traffic suffers a :class:`Link` each way.

For code built on ``loop.create_datagram_endpoint``: call
:func:`create_faulty_datagram_endpoint` with the same arguments plus an
impairment, and your protocol gets a transport whose ``sendto`` goes through
the outgoing link (*up*) and whose ``datagram_received`` calls come through
the incoming link (*down*, with ``incoming=``). Delays are ``loop.call_at``
timers on the event loop's clock, so nothing blocks and no thread is started;
closing the transport cancels what is still held.

The runtime calls (``set``, ``clear``, ``partition``, ``heal``, ``faults``) and
the seeding (:func:`netem.seeds.stream_seed`, client 0) are those of
:class:`~netem.socket.FaultySocket`, so the same seed gives the same decisions.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterator, MutableSet
from typing import Any, cast

from .models import FaultCounters, Impairment
from .scenario import Link, as_impairment
from .seeds import stream_seed

__all__ = ["FaultyDatagramTransport", "create_faulty_datagram_endpoint"]


def _as_link(value: Impairment | str | Link, seed: int | None) -> Link:
    return value if isinstance(value, Link) else Link(as_impairment(value), seed=seed)


class FaultyDatagramTransport(asyncio.DatagramTransport):
    """Wraps a real datagram transport; ``sendto`` is impaired, the rest is delegated."""

    def __init__(
        self,
        transport: asyncio.DatagramTransport,
        loop: asyncio.AbstractEventLoop,
        outgoing: Link,
        incoming: Link | None,
    ) -> None:
        super().__init__()
        self._transport = transport
        self._loop = loop
        self.link = outgoing
        self.incoming = incoming
        # MutableSet, not set: in this class "set" is the method (documentation tools read it)
        self._handles: MutableSet[asyncio.TimerHandle] = set()

    @property
    def counters(self) -> FaultCounters:
        """What the outgoing link did."""
        return self.link.counters

    @property
    def incoming_counters(self) -> FaultCounters:
        """What the incoming link did (all zero without ``incoming=``)."""
        return self.incoming.counters if self.incoming is not None else FaultCounters()

    # ----------------------------------------------------------- transport

    def sendto(self, data: Any, addr: Any = None) -> None:
        if self._transport.is_closing():
            self._transport.sendto(data, addr)  # let asyncio report it as it would
            return
        now = self._loop.time()
        for release, datagram in self.link.apply(bytes(data), now):
            if release <= now:
                self._transport.sendto(datagram, addr)
            else:
                self.later(release, self._send_held, datagram, addr)

    def _send_held(self, datagram: bytes, addr: Any) -> None:
        if not self._transport.is_closing():
            self._transport.sendto(datagram, addr)

    def later(self, when: float, action: Callable[..., None], *args: Any) -> None:
        """Run ``action(*args)`` at loop time ``when`` unless the transport closes first."""
        handle: asyncio.TimerHandle

        def run() -> None:
            self._handles.discard(handle)
            action(*args)

        handle = self._loop.call_at(when, run)
        self._handles.add(handle)

    def _cancel_held(self) -> None:
        for handle in self._handles:
            handle.cancel()
        self._handles.clear()

    def close(self) -> None:
        self._cancel_held()
        self._transport.close()

    def abort(self) -> None:
        self._cancel_held()
        self._transport.abort()

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._transport.get_extra_info(name, default)

    def get_write_buffer_size(self) -> int:
        """The wrapped transport's write buffer size (0 if it has none)."""
        size = getattr(self._transport, "get_write_buffer_size", None)
        return 0 if size is None else int(size())

    # ------------------------------------------------------- runtime faults

    def _links(self, direction: str) -> list[Link]:
        if direction not in ("up", "down", "both"):
            raise ValueError(f"direction must be up, down or both, got {direction!r}")
        links = [self.link] if direction in ("up", "both") else []
        if direction in ("down", "both") and self.incoming is not None:
            links.append(self.incoming)
        elif direction == "down":
            raise ValueError(
                "this transport impairs only what it sends: create it with incoming= "
                '(incoming="" for a clean start) to change incoming faults at run time'
            )
        return links

    def set(self, spec: Impairment | str, *, direction: str = "both") -> None:
        """New faults from the next datagram on (``"up"``: sent, ``"down"``: received)."""
        for link in self._links(direction):
            link.set(spec)

    def clear(self) -> None:
        """Every link clean and whole from now on."""
        for link in self._links("both"):
            link.clear()

    def partition(self, direction: str = "both") -> None:
        """Nothing passes in ``direction`` until :meth:`heal`."""
        for link in self._links(direction):
            link.partition()

    def heal(self, direction: str = "both") -> None:
        """Remove every fault from ``direction`` (``up``, ``down`` or ``both``)."""
        for link in self._links(direction):
            link.heal()

    @contextlib.contextmanager
    def faults(
        self,
        spec: Impairment | str | None = None,
        *,
        direction: str = "both",
        partition: bool = False,
    ) -> Iterator[FaultyDatagramTransport]:
        """Apply ``spec`` (and/or a partition) for a ``with`` block, then restore."""
        links = self._links(direction)
        with contextlib.ExitStack() as stack:
            for link in links:
                stack.enter_context(link.faults(spec, partition=partition))
            yield self


class _Protocol(asyncio.DatagramProtocol):
    """Sits between the real transport and the user's protocol."""

    def __init__(
        self,
        inner: asyncio.DatagramProtocol,
        loop: asyncio.AbstractEventLoop,
        outgoing: Link,
        incoming: Link | None,
    ) -> None:
        self.inner = inner
        self._loop = loop
        self._outgoing = outgoing
        self._incoming = incoming
        self.transport: FaultyDatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # asyncio's own datagram transports do not all subclass DatagramTransport
        transport = cast(asyncio.DatagramTransport, transport)
        now = self._loop.time()
        self._outgoing.start(now)
        if self._incoming is not None:
            self._incoming.start(now)
        self.transport = FaultyDatagramTransport(
            transport, self._loop, self._outgoing, self._incoming
        )
        self.inner.connection_made(self.transport)

    def datagram_received(self, data: bytes, addr: Any) -> None:
        if self._incoming is None or self.transport is None:
            self.inner.datagram_received(data, addr)
            return
        now = self._loop.time()
        for release, datagram in self._incoming.apply(data, now):
            if release <= now:
                self.inner.datagram_received(datagram, addr)
            else:
                self.transport.later(release, self.inner.datagram_received, datagram, addr)

    def error_received(self, exc: Exception) -> None:
        self.inner.error_received(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.transport is not None:
            self.transport._cancel_held()
        self.inner.connection_lost(exc)


async def create_faulty_datagram_endpoint(
    protocol_factory: Callable[[], asyncio.DatagramProtocol],
    impairment: Impairment | str | Link,
    *,
    incoming: Impairment | str | Link | None = None,
    seed: int | None = 0,
    **endpoint_options: Any,
) -> tuple[FaultyDatagramTransport, asyncio.DatagramProtocol]:
    """``loop.create_datagram_endpoint(protocol_factory, **endpoint_options)`` through netem.

    ``impairment`` applies to what the endpoint sends, ``incoming`` to what it
    receives. Returns ``(transport, protocol)`` like asyncio, with the
    transport being the :class:`FaultyDatagramTransport` your protocol also got.
    """
    loop = asyncio.get_running_loop()
    outgoing = _as_link(impairment, stream_seed(seed, "up"))
    inbound = None if incoming is None else _as_link(incoming, stream_seed(seed, "down"))
    inner = protocol_factory()
    _, wrapper = await loop.create_datagram_endpoint(
        lambda: _Protocol(inner, loop, outgoing, inbound), **endpoint_options
    )
    assert wrapper.transport is not None
    return wrapper.transport, inner
