"""Local posts: a thread or a signal handler of this process puts a message into one of
its own node's mailboxes, without the transport.

Theory of operation
-------------------
A node sending to itself goes through its UDP socket, address validation and
the whole reliable stream. A *local post* skips all of it: ``node.post(mailbox,
data)`` appends the message to this queue and wakes the node; at its next
turn the adapter hands every queued post to the core
(:meth:`Endpoint.post <reliable.endpoint.Endpoint.post>`), which judges and
admits it exactly as an arriving message — the mailbox's order (priority,
then post order), its capacity and max_bytes (a post to a full mailbox parks
and enters when room appears), the node's mailbox memory, durability (a
durable mailbox stages and commits it). ``msg.source`` is the node's own
address.

Why a queue and not a call into the core: the adapters' state is guarded by
a lock (the blocking ``Node``) or belongs to the event loop (``AsyncNode``),
and a signal handler runs in the middle of whatever the main thread was
doing — perhaps holding that very lock. Appending to a ``deque`` is atomic
and takes no lock, and the wake-up is one ``send`` on a socket pair (or the
loop's ``call_soon_threadsafe``), so :meth:`PostQueue.put` never blocks and
never waits for the node: that is what makes a post usable from a signal
handler. The price is that a post's fate is not known when ``post`` returns:
a refusal (no such mailbox, closed, too large for it, memory full) is
counted (``refused.*`` drops, and :attr:`PostQueue.refused`) and logged, not
raised. Argument errors are raised at once, before anything is queued.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

__all__ = ["PostQueue"]


class PostQueue:
    """Posts waiting for the node's next turn (``put`` from any thread or a signal handler)."""

    __slots__ = ("_queue", "_wake", "posted", "refused")

    def __init__(self, wake: Callable[[], None]) -> None:
        self._queue: deque[tuple[str, bytes, int, int]] = deque()
        self._wake = wake
        self.posted = 0  #: posts admitted (entered, parked or staged)
        self.refused = 0  #: posts the core refused

    def __bool__(self) -> bool:
        return bool(self._queue)

    def put(self, mailbox: str, data: bytes, msg_type: int, priority: int) -> None:
        """Queue one post and wake the node. Lock-free: safe in a signal handler."""
        self._queue.append((mailbox, data, msg_type, priority))
        self._wake()

    def admit(self, endpoint: Any, source: Any, now: float) -> None:
        """The adapter's turn (its lock held, or on its loop): hand the posts to the core,
        in order. Bounded: only what was queued when it started."""
        for _ in range(len(self._queue)):
            mailbox, data, msg_type, priority = self._queue.popleft()
            verdict = endpoint.post(
                mailbox, data, source=source, msg_type=msg_type, priority=priority, now=now
            )
            if verdict is None:
                self.posted += 1
            else:
                self.refused += 1
