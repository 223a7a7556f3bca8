"""A message nested in a big one and then abandoned must not take the big one with it.

Found by tools/soak.py (seed 509): a one-datagram message of a higher priority
goes out between two fragments of a big message in progress (NESTED). When it
is abandoned — its send timeout, or a path that shrank below its size — the
sender's base passes its sequence number and the receiver skips it. The
receiver read that gap as the end of the big message in progress and dropped
it, while acknowledging its fragments: the big message's sender was told it
was delivered, and it never arrived.
"""

from __future__ import annotations

from reliable import Config, errors, events

from .harness import B, Pair

BIG = b"big!" * 7_500  # 30,000 bytes: about 27 datagrams of 1200
URGENT = b"urgent:" + b"u" * 200


def test_an_abandoned_nested_message_leaves_the_message_around_it_whole() -> None:
    p = Pair(Config(peer_timeout=30.0))
    p.connect()
    big = p.a.endpoint.send(B, BIG, now=p.now)
    p.transfer(p.a)  # the first flight of the big message: it is in progress now
    urgent = p.a.endpoint.send(B, URGENT, now=p.now, priority=5, timeout=0.05)

    def lose_urgent(_i: int, d: bytes) -> bool:
        return b"urgent:" in d  # every copy of it: it times out and is abandoned

    for _ in range(20_000):
        if p.now > 5.0:
            break
        moved = p.transfer(p.a, drop=lose_urgent) + p.transfer(p.b)
        p.tick(0.001 if moved else 0.01)
    fates = {e.ticket: e for e in p.a.of(events.MessageDelivered) + p.a.of(events.MessageFailed)}
    assert isinstance(fates[urgent], events.MessageFailed)
    assert isinstance(fates[urgent].error, errors.SendTimeout)
    assert p.b.received() == [BIG], "the big message around the abandoned one arrives"
    assert isinstance(fates[big], events.MessageDelivered)
