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

Replies from another port. Some servers answer from a port other than the
one the client wrote to (TFTP answers from a fresh port per transfer; some
SIP, RTP and STUN servers do too). ``replies`` says what the proxy does with
a datagram that reaches a client's upstream socket from the server's host
but another port: ``"learn"`` (the default) relays it and sends the client's
next datagrams to that address, as the client itself would had it talked to
the server directly; ``"relay"`` relays it but keeps sending to ``forward``;
``"strict"`` drops it as a stray. Datagrams from any other host are strays in
every mode.

Captures: ``pcap_in`` records what the proxy received, ``pcap_out`` what it
sent, both directions, before and after impairment. ``capture`` writes one
pcapng with an interface per leg — *client leg* (client <-> the proxy's
listen address) and *server leg* (the client's upstream socket <-> the
server) — so each datagram appears once per leg it crossed, each leg is one
UDP conversation Wireshark can follow, and every record carries the fault
decision as a packet comment. Wildcard binds are recorded with the concrete
address the kernel routes from, never ``0.0.0.0``/``::``.

Per-client links. Each client gets its own pair of :class:`Link` objects
seeded by its admission order (:func:`netem.seeds.stream_seed`), so one noisy
client cannot shift another's faults: client 1 sees the same decisions however
much client 0 sends. (Pass ready-made ``Link`` objects instead of specs and all
clients share them.)

Changing faults at run time. :meth:`UdpProxy.set`, :meth:`~UdpProxy.clear`,
:meth:`~UdpProxy.partition`, :meth:`~UdpProxy.heal` and the
:meth:`~UdpProxy.faults` context manager change the rules for all clients or,
with ``client=``, for one (``"host:port"``, or ``"host"`` for every port of a
host). Rules are resolved per field, most specific first: the client's exact
address, then its host, then the all-clients rule, then what the proxy was
started with. Every change runs on the relay thread between datagrams (the
caller waits until it is in force), so the thread stays the only one touching
the links. :mod:`netem.control` serves the same calls over loopback HTTP.

