"""A sent message's fate: one Enum of states and one (state, input) -> state table.

Theory of operation
-------------------
Everything that decides what a sender reports about a message lives in this
file, in the style of h11's ``_state.py``: :class:`Fate` names where a message
stands, :class:`FateInput` names what can happen to it, and
:data:`TRANSITIONS` says, for every state, which inputs it accepts and the
state each leads to. :func:`advance` is the only way a fate changes; a pair
not in the table raises :class:`FateError` — an internal bug, never remote
garbage, because the session only feeds inputs the peer cannot forge into an
illegal pair (a notice naming a message it never deferred is ignored before
it gets here; every remote-driven input is legal in every live state).

The terminal states (``DELIVERED``, ``REFUSED``, ``TIMED_OUT``, ``CANCELLED``,
``LOST``) have no outgoing transitions: a message enters one of them once, and
the session reports its outcome (a ``MessageDelivered`` or ``MessageFailed``
event) exactly when it enters one. That is "exactly one fate per send" held
by the code, not only by the property tests.

Live states, and how the send stream relates to them:

* ``SENDING``: accepted, in the send stream, no word from the receiver yet
  (queued, partly sent, or wholly sent and awaiting its acknowledgement).
* ``CANCEL_PENDING``: wholly sent, the application cancelled it: it cannot be
  withdrawn, so it runs to its real outcome, unless the receiver parks it
  (then a ``Cancel`` takes it back).
* ``PARKED``: the receiver holds it until its mailbox has room (a
  ``DEFERRED`` notice); its ``Admitted`` or ``Discarded`` decides.
* ``RECLAIMING`` / ``RECLAIMING_CANCELLED``: parked, and a ``Cancel`` went
  because its send timed out / because the application cancelled it; the
  peer's answer decides (``Discarded(CANCELLED)`` is then ``SendTimeout`` /
  ``SendCancelled``).

Whether a parked message is still in the send stream (the ``DEFERRED``
notice came before the acknowledgement completing it) is the stream's
business, not the fate's: ``ACKED`` leaves a parked fate as it is.

The table (:func:`describe` renders it from :data:`TRANSITIONS`; a pair not
listed is illegal)::

    SENDING
        ACKED, ADMIT           -> DELIVERED
        DEFER                  -> PARKED
        REFUSE                 -> REFUSED
        RECLAIMED, TIMEOUT     -> TIMED_OUT
        CANCEL                 -> CANCEL_PENDING
        WITHDRAW               -> CANCELLED
        LOST                   -> LOST
    CANCEL_PENDING
        ACKED, ADMIT           -> DELIVERED
        DEFER                  -> RECLAIMING_CANCELLED
        REFUSE                 -> REFUSED
        RECLAIMED              -> CANCELLED
        TIMEOUT                -> TIMED_OUT
        CANCEL                 -> CANCEL_PENDING
        LOST                   -> LOST
    PARKED
        ACKED, DEFER           -> PARKED
        ADMIT                  -> DELIVERED
        REFUSE                 -> REFUSED
        RECLAIMED              -> TIMED_OUT
        TIMEOUT                -> RECLAIMING
        CANCEL                 -> RECLAIMING_CANCELLED
        LOST                   -> LOST
    RECLAIMING
        ACKED, DEFER, CANCEL   -> RECLAIMING
        ADMIT                  -> DELIVERED
        REFUSE                 -> REFUSED
        RECLAIMED              -> TIMED_OUT
        LOST                   -> LOST
    RECLAIMING_CANCELLED
        ACKED, DEFER, CANCEL   -> RECLAIMING_CANCELLED
        ADMIT                  -> DELIVERED
        REFUSE                 -> REFUSED
        RECLAIMED              -> CANCELLED
        LOST                   -> LOST

(``tests/test_fate.py`` checks this text against :data:`TRANSITIONS`.)
"""

from __future__ import annotations

import enum

from .errors import FateError

__all__ = [
    "DEADLINE_MATTERS",
    "DELIVERED_ON_ACK",
    "RECLAIMING_STATES",
    "TERMINAL",
    "TRANSITIONS",
    "Fate",
    "FateError",
    "FateInput",
    "advance",
    "describe",
]


class Fate(enum.Enum):
    """Where a sent message stands (see the module docstring)."""

    # Members are singletons compared by identity: hash them in C, not by name in
    # Python (Enum's own __hash__), since the table is consulted for every message.
    __hash__ = object.__hash__

    SENDING = "sending"
    CANCEL_PENDING = "cancel-pending"
    PARKED = "parked"
    RECLAIMING = "reclaiming"
    RECLAIMING_CANCELLED = "reclaiming-cancelled"
    DELIVERED = "delivered"  #: entered its mailbox (or, a node message, was acknowledged)
    REFUSED = "refused"  #: the receiver refused it: no mailbox, closed, too large, ...
    TIMED_OUT = "timed-out"  #: its send timeout expired (SendTimeout)
    CANCELLED = "cancelled"  #: the application withdrew it (SendCancelled)
    LOST = "lost"  #: its peer restarted, closed, dropped our session or went silent; we closed


