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

Captures: ``pcap_in`` records what the proxy received, ``pcap_out`` what it
sent, both directions, before and after impairment.
"""

from __future__ import annotations

import heapq
import itertools
import selectors
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from .models import FaultCounters, Impairment
from .pcap import PcapWriter
from .scenario import Link, Scenario, as_impairment

__all__ = ["ProxyStats", "UdpProxy", "parse_hostport"]

_BATCH = 1024  # datagrams drained from one socket before looking at the others
_BUFFER = 4 * 1024 * 1024
_SWEEP_INTERVAL = 1.0  # seconds between idle-client sweeps (kept off the per-wake path)


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
    clients: int = 0
    clients_expired: int = 0
    clients_refused: int = 0
    rebinds: int = 0
    send_errors: int = 0
    strays: int = 0  #: datagrams to an upstream socket from anyone but the server
    up: FaultCounters = field(default_factory=FaultCounters)
    down: FaultCounters = field(default_factory=FaultCounters)

    def as_dict(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__ if k not in ("up", "down")}
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
    """A fault-injecting UDP relay. Use as a context manager or ``start()``/``stop()``."""

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
        max_clients: int = 4096,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if scenario is not None and (up is not None or down is not None):
            raise ValueError("give either a scenario or up/down impairments, not both")
        if rebind_every is not None and rebind_every <= 0:
            raise ValueError("rebind_every must be a positive number of seconds")
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
        self._max_clients = max_clients
        self._clients: dict[tuple[Any, ...], _Client] = {}
        self._heap: list[tuple[float, int, bool, tuple[Any, ...], bytes]] = []
        self._order = itertools.count()
        self._pcap_in = PcapWriter(pcap_in) if pcap_in else None
        self._pcap_out = PcapWriter(pcap_out) if pcap_out else None
        self.stats = ProxyStats()
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._fast = self.up_link.is_clean and self.down_link.is_clean
        self._next_sweep = 0.0

    # ------------------------------------------------------------- lifecycle

    @property
    def address(self) -> tuple[Any, ...]:
        """Where clients send: the bound listen address."""
        return tuple(self._listen.getsockname()[:2])

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
        """Stop relaying, close sockets and captures. Idempotent."""
        self._stop.set()
        try:
            self._wake_w.send(b"\0")
        except OSError:
            pass
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(5)
        for client in list(self._clients.values()):
            self._close_client(client)
        for s in (self._listen, self._wake_r, self._wake_w):
            s.close()
        self._selector.close()
        for writer in (self._pcap_in, self._pcap_out):
            if writer is not None:
                writer.close()
        self.stats.up = self.up_link.counters
        self.stats.down = self.down_link.counters

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
        return self.stats

    # ------------------------------------------------------------------ loop

    def _run(self) -> None:
        select = self._selector.select
        while not self._stop.is_set():
            timeout = 1.0
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
        except (BlockingIOError, InterruptedError):
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
        if len(self._clients) >= self._max_clients:
            self.stats.clients_refused += 1
            return None
        client = _Client(addr, self._open_upstream(), now, now)
        self._clients[addr] = client
        self._selector.register(client.upstream, selectors.EVENT_READ, client)
        self.stats.clients += 1
        return client

    def _open_upstream(self) -> socket.socket:
        sock = socket.socket(self._forward_family, socket.SOCK_DGRAM)
        _tune(sock)
        sock.bind((self._upstream_host, 0))
        sock.setblocking(False)
        return sock

    def _housekeeping(self, now: float) -> None:
        if now < self._next_sweep:
            return
        self._next_sweep = now + _SWEEP_INTERVAL
        for client in list(self._clients.values()):
            if now - client.last_seen > self._idle_timeout:
                self._close_client(client)
                del self._clients[client.address]
                self.stats.clients_expired += 1

    def _rebind(self, client: _Client, now: float) -> None:
        """NAT rebinding: the client's traffic now leaves from a new source port."""
        old = client.upstream
        self._selector.unregister(old)
        old.close()  # replies to the old port now bounce, as behind a real NAT
        client.upstream = self._open_upstream()
        client.bound_at = now
        self._selector.register(client.upstream, selectors.EVENT_READ, client)
        self.stats.rebinds += 1

    def _close_client(self, client: _Client) -> None:
        try:
            self._selector.unregister(client.upstream)
        except (KeyError, ValueError, OSError):
            pass
        client.upstream.close()


def _seed(seed: int | None, offset: int) -> int | None:
    return None if seed is None else seed * 2 + offset


def _tune(sock: socket.socket) -> None:
    for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, option, _BUFFER)
        except OSError:
            pass
