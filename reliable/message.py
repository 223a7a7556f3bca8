"""What the adapters hand to applications: received messages and delivery receipts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from .addressing import CoreAddress
from .errors import format_address

__all__ = ["DeliveryFacts", "GroupReceipt", "Message", "Receipt"]


@dataclass(slots=True, eq=False)
class Message:
    """A message received from ``source`` (the sending node's address).

    Compared by identity: two receives never return the same message, and
    equal bytes from the same sender are still two messages. Treat it as
    immutable (it is not frozen, for speed: see :mod:`reliable.events`).
    """

    source: CoreAddress
    data: bytes
    msg_type: int = 0
    priority: int = 0
    mailbox: str = ""
    msg_id: int = 0
    incarnation: int = 0
    group: str | None = None  #: the group it was sent to (``multicast://...``), if any
    #: bytes cut off its end by a receive with ``max_size`` and ``truncate=True``
    #: (``msgrcv``'s ``MSG_NOERROR``); 0: ``data`` is the whole message
    truncated: int = 0

    # Written out, not generated: a dataclass's generated __init__ stays interpreted
    # code in the compiled core (about 5x the cost per object there). Same
    # signature and defaults as the generated one.
    def __init__(
        self,
        source: CoreAddress,
        data: bytes,
        msg_type: int = 0,
        priority: int = 0,
        mailbox: str = "",
        msg_id: int = 0,
        incarnation: int = 0,
        group: str | None = None,
        truncated: int = 0,
    ) -> None:
        self.source = source
        self.data = data
        self.msg_type = msg_type
        self.priority = priority
        self.mailbox = mailbox
        self.msg_id = msg_id
        self.incarnation = incarnation
        self.group = group
        self.truncated = truncated

    @property
    def sender(self) -> str:
        """The source as ``host:port`` text."""
        return format_address(self.source)


class DeliveryFacts(Protocol):
    """What a :class:`Receipt` is made from: the fields of ``events.MessageDelivered``.

    A protocol rather than that class, so this module imports nothing from
    events.py, which imports this one at run time (its compiled dataclasses
    need their field types then): the two modules depend one way only.
    """

    @property
    def peer(self) -> CoreAddress: ...
    @property
    def size(self) -> int: ...
    @property
    def fragments(self) -> int: ...
    @property
    def transmissions(self) -> int: ...
    @property
    def elapsed(self) -> float: ...
    @property
    def incarnation(self) -> int: ...
    @property
    def mailbox(self) -> str: ...
    @property
    def deferred(self) -> bool: ...
    @property
    def receiver(self) -> str | None: ...
    @property
    def failovers(self) -> tuple[tuple[CoreAddress, str], ...]: ...


@dataclass(frozen=True, slots=True, kw_only=True)
class Receipt:
    """Proof of delivery: the message entered its mailbox on the destination node.

    For a rendezvous mailbox (capacity 0) that means a receiver took it, and
    ``receiver`` says which.
    """

    peer: CoreAddress
    size: int  #: bytes delivered
    fragments: int
    #: datagrams sent for the message, retransmissions included (not the resend of a
    #: first flight the peer dropped unread while it validated our address)
    transmissions: int
    elapsed: float  #: seconds from send to acknowledgement
    incarnation: int  #: the incarnation of the peer that acknowledged it
    mailbox: str = ""  #: the destination mailbox ("" for the node's default)
    deferred: bool = False  #: the mailbox was full and the message waited for room
    receiver: str | None = None  #: which receiver took it, when known (rendezvous)
    #: anycast only: members tried first that failed, with why (see docs/groups.md)
    failovers: tuple[tuple[CoreAddress, str], ...] = ()

    @property
    def retransmissions(self) -> int:
        return self.transmissions - self.fragments

    @classmethod
    def from_event(cls, event: DeliveryFacts) -> Receipt:
        """The receipt a :class:`~reliable.events.MessageDelivered` event describes."""
        return cls(
            peer=event.peer,
            size=event.size,
            fragments=event.fragments,
            transmissions=event.transmissions,
            elapsed=event.elapsed,
            incarnation=event.incarnation,
            mailbox=event.mailbox,
            deferred=event.deferred,
            receiver=event.receiver,
            failovers=event.failovers,
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class GroupReceipt:
    """What became of one message sent to a group: who has it, and who does not and why.

    ``acked`` members acknowledged it: it is in their mailbox (or parked there
    until it has room). ``missing`` maps every other member the message was
    meant for, the live members when it was sent, to the reason: ``timeout``
    (no acknowledgement in time), ``left``, ``unreachable``, ``restarted``, or
    a refusal (``no_mailbox``, ``mailbox_closed``, ``too_large``, ``no_memory``).
    """

    group: str  #: the destination, e.g. ``multicast://239.1.2.3:7000/inbox``
    size: int
    fragments: int
    transmissions: int  #: datagrams sent for it, to the group and unicast repairs
    elapsed: float
    acked: tuple[CoreAddress, ...]
    missing: dict[CoreAddress, str]

    @property
    def complete(self) -> bool:
        """Every member it was meant for has it."""
        return not self.missing

    def __str__(self) -> str:
        have = ", ".join(format_address(m) for m in self.acked) or "nobody"
        text = f"{self.group}: {len(self.acked)} acked ({have})"
        if self.missing:
            gone = ", ".join(f"{format_address(m)} ({why})" for m, why in self.missing.items())
            text += f"; {len(self.missing)} missing: {gone}"
        return text
