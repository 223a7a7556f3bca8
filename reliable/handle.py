"""The mailbox handle both adapters share: managing one mailbox of a node.

Theory of operation. ``driver.MailboxHandle`` (re-exported there) is the base
of ``node.Mailbox`` and ``aio.AsyncMailbox``. It lives in this module, which is
always interpreted, because a compiled (mypyc) class cannot be the base of an
interpreted one unless opened for it, cannot be weakly referenced (an owner
handle is tracked with ``weakref.finalize``), and mypyc cannot compile the
closures its methods hand to the node; and nothing here runs per message, so
compiling it would gain nothing.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from types import EllipsisType
from typing import Any, Protocol

from . import errors
from .addressing import Address, normalize, parse_address
from .endpoint import Endpoint
from .mailbox import Selector
from .message import Message
from .stats import MailboxStats, NodeStats

__all__ = ["MailboxHandle", "node_address"]


class _ManagedNode(Protocol):
    def _manage(self, name: str, action: str, owner: int | None) -> None: ...

    def _core(self, call: Callable[[Endpoint, float], Any]) -> Any: ...

    def _port_abandoned(self, name: str, owner: int) -> None: ...

    def stats(self) -> NodeStats: ...


class MailboxHandle:
    """What the blocking and asyncio mailbox handles share: managing the mailbox.

    The handle a ``create_mailbox`` returns carries the owner token, which a
    port requires of its receiver and of whoever closes, opens or deletes it;
    other handles carry ``None``. When a port's owner handle is garbage
    collected, the port is deleted: nobody could ever receive from it, so
    senders must learn ``MailboxNotFound`` rather than be acknowledged into
    the void. The deletion runs on the node's own schedule (the next thread to
    drive the node, or the event loop), never inside the garbage collector, which may run while
    the node's lock is held.
    """

    def __init__(self, node: _ManagedNode, name: str, owner: int | None) -> None:
        self._managed = node
        self.name = name
        self._owner = owner
        if owner is not None:
            weakref.finalize(self, node._port_abandoned, name, owner)

    def close(self) -> None:
        """Refuse new messages (their senders get ``MailboxClosed``); queued ones stay."""
        self._managed._manage(self.name, "close", self._owner)

    def open(self) -> None:
        """Accept messages again after :meth:`close`."""
        self._managed._manage(self.name, "open", self._owner)

    def delete(self) -> None:
        """Remove the mailbox; pending senders and waiting receivers fail cleanly."""
        self._managed._manage(self.name, "delete", self._owner)

    def stats(self) -> MailboxStats:
        return self._managed.stats().mailbox(self.name)

    # Peek, locks and explicit delete (issue 19): one core call each, then the
    # node commits a durable mailbox's writes before the call returns.

    def peek(self, *, msg_type: int = 0, except_type: bool = False) -> Message | None:
        """The message a receive would take now, left in the mailbox (browse); or None."""
        selector = Selector.of(None, msg_type, except_type)
        owner = self._owner
        return self._managed._core(  # type: ignore[no-any-return]
            lambda ep, now: ep.peek(self.name, selector, owner=owner, now=now)
        )

    def ack(self, message: Message) -> bool:
        """Remove ``message``, received with ``lock=``, for good (durable: committed on
        return). False if its lock had expired: it went back, and may be received again."""
        owner = self._owner
        return bool(
            self._managed._core(lambda ep, now: ep.ack(self.name, message, owner=owner, now=now))
        )

    def release(self, message: Message) -> bool:
        """Give ``message``, received with ``lock=``, back to the head of its priority."""
        owner = self._owner
        return bool(
            self._managed._core(
                lambda ep, now: ep.release(self.name, message, owner=owner, now=now)
            )
        )

    def remove(self, message: Message) -> bool:
        """Explicit delete of a peeked (or locked) message; False if it is already gone."""
        owner = self._owner
        return bool(
            self._managed._core(
                lambda ep, now: ep.remove_message(self.name, message, owner=owner, now=now)
            )
        )

    def set_limits(
        self,
        capacity: int | EllipsisType | None = ...,
        max_bytes: int | EllipsisType | None = ...,
    ) -> None:
        """Change the capacity and/or max_bytes now (``mq_setattr``, ``IPC_SET``); what
        is left out keeps its value. Raising them admits waiting (parked) messages."""
        now_stats = self.stats()
        cap = now_stats.capacity if capacity is ... else capacity
        size = now_stats.max_bytes if max_bytes is ... else max_bytes
        owner = self._owner
        self._managed._core(lambda ep, now: ep.set_limits(self.name, cap, size, now, owner=owner))

    # Receivers on other nodes (reliable/remote_mailbox.py).

    def grant(self, node: str | tuple[Any, ...]) -> None:
        """Let ``node`` (``host:port``, as the receiving node is bound) receive from this
        mailbox with ``RemoteMailbox.receive``; others are refused. Not for a port."""
        addr = node_address(node)
        name = self.name

        def grant(ep: Endpoint, now: float) -> None:
            if not ep.has_mailbox(name):
                raise errors.UnknownMailbox(f"no mailbox {name!r} on this node")
            if ep.port_owner(name) is not None:
                raise errors.UsageError(
                    f"mailbox {name!r} is a port: its one receiver is its owner; create a "
                    "plain mailbox to share it with other nodes"
                )
            ep.remote.grant(name, addr)

        self._managed._core(grant)

    def revoke(self, node: str | tuple[Any, ...]) -> None:
        """Take the receive right back from ``node``; its waiting receives are refused."""
        addr = node_address(node)
        self._managed._core(lambda ep, now: ep.remote.revoke(self.name, addr, now))

    def granted(self) -> list[Address]:
        """The nodes granted the receive right."""
        return list(self._managed._core(lambda ep, now: ep.remote.granted(self.name)))

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"


def node_address(node: str | tuple[Any, ...]) -> Address:
    """A node's ``host:port`` (or tuple) as the peer key its datagrams arrive under."""
    if isinstance(node, tuple):
        return normalize(node)
    return parse_address(node)
