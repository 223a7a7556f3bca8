"""A deterministic simulated network for sans-I/O protocol code.

Hosts are objects with the four-method sans-I/O surface (:class:`SansIOHost`:
``receive_datagram``, ``datagrams_to_send``, ``get_timer``, ``handle_timer``),
which :class:`reliable.Endpoint` has and any user's protocol object can have.
The network keeps a virtual clock and one event queue of datagram arrivals and
host timers; nothing sleeps, so simulated minutes pass in milliseconds of CPU.
Each directed link applies its own seeded :class:`~netem.models.FaultModel`,
so a run is a pure function of the seed and the hosts' behaviour.

Faults change mid-run with :meth:`SimNetwork.set`, :meth:`~SimNetwork.clear`,
:meth:`~SimNetwork.partition` (from now until healed, or between two times),
:meth:`~SimNetwork.heal` and the :meth:`~SimNetwork.faults` context manager —
call them from test code between ``run`` calls or from a ``call_at`` action.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
from collections.abc import Callable, Hashable, Iterator
from typing import Any, Protocol

from .models import Impairment
from .scenario import Link, LinkState, Scenario, Window, as_impairment

__all__ = ["SansIOHost", "SimNetwork"]


class SansIOHost(Protocol):
    """What the simulated network needs from a host."""

    def receive_datagram(self, data: bytes, addr: Any, now: float) -> None: ...

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, Any]]: ...

    def get_timer(self) -> float | None: ...

    def handle_timer(self, now: float) -> None: ...


_ARRIVAL = 0
_TIMER = 1
_CALL = 2


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
        self._groups: dict[Hashable, set[Hashable]] = {}
        self.undeliverable = 0
        self.events_processed = 0

    # -------------------------------------------------------------- topology

    def add_host(self, addr: Hashable, host: SansIOHost) -> None:
        self._hosts[addr] = host
        self._timer_at[addr] = None
        self.flush(addr)

    def remove_host(self, addr: Hashable) -> None:
        """Take a host off the network (a crash); datagrams to it vanish."""
        self._hosts.pop(addr, None)
        self._timer_at.pop(addr, None)

    def subscribe(self, group: Hashable, addr: Hashable) -> None:
        """Make host ``addr`` receive datagrams sent to ``group`` (multicast or broadcast).

        A datagram to a group goes to every subscriber but its sender, each copy
        through the sender's own faulty link to that subscriber, as IP multicast
        would copy it at a switch.
        """
        self._groups.setdefault(group, set()).add(addr)

    def unsubscribe(self, group: Hashable, addr: Hashable) -> None:
        self._groups.get(group, set()).discard(addr)

    def host(self, addr: Hashable) -> SansIOHost:
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
        up, down = scenario.links(self._seed + _stable_hash(repr((a, b))))
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
        before: list[LinkState] = [link.state() for link in links]
        try:
            for link in links:
                if spec is not None:
                    link.set(spec)
                if partition:
                    link.partition()
            yield self
        finally:
            for link, state in zip(links, before, strict=True):
                link.restore(state)

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

    def _link_seed(self, src: Hashable, dst: Hashable) -> int:
        # Stable across runs (unlike hash() of str), distinct per direction.
        return (self._seed * 1_000_003 + _stable_hash(repr((src, dst)))) & 0xFFFFFFFF

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
        if host is None:
            return
        for data, dst in host.datagrams_to_send(self.now):
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
        deadline = host.get_timer()
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
            deadline = timed.get_timer()
            if deadline is not None and deadline <= self.now:
                timed.handle_timer(self.now)
            self.flush(addr)
        elif kind == _CALL:
            action, addr = payload
            action()
            if addr is not None:
                self.flush(addr)
        else:
            dst, src, datagram = payload
            host = self._hosts.get(dst)
            if host is None:
                self.undeliverable += 1  # to a host taken off the network
            else:
                host.receive_datagram(datagram, src, self.now)
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


def _stable_hash(text: str) -> int:
    h = 2166136261
    for ch in text.encode():
        h = ((h ^ ch) * 16777619) & 0xFFFFFFFF
    return h
