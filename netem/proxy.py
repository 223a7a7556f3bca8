"""The standalone carrier: a UDP proxy that impairs both directions, NAT-style.

Clients send to ``listen``; the proxy forwards to ``forward`` from one
upstream socket per client (so the server sees each client as a distinct
address, as behind a NAT) and relays replies back. The *up* link
(client -> server) and *down* link (server -> client) apply their own fault
models; with clean links the relay takes a fast path with no model at all.

One thread runs a ``selectors`` loop: it drains each readable socket until it
would block, releases delayed datagrams from a heap at their time, expires
idle clients, and (with ``rebind_every``) moves each client to a fresh
upstream socket — NAT rebinding: the server suddenly sees the client's
traffic from a new source port.

Staying up. Each client costs one file descriptor, so a proxy fed many
one-shot clients (``dig`` retries from a new port every time) runs out of
them. Three rules keep it relaying for the clients it has:

* the client cap defaults to what the descriptor limit (``RLIMIT_NOFILE``)
  leaves after the descriptors already open and a small reserve;
* a client whose upstream socket cannot be opened (``EMFILE``, ``ENFILE``,
  ``ENOBUFS``, any ``OSError``) or that would exceed the cap is *refused*:
  its datagram is dropped and counted in ``ProxyStats.refused`` by reason,
  and the next datagram from it tries again;
* idle clients expire after ``idle_timeout``, which closes their socket.

Per-datagram errors are counted, never raised. Anything else that escapes
the loop (a bug, a capture file that cannot be written) is fatal: the relay
thread records it in :attr:`UdpProxy.error` and ends, and :meth:`UdpProxy.wait`
and :meth:`UdpProxy.stop` raise :class:`ProxyFailed` — the proxy never stops
relaying quietly.

Captures: ``pcap_in`` records what the proxy received, ``pcap_out`` what it
sent, both directions, before and after impairment.
"""

from __future__ import annotations

import errno
import heapq
import itertools
import os
import selectors
import socket
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from .models import FaultCounters, Impairment
from .pcap import PcapWriter
from .scenario import Link, Scenario, as_impairment

try:
    import resource
except ImportError:  # pragma: no cover - not on Windows
    resource = None  # type: ignore[assignment]

__all__ = [
    "DEFAULT_MAX_CLIENTS",
    "ProxyFailed",
    "ProxyStats",
    "UdpProxy",
    "fd_client_limit",
    "parse_hostport",
]

_BATCH = 1024  # datagrams drained from one socket before looking at the others
_BUFFER = 4 * 1024 * 1024
_SWEEP_INTERVAL = 1.0  # longest gap between idle-client sweeps (kept off the per-wake path)
DEFAULT_MAX_CLIENTS = 4096  #: the client cap when the descriptor limit allows more
#: Descriptors kept free beyond those open when the proxy is built: a rebind's new
#: socket, captures, and whatever else the process opens later (imports, logs).
FD_RESERVE = 16
REFUSED_CAP = "max_clients"  #: the ``refused`` reason when the client cap is reached


class ProxyFailed(RuntimeError):
    """The relay thread stopped on an unexpected error; ``error`` is that exception."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(f"netem proxy stopped relaying: {type(error).__name__}: {error}")
        self.error = error


def fd_client_limit() -> int | None:
    """How many clients this process's descriptor limit leaves room for right now.

    The soft ``RLIMIT_NOFILE`` minus the descriptors already open minus
    :data:`FD_RESERVE`, at least 1; ``None`` when the limit is unknown or infinite.
    """
    if resource is None:
        return None
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return None
    return max(1, soft - _open_descriptors() - FD_RESERVE)


def _open_descriptors() -> int:
    for fd_dir in ("/proc/self/fd", "/dev/fd"):
        try:
            return len(os.listdir(fd_dir)) - 1  # listdir's own descriptor
        except OSError:
            continue
    return 8  # stdio, the listen socket, the wake pair, the selector, spare


def parse_hostport(value: str | tuple[str, int]) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` -> ``(host, port)`` with a clear error."""
    if isinstance(value, tuple):
        return value
    text = value.strip()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
    else:
        host, _, port_text = text.rpartition(":")
    if not host or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(
            f"bad address {value!r}: write HOST:PORT, e.g. 127.0.0.1:7000 or [::1]:7000"
        )
    return host, int(port_text)


