"""In-process carrier: a UDP socket wrapper whose outgoing datagrams suffer a :class:`Link`.

Wrap each end's socket and both directions of a conversation are impaired,
with no root, no kernel module and no proxy process. Datagrams the model
delays are released by one helper thread per wrapper, in release-time order,
so delay, jitter and reordering behave as on a real path. Receiving is not
touched: the peer's wrapper impairs the other direction.

The model is driven under a lock, so the wrapper may be shared by threads
(``reliable.Node`` sends from application threads and its I/O thread).
"""

from __future__ import annotations

import heapq
import itertools
import socket as _socket
import threading
import time
from collections.abc import Callable
from typing import Any

from .models import FaultCounters, Impairment
from .scenario import Link, as_impairment

__all__ = ["FaultySocket"]

#: Most datagrams held for delayed release; beyond this they are dropped (like a full queue).
MAX_HELD = 100_000


class FaultySocket:
    """A ``socket.socket`` look-alike that impairs what it sends."""

    def __init__(
        self,
        sock: _socket.socket,
        impairment: Impairment | str | Link,
        *,
        seed: int | None = 0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._sock = sock
        self.link = (
            impairment
            if isinstance(impairment, Link)
            else Link(as_impairment(impairment), seed=seed)
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

    @classmethod
    def bind(
        cls, address: tuple[str, int], impairment: Impairment | str | Link, *, seed: int | None = 0
    ) -> FaultySocket:
        """A new UDP socket bound to ``address``, wrapped."""
        family = _socket.AF_INET6 if ":" in address[0] else _socket.AF_INET
        sock = _socket.socket(family, _socket.SOCK_DGRAM)
        sock.bind(address)
        return cls(sock, impairment, seed=seed)

    @property
    def counters(self) -> FaultCounters:
        return self.link.counters

    @property
    def family(self) -> int:
        return int(self._sock.family)

    # ------------------------------------------------------------- socket API

    def sendto(self, data: bytes, address: Any, /) -> int:
        """Impair and send; returns ``len(data)`` whatever the model decided, as UDP would."""
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

    def recvfrom(self, bufsize: int, /) -> tuple[bytes, Any]:
        return self._sock.recvfrom(bufsize)

    def fileno(self) -> int:
        return self._sock.fileno()

    def getsockname(self) -> Any:
        return self._sock.getsockname()

    def setblocking(self, flag: bool, /) -> None:
        self._sock.setblocking(flag)

    def setsockopt(self, level: int, option: int, value: int, /) -> None:
        self._sock.setsockopt(level, option, value)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._held.clear()
            self._ready.notify_all()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(1.0)
        self._sock.close()

    # ---------------------------------------------------------- delayed sends

    def _ensure_thread(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._release_loop, name="netem-delay", daemon=True
            )
            self._thread.start()

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
