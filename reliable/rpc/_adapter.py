"""What the RPC adapters share: a timer armed at the core's next deadline (asyncio),
and the errors that say a port is gone.

The sans-I/O cores answer ``get_timer()`` (an absolute time on the loop's
clock, or None) and run ``handle_timer(now)``; an adapter re-arms one
``loop.call_at`` handle whenever that answer may have changed (after each
step), so nothing polls: the loop wakes when the core has work (or, once,
when work it was armed for went away: see :meth:`LoopTimer.arm`).
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
        """Fire no later than ``at`` (loop time); None: no time is needed.

        Lazy: a handle already set for the same time or sooner is kept (a call's
        deadline or retry moves later with every call; replacing the handle each
        time costs more than the call's own work), and one set when no time is
        needed any more is left to fire. Firing early is harmless: ``fire`` runs
        the core's step, which handles only what is due, and arms again.
        """
        if at is None or (self._at is not None and self._at <= at):
            return
        if self._handle is not None:
            self._handle.cancel()
        self._at = at
        self._handle = self._loop.call_at(at, self._run)

    def cancel(self) -> None:
        """Fire no more (the adapter closes)."""
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        self._at = None

    def _run(self) -> None:
        self._handle = None
        self._at = None
        self._fire()
