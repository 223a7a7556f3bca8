"""Mailbox handles: the base both adapters share, and the blocking ``Mailbox``.

Theory of operation. ``MailboxHandle`` (re-exported by ``driver``) is the base
of ``node.Mailbox`` (defined here, re-exported by ``node``) and
``aio.AsyncMailbox``. They live in this module, which is always interpreted,
because a compiled (mypyc) class cannot be the base of an interpreted one
unless opened for it (which needs ``mypy_extensions`` at run time, and
``reliable`` imports only the standard library), cannot be weakly referenced
(an owner handle is tracked with ``weakref.finalize``), and mypyc cannot
compile the closures these methods hand to the node. Nothing here runs per
message: a handle's receive calls straight into the node.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from types import EllipsisType
from typing import TYPE_CHECKING, Any, Protocol

from . import errors
from .addressing import Address, normalize, parse_address
from .endpoint import Endpoint
from .mailbox import Selector, Sources
from .message import Message
from .stats import MailboxStats, NodeStats

if TYPE_CHECKING:
    from .node import Node

__all__ = ["Mailbox", "MailboxHandle", "node_address"]

#: As reliable.driver's: arguments of any type, checked inside (a UsageError either core).
Int = Any
Seconds = Any


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


class Mailbox(MailboxHandle):
    """A handle on one mailbox of a :class:`~reliable.node.Node`.

    The handle :meth:`~reliable.node.Node.create_mailbox` returns is the owner's: for a
    port it is the only one that may receive. Senders on other nodes address
    the mailbox as ``host:port/name``.
    """

    def __init__(self, node: Node, name: str, owner: int | None) -> None:
        super().__init__(node, name, owner)
        self._node = node

    def receive(
        self,
        timeout: Seconds = None,
        *,
        source: Sources = None,
        msg_type: Int = 0,
        except_type: bool = False,
        receiver: str | None = None,
        max_size: int | None = None,
        truncate: bool = False,
        lock: float | None = None,
    ) -> Message:
        """As :meth:`~reliable.node.Node.receive`, from this mailbox.

        ``lock`` (seconds): take the message under a lock instead of removing
        it; :meth:`ack` removes it, :meth:`release` gives it back, and if
        neither comes in time it is receivable again (a visibility timeout).
        """
        got = self._node._receive(
            self.name,
            self._owner,
            source,
            msg_type,
            except_type,
            receiver,
            timeout,
            1,
            wait=True,
            lock=lock,
            max_size=max_size,
            truncate=truncate,
        )
        return got[0]

    def transfer(self, to: str | tuple[Any, ...], timeout: Seconds = 5.0) -> dict[str, Any]:
        """Move this mailbox to the node at ``to``: its queued messages (in order), its
        grants, and the right to manage it. ``to`` must have created an empty
        mailbox of the same name (its consent; its limits apply from then on).

        Returns ``{"mailbox", "owner", "moved"}`` once the new owner holds the
        messages. Senders that still address this node are refused with
        ``MailboxNotFound`` (not delivered: safe to send again) and told the new
        owner; their node sends there from then on. Raises
        :class:`~reliable.errors.UsageError` if the new owner refused (the mailbox
        then stays here, messages and all), or for a port, a durable mailbox, or one
        with messages under a lock.
        """
        return self._node._transfer(self.name, to, timeout)

    def receive_nowait(
        self,
        *,
        source: Sources = None,
        msg_type: Int = 0,
        except_type: bool = False,
        receiver: str | None = None,
        max_size: int | None = None,
        truncate: bool = False,
    ) -> Message | None:
        """As :meth:`~reliable.node.Node.receive_nowait`, from this mailbox."""
        got = self._node._receive(
            self.name,
            self._owner,
            source,
            msg_type,
            except_type,
            receiver,
            None,
            1,
            wait=False,
            max_size=max_size,
            truncate=truncate,
        )
        return got[0] if got else None

    def receive_many(
        self,
        max_count: int,
        timeout: Seconds = None,
        *,
        source: Sources = None,
        msg_type: Int = 0,
        except_type: bool = False,
        receiver: str | None = None,
        max_size: int | None = None,
        truncate: bool = False,
        lock: float | None = None,
    ) -> list[Message]:
        """As :meth:`~reliable.node.Node.receive_many`, from this mailbox; with ``lock`` (seconds)
        each message is taken under its own lock, as :meth:`receive` does."""
        from .driver import check_count  # (driver imports this module)

        check_count(max_count)
        try:
            return self._node._receive(
                self.name,
                self._owner,
                source,
                msg_type,
                except_type,
                receiver,
                timeout,
                max_count,
                wait=True,
                lock=lock,
                max_size=max_size,
                truncate=truncate,
            )
        except errors.ReceiveTimeout:
            return []
