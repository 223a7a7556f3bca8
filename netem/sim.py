"""A deterministic simulated network for sans-I/O protocol code.

Hosts are objects with the four-method sans-I/O surface (:class:`SansIOHost`:
``receive_datagram``, ``datagrams_to_send``, ``get_timer``, ``handle_timer``),
which :class:`reliable.Endpoint` has and any user's protocol object can have.
The network keeps a virtual clock and one event queue of datagram arrivals and
host timers; nothing sleeps, so simulated minutes pass in milliseconds of CPU.
Each directed link applies its own seeded :class:`~netem.models.FaultModel`,
so a run is a pure function of the seed and the hosts' behaviour. Links are
seeded as every carrier seeds them (:mod:`netem.seeds`): the k-th pair of hosts
to use (or configure) a link is conversation k, and the direction the pair
first used is *up* — so two hosts that talk as a client and a server through
the proxy see the same decisions here under the same seed.

Faults change mid-run with :meth:`SimNetwork.set`, :meth:`~SimNetwork.clear`,
:meth:`~SimNetwork.partition` (from now until healed, or between two times),
:meth:`~SimNetwork.heal` and the :meth:`~SimNetwork.faults` context manager —
call them from test code between ``run`` calls or from a ``call_at`` action.

Hosts misbehave as real processes do, deterministically:

* :meth:`~SimNetwork.pause` stops a host for a while (a GC pause, SIGSTOP, a
  VM migration): nothing it is sent is read, none of its timers fire and its
  ``call_at`` steps wait. Datagrams queue as in a socket buffer (bounded by
  ``backlog``); when it resumes it reads them all in arrival order, runs the
  deferred steps, then its overdue timer, all at the resume time.
* :meth:`~SimNetwork.set_clock` gives a host its own clock — an offset from
  the network's and a drift rate. Every ``now`` the host is handed, and every
  deadline it returns from ``get_timer``, is on its clock; the network
  converts. A host's clock never runs backwards unless ``set_clock`` steps it
  back.
* :meth:`~SimNetwork.crash` and :meth:`~SimNetwork.restart` script a crash
  (the host vanishes: datagrams to it and its timers are lost) and a restart
  (a fresh host from a factory, on the same address and clock);
  :meth:`~SimNetwork.lives` lists every host an address has had.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
from collections.abc import Callable, Hashable, Iterator, MutableSet
from dataclasses import dataclass, field
from typing import Any, Protocol

from .models import Impairment
from .scenario import Link, Scenario, Window, as_impairment
from .seeds import stream_seed

__all__ = ["SansIOHost", "SimNetwork"]


class SansIOHost(Protocol):
    """What the simulated network needs from a host."""

    def receive_datagram(self, data: bytes, addr: Any, now: float) -> None:
        """Take one datagram from ``addr`` that arrived at virtual time ``now``."""

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, Any]]:
        """Everything the host wants sent now, as ``(bytes, address)`` pairs."""
        ...

    def get_timer(self) -> float | None:
        """When the host next needs :meth:`handle_timer` (virtual time), ``None``: never."""
        ...

    def handle_timer(self, now: float) -> None:
        """Run what was due by ``now``."""


_ARRIVAL = 0
_TIMER = 1
_CALL = 2


@dataclass(slots=True)
class _Pause:
    """A host that has stopped: what it was sent and asked to do meanwhile."""

    end: float | None  #: when it resumes by itself (``None``: at :meth:`SimNetwork.resume`)
    backlog: int | None  #: datagrams its socket buffer holds; more are lost
    held: list[tuple[int, Any]] = field(default_factory=list)  #: (kind, payload) in order
    arrivals: int = 0  #: datagrams in ``held``


@dataclass(slots=True)
class _Clock:
    """A host's clock: ``local(t) = t + offset + (t - since) * drift``."""

    since: float
    offset: float
    drift: float
    last: float = float("-inf")  #: the latest local time handed out (kept monotonic)

    def local(self, t: float) -> float:
        return t + self.offset + (t - self.since) * self.drift

    def network(self, local: float) -> float:
        return self.since + (local - self.since - self.offset) / (1.0 + self.drift)