Logging (logger ``netem.proxy``; silent unless configured): INFO when the
proxy starts and stops, takes on a client, and when faults change while it
runs; WARNING the first time a client is refused for each reason (later ones
at DEBUG, so a flood cannot flood the log); DEBUG for expiries and rebinds;
ERROR, with the traceback, if the relay thread dies.
"""

from __future__ import annotations

import contextlib
import copy
import errno
import heapq
import ipaddress
import itertools
import logging
import os
import selectors
import socket
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from .control import ControlServer
from .models import FaultCounters, Impairment
from .pcap import INBOUND, OUTBOUND, PcapngWriter, PcapWriter
from .scenario import Link, LinkState, Scenario, as_impairment
from .seeds import DIRECTIONS, stream_seed
from .spec import format_spec

try:
    import resource
except ImportError:  # pragma: no cover - not on Windows
    resource = None  # type: ignore[assignment]

_log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_MAX_CLIENTS",
    "ProxyFailed",
    "ProxyStats",
    "UdpProxy",
    "fd_client_limit",
    "parse_client",
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
REPLY_MODES = ("learn", "relay", "strict")  #: what to do with replies from another server port
CLIENT_LEG, SERVER_LEG = 0, 1  #: the capture's interfaces


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
    strays: int = 0  #: datagrams to an upstream socket from another host (or port, if strict)
    #: replies relayed from a server port other than ``forward``'s (``replies`` not strict)
    other_port_replies: int = 0
    up: FaultCounters = field(default_factory=FaultCounters)
    down: FaultCounters = field(default_factory=FaultCounters)

    def as_dict(self) -> dict[str, Any]:
        """Every counter of the proxy (both directions), for JSON."""
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
    up: Link
    down: Link
    server: tuple[Any, ...]  #: where its datagrams go: ``forward``, or a learned reply address
    index: int = 0  #: admission order (its decision streams' number)
    sent: dict[str, int] = field(default_factory=lambda: {"up": 0, "down": 0})  #: for captures


@dataclass(slots=True)
class _Rule:
    """One direction of a runtime rule; ``None`` fields defer to a less specific rule."""

    impairment: Impairment | None = None
    partitioned: bool | None = None


#: A rule's scope: ``None`` (every client), ``(host,)`` or ``(host, port)``.
ClientKey = tuple[Any, ...] | None


def parse_client(value: str | tuple[Any, ...]) -> tuple[Any, ...]:
    """A client selector: ``"host:port"``, ``"[v6]:port"``, ``(host, port)`` or a bare ``"host"``.

    Returns ``(host, port)`` or ``(host,)`` with the host in canonical form.
    """
    if isinstance(value, tuple):
        parts: tuple[Any, ...] = (value[0],) if len(value) == 1 else (value[0], int(value[1]))
    else:
        text = value.strip()
        bare_v6 = text.count(":") > 1 and not text.startswith("[")
        parts = (text.strip("[]"),) if bare_v6 or ":" not in text else parse_hostport(text)
    return (_canonical_host(str(parts[0])), *parts[1:])


def _canonical_host(host: str) -> str:
    try:
        return ipaddress.ip_address(host.split("%")[0]).compressed
    except ValueError:
        raise ValueError(
            f"bad client {host!r}: give an IP address, optionally with a port "
            f"(127.0.0.1:5000, [::1]:5000)"
        ) from None


class UdpProxy:
    """A fault-injecting UDP relay. Use as a context manager or ``start()``/``stop()``.

    ``idle_timeout`` (seconds) closes a client's upstream socket after that long
    without a datagram from it (120 s: RFC 4787 REQ-5's floor for a NAT's UDP
    mapping). ``max_clients`` caps the clients held at once; by default it is
    :data:`DEFAULT_MAX_CLIENTS` or what :func:`fd_client_limit` leaves, whichever
    is lower. An explicit cap above the descriptor limit is honoured with a
    ``RuntimeWarning``: clients beyond the limit are refused as ``EMFILE``.

    ``control="127.0.0.1:0"`` serves :mod:`netem.control`'s HTTP/JSON API on
    that loopback address while the proxy runs (off by default; it has no
    authentication, so only loopback addresses are accepted).
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
        control: str | tuple[str, int] | None = None,
        replies: str = "learn",
        capture: str | Path | None = None,
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
        if replies not in REPLY_MODES:
            raise ValueError(f"replies must be one of {', '.join(REPLY_MODES)}, got {replies!r}")
        self._replies = replies
        listen_addr = parse_hostport(listen)
        self._forward_text = parse_hostport(forward)
        self._seed = seed
        self._scenario = scenario
        self._shared: tuple[Link, Link] | None = None
        if isinstance(up, Link) or isinstance(down, Link):
            self._shared = (
                up
                if isinstance(up, Link)
                else Link(as_impairment(up), seed=stream_seed(seed, "up")),
                down
                if isinstance(down, Link)
                else Link(as_impairment(down), seed=stream_seed(seed, "down")),
            )
        self._base = {
            "up": as_impairment(up if not isinstance(up, Link) else None),
            "down": as_impairment(down if not isinstance(down, Link) else None),
        }
        self._epoch: float | None = None
        # the configuration's own links, for is_clean; clients get fresh ones
        self._config_links = self._links_for(0)
        self._rules: dict[ClientKey, dict[str, _Rule]] = {}
        self._control: list[tuple[Callable[[], Any], threading.Event, list[Any]]] = []
        self._control_lock = threading.Lock()
        self._retired = {"up": FaultCounters(), "down": FaultCounters()}
        self._clients_lock = threading.Lock()  # admission/expiry vs. snapshot()
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
        # (release, order, upward, client, datagram, capture note, what was sent if damaged)
        self._heap: list[
            tuple[float, int, bool, tuple[Any, ...], bytes, str | None, bytes | None]
        ] = []
        self._order = itertools.count()
        self._pcap_in = PcapWriter(pcap_in) if pcap_in else None
        self._pcap_out = PcapWriter(pcap_out) if pcap_out else None
        self._capture = PcapngWriter(capture, ("client leg", "server leg")) if capture else None
        self._route_cache: dict[tuple[Any, ...], str] = {}
        self.stats = ProxyStats()
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._stop = threading.Event()
        self._done = threading.Event()
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._fast = self._all_clean()
        self._next_sweep = 0.0
        self._stopped_logged = False
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
        self._control_server: ControlServer | None = None
        if control is not None:
            try:
                self._control_server = ControlServer(self, parse_hostport(control))
            except BaseException:
                self._close_sockets()
                raise

    def _close_sockets(self) -> None:
        for s in (self._listen, self._wake_r, self._wake_w):
            s.close()
        self._selector.close()
        for writer in (self._pcap_in, self._pcap_out, self._capture):
            if writer is not None:
                writer.close()

    @property
    def control_address(self) -> tuple[str, int] | None:
        """Where the control endpoint listens (``control=``), or ``None`` when off."""
        return None if self._control_server is None else self._control_server.address

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
        """Start relaying on a background thread; returns ``self`` (also a context manager)."""
        if self._thread is None:
            now = self._clock()
            self._epoch = now
            if self._shared is not None:
                for link in self._shared:
                    link.start(now)
            self._listen.setblocking(False)
            self._wake_r.setblocking(False)
            self._selector.register(self._listen, selectors.EVENT_READ, None)
            self._selector.register(self._wake_r, selectors.EVENT_READ, "wake")
            self._thread = threading.Thread(target=self._run, name="netem-proxy", daemon=True)
            self._thread.start()
            _log.info(
                "relaying %s -> %s (up: %s; down: %s)",
                _format(self.address),
                _format(self.forward),
                format_spec(self._base["up"]) or "clean",
                format_spec(self._base["down"]) or "clean",
            )
            if self._control_server is not None:
                self._control_server.start()
        return self

    def stop(self) -> None:
        """Stop relaying, close sockets and captures. Idempotent.

        Raises :class:`ProxyFailed` (after closing everything) if the relay
        thread had stopped on an error, so a failure is never lost.
        """
        if self._control_server is not None:
            self._control_server.stop()
        self._stop.set()
        try:
            self._wake_w.send(b"\0")
        except OSError:
            pass
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(5)
        with self._clients_lock:
            for client in list(self._clients.values()):
                self._close_client(client)
            self._clients.clear()
        self._close_sockets()
        self.stats.up, self.stats.down = self._counters()
        self.stats.clients_active = 0
        if self._thread is not None and not self._stopped_logged:
            self._stopped_logged = True
            _log.info(
                "stopped after %d clients; up: %d datagrams seen, %d dropped; "
                "down: %d seen, %d dropped",
                self.stats.clients,
                self.stats.up.seen,
                self.stats.up.dropped,
                self.stats.down.seen,
                self.stats.down.dropped,
            )
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
        with self._clients_lock:
            self.stats.up, self.stats.down = self._counters()
            self.stats.clients_active = len(self._clients)
        return self.stats

    def client_counters(self) -> dict[str, dict[str, FaultCounters]]:
        """Each active client's own link counters: ``{"host:port": {"up": ..., "down": ...}}``."""
        with self._clients_lock:
            return {
                _format(c.address): {"up": c.up.counters, "down": c.down.counters}
                for c in self._clients.values()
            }

    def _counters(self) -> tuple[FaultCounters, FaultCounters]:
        if self._shared is not None:
            return self._shared[0].counters, self._shared[1].counters
        up, down = self._retired["up"], self._retired["down"]
        for client in self._clients.values():
            up = up.merge(client.up.counters)
            down = down.merge(client.down.counters)
        return up, down

    # --------------------------------------------------------- runtime faults

    def set(
        self,
        spec: Impairment | str | None = None,
        *,
        up: Impairment | str | None = None,
        down: Impairment | str | None = None,
        direction: str = "both",
        client: str | tuple[Any, ...] | None = None,
    ) -> None:
        """Put new faults in force from the next datagram on (they replace the start-up ones).

        ``spec`` goes to ``direction`` (``"up"``, ``"down"`` or ``"both"``);
        ``up=``/``down=`` set each direction on its own. ``client`` limits the
        change to one client (``"host:port"``) or host (``"host"``), sparing the
        others. Returns once the change is in force.
        """
        changes: dict[str, Impairment] = {}
        if spec is not None:
            for name in _directions(direction):
                changes[name] = as_impairment(spec)
        if up is not None:
            changes["up"] = as_impairment(up)
        if down is not None:
            changes["down"] = as_impairment(down)
        if not changes:
            raise ValueError("set() needs a spec (or up=/down=): what should the link do?")
        key = self._key(client)

        def change() -> None:
            for name, imp in changes.items():
                self._rule(key, name).impairment = imp

        self._run_control(change)
        for name, imp in changes.items():
            _log.info("%s%s: now %s", name, _whom(key), format_spec(imp) or "clean")

    def clear(self, *, client: str | tuple[Any, ...] | None = None) -> None:
        """Remove faults: every client clean and healed (or, with ``client``, drop its rules)."""
        key = self._key(client)

        def change() -> None:
            if key is None:
                self._rules = {None: {d: _Rule(Impairment(), False) for d in DIRECTIONS}}
            else:
                self._rules.pop(key, None)

        self._run_control(change)
        _log.info("faults cleared%s", _whom(key))

    def partition(
        self, direction: str = "both", *, client: str | tuple[Any, ...] | None = None
    ) -> None:
        """Cut ``direction`` (``"up"``: client to server; ``"down"``; ``"both"``) until healed."""
        names = _directions(direction)
        key = self._key(client)

        def change() -> None:
            for name in names:
                self._rule(key, name).partitioned = True

        self._run_control(change)
        _log.info("partitioned %s%s", "/".join(names), _whom(key))

    def heal(self, direction: str = "both", *, client: str | tuple[Any, ...] | None = None) -> None:
        """End partitions in ``direction``: everyone's (or, with ``client``, that client's)."""
        names = _directions(direction)
        key = self._key(client)

        def change() -> None:
            for name in names:
                self._rule(key, name).partitioned = False
                if key is None:
                    for rules in self._rules.values():
                        if name in rules and rules is not self._rules[None]:
                            rules[name].partitioned = None

        self._run_control(change)
        _log.info("healed %s%s", "/".join(names), _whom(key))

    @contextlib.contextmanager
    def faults(
        self,
        spec: Impairment | str | None = None,
        *,
        direction: str = "both",
        partition: bool = False,
        client: str | tuple[Any, ...] | None = None,
    ) -> Iterator[UdpProxy]:
        """Apply ``spec`` (and/or a partition) for a ``with`` block, then put the rules back."""
        before = self._run_control(lambda: copy.deepcopy(self._rules), sync=False)
        try:
            if spec is not None:
                self.set(spec, direction=direction, client=client)
            if partition:
                self.partition(direction, client=client)
            yield self
        finally:

            def restore() -> None:
                self._rules = before

            self._run_control(restore)

    def faults_in_force(self) -> dict[str, Any]:
        """The rules now in force, as JSON-ready data (what ``rmsg netem ctl get`` shows)."""

        def describe() -> dict[str, Any]:
            out: dict[str, Any] = {"clients": {}}
            for name in DIRECTIONS:
                out[name] = self._describe(self._effective(None, name), name)
            for key, rules in self._rules.items():
                if key is not None:
                    out["clients"][_format(key)] = {
                        name: {
                            "spec": None if r.impairment is None else format_spec(r.impairment),
                            "partitioned": r.partitioned,
                        }
                        for name, r in rules.items()
                    }
            return out

        result: dict[str, Any] = self._run_control(describe, sync=False)
        return result

    def _describe(self, state: LinkState, name: str) -> dict[str, Any]:
        if state.impairment is not None:
            spec: str | None = format_spec(state.impairment)
        elif self._scenario is not None:
            spec = None
        else:
            spec = format_spec(self._base[name])
        return {
            "spec": spec,
            "scenario": state.impairment is None and self._scenario is not None,
            "partitioned": state.partitioned,
        }

    def _key(self, client: str | tuple[Any, ...] | None) -> ClientKey:
        if client is None:
            return None
        if self._shared is not None:
            raise ValueError(
                "per-client rules need specs, not Link objects: this proxy's clients share "
                "one pair of links"
            )
        return parse_client(client)

    def _rule(self, key: ClientKey, direction: str) -> _Rule:
        return self._rules.setdefault(key, {}).setdefault(direction, _Rule())

    def _effective(self, address: tuple[Any, ...] | None, direction: str) -> LinkState:
        """The runtime state for a client at ``address`` (``None``: a client no rule names)."""
        keys: list[ClientKey] = []
        if address is not None:
            host = _canonical_host(str(address[0]))
            keys = [(host, int(address[1])), (host,)]
        keys.append(None)
        impairment: Impairment | None = None
        partitioned: bool | None = None
        for key in keys:
            rule = self._rules.get(key, {}).get(direction)
            if rule is None:
                continue
            if impairment is None:
                impairment = rule.impairment
            if partitioned is None:
                partitioned = rule.partitioned
        return LinkState(impairment, bool(partitioned))

    def _sync(self, client: _Client) -> None:
        for name, link in (("up", client.up), ("down", client.down)):
            link.restore(self._effective(client.address, name))

    def _all_clean(self) -> bool:
        """Whether no client, present or future, has anything impaired (the fast path)."""
        for name, config in zip(DIRECTIONS, self._config_links, strict=True):
            state = self._effective(None, name)
            base_clean = config.is_clean if state.impairment is None else state.impairment.is_clean
            if state.partitioned or not base_clean:
                return False
        for key, rules in self._rules.items():
            if key is None:
                continue
            for rule in rules.values():
                if rule.partitioned or (
                    rule.impairment is not None and not rule.impairment.is_clean
                ):
                    return False
        return all(c.up.is_clean and c.down.is_clean for c in self._clients.values())

    def _run_control(self, action: Callable[[], Any], *, sync: bool = True) -> Any:
        """Run ``action`` on the relay thread between datagrams (directly if none runs)."""

        def job() -> Any:
            result = action()
            if sync:
                if self._shared is not None:
                    for name, link in zip(DIRECTIONS, self._shared, strict=True):
                        link.restore(self._effective(None, name))
                for client in self._clients.values():
                    self._sync(client)
                self._fast = self._all_clean()
            return result

        thread = self._thread
        if thread is None or self._done.is_set():
            if self._error is not None:
                raise ProxyFailed(self._error)
            return job()
        done = threading.Event()
        box: list[Any] = []
        with self._control_lock:
            self._control.append((job, done, box))
        try:
            self._wake_w.send(b"\0")
        except OSError:
            pass
        while not done.wait(0.05):
            if self._done.is_set():
                if self._error is not None:
                    raise ProxyFailed(self._error)
                return job()  # stopped meanwhile: nobody else touches the links now
        if box and isinstance(box[0], BaseException):
            raise box[0]
        return box[1] if len(box) > 1 else None

    def _run_controls(self) -> None:
        with self._control_lock:
            jobs, self._control = self._control, []
        for job, done, box in jobs:
            try:
                box[:] = [None, job()]
            except Exception as exc:  # a bad control request must not stop the relay
                box[:] = [exc]
            done.set()

    def _links_for(self, index: int) -> tuple[Link, Link]:
        """Fresh links for the ``index``-th client (or the shared pair)."""
        if self._shared is not None:
            return self._shared
        if self._scenario is not None:
            up, down = self._scenario.links(self._seed, client=index)
        else:
            up = Link(self._base["up"], seed=stream_seed(self._seed, "up", index))
            down = Link(self._base["down"], seed=stream_seed(self._seed, "down", index))
        if self._epoch is not None:  # timelines run from the proxy's start, for everyone
            up.start(self._epoch)
            down.start(self._epoch)
        return up, down

    # ------------------------------------------------------------------ loop

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # recorded, then raised by wait() and stop()
            self._error = exc
            _log.error("relay thread stopped on an error", exc_info=exc)
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
                    if self._control:
                        self._run_controls()
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
        now = self._clock()
        received = sent = 0
        last_addr: Any = None
        send: Any = None
        dest: Any = None
        try:
            for _ in range(_BATCH):
                data, addr = recv(65535)
                received += 1
                if addr != last_addr:
                    client = self._client_for(addr, now)
                    if client is None:
                        continue
                    last_addr, send, dest = addr, client.upstream.sendto, client.server
                try:
                    send(data, dest)
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
                if addr[:2] != forward and not self._accept_reply(client, addr):
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

    def _accept_reply(self, client: _Client, addr: tuple[Any, ...]) -> bool:
        """Whether a datagram from ``addr`` (not ``forward``) is the server's reply;
        in ``learn`` mode the client's next datagrams then go to ``addr``."""
        source = tuple(addr[:2])
        if source == self.forward:
            return True
        if self._replies == "strict" or source[0] != self.forward[0]:
            self.stats.strays += 1
            return False
        self.stats.other_port_replies += 1
        if self._replies == "learn":
            client.server = source
        return True

    @property
    def _plain(self) -> bool:
        """Clean links and nothing recorded: the batch fast paths apply."""
        return (
            self._fast
            and self._pcap_in is None
            and self._pcap_out is None
            and self._capture is None
        )

    def _from_clients(self) -> None:
        if self._plain:
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
            self._impair(client, "up", data, now, fast)

    def _from_server(self, client: _Client) -> None:
        if self._plain:
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
            source = tuple(addr[:2])
            if source != self.forward and not self._accept_reply(client, source):
                continue
            stats.down_received += 1
            now = self._clock()
            if self._pcap_in is not None:
                self._pcap_in.write(time.time(), source, client.address, data)
            self._impair(client, "down", data, now, self._fast, source)

    def _impair(
        self,
        client: _Client,
        direction: str,
        data: bytes,
        now: float,
        fast: bool,
        source: tuple[Any, ...] | None = None,
    ) -> None:
        """Put ``data`` through the client's ``direction`` link: send what is due now,
        hold the rest; with ``capture``, record the arrival leg with its decision."""
        upward = direction == "up"
        link = client.up if upward else client.down
        capture = self._capture
        before = link.counters if capture is not None and not fast else None
        fates = [(now, data)] if fast else link.apply(data, now)
        label = ""
        if capture is not None:
            number = client.sent[direction]
            client.sent[direction] = number + 1
            label = f"{direction} client {client.index} #{number}"
            verdict = (
                _verdict(before, link.counters, fates, now) if before is not None else "clean link"
            )
            if upward:
                src, dst, leg, flag = client.address, self._client_side(client), CLIENT_LEG, INBOUND
            else:
                local = self._server_side(client)
                src, dst, leg, flag = source or client.server, local, SERVER_LEG, INBOUND
            capture.write(
                time.time(), leg, src, dst, data, direction=flag, comment=f"{label}: {verdict}"
            )
        count = len(fates)
        for copy_no, (release, datagram) in enumerate(fates, 1):
            note = None
            # a copy damaged on the way is captured with the checksum of what was sent
            sent_as = data if datagram is not data and datagram != data else None
            if capture is not None:
                note = _copy_note(label, copy_no, count, release - now, sent_as is not None)
            if release <= now:
                self._send(upward, client, datagram, note, sent_as)
            else:
                key = client.address
                heapq.heappush(
                    self._heap, (release, next(self._order), upward, key, datagram, note, sent_as)
                )

    def _release(self, now: float) -> None:
        heap = self._heap
        while heap and heap[0][0] <= now:
            _, _, upward, addr, datagram, note, sent_as = heapq.heappop(heap)
            client = self._clients.get(addr)
            if client is not None:
                self._send(upward, client, datagram, note, sent_as)
            elif not upward:  # expired meanwhile: the reply still finds its way back
                self._send_down(addr, datagram, sent_as=sent_as)

    def _send(
        self,
        upward: bool,
        client: _Client,
        data: bytes,
        note: str | None,
        sent_as: bytes | None = None,
    ) -> None:
        if upward:
            self._send_up(client, data, note, sent_as)
        else:
            self._send_down(client.address, data, note, client, sent_as)

    def _send_up(
        self,
        client: _Client,
        data: bytes,
        note: str | None = None,
        sent_as: bytes | None = None,
    ) -> None:
        try:
            client.upstream.sendto(data, client.server)
        except OSError:
            self.stats.send_errors += 1
            return
        self.stats.up_sent += 1
        if self._pcap_out is not None or self._capture is not None:
            local = self._server_side(client)
            if self._pcap_out is not None:
                self._pcap_out.write(time.time(), local, client.server, data, checksum_of=sent_as)
            if self._capture is not None:
                self._capture.write(
                    time.time(),
                    SERVER_LEG,
                    local,
                    client.server,
                    data,
                    direction=OUTBOUND,
                    comment=note,
                    checksum_of=sent_as,
                )

    def _send_down(
        self,
        addr: tuple[Any, ...],
        data: bytes,
        note: str | None = None,
        client: _Client | None = None,
        sent_as: bytes | None = None,
    ) -> None:
        try:
            self._listen.sendto(data, addr)
        except OSError:
            self.stats.send_errors += 1
            return
        self.stats.down_sent += 1
        if self._pcap_out is not None:
            local = self._local_toward(addr, self.address)
            self._pcap_out.write(time.time(), local, addr, data, checksum_of=sent_as)
        if self._capture is not None:
            local = self._local_toward(addr, self.address)
            self._capture.write(
                time.time(),
                CLIENT_LEG,
                local,
                addr,
                data,
                direction=OUTBOUND,
                comment=note,
                checksum_of=sent_as,
            )

    # ----------------------------------------------------------- addresses

    def _client_side(self, client: _Client) -> tuple[Any, ...]:
        """The proxy's address as the client sees it (its listen address, made concrete)."""
        return self._local_toward(client.address, self.address)

    def _server_side(self, client: _Client) -> tuple[Any, ...]:
        """The client's upstream address as the server sees it (made concrete)."""
        return self._local_toward(client.server, tuple(client.upstream.getsockname()[:2]))

    def _local_toward(self, peer: tuple[Any, ...], bound: tuple[Any, ...]) -> tuple[Any, ...]:
        """``bound`` with a wildcard host replaced by the address the kernel routes
        from toward ``peer`` (so captures never show 0.0.0.0 or ::)."""
        host = str(bound[0])
        if host not in ("0.0.0.0", "::"):
            return bound
        key = (peer[0],)
        concrete = self._route_cache.get(key)
        if concrete is None:
            family = socket.AF_INET6 if ":" in str(peer[0]) else socket.AF_INET
            probe = socket.socket(family, socket.SOCK_DGRAM)
            try:
                probe.connect((peer[0], peer[1] or 9))  # UDP connect sends nothing
                concrete = str(probe.getsockname()[0])
            except OSError:
                concrete = host
            finally:
                probe.close()
            self._route_cache[key] = concrete
        return (concrete, bound[1])

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
            self._refuse(REFUSED_CAP, addr)
            return None
        try:
            upstream = self._open_upstream()
        except OSError as exc:  # EMFILE, ENFILE, ENOBUFS, no ephemeral port...
            self._refuse(_reason(exc), addr)
            return None
        index = self.stats.clients
        up, down = self._links_for(index)
        client = _Client(addr, upstream, now, now, up, down, self.forward, index)
        try:
            self._selector.register(upstream, selectors.EVENT_READ, client)
        except OSError as exc:  # epoll out of memory or watches
            upstream.close()
            self._refuse(_reason(exc), addr)
            return None
        self._sync(client)
        with self._clients_lock:
            self._clients[addr] = client
            self.stats.clients += 1
        _log.info("new client %s (client #%d)", _format(addr), index + 1)
        return client

    def _refuse(self, reason: str, addr: tuple[Any, ...]) -> None:
        first = reason not in self.stats.refused
        self.stats.clients_refused += 1
        self.stats.refused[reason] = self.stats.refused.get(reason, 0) + 1
        _log.log(
            logging.WARNING if first else logging.DEBUG,
            "refused client %s: %s%s",
            _format(addr),
            reason,
            " (further refusals for this reason are logged at DEBUG)" if first else "",
        )

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
                with self._clients_lock:
                    self._close_client(client)
                    del self._clients[client.address]
                    self.stats.clients_expired += 1
                _log.debug("client %s expired (idle)", _format(client.address))

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
        _log.debug("client %s rebound to a new upstream port", _format(client.address))

    def _close_client(self, client: _Client) -> None:
        if self._shared is None:  # its faults still count once it is gone
            self._retired["up"] = self._retired["up"].merge(client.up.counters)
            self._retired["down"] = self._retired["down"].merge(client.down.counters)
        try:
            self._selector.unregister(client.upstream)
        except (KeyError, ValueError, OSError):
            pass
        client.upstream.close()


