"""One seed, one story: how every carrier turns a user's seed into decision streams.

A *decision stream* is the sequence of random draws one :class:`~netem.scenario.Link`
makes. Carriers name each stream by ``(direction, client)``:

* ``direction`` is ``"up"`` for the first direction of a conversation — client to
  server through the proxy, what a :class:`~netem.socket.FaultySocket` sends, the
  first host to send in a :class:`~netem.sim.SimNetwork` pair — and ``"down"``
  for the reverse;
* ``client`` counts conversations from 0 in the order the carrier first sees
  them: the proxy's clients in admission order, a simulated network's host pairs
  in the order they first exchange a datagram (or are configured), and 0 for a
  wrapped socket.

:func:`stream_seed` maps ``(seed, direction, client)`` to the stream's seed with
a stable hash, so the same user seed and the same datagram sequence give the
same decisions on every carrier, on every run and every Python version.
"""

from __future__ import annotations

import hashlib

__all__ = ["DIRECTIONS", "stream_seed"]

#: The two directions of a conversation.
DIRECTIONS = ("up", "down")


def stream_seed(seed: int | None, direction: str, client: int = 0) -> int | None:
    """The seed of decision stream ``(direction, client)`` under the user's ``seed``.

    ``None`` stays ``None`` (fresh entropy, not reproducible).
    """
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be 'up' or 'down', got {direction!r}")
    if seed is None:
        return None
    digest = hashlib.blake2b(f"netem/{seed}/{direction}/{client}".encode(), digest_size=8)
    return int.from_bytes(digest.digest(), "big")