class SimNetwork:
    """Virtual-time network of sans-I/O hosts joined by faulty directed links."""

    def __init__(
        self,
        *,
        seed: int = 0,
        latency: float = 0.0005,
        default: Impairment | str | None = None,
    ) -> None:
        self.now = 0.0
        self.latency = latency
        self._seed = seed
        self._default = as_impairment(default)
        self._hosts: dict[Hashable, SansIOHost] = {}
        self._links: dict[tuple[Hashable, Hashable], Link] = {}
        self._queue: list[tuple[float, int, int, Any]] = []
        self._order = itertools.count()
        self._timer_at: dict[Hashable, float | None] = {}
        self._groups: dict[Hashable, MutableSet[Hashable]] = {}
        self._pairs: dict[frozenset[Hashable], tuple[int, Hashable]] = {}
        self._paused: dict[Hashable, _Pause] = {}
        self._clocks: dict[Hashable, _Clock] = {}
        self._lives: dict[Hashable, list[SansIOHost]] = {}
        self.undeliverable = 0  #: datagrams to an address with no host (crashed, never added)
        self.overflowed = 0  #: datagrams lost because a paused host's backlog was full
        self.crashes = 0
        self.events_processed = 0

    # -------------------------------------------------------------- topology

    def add_host(self, addr: Hashable, host: SansIOHost) -> None:
        """Put ``host`` on the network at ``addr`` (again after a crash: its next life)."""
        self._hosts[addr] = host
        self._timer_at[addr] = None
        self._lives.setdefault(addr, []).append(host)
        self.flush(addr)

    def remove_host(self, addr: Hashable) -> None:
        """Take a host off the network (a crash); datagrams to it vanish."""
        self._hosts.pop(addr, None)
        self._timer_at.pop(addr, None)
        pause = self._paused.pop(addr, None)
        if pause is not None:  # what its socket buffer held dies with it
            self.undeliverable += pause.arrivals

    def lives(self, addr: Hashable) -> list[SansIOHost]:
        """Every host that has held ``addr``, first to last (restarts append)."""
        return list(self._lives.get(addr, []))

    # ------------------------------------------------------ process faults

    def crash(self, addr: Hashable, *, at: float | None = None) -> None:
        """Crash ``addr`` now or at simulated time ``at``: the host is gone, its
        timers never fire, datagrams to it vanish (counted in ``undeliverable``)."""

        def down() -> None:
            if addr in self._hosts:
                self.crashes += 1
            self.remove_host(addr)

        self._now_or_at(at, down)

    def restart(
        self, addr: Hashable, factory: Callable[[], SansIOHost], *, at: float | None = None
    ) -> None:
        """Bring ``addr`` back now or at ``at`` as ``factory()`` (built at that moment,
        so it can read :meth:`clock`); the host's clock keeps its skew (same machine).
        Restarting a live host crashes it first."""

        def up() -> None:
            if addr in self._hosts:
                self.crashes += 1
                self.remove_host(addr)
            self.add_host(addr, factory())

        self._now_or_at(at, up)

    def pause(
        self,
        addr: Hashable,
        *,
        start: float | None = None,
        end: float | None = None,
        backlog: int | None = None,
    ) -> None:
        """Stop ``addr`` from ``start`` (default now) until ``end`` (default: until
        :meth:`resume`), as a stopped process: it reads nothing, its timers and
        ``call_at`` steps wait. Its socket buffer holds ``backlog`` datagrams
        (``None``: all); more are lost and counted in ``overflowed``.
        Pausing a paused host replaces its end."""
        if end is not None and start is not None and end < start:
            raise ValueError(f"pause ends ({end}) before it starts ({start})")
        if backlog is not None and backlog < 0:
            raise ValueError("backlog must be a number of datagrams >= 0, or None")

        def stop() -> None:
            if addr not in self._hosts:
                return
            current = self._paused.get(addr)
            if current is None:
                self._paused[addr] = _Pause(end, backlog)
            else:
                current.end, current.backlog = end, backlog
            if end is not None:
                self.call_at(end, lambda: self._resume_if(addr, end))

        self._now_or_at(start, stop)

    def resume(self, addr: Hashable) -> None:
        """End ``addr``'s pause now: it reads what its buffer held (in arrival order),
        runs the steps that waited, then its overdue timer, all at this moment."""
        pause = self._paused.pop(addr, None)
        host = self._hosts.get(addr)
        if pause is None or host is None:
            return
        for kind, payload in pause.held:
            if kind == _ARRIVAL:
                _, src, datagram = payload
                host.receive_datagram(datagram, src, self.clock(addr))
            else:
                payload()
        deadline = host.get_timer()
        if deadline is not None and self._due(addr, deadline):
            host.handle_timer(self._fire_time(addr, deadline))
        self._timer_at[addr] = None
        self.flush(addr)

    def paused(self, addr: Hashable) -> bool:
        """Whether ``addr`` is paused now."""
        return addr in self._paused

    def _resume_if(self, addr: Hashable, end: float) -> None:
        pause = self._paused.get(addr)
        if pause is not None and pause.end == end:
            self.resume(addr)

    def _now_or_at(self, at: float | None, action: Callable[[], None]) -> None:
        if at is None or at <= self.now:
            action()
        else:
            self.call_at(at, action)

    # ---------------------------------------------------------------- clocks

    def set_clock(self, addr: Hashable, *, offset: float = 0.0, drift: float = 0.0) -> None:
        """From now on, ``addr``'s clock reads ``offset`` seconds ahead of the network's
        (behind if negative) and gains ``drift`` seconds per second (``1e-4``: 100 ppm
        fast; ``-0.5``: half speed). Calling it again steps the clock to the new
        offset (a clock step back is the only way a host's time goes backwards)."""
        if not drift > -1.0:
            raise ValueError(f"drift must be above -1 (a clock that runs), got {drift}")
        self._clocks[addr] = _Clock(self.now, offset, drift)
        if addr in self._hosts:
            self._timer_at[addr] = None
            self.flush(addr)  # its deadline moves on the network's clock

    def clock(self, addr: Hashable) -> float:
        """What ``addr``'s clock reads now — pass it as ``now`` to that host's methods."""
        clock = self._clocks.get(addr)
        if clock is None:
            return self.now
        clock.last = max(clock.last, clock.local(self.now))
        return clock.last

    def _to_network(self, addr: Hashable, local: float) -> float:
        clock = self._clocks.get(addr)
        return local if clock is None else clock.network(local)

    def _due(self, addr: Hashable, deadline: float) -> bool:
        # Either test: converting back and forth may round a due deadline an ulp late.
        return deadline <= self.clock(addr) or self._to_network(addr, deadline) <= self.now

    def _fire_time(self, addr: Hashable, deadline: float) -> float:
        now = self.clock(addr)
        if deadline > now:  # an ulp of rounding: the host must see its deadline reached
            self._clocks[addr].last = now = deadline
        return now

    def subscribe(self, group: Hashable, addr: Hashable) -> None:
        """Make host ``addr`` receive datagrams sent to ``group`` (multicast or broadcast).

        A datagram to a group goes to every subscriber but its sender, each copy
        through the sender's own faulty link to that subscriber, as IP multicast
        would copy it at a switch.
        """
        self._groups.setdefault(group, set()).add(addr)

    def unsubscribe(self, group: Hashable, addr: Hashable) -> None:
        """Stop host ``addr`` receiving datagrams sent to ``group``."""
        self._groups.get(group, set()).discard(addr)

    def host(self, addr: Hashable) -> SansIOHost:
        """The host living at ``addr`` now."""
        return self._hosts[addr]

    def set_link(self, src: Hashable, dst: Hashable, impairment: Impairment | str | Link) -> None:
        """Impair datagrams from ``src`` to ``dst`` (one direction), from now on."""
        link = (
            impairment
            if isinstance(impairment, Link)
            else Link(as_impairment(impairment), seed=self._link_seed(src, dst))
        )
        if link.epoch is None:
            link.start(self.now)
        self._links[(src, dst)] = link

    def set_scenario(self, a: Hashable, b: Hashable, scenario: Scenario) -> None:
        """Apply a two-way scenario (*up* is ``a -> b``); its clock starts now."""
        base = scenario.seed if scenario.seed is not None else self._seed
        up = Link(scenario.up, partitions=scenario.up_partitions, seed=self._link_seed(a, b, base))
        down = Link(
            scenario.down, partitions=scenario.down_partitions, seed=self._link_seed(b, a, base)
        )
        self.set_link(a, b, up)
        self.set_link(b, a, down)

    def partition(
        self,
        a: Hashable,
        b: Hashable,
        *,
        start: float | None = None,
        end: float | None = None,
        direction: str = "both",
    ) -> None:
        """Cut ``a`` off from ``b``: from now until :meth:`heal`, or between
        simulated times ``start`` and ``end`` when both are given.

        ``direction`` is ``"up"`` (only ``a -> b``), ``"down"`` or ``"both"``.
        """
        links = self._pair_links(a, b, direction)
        if start is None and end is None:
            for link in links:
                link.partition()
            return
        if start is None or end is None:
            raise ValueError("give both start and end (a window), or neither (until heal)")
        for link in links:
            epoch = link.epoch or 0.0
            link.add_partition(Window(max(0.0, start - epoch), end - epoch))

    def heal(self, a: Hashable, b: Hashable, *, direction: str = "both") -> None:
        """End a :meth:`partition` made without times (windows still apply)."""
        for link in self._pair_links(a, b, direction):
            link.heal()

    def set(
        self,
        a: Hashable,
        b: Hashable,
        spec: Impairment | str | None,
        *,
        direction: str = "both",
    ) -> None:
        """Put ``spec`` in force between ``a`` and ``b`` from now on, keeping each link's
        seeded stream (unlike :meth:`set_link`, which replaces the link)."""
        for link in self._pair_links(a, b, direction):
            link.set(spec)

    def clear(self, a: Hashable, b: Hashable) -> None:
        """Both directions between ``a`` and ``b`` clean and whole from now on."""
        for link in self._pair_links(a, b, "both"):
            link.clear()

    @contextlib.contextmanager
    def faults(
        self,
        a: Hashable,
        b: Hashable,
        spec: Impairment | str | None = None,
        *,
        direction: str = "both",
        partition: bool = False,
    ) -> Iterator[SimNetwork]:
        """Apply ``spec`` (and/or a partition) between ``a`` and ``b`` for a ``with``
        block, then restore what was there."""
        links = self._pair_links(a, b, direction)
        with contextlib.ExitStack() as stack:
            for link in links:
                stack.enter_context(link.faults(spec, partition=partition))
            yield self

    def _pair_links(self, a: Hashable, b: Hashable, direction: str) -> list[Link]:
        if direction not in ("up", "down", "both"):
            raise ValueError(f"direction must be up, down or both, got {direction!r}")
        pairs = {"up": [(a, b)], "down": [(b, a)], "both": [(a, b), (b, a)]}[direction]
        return [self.link(src, dst) for src, dst in pairs]

    def link(self, src: Hashable, dst: Hashable) -> Link:
        """The link ``src -> dst`` (created with the default impairment on first use)."""
        link = self._links.get((src, dst))
        if link is None:
            link = Link(self._default, seed=self._link_seed(src, dst))
            link.start(0.0)
            self._links[(src, dst)] = link
        return link

    def _pair(self, src: Hashable, dst: Hashable) -> tuple[int, Hashable]:
        """The pair's conversation number and the host that used it first."""
        key = frozenset((src, dst))
        if key not in self._pairs:
            self._pairs[key] = (len(self._pairs), src)
        return self._pairs[key]

    def _link_seed(self, src: Hashable, dst: Hashable, seed: int | None = None) -> int | None:
        index, first = self._pair(src, dst)
        base = self._seed if seed is None else seed
        return stream_seed(base, "up" if src == first else "down", index)

    # ---------------------------------------------------------------- driving

    def call_at(
        self, when: float, action: Callable[[], None], *, host: Hashable | None = None
    ) -> None:
        """Run ``action()`` at simulated time ``when`` (an application step: a send, a crash).

        With ``host``, that host's output is collected and its timer re-armed afterwards.
        """
        heapq.heappush(self._queue, (when, next(self._order), _CALL, (action, host)))

    def flush(self, addr: Hashable) -> None:
        """Collect what ``addr`` wants to send and re-arm its timer (call after poking a host)."""
        host = self._hosts.get(addr)
        if host is None or addr in self._paused:
            return
        for data, dst in host.datagrams_to_send(self.clock(addr)):
            subscribers = self._groups.get(dst)
            targets = [dst] if subscribers is None else sorted(subscribers - {addr}, key=repr)
            for target in targets:
                for release, datagram in self.link(addr, target).apply(data, self.now):
                    heapq.heappush(
                        self._queue,
                        (
                            release + self.latency,
                            next(self._order),
                            _ARRIVAL,
                            (target, addr, datagram),
                        ),
                    )
        local = host.get_timer()
        deadline = None if local is None else self._to_network(addr, local)
        if deadline is not None and deadline != self._timer_at.get(addr):
            heapq.heappush(self._queue, (deadline, next(self._order), _TIMER, addr))
        self._timer_at[addr] = deadline

    def _drop_superseded(self) -> None:
        """Pop timer entries at the head of the queue that a later re-arm superseded,
        so the head is the next event that will really happen."""
        queue = self._queue
        while queue and queue[0][2] == _TIMER:
            when, _, _, addr = queue[0]
            if addr in self._hosts and self._timer_at.get(addr) == when:
                return
            heapq.heappop(queue)

    def step(self) -> bool:
        """Process the next event (exactly one); ``False`` when nothing is left to happen."""
        self._drop_superseded()
        if not self._queue:
            return False
        when, _, kind, payload = heapq.heappop(self._queue)
        self.now = max(self.now, when)
        if kind == _TIMER:
            addr = payload
            timed = self._hosts[addr]  # live: superseded entries were dropped above
            self._timer_at[addr] = None
            if addr not in self._paused:  # a paused host's timer waits for resume()
                deadline = timed.get_timer()
                if deadline is not None and self._due(addr, deadline):
                    timed.handle_timer(self._fire_time(addr, deadline))
                self.flush(addr)
        elif kind == _CALL:
            action, addr = payload
            pause = None if addr is None else self._paused.get(addr)
            if pause is not None:
                pause.held.append((_CALL, action))  # the application is stopped too
            else:
                action()
                if addr is not None:
                    self.flush(addr)
        else:
            dst, src, datagram = payload
            host = self._hosts.get(dst)
            pause = self._paused.get(dst)
            if host is None:
                self.undeliverable += 1  # to a host taken off the network
            elif pause is not None:
                if pause.backlog is not None and pause.arrivals >= pause.backlog:
                    self.overflowed += 1
                else:
                    pause.held.append((_ARRIVAL, payload))
                    pause.arrivals += 1
            else:
                host.receive_datagram(datagram, src, self.clock(dst))
                self.flush(dst)
        self.events_processed += 1
        return True

    def run(
        self,
        *,
        until: float | None = None,
        stop: Callable[[], bool] | None = None,
        max_events: int = 10_000_000,
    ) -> None:
        """Advance until ``stop()`` holds, simulated time passes ``until``, or all is quiet."""
        for _ in range(max_events):
            if stop is not None and stop():
                return
            self._drop_superseded()  # a stale head must not let a later event slip past until
            if until is not None and (not self._queue or self._queue[0][0] > until):
                self.now = max(self.now, until)
                return
            if not self.step():
                return
        raise RuntimeError(f"simulation did not settle within {max_events} events")