@dataclass(slots=True)
class ProxyStats:
    """What the proxy has done so far."""

    up_received: int = 0
    up_sent: int = 0
    down_received: int = 0
    down_sent: int = 0
    clients: int = 0  #: clients admitted so far
    clients_active: int = 0  #: clients holding an upstream socket now
    clients_expired: int = 0  #: closed after ``idle_timeout`` without a datagram
    clients_refused: int = 0  #: datagrams from new clients dropped: the sum of ``refused``
    #: refusals by reason: ``"max_clients"`` (the cap) or the errno name of the
    #: failure to open the upstream socket (``"EMFILE"``, ``"ENFILE"``, ``"ENOBUFS"``...)
    refused: dict[str, int] = field(default_factory=dict)
    rebinds: int = 0
    rebind_errors: int = 0  #: rebinds skipped (no new socket): the client kept its port
    send_errors: int = 0
    strays: int = 0  #: datagrams to an upstream socket from anyone but the server
    up: FaultCounters = field(default_factory=FaultCounters)
    down: FaultCounters = field(default_factory=FaultCounters)

    def as_dict(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__ if k not in ("up", "down")}
        d["refused"] = dict(self.refused)
        d["up"] = self.up.as_dict()
        d["down"] = self.down.as_dict()
        return d


@dataclass(slots=True, eq=False)
class _Client:
    address: tuple[Any, ...]
    upstream: socket.socket
    last_seen: float
    bound_at: float


