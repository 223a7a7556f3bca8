"""Typed events the protocol core hands to its driver via ``Endpoint.next_event()``.

Events are facts, in the order they happened. The adapters turn them into
resolved handles, queued messages and raised errors; a simulation can assert
on them directly.

Treat them as immutable. They are plain slotted dataclasses (hashable by
value, as a frozen one is), not frozen ones: a frozen dataclass sets each
field through ``object.__setattr__``, and the per-message events
(``MessageReceived``, ``MessageDelivered``) and :class:`~reliable.message.Message`
being frozen cost about 15% of the core's instructions per message.
"""

from __future__ import annotations

from dataclasses import dataclass

from .addressing import CoreAddress
from .errors import DeliveryFailed, ReliableError

# A real import, not a TYPE_CHECKING one: compiled (mypyc) dataclasses need their field
# types at import. message.py imports nothing from here (its Receipt.from_event takes a
# DeliveryFacts protocol, which MessageDelivered satisfies), so there is no loop.
from .message import GroupReceipt, Message

__all__ = [
    "Closed",
    "GroupSendDone",
    "MemberJoined",
    "ManageAnswered",
    "MemberLeft",
    "Event",
    "MessageDelivered",
    "MessageFailed",
    "MessageReceived",
    "PeerClosed",
    "PeerRejectedUs",
    "PeerRestarted",
    "PeerUnreachable",
    "ReceiveFailed",
    "SessionDropped",
    "StatsReceived",
    "MessageTaken",
]


@dataclass(slots=True, kw_only=True, unsafe_hash=True)
class Event:
    """Base of all events."""


@dataclass(slots=True, kw_only=True, unsafe_hash=True)
class MessageReceived(Event):
    """A whole message from ``peer`` arrived at its mailbox, in that peer's send order
    within a priority (a higher priority may overtake; docs/protocol.md section 4).

    A fact for observers and tests: the message itself waits in the mailbox
    (queued, or parked if the mailbox is full) until a receive takes it.
    Queued only by an ``Endpoint(..., arrival_events=True)``: built only when
    someone asked to observe it.
    """

    peer: CoreAddress
    data: bytes
    msg_type: int
    priority: int
    mailbox: str
    msg_id: int
    incarnation: int


@dataclass(slots=True, unsafe_hash=True)
class MessageDelivered(Event):
    """The peer acknowledged every fragment of message ``ticket`` (the receipt)."""

    ticket: int
    peer: CoreAddress
    size: int  #: message bytes
    fragments: int
    #: datagrams sent for it, retransmissions included (not the resend of a
    #: first flight the peer dropped unread while it validated our address)
    transmissions: int
    elapsed: float  #: seconds from ``send`` to acknowledgement
    incarnation: int  #: the peer incarnation that acknowledged it
    mailbox: str = ""
    deferred: bool = False  #: it waited at the peer for room in its mailbox
    receiver: str | None = None  #: who took it, for a rendezvous mailbox
    failovers: tuple[tuple[CoreAddress, str], ...] = ()  #: anycast: members tried before, and why

    # Written out, not generated: a dataclass's generated __init__ stays interpreted
    # code in the compiled core (about 5x the cost per object there). Same
    # signature and defaults as the generated one.
    def __init__(
        self,
        ticket: int,
        peer: CoreAddress,
        size: int,
        fragments: int,
        transmissions: int,
        elapsed: float,
        incarnation: int,
        mailbox: str = "",
        deferred: bool = False,
        receiver: str | None = None,
        failovers: tuple[tuple[CoreAddress, str], ...] = (),
    ) -> None:
        self.ticket = ticket
        self.peer = peer
        self.size = size
        self.fragments = fragments
        self.transmissions = transmissions
        self.elapsed = elapsed
        self.incarnation = incarnation
        self.mailbox = mailbox
        self.deferred = deferred
        self.receiver = receiver
        self.failovers = failovers


