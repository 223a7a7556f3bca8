"""A liveness bug the RPC simulation found: sends after timed-out ones to a late peer.

Sends with a short timeout, made while the peer has not started, time out
and are abandoned after they went out; the peer then starts, holds the later
messages out of order, and selectively acknowledges them. Only DATA carries
the base that tells it the abandoned numbers will never come, and nothing was
left to send: the later messages never got a fate, every time. The sender now
resends the last fragment of the oldest unfinished message to carry the base.
"""

from __future__ import annotations

import random

from netem import SimNetwork
from reliable import Config, Endpoint, events

A, B = ("sim-a", 1), ("sim-b", 2)


def test_sends_after_timed_out_ones_to_a_late_peer_get_a_fate() -> None:
    config = Config(peer_timeout=2.0)
    net = SimNetwork(seed=1)
    a = Endpoint(config, rng=random.Random(1))
    net.add_host(A, a)
    for i in range(6):
        timeout = 0.05 if i in (2, 3) else None
        net.call_at(
            0.01 + i * 0.06,
            lambda i=i, t=timeout: a.send(B, b"m%d" % i, now=net.now, mailbox="q", timeout=t),
            host=A,
        )

    def boot() -> None:
        b = Endpoint(config, rng=random.Random(2))
        b.create_mailbox("q", now=net.now)
        net.add_host(B, b)

    net.call_at(1.0, boot)
    fates: dict[int, str] = {}

    def done() -> bool:
        while (e := a.next_event()) is not None:
            if isinstance(e, events.MessageDelivered):
                fates[e.ticket] = "delivered"
            elif isinstance(e, events.MessageFailed):
                fates[e.ticket] = type(e.error).__name__
        return len(fates) == 6

    net.run(stop=done, until=60.0)
    assert len(fates) == 6, f"only {fates} got a fate within 60 s"
