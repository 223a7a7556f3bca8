"""The next deadline among many sessions, without asking every session every time.

Why: a node asks for its next timer after every datagram. Taking the minimum
over all sessions made that O(peers), which at a thousand peers cost more
than the protocol itself. Here each session has at most one live entry in a
heap, updated only when the session may have changed; an entry is checked
against the session's real deadline when it reaches the top, so a deadline
that moved later is simply re-filed. The one rule for callers: after
anything that may move a session's deadline *earlier* (new data to send, a
packet received), call :meth:`TimerHeap.update` for it before the next query.

The endpoint's ``deadline_of`` answers from the deadline it computed when it
last refiled the session, not by computing it again: every change to a
session marks it dirty, and dirty sessions are refiled before every query, so
the two agree (a session whose deadline moved later without being marked
would only get a harmless early ``on_timer``).
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Hashable

__all__ = ["TimerHeap"]


class TimerHeap:
    """Deadlines of keyed timers (sessions), earliest first, refreshed lazily."""

    __slots__ = ("_filed", "_heap", "_order")

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Hashable]] = []
        self._filed: dict[Hashable, float] = {}  # key -> the deadline its live entry holds
        self._order = itertools.count()  # tie-break: keys need not be comparable

    def update(self, key: Hashable, deadline: float | None) -> None:
        """``key``'s deadline may have changed to ``deadline``."""
        if deadline is None:
            return  # a stale entry, if any, is dropped when it surfaces
        filed = self._filed.get(key)
        if filed is None or deadline < filed:
            self._filed[key] = deadline
            heapq.heappush(self._heap, (deadline, next(self._order), key))
        elif deadline != filed:
            # Later, and its entry is the earliest (one session, or the busiest): re-filed
            # now, as earliest() would when it reached the top, so the query that follows
            # (a node asks after every datagram) finds the top true at once.
            heap = self._heap
            top = heap[0]
            if top[0] == filed and top[2] == key:
                self._filed[key] = deadline
                heapq.heapreplace(heap, (deadline, next(self._order), key))

    def earliest(self, deadline_of: Callable[[Hashable], float | None]) -> float | None:
        """The earliest real deadline; ``deadline_of(key)`` is the truth (None: no timer)."""
        heap = self._heap
        while heap:
            when, _, key = heap[0]
            if self._filed.get(key) != when:
                heapq.heappop(heap)  # superseded by an earlier entry for the same key
                continue
            actual = deadline_of(key)
            if actual == when:
                return when
            if actual is None:
                heapq.heappop(heap)
                del self._filed[key]
            else:  # moved (later): re-filed in one heap operation, not a pop and a push
                self._filed[key] = actual
                heapq.heapreplace(heap, (actual, next(self._order), key))
        return None

    def due(self, now: float, deadline_of: Callable[[Hashable], float | None]) -> list[Hashable]:
        """Keys whose real deadline is at or before ``now``; their entries are removed."""
        keys = []
        while (when := self.earliest(deadline_of)) is not None and when <= now:
            _, _, key = heapq.heappop(self._heap)
            del self._filed[key]
            keys.append(key)
        return keys

    def __len__(self) -> int:
        return len(self._heap)
