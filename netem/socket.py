"""In-process carrier: a UDP socket wrapper whose traffic suffers a :class:`Link` each way.

``FaultySocket(sock, outgoing)`` impairs what the socket sends; add
``incoming=`` to impair what it receives as well, so one wrapped socket makes
both directions of a conversation bad, with no root, no kernel module and no
proxy process.

Outgoing: the link decides at ``sendto``; datagrams it delays are released by
a helper thread in release-time order, so delay, jitter and reordering behave
as on a real path.

Incoming: a helper thread reads the real socket, applies the incoming link and
hands each surviving datagram, at its release time, to an internal AF_UNIX
datagram pair (with its source address in a small header). ``fileno()`` and
``recvfrom()`` use that pair, so ``select`` wakes exactly when an impaired
datagram becomes due — event loops and ``reliable.Node`` work unchanged.

It behaves as a UDP socket for everything a client does — ``connect`` and
``send``/``recv``, ``recv_into``/``recvfrom_into``, ``settimeout``/``gettimeout``
(a timeout raises ``TimeoutError`` as a socket's would), ``getpeername``,
``getsockopt``, ``with`` — so ordinary client code runs unchanged.

Links are driven under a lock, so the wrapper may be shared by threads
(``reliable.Node`` sends from whichever application thread drives it, or from
its background thread).

Faults can change while it runs: :meth:`FaultySocket.set`, ``clear``,
``partition``, ``heal`` and the ``faults`` context manager act on the
outgoing link (*up*) and, when there is one, the incoming link (*down*).
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import heapq
import itertools
import selectors
import socket as _socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import Any

from .models import FaultCounters, Impairment
from .scenario import Link, LinkState, as_impairment
from .seeds import stream_seed

__all__ = ["FaultySocket"]

#: Most datagrams held for delayed release; beyond this they are dropped (like a full queue).
MAX_HELD = 100_000
_ADDR = struct.Struct("!BHIIH")  # host length, port, flowinfo, scope id, reserved


def _pack(data: bytes, addr: Any) -> bytes:
    host = str(addr[0]).encode()
    flow, scope = (int(addr[2]), int(addr[3])) if len(addr) == 4 else (0, 0)
    return _ADDR.pack(len(host), int(addr[1]), flow, scope, len(addr)) + host + data


def _unpack(blob: bytes) -> tuple[bytes, Any]:
    host_len, port, flow, scope, arity = _ADDR.unpack_from(blob)
    start = _ADDR.size + host_len
    host = blob[_ADDR.size : start].decode()
    addr: tuple[Any, ...] = (host, port, flow, scope) if arity == 4 else (host, port)
    return blob[start:], addr


def _as_link(value: Impairment | str | Link, seed: int | None) -> Link:  # seed: a stream's
    return value if isinstance(value, Link) else Link(as_impairment(value), seed=seed)


class FaultySocket:
    """A ``socket.socket`` look-alike that impairs what it sends (and, optionally, receives).

    ``seed`` and ``client`` name the decision streams (:mod:`netem.seeds`): what
    it sends is stream ``("up", client)``, what it receives ``("down", client)``
    — the same decisions as the proxy's client number ``client`` under the same seed.
    """

    def __init__(
        self,
        sock: _socket.socket,
        impairment: Impairment | str | Link,
        *,
        incoming: Impairment | str | Link | None = None,
        seed: int | None = 0,
        client: int = 0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._sock = sock
        # one seed, one story: what it sends is stream "up", what it receives "down"
        self.link = _as_link(impairment, stream_seed(seed, "up", client))
        self.incoming = (
            None if incoming is None else _as_link(incoming, stream_seed(seed, "down", client))
        )
        self._clock = clock
        self._lock = threading.Lock()
        self._ready = threading.Condition(self._lock)
        self._held: list[tuple[float, int, bytes, Any]] = []
        self._order = itertools.count()
        self._thread: threading.Thread | None = None
        self._closed = False
        self.overflow = 0  #: datagrams dropped because MAX_HELD were already held
        self.send_errors = 0  #: delayed datagrams the kernel refused (buffer full)
        self._inbox_r: _socket.socket | None = None
        self._inbox_w: _socket.socket | None = None
        self._stop_r: _socket.socket | None = None
        self._stop_w: _socket.socket | None = None
        self._receiver: threading.Thread | None = None
        self._peer: Any = None
        self._timeout: float | None = sock.gettimeout()
        if self.incoming is not None:
            self._start_receiver()

    @classmethod
    def bind(
        cls,
        address: tuple[str, int],
        impairment: Impairment | str | Link,
        *,
        incoming: Impairment | str | Link | None = None,
        seed: int | None = 0,
        client: int = 0,
    ) -> FaultySocket:
        """A new UDP socket bound to ``address``, wrapped."""
        family = _socket.AF_INET6 if ":" in address[0] else _socket.AF_INET
        sock = _socket.socket(family, _socket.SOCK_DGRAM)
        sock.bind(address)
        return cls(sock, impairment, incoming=incoming, seed=seed, client=client)

    @property
    def counters(self) -> FaultCounters:
        """What the outgoing link did."""
        return self.link.counters

    @property
    def incoming_counters(self) -> FaultCounters:
        """What the incoming link did (all zero without ``incoming=``)."""
        return self.incoming.counters if self.incoming is not None else FaultCounters()

    @property
    def family(self) -> int:
        return int(self._sock.family)

    # ------------------------------------------------------ runtime faults

    def _links(self, direction: str) -> list[Link]:
        if direction not in ("up", "down", "both"):
            raise ValueError(f"direction must be up, down or both, got {direction!r}")
        links = [self.link] if direction in ("up", "both") else []
        if direction in ("down", "both") and self.incoming is not None:
            links.append(self.incoming)
        elif direction == "down":
            raise ValueError(
                "this socket impairs only what it sends: wrap it with incoming= "
                '(incoming="" for a clean start) to change incoming faults at run time'
            )
        return links

    def set(
        self,
        spec: Impairment | str | None = None,
        *,
        up: Impairment | str | None = None,
        down: Impairment | str | None = None,
        direction: str = "both",
    ) -> None:
        """New faults from the next datagram on: ``spec`` for ``direction``
        (``"up"``: outgoing, ``"down"``: incoming, ``"both"``: every link this
        socket has), or ``up=``/``down=`` each on its own."""
        changes: list[tuple[Link, Impairment]] = []
        if spec is not None:
            changes += [(link, as_impairment(spec)) for link in self._links(direction)]
        if up is not None:
            changes += [(link, as_impairment(up)) for link in self._links("up")]
        if down is not None:
            changes += [(link, as_impairment(down)) for link in self._links("down")]
        if not changes:
            raise ValueError("set() needs a spec (or up=/down=): what should the link do?")
        with self._lock:
            for link, imp in changes:
                link.set(imp)

    def clear(self) -> None:
        """Every link clean and whole from now on."""
        with self._lock:
            for link in self._links("both"):
                link.clear()

    def partition(self, direction: str = "both") -> None:
        """Nothing passes in ``direction`` until :meth:`heal`."""
        with self._lock:
            for link in self._links(direction):
                link.partition()

    def heal(self, direction: str = "both") -> None:
        """End a :meth:`partition`."""
        with self._lock:
            for link in self._links(direction):
                link.heal()

    @contextlib.contextmanager
    def faults(
        self,
        spec: Impairment | str | None = None,
        *,
        direction: str = "both",
        partition: bool = False,
    ) -> Iterator[FaultySocket]:
        """Apply ``spec`` (and/or a partition) for a ``with`` block, then restore."""
        links = self._links(direction)
        with self._lock:
            before: list[LinkState] = [link.state() for link in links]
        try:
            if spec is not None:
                self.set(spec, direction=direction)
            if partition:
                self.partition(direction)
            yield self
        finally:
            with self._lock:
                for link, state in zip(links, before, strict=True):
                    link.restore(state)

    # ------------------------------------------------------------- socket API

    def sendto(self, data: bytes, address: Any, /) -> int:
        """Impair and send; returns ``len(data)`` whatever the link decided, as UDP would."""
        with self._lock:
            now = self._clock()
            fates = self.link.apply(bytes(data), now)
            immediate = []
            for release, datagram in fates:
                if release <= now:
                    immediate.append(datagram)
                elif len(self._held) >= MAX_HELD:
                    self.overflow += 1
                else:
                    heapq.heappush(self._held, (release, next(self._order), datagram, address))
                    self._ensure_thread()
                    self._ready.notify()
        for datagram in immediate:
            self._sock.sendto(datagram, address)
        return len(data)

    def send(self, data: bytes, /) -> int:
        """Impair and send to the connected peer (``connect`` first)."""
        if self._peer is None:
            raise OSError(errno.EDESTADDRREQ, "Destination address required: connect() first")
        return self.sendto(data, self._peer)

    def connect(self, address: Any, /) -> None:
        """Fix the peer for ``send``; the kernel then only delivers datagrams from it."""
        self._sock.connect(address)
        self._peer = self._sock.getpeername()

    def getpeername(self) -> Any:
        """The wrapped socket's peer address (``socket.socket.getpeername``)."""
        return self._sock.getpeername()

    def recvfrom(self, bufsize: int, /) -> tuple[bytes, Any]:
        """The next datagram that survived the faults, and its source; honours the timeout."""
        if self._inbox_r is None:
            return self._sock.recvfrom(bufsize)
        data, addr = _unpack(self._inbox_r.recv(bufsize + _ADDR.size + 256))
        return data[:bufsize], addr

    def recv(self, bufsize: int, /) -> bytes:
        """As :meth:`recvfrom`, without the source address."""
        return self.recvfrom(bufsize)[0]

    def recvfrom_into(self, buffer: Any, nbytes: int = 0, /) -> tuple[int, Any]:
        """As :meth:`recvfrom`, into ``buffer`` (at most ``nbytes``); returns size and source."""
        view = memoryview(buffer).cast("B")
        size = nbytes or len(view)
        data, addr = self.recvfrom(size)
        view[: len(data)] = data
        return len(data), addr

    def recv_into(self, buffer: Any, nbytes: int = 0, /) -> int:
        """As :meth:`recvfrom_into`, without the source address."""
        return self.recvfrom_into(buffer, nbytes)[0]

    def fileno(self) -> int:
        """A descriptor that polls readable when a datagram is ready (after delay, reordering)."""
        return self._inbox_r.fileno() if self._inbox_r is not None else self._sock.fileno()

    def getsockname(self) -> Any:
        """The wrapped socket's own address."""
        return self._sock.getsockname()

    @property
    def type(self) -> int:
        return int(self._sock.type)

    @property
    def proto(self) -> int:
        return self._sock.proto

    def settimeout(self, value: float | None, /) -> None:
        """Receive timeout in seconds (``None``: block; ``0``: non-blocking), as a socket's."""
        if self._inbox_r is not None:
            self._inbox_r.settimeout(value)  # the real socket stays the helper's
        else:
            self._sock.settimeout(value)
        self._timeout = value

    def gettimeout(self) -> float | None:
        """The timeout set with ``settimeout`` (``None``: blocking; ``0.0``: non-blocking)."""
        return self._timeout

    def setblocking(self, flag: bool, /) -> None:
        """``True`` is ``settimeout(None)``, ``False`` is ``settimeout(0.0)``, as for sockets."""
        self.settimeout(None if flag else 0.0)

    def getblocking(self) -> bool:
        """Whether receives block (the timeout is not ``0.0``)."""
        return self._timeout != 0.0

    def setsockopt(self, level: int, option: int, value: int | bytes, /) -> None:
        """Set an option on the wrapped socket."""
        self._sock.setsockopt(level, option, value)

    def getsockopt(self, level: int, option: int, buflen: int = 0, /) -> Any:
        """Read an option of the wrapped socket."""
        if buflen:
            return self._sock.getsockopt(level, option, buflen)
        return self._sock.getsockopt(level, option)

    def __enter__(self) -> FaultySocket:
        return self

    def __exit__(
        self,
        kind: builtins.type[BaseException] | None,
        value: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the wrapped socket; datagrams still held back (delayed, reordered) are dropped."""
        with self._lock:
            self._closed = True
            self._held.clear()
            self._ready.notify_all()
        if self._stop_w is not None:
            try:
                self._stop_w.send(b"\0")
            except OSError:
                pass
        for thread in (self._thread, self._receiver):
            if thread is not None and thread is not threading.current_thread():
                thread.join(1.0)
        for s in (self._inbox_r, self._inbox_w, self._stop_r, self._stop_w):
            if s is not None:
                s.close()
        self._sock.close()

    # ---------------------------------------------------------- delayed sends

    def _ensure_thread(self) -> None:
        if self._thread is None:
            thread = threading.Thread(target=self._release_loop, name="netem-delay", daemon=True)
            self._thread = thread
            thread.start()

    def _release_loop(self) -> None:
        while True:
            with self._lock:
                while not self._closed:
                    if self._held:
                        wait = self._held[0][0] - self._clock()
                        if wait <= 0:
                            break
                        self._ready.wait(wait)
                    else:
                        self._ready.wait()
                if self._closed:
                    return
                _, _, datagram, address = heapq.heappop(self._held)
            try:
                self._sock.sendto(datagram, address)
            except OSError:
                self.send_errors += 1

    # ------------------------------------------------------- impaired receive

    def _start_receiver(self) -> None:
        self._inbox_r, self._inbox_w = _socket.socketpair(_socket.AF_UNIX, _socket.SOCK_DGRAM)
        self._stop_r, self._stop_w = _socket.socketpair()
        for s in (self._inbox_w, self._inbox_r):
            s.setsockopt(_socket.SOL_SOCKET, _socket.SO_SNDBUF, 4 * 1024 * 1024)
            s.setsockopt(_socket.SOL_SOCKET, _socket.SO_RCVBUF, 4 * 1024 * 1024)
        self._inbox_w.setblocking(False)
        self._inbox_r.settimeout(self._sock.gettimeout())  # the user's timeout, on what they read
        self._sock.setblocking(False)
        self._receiver = threading.Thread(target=self._receive_loop, name="netem-rx", daemon=True)
        self._receiver.start()

    def _receive_loop(self) -> None:
        assert self.incoming is not None and self._inbox_w is not None and self._stop_r is not None
        link = self.incoming
        pending: list[tuple[float, int, bytes, Any]] = []
        order = itertools.count()
        selector = selectors.DefaultSelector()
        selector.register(self._sock, selectors.EVENT_READ)
        selector.register(self._stop_r, selectors.EVENT_READ)
        try:
            while True:
                wait = None if not pending else max(0.0, pending[0][0] - self._clock())
                for key, _ in selector.select(wait):
                    if key.fileobj is self._stop_r:
                        return
                    for _ in range(512):
                        try:
                            data, addr = self._sock.recvfrom(65535)
                        except (BlockingIOError, InterruptedError):
                            break
                        except OSError:
                            return
                        now = self._clock()
                        with self._lock:
                            fates = link.apply(data, now)
                        for release, datagram in fates:
                            if len(pending) < MAX_HELD:
                                heapq.heappush(pending, (release, next(order), datagram, addr))
                            else:
                                self.overflow += 1
                now = self._clock()
                while pending and pending[0][0] <= now:
                    _, _, datagram, addr = heapq.heappop(pending)
                    try:
                        self._inbox_w.send(_pack(datagram, addr))
                    except OSError:
                        self.overflow += 1  # the application is not reading: like a full buffer
        finally:
            selector.close()
