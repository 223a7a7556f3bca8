"""A rate-limited link, on virtual time: the sender fills it and retransmits nothing.

On a slow link a datagram's round trip includes its serialisation: 64 KiB take
65 ms at 8 Mbit/s, and a burst queues for as long as the link needs to drain
it. A probe timer that trusts a round trip timed with a tiny packet fires long
before the first acknowledgement can return. Seen on loopback through netem's
``rate 8mbit``: 1 MiB in 64 KiB datagrams took 6.8 s and 152 transmissions of
17 fragments, while 1200-byte datagrams took 1.1 s; at 1 Mbit/s 1200-byte
datagrams stormed the same way.
"""

from __future__ import annotations

import random

import pytest

from netem import Impairment, SimNetwork
from reliable import Config, Endpoint, events

A = ("127.0.0.1", 1000)  # loopback addresses: the path gets loopback_datagram_size
B = ("127.0.0.1", 2000)
MESSAGE = 1 << 20


def _pair(loopback: int | None, rate: float) -> tuple[SimNetwork, Endpoint, Endpoint]:
    config = Config(loopback_datagram_size=loopback)
    net = SimNetwork(seed=7, latency=0.00005)  # loopback-like: the link's rate is the delay
    net.set_link(A, B, Impairment(rate=rate))
    a = Endpoint(config, rng=random.Random(1))
    b = Endpoint(config, rng=random.Random(2))
    net.add_host(A, a)
    net.add_host(B, b)
    return net, a, b


def _send(net: SimNetwork, a: Endpoint, b: Endpoint, data: bytes) -> events.MessageDelivered:
    """Send ``data`` from a to b and run until a hears its fate."""
    net.call_at(net.now, lambda: a.send(B, data, now=net.now), host=A)
    return _fate(net, a, b)


def _fate(net: SimNetwork, a: Endpoint, b: Endpoint) -> events.MessageDelivered:
    """Run (b's application taking what arrives) until a hears of its one message."""
    fates: list[events.Event] = []

    def done() -> bool:
        while (e := a.next_event()) is not None:
            if isinstance(e, (events.MessageDelivered, events.MessageFailed)):
                fates.append(e)
        while b.take(now=net.now) is not None:
            pass
        return bool(fates)

    net.run(stop=done, until=net.now + 60)
    (fate,) = fates
    assert isinstance(fate, events.MessageDelivered), fate
    return fate


@pytest.mark.parametrize(
    ("loopback", "rate"),
    [(65000, 8e6), (None, 8e6), (None, 1e6)],
    ids=["64KiB-datagrams-8mbit", "1200B-datagrams-8mbit", "1200B-datagrams-1mbit"],
)
def test_a_rate_limited_link_is_filled_without_retransmissions(
    loopback: int | None, rate: float
) -> None:
    """After a first small exchange (a round trip timed with a tiny datagram), 1 MiB
    crosses in at most 1.2 times the link's serialisation time, sent exactly once."""
    net, a, b = _pair(loopback, rate)
    _send(net, a, b, b"hi")  # resent once: b challenged it
    start, before = net.now, a.stats().retransmissions
    receipt = _send(net, a, b, random.Random(3).randbytes(MESSAGE))
    assert net.now - start <= 1.2 * MESSAGE * 8 / rate
    assert receipt.transmissions == receipt.fragments
    assert a.stats().retransmissions == before


@pytest.mark.parametrize("loopback", [65000, None], ids=["64KiB-datagrams", "1200B-datagrams"])
def test_a_first_contact_over_a_rate_limited_link_resends_only_what_was_dropped(
    loopback: int | None,
) -> None:
    """A large first message: the peer would drop a first flight unread (it keeps no
    state before its cookie is echoed), so one ordinary datagram at most goes before its
    CHALLENGE, or a PING if the first fragment is larger (the first flight was a whole
    window of 64 KiB datagrams, queued on the slow link ahead of its own resend). That
    is the only resend (first contact, not a retransmission), and the link stays busy."""
    net, a, b = _pair(loopback, 8e6)
    net.call_at(0.0, lambda: a.send(B, random.Random(3).randbytes(MESSAGE), now=0.0), host=A)
    net.run(until=0.0)
    sender = a._peers[B].sender
    first_flight, dropped = sender.packets_sent, sender.in_flight_bytes
    assert first_flight == (0 if loopback else 1) and dropped <= Config().max_datagram_size
    receipt = _fate(net, a, b)
    assert sender.packets_sent == receipt.fragments + first_flight
    assert receipt.transmissions == receipt.fragments and sender.retransmissions == 0
    assert net.now <= 1.2 * (MESSAGE + dropped) * 8 / 8e6
