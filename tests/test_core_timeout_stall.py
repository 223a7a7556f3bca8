"""A core liveness bug found by the RPC simulation (tests/test_rpc_sim.py), kept here as a
strict xfail for whoever owns the core: remove the marker once it passes.

Sends with a short timeout, made while the peer has not started, time out
(``SendTimeout``); the peer then starts, and the sends queued after them to the
same peer never get a fate at all: on a perfect link, every time.
"""

from __future__ import annotations

import random

import pytest

from netem import SimNetwork
from reliable import Config, Endpoint, events

A, B = ("sim-a", 1), ("sim-b", 2)


@pytest.mark.xfail(strict=True, reason="core: messages after timed-out ones to a late peer stall")
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
