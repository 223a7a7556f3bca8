"""What the RPC adapters share: a timer armed at the core's next deadline (asyncio),
and the errors that say a port is gone.

The sans-I/O cores answer ``get_timer()`` (an absolute time on the loop's
clock, or None) and run ``handle_timer(now)``; an adapter re-arms one
``loop.call_at`` handle whenever that answer may have changed (after each
step), so nothing polls: the loop wakes exactly when the core has work.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from .. import errors

#: What a receive on an adapter's port raises once the port or its node is gone
#: (UnknownMailbox: deleted before this receive began, as close() may do meanwhile).
PORT_GONE = (errors.NodeClosed, errors.MailboxDeleted, errors.UnknownMailbox)


class LoopTimer:
    """One ``call_at`` handle that runs ``fire`` at the time last :meth:`arm`-ed."""

    __slots__ = ("_at", "_fire", "_handle", "_loop")

    def __init__(self, loop: asyncio.AbstractEventLoop, fire: Callable[[], None]) -> None:
        self._loop = loop
        self._fire = fire
        self._handle: asyncio.TimerHandle | None = None
        self._at: float | None = None

    def arm(self, at: float | None) -> None:
        """Fire at ``at`` (loop time) instead of whenever was set before; None: not at all."""
        if at == self._at:
            return
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        self._at = at
        if at is not None:
            self._handle = self._loop.call_at(at, self._run)

    def cancel(self) -> None:
        self.arm(None)

    def _run(self) -> None:
        self._handle = None
        self._at = None
        self._fire()