def _verdict(
    before: FaultCounters, after: FaultCounters, fates: list[tuple[float, bytes]], now: float
) -> str:
    """One datagram's fault decision, from its link's counters before and after it."""
    if not fates:
        for reason in ("partition", "mtu", "queue", "loss", "checksum"):
            if getattr(after, f"dropped_{reason}") > getattr(before, f"dropped_{reason}"):
                return f"dropped ({reason})"
        return "dropped"
    parts = [f"{len(fates)} copies" if len(fates) > 1 else "1 copy"]
    delays = ", ".join(f"{(release - now) * 1000:.3f}" for release, _ in fates)
    parts.append(f"delay {delays} ms")
    lost = after.dropped - before.dropped
    for name, count in (
        ("lost copies", lost),
        ("corrupted", after.corrupted - before.corrupted),
        ("reordered", after.reordered - before.reordered),
        ("replayed", after.replayed - before.replayed),
    ):
        if count:
            parts.append(name if count == 1 and name != "lost copies" else f"{name} {count}")
    return "; ".join(parts)


def _copy_note(label: str, copy_no: int, count: int, delay: float, changed: bool) -> str:
    """The comment on one released copy, on the leg it leaves by."""
    note = f"{label} copy {copy_no}/{count}: delayed {delay * 1000:.3f} ms"
    return note + ", corrupted" if changed else note


def _reason(exc: OSError) -> str:
    """The errno name of a failure (``EMFILE``), for the ``refused`` counters."""
    return errno.errorcode.get(exc.errno or 0, type(exc).__name__)


def _directions(direction: str) -> tuple[str, ...]:
    if direction == "both":
        return DIRECTIONS
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be up, down or both, got {direction!r}")
    return (direction,)


def _whom(key: ClientKey) -> str:
    return "" if key is None else f" for {_format(key)}"


def _format(key: tuple[Any, ...]) -> str:
    host = str(key[0])
    if len(key) == 1:
        return host
    return f"[{host}]:{key[1]}" if ":" in host else f"{host}:{key[1]}"


def _tune(sock: socket.socket) -> None:
    for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, option, _BUFFER)
        except OSError:
            pass
