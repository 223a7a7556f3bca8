"""Test helpers: two protocol endpoints joined by a scriptable link on virtual time.

Modelled on aioquic's ``client_and_server()``: tests move datagrams by hand
(``transfer``), drop or corrupt them on purpose, and advance ``now`` in ticks,
so every step of the protocol is visible and deterministic.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from hypothesis import strategies as st

from netem import Impairment
from reliable import Config, Endpoint, events, wire
from reliable.security import Security

A = ("10.0.0.1", 1000)  # never used as a socket address: pure labels for the fake link
B = ("10.0.0.2", 2000)
TICK = 0.001


@dataclass
class Side:
    addr: Any
    endpoint: Endpoint
    events: list[events.Event] = field(default_factory=list)
    released: int = 0  #: messages the harness took out of mailboxes
    owners: dict[str, int] = field(default_factory=dict)  #: owner tokens of created mailboxes

    def create_mailbox(self, name: str, **options: Any) -> int:
        owner = self.endpoint.create_mailbox(name, now=0.0, **options)
        self.owners[name] = owner
        return owner

    def drain(self) -> list[events.Event]:
        while (e := self.endpoint.next_event()) is not None:
            self.events.append(e)
        return self.events

    def of(self, kind: type) -> list[Any]:
        self.drain()
        return [e for e in self.events if isinstance(e, kind)]

    def received(self) -> list[bytes]:
        return [e.data for e in self.of(events.MessageReceived)]


class Pair:
    """Two endpoints, A and B, and the datagrams in flight between them."""

    def __init__(
        self,
        config_a: Config | None = None,
        config_b: Config | None = None,
        *,
        seed: int = 1,
        release: bool = True,
        security_a: Security | None = None,
        security_b: Security | None = None,
        addrs: tuple[Any, Any] = (A, B),
    ) -> None:
        """``addrs`` are the two ends' addresses: loopback ones give the path
        ``Config.loopback_datagram_size`` (64 KiB datagrams) instead of
        ``max_datagram_size``."""
        self.now = 0.0
        self.seed = seed
        self.a = Side(
            addrs[0],
            Endpoint(
                config_a or Config(),
                rng=random.Random(seed),
                security=security_a,
                arrival_events=True,
            ),
        )
        self.b = Side(
            addrs[1],
            Endpoint(
                config_b or Config(),
                rng=random.Random(seed + 1),
                security=security_b,
                arrival_events=True,
            ),
        )
        self.release = release
        self.log: list[tuple[Any, wire.Packet | None]] = []

    def connect(self) -> None:
        """Let each end validate the other's address (the first contact costs a round
        trip: a CHALLENGE and its echo), then forget that exchange's events, so a
        test can watch the transport between two nodes that already know each other."""
        for side in (self.a, self.b):
            side.endpoint.send(self.other(side).addr, b"", now=self.now)
        self.settle()
        for side in (self.a, self.b):
            side.drain()
            side.events.clear()
            while side.endpoint.take(now=self.now) is not None:
                pass

    def side(self, addr: Any) -> Side:
        return self.a if addr == self.a.addr else self.b

    def other(self, side: Side) -> Side:
        return self.b if side is self.a else self.a

    def restart_b(self, config: Config | None = None, seed: int = 99) -> None:
        """B crashes and comes back on the same address with a new incarnation."""
        self.b = Side(
            self.b.addr, Endpoint(config or Config(), rng=random.Random(seed), arrival_events=True)
        )

    def outgoing(self, side: Side) -> list[bytes]:
        return [d for d, _ in side.endpoint.datagrams_to_send(self.now)]

    def deliver(self, side: Side, datagrams: list[bytes]) -> None:
        """Hand ``datagrams`` (sent by the other side) to ``side``."""
        src = self.other(side).addr
        for d in datagrams:
            side.endpoint.receive_datagram(d, src, self.now)
        self._release(side)

    def _release(self, side: Side) -> None:
        """Take every message waiting in a mailbox, as a prompt application would."""
        if not self.release:
            return
        endpoint = side.endpoint
        for name in endpoint.mailbox_names():
            while endpoint.take(name, owner=side.owners.get(name), now=self.now) is not None:
                side.released += 1

    def transfer(
        self,
        sender: Side,
        *,
        drop: Callable[[int, bytes], bool] | None = None,
        mangle: Callable[[bytes], bytes] | None = None,
    ) -> int:
        """Move everything ``sender`` wants to send to the other side; returns datagrams moved."""
        out = self.outgoing(sender)
        kept = []
        for i, d in enumerate(out):
            if drop is not None and drop(i, d):
                continue
            kept.append(mangle(d) if mangle else d)
        self.deliver(self.other(sender), kept)
        return len(out)

    def tick(self, dt: float = TICK) -> None:
        """Advance time and run due timers on both sides."""
        self.now += dt
        for side in (self.a, self.b):
            t = side.endpoint.get_timer()
            if t is not None and t <= self.now:
                side.endpoint.handle_timer(self.now)

    def run(self, seconds: float) -> None:
        """Exchange for ``seconds`` of virtual time (for states that keep timers armed,
        such as a sender waiting on a deferred message, which keeps probing its peer)."""
        self.settle(until=self.now + seconds)

    def settle(
        self, *, max_steps: int = 100_000, dt: float = TICK, until: float | None = None
    ) -> int:
        """Exchange until neither side has anything to send or any timer but idle
        sessions' expiries (``Endpoint.quiet``); returns steps. With ``until``, run
        to that time whatever happens (idle sessions may then be dropped)."""
        for step in range(max_steps):
            if until is not None and self.now >= until:
                return step
            moved = self.transfer(self.a) + self.transfer(self.b)
            if not moved:
                if until is None and self.a.endpoint.quiet() and self.b.endpoint.quiet():
                    return step
                timers = [s.endpoint.get_timer() for s in (self.a, self.b)]
                pending = [t for t in timers if t is not None]
                if not pending:
                    return step
                self.now = max(self.now, min(pending))
                for side in (self.a, self.b):
                    t = side.endpoint.get_timer()
                    if t is not None and t <= self.now:
                        side.endpoint.handle_timer(self.now)
            else:
                self.tick(dt)
        raise AssertionError("the pair did not settle")


def decode_all(datagrams: list[bytes]) -> list[wire.Packet]:
    return [wire.decode(d) for d in datagrams]


def forged_datagram(rng: random.Random, i: int, size: int = 600) -> bytes:
    """What a spoofing flooder sends: a well-formed packet (valid CRC) from a made-up
    incarnation; a third are PINGs, the rest single-datagram DATA, and every other
    one tries a made-up cookie."""
    fragment = wire.Fragment(
        seq=rng.getrandbits(32),
        base=0,
        msg_id=0,
        index=0,
        count=1,
        total_len=size,
        msg_type=0,
        priority=0,
        mailbox="",
        payload=rng.randbytes(size),
    )
    return wire.encode(
        wire.Packet(
            kind=wire.Kind.PING if i % 3 == 0 else wire.Kind.DATA,
            src_incarnation=rng.getrandbits(64) | 1,
            cookie=rng.randbytes(16) if i % 2 else None,
            fragment=None if i % 3 == 0 else fragment,
        )
    )


#: A lossy link for the simulator properties: every fault at once, each up to a rate
#: where the protocol must still deliver within the test's simulated time.
links = st.builds(
    Impairment,
    loss=st.floats(0, 0.3),
    duplicate=st.floats(0, 0.2),
    corrupt=st.floats(0, 0.1),
    delay=st.floats(0, 0.01),
    jitter=st.floats(0, 0.01),
    reorder=st.floats(0, 0.3),
)