class UdpProxy:
    """A fault-injecting UDP relay. Use as a context manager or ``start()``/``stop()``.

    ``idle_timeout`` (seconds) closes a client's upstream socket after that long
    without a datagram from it (120 s: RFC 4787 REQ-5's floor for a NAT's UDP
    mapping). ``max_clients`` caps the clients held at once; by default it is
    :data:`DEFAULT_MAX_CLIENTS` or what :func:`fd_client_limit` leaves, whichever
    is lower. An explicit cap above the descriptor limit is honoured with a
    ``RuntimeWarning``: clients beyond the limit are refused as ``EMFILE``.
    """

    def __init__(
        self,
        listen: str | tuple[str, int],
        forward: str | tuple[str, int],
        *,
        up: Impairment | str | Link | None = None,
        down: Impairment | str | Link | None = None,
        scenario: Scenario | None = None,
        seed: int | None = 0,
        pcap_in: str | Path | None = None,
        pcap_out: str | Path | None = None,
        rebind_every: float | None = None,
        idle_timeout: float = 120.0,
        max_clients: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if scenario is not None and (up is not None or down is not None):
            raise ValueError("give either a scenario or up/down impairments, not both")
        if rebind_every is not None and rebind_every <= 0:
            raise ValueError("rebind_every must be a positive number of seconds")
        if not idle_timeout > 0:
            raise ValueError("idle_timeout must be a positive number of seconds")
        if max_clients is not None and max_clients < 1:
            raise ValueError("max_clients must be at least 1 (or None for the default)")
        listen_addr = parse_hostport(listen)
        self._forward_text = parse_hostport(forward)
        if scenario is not None:
            self.up_link, self.down_link = scenario.links(seed)
        else:
            self.up_link = (
                up if isinstance(up, Link) else Link(as_impairment(up), seed=_seed(seed, 1))
            )
            self.down_link = (
                down if isinstance(down, Link) else Link(as_impairment(down), seed=_seed(seed, 2))
            )
        info = socket.getaddrinfo(*listen_addr, type=socket.SOCK_DGRAM)[0]
        self._listen = socket.socket(info[0], socket.SOCK_DGRAM)
        self._listen.bind(info[4])
        fwd = socket.getaddrinfo(*self._forward_text, type=socket.SOCK_DGRAM)[0]
        self._forward_family = fwd[0]
        self.forward: tuple[Any, ...] = fwd[4][:2]
        # Upstream sockets leave from the listen host when it is a specific address of
        # the server's family (so captures and servers see a real source address).
        wildcard = "::" if fwd[0] == socket.AF_INET6 else "0.0.0.0"
        listen_host = info[4][0]
        same_family = info[0] == fwd[0]
        self._upstream_host = (
            listen_host if same_family and listen_host not in ("0.0.0.0", "::") else wildcard
        )
        _tune(self._listen)
        self._clock = clock
        self._rebind_every = rebind_every
        self._idle_timeout = idle_timeout
        self._sweep_interval = min(_SWEEP_INTERVAL, idle_timeout / 4)
        self._clients: dict[tuple[Any, ...], _Client] = {}
        self._heap: list[tuple[float, int, bool, tuple[Any, ...], bytes]] = []
        self._order = itertools.count()
        self._pcap_in = PcapWriter(pcap_in) if pcap_in else None
        self._pcap_out = PcapWriter(pcap_out) if pcap_out else None
        self.stats = ProxyStats()
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._stop = threading.Event()
        self._done = threading.Event()
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._fast = self.up_link.is_clean and self.down_link.is_clean
        self._next_sweep = 0.0
        # Measured last, with the proxy's own descriptors (and captures) open.
        room = fd_client_limit()
        if max_clients is None:
            max_clients = DEFAULT_MAX_CLIENTS if room is None else min(DEFAULT_MAX_CLIENTS, room)
        elif room is not None and max_clients > room:
            warnings.warn(
                f"max_clients {max_clients} is above the {room} clients this process's "
                f"descriptor limit leaves room for: clients beyond that are refused as "
                f"EMFILE (raise it with ulimit -n)",
                RuntimeWarning,
                stacklevel=2,
            )
        self.max_clients: int = max_clients
        """The most clients held at once; new ones beyond it are refused."""

    # ------------------------------------------------------------- lifecycle

    @property
    def address(self) -> tuple[Any, ...]:
        """Where clients send: the bound listen address."""
        return tuple(self._listen.getsockname()[:2])

    @property
    def error(self) -> BaseException | None:
        """The unexpected error that stopped the relay thread, or ``None``."""
        return self._error

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the relay thread ends or ``timeout`` seconds pass.

        Returns whether it has ended (``stop()`` was called); raises
        :class:`ProxyFailed` if it ended on an error. Poll it to notice a failure.
        """
        if self._thread is None:
            return False
        ended = self._done.wait(timeout)
        if self._error is not None:
            raise ProxyFailed(self._error)
        return ended

    def start(self) -> UdpProxy:
        if self._thread is None:
            now = self._clock()
            self.up_link.start(now)
            self.down_link.start(now)
            self._listen.setblocking(False)
            self._wake_r.setblocking(False)
            self._selector.register(self._listen, selectors.EVENT_READ, None)
            self._selector.register(self._wake_r, selectors.EVENT_READ, "wake")
            self._thread = threading.Thread(target=self._run, name="netem-proxy", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop relaying, close sockets and captures. Idempotent.

        Raises :class:`ProxyFailed` (after closing everything) if the relay
        thread had stopped on an error, so a failure is never lost.
        """
        self._stop.set()
        try:
            self._wake_w.send(b"\0")
        except OSError:
            pass
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(5)
        for client in list(self._clients.values()):
            self._close_client(client)
        self._clients.clear()
        for s in (self._listen, self._wake_r, self._wake_w):
            s.close()
        self._selector.close()
        for writer in (self._pcap_in, self._pcap_out):
            if writer is not None:
                writer.close()
        self.stats.up = self.up_link.counters
        self.stats.down = self.down_link.counters
        self.stats.clients_active = 0
        if self._error is not None:
            raise ProxyFailed(self._error)

    def __enter__(self) -> UdpProxy:
        return self.start()

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def snapshot(self) -> ProxyStats:
        """Current statistics, link counters included."""
        self.stats.up = self.up_link.counters
        self.stats.down = self.down_link.counters
        self.stats.clients_active = len(self._clients)
        return self.stats

    # ------------------------------------------------------------------ loop

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # recorded, then raised by wait() and stop()
            self._error = exc
        finally:
            self._done.set()

    def _loop(self) -> None:
        select = self._selector.select
        while not self._stop.is_set():
            timeout = max(0.0, min(1.0, self._next_sweep - self._clock()))
            if self._heap:
                timeout = max(0.0, min(timeout, self._heap[0][0] - self._clock()))
            for key, _ in select(timeout):
                if key.data == "wake":
                    try:
                        self._wake_r.recv(4096)
                    except OSError:
                        pass
                elif key.data is None:
                    self._from_clients()
                else:
                    self._from_server(key.data)
            now = self._clock()
            if self._heap:
                self._release(now)
            self._housekeeping(now)

    def _relay_clean_up(self) -> None:
        """The fast path: clean link, no capture — relay a batch with no per-datagram model."""
        recv = self._listen.recvfrom
        forward = self.forward
        now = self._clock()
        received = sent = 0
        last_addr: Any = None
        send: Any = None
        try:
            for _ in range(_BATCH):
                data, addr = recv(65535)
                received += 1
                if addr != last_addr:
                    client = self._client_for(addr, now)
                    if client is None:
                        continue
                    last_addr, send = addr, client.upstream.sendto
                try:
                    send(data, forward)
                    sent += 1
                except OSError:
                    self.stats.send_errors += 1
        except OSError:  # would block (drained), or an error the next wake retries
            pass
        finally:
            self.stats.up_received += received
            self.stats.up_sent += sent

    def _relay_clean_down(self, client: _Client) -> None:
        recv = client.upstream.recvfrom
        send = self._listen.sendto
        forward = self.forward
        to = client.address
        received = sent = 0
        try:
            for _ in range(_BATCH):
                data, addr = recv(65535)
                if addr[:2] != forward:
                    self.stats.strays += 1
                    continue
                received += 1
                try:
                    send(data, to)
                    sent += 1
                except OSError:
                    self.stats.send_errors += 1
        except (BlockingIOError, InterruptedError, OSError):
            pass
        finally:
            self.stats.down_received += received
            self.stats.down_sent += sent

    def _from_clients(self) -> None:
        if self._fast and self._pcap_in is None and self._pcap_out is None:
            self._relay_clean_up()
            return
        recv = self._listen.recvfrom
        stats = self.stats
        fast = self._fast
        for _ in range(_BATCH):
            try:
                data, addr = recv(65535)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                continue
            stats.up_received += 1
            now = self._clock()
            client = self._client_for(addr, now)
            if client is None:
                continue
            if self._pcap_in is not None:
                self._pcap_in.write(time.time(), addr, self.address, data)
            if fast:
                self._send_up(client, data)
                continue
            for release, datagram in self.up_link.apply(data, now):
                if release <= now:
                    self._send_up(client, datagram)
                else:
                    heapq.heappush(self._heap, (release, next(self._order), True, addr, datagram))

    def _from_server(self, client: _Client) -> None:
        if self._fast and self._pcap_in is None and self._pcap_out is None:
            self._relay_clean_down(client)
            return
        sock = client.upstream
        stats = self.stats
        for _ in range(_BATCH):
            try:
                data, addr = sock.recvfrom(65535)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            if tuple(addr[:2]) != self.forward:
                stats.strays += 1
                continue
            stats.down_received += 1
            now = self._clock()
            if self._pcap_in is not None:
                self._pcap_in.write(time.time(), self.forward, client.address, data)
            if self._fast:
                self._send_down(client.address, data)
                continue
            for release, datagram in self.down_link.apply(data, now):
                if release <= now:
                    self._send_down(client.address, datagram)
                else:
                    heapq.heappush(
                        self._heap, (release, next(self._order), False, client.address, datagram)
                    )

    def _release(self, now: float) -> None:
        heap = self._heap
        while heap and heap[0][0] <= now:
            _, _, upward, addr, datagram = heapq.heappop(heap)
            if upward:
                client = self._clients.get(addr)
                if client is not None:
                    self._send_up(client, datagram)
            else:
                self._send_down(addr, datagram)

    def _send_up(self, client: _Client, data: bytes) -> None:
        try:
            client.upstream.sendto(data, self.forward)
        except OSError:
            self.stats.send_errors += 1
            return
        self.stats.up_sent += 1
        if self._pcap_out is not None:
            self._pcap_out.write(time.time(), client.upstream.getsockname(), self.forward, data)

    def _send_down(self, addr: tuple[Any, ...], data: bytes) -> None:
        try:
            self._listen.sendto(data, addr)
        except OSError:
            self.stats.send_errors += 1
            return
        self.stats.down_sent += 1
        if self._pcap_out is not None:
            self._pcap_out.write(time.time(), self.address, addr, data)

    # --------------------------------------------------------------- clients

    def _client_for(self, addr: tuple[Any, ...], now: float) -> _Client | None:
        """The client's session (new if needed), rebound first if its NAT mapping is due to change.

        Rebinding between datagrams, not after one was relayed, is what a NAT does:
        the next datagram leaves from the new port; replies still in flight to the
        old one are lost.
        """
        client = self._clients.get(addr)
        if client is None:
            return self._new_client(addr, now)
        client.last_seen = now
        if self._rebind_every is not None and now - client.bound_at >= self._rebind_every:
            self._rebind(client, now)
        return client

    def _new_client(self, addr: tuple[Any, ...], now: float) -> _Client | None:
        """A session for a new client, or ``None`` (refused, counted) if it cannot have one."""
        if len(self._clients) >= self.max_clients:
            self._refuse(REFUSED_CAP)
            return None
        try:
            upstream = self._open_upstream()
        except OSError as exc:  # EMFILE, ENFILE, ENOBUFS, no ephemeral port...
            self._refuse(_reason(exc))
            return None
        client = _Client(addr, upstream, now, now)
        try:
            self._selector.register(upstream, selectors.EVENT_READ, client)
        except OSError as exc:  # epoll out of memory or watches
            upstream.close()
            self._refuse(_reason(exc))
            return None
        self._clients[addr] = client
        self.stats.clients += 1
        return client

    def _refuse(self, reason: str) -> None:
        self.stats.clients_refused += 1
        self.stats.refused[reason] = self.stats.refused.get(reason, 0) + 1

    def _open_upstream(self) -> socket.socket:
        sock = socket.socket(self._forward_family, socket.SOCK_DGRAM)
        try:
            _tune(sock)
            sock.bind((self._upstream_host, 0))
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        return sock

    def _housekeeping(self, now: float) -> None:
        if now < self._next_sweep:
            return
        self._next_sweep = now + self._sweep_interval
        for client in list(self._clients.values()):
            if now - client.last_seen > self._idle_timeout:
                self._close_client(client)
                del self._clients[client.address]
                self.stats.clients_expired += 1

    def _rebind(self, client: _Client, now: float) -> None:
        """NAT rebinding: the client's traffic now leaves from a new source port.

        The old socket closes only once the new one is open and watched; if either
        fails, the client keeps its port (counted in ``rebind_errors``) and the
        next datagram after ``rebind_every`` tries again.
        """
        client.bound_at = now
        try:
            new = self._open_upstream()
        except OSError:
            self.stats.rebind_errors += 1
            return
        try:
            self._selector.register(new, selectors.EVENT_READ, client)
        except OSError:
            new.close()
            self.stats.rebind_errors += 1
            return
        old = client.upstream
        self._selector.unregister(old)
        old.close()  # replies to the old port now bounce, as behind a real NAT
        client.upstream = new
        self.stats.rebinds += 1

    def _close_client(self, client: _Client) -> None:
        try:
            self._selector.unregister(client.upstream)
        except (KeyError, ValueError, OSError):
            pass
        client.upstream.close()


def _reason(exc: OSError) -> str:
    """The errno name of a failure (``EMFILE``), for the ``refused`` counters."""
    return errno.errorcode.get(exc.errno or 0, type(exc).__name__)


def _seed(seed: int | None, offset: int) -> int | None:
    return None if seed is None else seed * 2 + offset


def _tune(sock: socket.socket) -> None:
    for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, option, _BUFFER)
        except OSError:
            pass