class FateInput(enum.Enum):
    """What can happen to a sent message."""

    __hash__ = object.__hash__  # as Fate's

    ACKED = "acked"  #: the cumulative ack passed its last fragment, no verdict with it
    DEFER = "defer"  #: a DEFERRED notice: the receiver parked it
    ADMIT = "admit"  #: an Admitted outcome: it entered its mailbox
    REFUSE = "refuse"  #: a refusal (notice or Discarded), other than a withdrawal
    RECLAIMED = "reclaimed"  #: Discarded(CANCELLED): the receiver gave it back
    TIMEOUT = "timeout"  #: its send deadline passed
    CANCEL = "cancel"  #: the application cancelled it once wholly sent
    WITHDRAW = "withdraw"  #: the application cancelled it before its last fragment left
    LOST = "lost"  #: the peer restarted, closed, dropped our session or went silent; we closed


_F, _I = Fate, FateInput

#: Every legal (state, input) pair and the state it leads to.
TRANSITIONS: dict[Fate, dict[FateInput, Fate]] = {
    _F.SENDING: {
        _I.ACKED: _F.DELIVERED,
        _I.DEFER: _F.PARKED,
        _I.ADMIT: _F.DELIVERED,
        _I.REFUSE: _F.REFUSED,
        _I.RECLAIMED: _F.TIMED_OUT,
        _I.TIMEOUT: _F.TIMED_OUT,
        _I.CANCEL: _F.CANCEL_PENDING,
        _I.WITHDRAW: _F.CANCELLED,
        _I.LOST: _F.LOST,
    },
    _F.CANCEL_PENDING: {
        _I.ACKED: _F.DELIVERED,
        _I.DEFER: _F.RECLAIMING_CANCELLED,
        _I.ADMIT: _F.DELIVERED,
        _I.REFUSE: _F.REFUSED,
        _I.RECLAIMED: _F.CANCELLED,
        _I.TIMEOUT: _F.TIMED_OUT,
        _I.CANCEL: _F.CANCEL_PENDING,
        _I.LOST: _F.LOST,
    },
    _F.PARKED: {
        _I.ACKED: _F.PARKED,
        _I.DEFER: _F.PARKED,
        _I.ADMIT: _F.DELIVERED,
        _I.REFUSE: _F.REFUSED,
        _I.RECLAIMED: _F.TIMED_OUT,
        _I.TIMEOUT: _F.RECLAIMING,
        _I.CANCEL: _F.RECLAIMING_CANCELLED,
        _I.LOST: _F.LOST,
    },
    _F.RECLAIMING: {
        _I.ACKED: _F.RECLAIMING,
        _I.DEFER: _F.RECLAIMING,
        _I.ADMIT: _F.DELIVERED,
        _I.REFUSE: _F.REFUSED,
        _I.RECLAIMED: _F.TIMED_OUT,
        _I.CANCEL: _F.RECLAIMING,  # the timeout already asked for it back
        _I.LOST: _F.LOST,
    },
    _F.RECLAIMING_CANCELLED: {
        _I.ACKED: _F.RECLAIMING_CANCELLED,
        _I.DEFER: _F.RECLAIMING_CANCELLED,
        _I.ADMIT: _F.DELIVERED,
        _I.REFUSE: _F.REFUSED,
        _I.RECLAIMED: _F.CANCELLED,
        _I.CANCEL: _F.RECLAIMING_CANCELLED,
        _I.LOST: _F.LOST,
    },
    _F.DELIVERED: {},
    _F.REFUSED: {},
    _F.TIMED_OUT: {},
    _F.CANCELLED: {},
    _F.LOST: {},
}

#: The states a message ends in: each entered once, with its outcome reported then.
TERMINAL = frozenset(state for state, moves in TRANSITIONS.items() if not moves)
#: States in which a passing send deadline still does something.
DEADLINE_MATTERS = frozenset(state for state, moves in TRANSITIONS.items() if _I.TIMEOUT in moves)
#: States the acknowledgement completing the message ends (nothing else to wait for).
DELIVERED_ON_ACK = frozenset(
    state for state, moves in TRANSITIONS.items() if moves.get(_I.ACKED) in TERMINAL
)
#: States in which a ``Cancel`` for the message is on its way to the peer.
RECLAIMING_STATES = frozenset({_F.RECLAIMING, _F.RECLAIMING_CANCELLED})


def describe() -> str:
    """The transition table as text: per live state, each next state and the inputs to it."""
    lines: list[str] = []
    for state, moves in TRANSITIONS.items():
        if not moves:
            continue
        lines.append(state.name)
        targets: dict[Fate, list[str]] = {}
        for event, target in moves.items():
            targets.setdefault(target, []).append(event.name)
        for target, names in targets.items():
            lines.append(f"    {', '.join(names):<22} -> {target.name}")
    return "\n".join(lines)


def advance(state: Fate, event: FateInput) -> Fate:
    """The state ``event`` leads ``state`` to; raises :class:`FateError` if it is illegal."""
    try:
        return TRANSITIONS[state][event]
    except KeyError:
        raise FateError(f"a message in state {state.name} cannot take {event.name}") from None
