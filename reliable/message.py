"""What the adapters hand to applications: received messages and delivery receipts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .errors import format_address
from .events import MessageDelivered

__all__ = ["Message", "Receipt"]


@dataclass(frozen=True, slots=True, kw_only=True, eq=False)
class Message:
    """A message received from ``source`` (the sending node's address).

    Compared by identity: two receives never return the same message, and
    equal bytes from the same sender are still two messages.
    """

    source: Any
    data: bytes
    msg_type: int = 0
    priority: int = 0
    mailbox: str = ""
    msg_id: int = 0
    incarnation: int = 0

    @property
    def sender(self) -> str:
        """The source as ``host:port`` text."""
        return format_address(self.source)


@dataclass(frozen=True, slots=True, kw_only=True)
class Receipt:
    """Proof of delivery: the message entered its mailbox on the destination node.

    For a rendezvous mailbox (capacity 0) that means a receiver took it, and
    ``receiver`` says which.
    """

    peer: Any
    size: int  #: bytes delivered
    fragments: int
    transmissions: int  #: datagrams sent for the message, retransmissions included
    elapsed: float  #: seconds from send to acknowledgement
    incarnation: int  #: the incarnation of the peer that acknowledged it
    mailbox: str = ""  #: the destination mailbox ("" for the node's default)
    deferred: bool = False  #: the mailbox was full and the message waited for room
    receiver: str | None = None  #: which receiver took it, when known (rendezvous)

    @property
    def retransmissions(self) -> int:
        return self.transmissions - self.fragments

    @classmethod
    def from_event(cls, event: MessageDelivered) -> Receipt:
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
        )