@dataclass(slots=True, kw_only=True, unsafe_hash=True)
class MessageFailed(Event):
    """Message ``ticket`` will not be confirmed; ``error`` says why."""

    ticket: int
    peer: CoreAddress
    error: DeliveryFailed


@dataclass(slots=True, unsafe_hash=True)
class MessageTaken(Event):
    """Waiting receive ``waiter`` (see ``Endpoint.wait_for_message``) got ``message``."""

    waiter: int
    message: Message


@dataclass(slots=True, kw_only=True, unsafe_hash=True)
class ReceiveFailed(Event):
    """Waiting receive ``waiter`` ended without a message (its mailbox was deleted)."""

    waiter: int
    error: ReliableError


@dataclass(slots=True, kw_only=True, unsafe_hash=True)
class StatsReceived(Event):
    """``peer`` answered stats query ``request`` (``Endpoint.query_stats``) with JSON ``body``."""

    peer: CoreAddress
    request: int
    body: bytes


@dataclass(slots=True, kw_only=True, unsafe_hash=True)
class ManageAnswered(Event):
    """``peer`` answered management request ``request`` (``Endpoint.manage``):
    ``status`` 0 with a JSON ``body``, else an error text (see reliable/remote_mailbox.py)."""

    peer: CoreAddress
    request: int
    status: int
    body: bytes


@dataclass(slots=True, kw_only=True, unsafe_hash=True)
class PeerRestarted(Event):
    """``peer`` came back with a new incarnation; its old session ended."""

    peer: CoreAddress
    old_incarnation: int
    new_incarnation: int


@dataclass(slots=True, kw_only=True, unsafe_hash=True)
class PeerUnreachable(Event):
    """``peer`` stayed silent for ``silent_for`` seconds while we waited on it.

    Or, with ``cause`` set, the operating system said it cannot be reached
    (``cause`` says how, ``errno`` is the OS's number if it gave one).
    """

    peer: CoreAddress
    silent_for: float
    cause: str | None = None
    errno: int | None = None


@dataclass(slots=True, kw_only=True, unsafe_hash=True)
class SessionDropped(Event):
    """This node forgot its session with ``peer``, releasing ``released`` bytes.

    ``reason`` is ``"idle"`` (nothing pending, silent past ``Config.idle_timeout``
    and a probe), ``"unreachable"`` (it held memory for a peer that went
    silent), or ``"evicted"`` (the least recently heard idle session, to make
    room under ``Config.max_peers``). Nothing accepted is lost: an idle session
    has nothing in flight, and a peer heard from again resumes where it was.
    """

    peer: CoreAddress
    reason: str
    released: int


@dataclass(slots=True, kw_only=True, unsafe_hash=True)
class PeerRejectedUs(Event):
    """``peer`` answered our datagrams with AUTH_FAILED: our keys or modes differ."""

    peer: CoreAddress
    error: DeliveryFailed


@dataclass(slots=True, kw_only=True, unsafe_hash=True)
class PeerClosed(Event):
    """``peer`` announced it is closing; its incarnation ended."""

    peer: CoreAddress
    incarnation: int


@dataclass(slots=True, kw_only=True, unsafe_hash=True)
class Closed(Event):
    """This endpoint finished closing; it sends and accepts nothing more."""


@dataclass(slots=True, kw_only=True, unsafe_hash=True)
class GroupSendDone(Event):
    """Group message ``ticket`` is resolved: ``receipt`` says which members have it."""

    ticket: int
    receipt: GroupReceipt


@dataclass(slots=True, kw_only=True, unsafe_hash=True)
class MemberJoined(Event):
    """``member`` joined ``group`` (a group address or ``anycast://`` service), as heard here."""

    group: str
    member: CoreAddress
    incarnation: int


@dataclass(slots=True, kw_only=True, unsafe_hash=True)
class MemberLeft(Event):
    """``member`` left ``group``; ``reason`` is left, unreachable, restarted or withdrawn."""

    group: str
    member: CoreAddress
    incarnation: int
    reason: str
