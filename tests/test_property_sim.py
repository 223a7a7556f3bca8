"""The central property, over the simulated network, with hypothesis choosing everything:

every message accepted by ``send`` is delivered exactly once, intact and in
order — or its sender is told it failed (and even then it is never delivered
twice).
"""

from __future__ import annotations

import random
import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from netem import Impairment, SimNetwork
from reliable import Config, Endpoint, errors, events

A = ("sim-a", 1)
B = ("sim-b", 2)
_INDEX = struct.Struct("!I")

impairments = st.builds(
    Impairment,
    loss=st.floats(0, 0.5),
    loss_correlation=st.sampled_from([0.0, 0.25, 0.5]),
    duplicate=st.floats(0, 0.3),
    corrupt=st.floats(0, 0.2),
    corrupt_bits=st.integers(1, 8),
    delay=st.floats(0, 0.02),
    jitter=st.floats(0, 0.02),
    reorder=st.floats(0, 0.5),
)

SETTINGS = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _payload(index: int, size: int, rng: random.Random) -> bytes:
    return _INDEX.pack(index) + rng.randbytes(size)


def _fates(side: Endpoint) -> tuple[dict[int, events.Event], list[events.MessageReceived]]:
    fates: dict[int, events.Event] = {}
    received: list[events.MessageReceived] = []
    while (e := side.next_event()) is not None:
        if isinstance(e, (events.MessageDelivered, events.MessageFailed)):
            assert e.ticket not in fates, "a message had two fates"
            fates[e.ticket] = e
        elif isinstance(e, events.MessageReceived):
            received.append(e)
    return fates, received


@SETTINGS
@given(
    sizes=st.lists(st.integers(0, 5000), min_size=1, max_size=40),
    gaps=st.lists(st.floats(0, 0.05), min_size=40, max_size=40),
    impairment=impairments,
    reverse=impairments,
    seed=st.integers(0, 2**16),
    datagram=st.sampled_from([900, 1200, 9000]),
)
def test_exactly_once_in_order_or_reported(
    sizes: list[int],
    gaps: list[float],
    impairment: Impairment,
    reverse: Impairment,
    seed: int,
    datagram: int,
) -> None:
    config = Config(max_datagram_size=datagram, peer_timeout=5.0)
    net = SimNetwork(seed=seed)
    net.set_link(A, B, impairment)
    net.set_link(B, A, reverse)
    a = Endpoint(config, rng=random.Random(seed))
    b = Endpoint(config, rng=random.Random(seed + 1))
    net.add_host(A, a)
    net.add_host(B, b)
    rng = random.Random(seed)
    sent: dict[int, bytes] = {}
    when = 0.0
    for i, size in enumerate(sizes):
        data = _payload(i, size, rng)
        when += gaps[i]

        def send(data: bytes = data) -> None:
            sent[a.send(B, data, now=net.now)] = data

        net.call_at(when, send, host=A)
    fates: dict[int, events.Event] = {}
    received: list[events.MessageReceived] = []

    def done() -> bool:
        f, r = _fates(a)
        fates.update(f)
        received.extend(_fates(b)[1] + r)
        return len(fates) == len(sizes)

    net.run(stop=done, until=3600.0)
    assert len(fates) == len(sizes), "every accepted message must get a fate"
    by_data = {data: ticket for ticket, data in sent.items()}
    order = [by_data.get(e.data) for e in received]
    assert None not in order, "only intact, sent payloads are ever delivered"
    assert len(set(order)) == len(order), "nothing is delivered twice"
    assert order == sorted(order), "delivery follows send order"
    for ticket, fate in fates.items():
        if isinstance(fate, events.MessageDelivered):
            assert ticket in order, "a receipt means the peer really has it"
        else:
            assert isinstance(fate, events.MessageFailed)
            assert isinstance(fate.error, (errors.PeerUnreachable, errors.SendTimeout))


@SETTINGS
@given(
    count=st.integers(2, 30),
    crash_at=st.floats(0.0, 0.2),
    downtime=st.floats(0.0, 3.0),
    impairment=impairments.filter(lambda i: i.loss <= 0.3),
    seed=st.integers(0, 2**16),
)
def test_restart_mid_stream_loses_nothing_silently(
    count: int, crash_at: float, downtime: float, impairment: Impairment, seed: int
) -> None:
    """B crashes while A streams to it and comes back on the same address."""
    config = Config(peer_timeout=10.0)
    net = SimNetwork(seed=seed, default=impairment)
    a = Endpoint(config, rng=random.Random(seed))
    lives = [Endpoint(config, rng=random.Random(seed + 1))]
    net.add_host(A, a)
    net.add_host(B, lives[0])
    rng = random.Random(seed)
    sent: dict[int, bytes] = {}
    for i in range(count):

        def send(data: bytes = _payload(i, rng.randrange(3000), rng)) -> None:
            sent[a.send(B, data, now=net.now)] = data

        net.call_at(i * 0.01, send, host=A)

    def crash() -> None:
        net.remove_host(B)

    def reboot() -> None:
        lives.append(Endpoint(config, rng=random.Random(seed + 2)))
        net.add_host(B, lives[-1])

    net.call_at(crash_at, crash)
    net.call_at(crash_at + downtime, reboot)
    fates: dict[int, events.Event] = {}
    per_life: list[list[bytes]] = [[] for _ in range(2)]

    def done() -> bool:
        fates.update(_fates(a)[0])
        for n, life in enumerate(lives):
            per_life[n].extend(e.data for e in _fates(life)[1])
        return len(fates) == count and len(lives) == 2

    net.run(stop=done, until=3600.0)
    assert len(fates) == count
    for got in per_life:
        indices = [_INDEX.unpack_from(d)[0] for d in got]
        assert len(set(indices)) == len(indices) and indices == sorted(indices)
    for ticket, fate in fates.items():
        if isinstance(fate, events.MessageDelivered):
            life = lives.index(next(x for x in lives if x.incarnation == fate.incarnation))
            assert sent[ticket] in per_life[life], "the receipt names the life that has it"
        else:
            assert isinstance(fate, events.MessageFailed)
            assert isinstance(
                fate.error, (errors.PeerRestarted, errors.PeerUnreachable, errors.SendTimeout)
            )
