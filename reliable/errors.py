"""The exception tree.

Two sides, kept apart on purpose:

* :class:`UsageError` (also a ``ValueError``) is local misuse — a bad address,
  an oversized message, a negative timeout. It is raised by the call that made
  the mistake, before anything is sent, with a message that says what to change.
* :class:`DeliveryFailed` is what the network or the peer did to a message that
  was accepted: the peer became unreachable, restarted, closed or refused it.
  The protocol core never raises these; it reports them as
  :class:`~reliable.events.MessageFailed` events and the adapters raise them
  from ``send``/``result()`` so the caller always learns the fate of a message.

Every :class:`DeliveryFailed` says what the caller may do next in
``delivered``: ``False`` means the message certainly never reached a mailbox
(sending it again cannot duplicate it); ``None`` means it may have (its
acknowledgement may be what was lost), so sending it again could deliver it
twice. A failure is never ``True``: a delivered message gets a receipt.
"""

from __future__ import annotations

import copy
from typing import Any, Literal, TypeVar

__all__ = [
    "NoServiceMember",
    "FateError",
    "AddressError",
    "BindError",
    "AuthenticationFailed",
    "DeliveryFailed",
    "MailboxClosed",
    "MailboxDeleted",
    "MailboxExists",
    "MailboxFull",
    "MailboxGone",
    "MailboxNotFound",
    "MessageRejected",
    "MessageTooBig",
    "MessageTooLarge",
    "NodeClosed",
    "PeerClosed",
    "PeerDroppedSession",
    "PeerRestarted",
    "PeerUnreachable",
    "ReceiveRefused",
    "ReceiveTimeout",
    "ReliableError",
    "SendAborted",
    "SendBufferFull",
    "SendCancelled",
    "SendTimeout",
    "UnknownMailbox",
    "UsageError",
    "WouldBlock",
    "format_address",
]


def format_address(addr: Any) -> str:
    """``host:port`` for IPv4 and names, ``[host]:port`` for IPv6."""
    if isinstance(addr, tuple) and len(addr) >= 2:
        host, port = addr[0], addr[1]
        if isinstance(host, str) and ":" in host:
            return f"[{host}]:{port}"
        return f"{host}:{port}"
    return str(addr)


class FateError(RuntimeError):
    """An input a sent message's fate does not accept in its state (see
    :mod:`reliable.fate`): a bug in the core, never caused by a peer. It lives
    here, interpreted, because a compiled (mypyc) module cannot subclass a
    built-in exception."""


class ReliableError(Exception):
    """Root of every error rmsg raises."""


class UsageError(ReliableError, ValueError):
    """The caller asked for something invalid; nothing was sent."""


class AddressError(UsageError):
    """An address could not be parsed or resolved."""


class BindError(ReliableError, OSError):
    """The operating system refused to bind a local address (in use, not this host's,
    not permitted). An ``OSError`` with the OS's ``errno`` (``errno.EADDRINUSE``...), not
    misuse of the API: the same call may succeed later or on another host."""

    def __init__(self, errno: int, message: str) -> None:
        super().__init__(errno, message)

    def __str__(self) -> str:
        return str(self.strerror)


class MessageTooLarge(UsageError):
    """The message exceeds ``Config.max_message_size``."""


class MessageTooBig(ReliableError):
    """A receive's ``max_size`` is smaller than the message it would take (``msgrcv``'s
    ``E2BIG``); the message stays queued. ``truncate=True`` takes it cut instead."""

    def __init__(self, size: int, max_size: int, mailbox: str) -> None:
        where = f"mailbox {mailbox!r}" if mailbox else "the default mailbox"
        super().__init__(
            f"the next message for this receive in {where} is {size} bytes, more than "
            f"max_size={max_size}; it stays queued: receive it with a larger max_size, "
            "or with truncate=True to take it cut to max_size"
        )
        self.size = size
        self.max_size = max_size
        self.mailbox = mailbox


class MailboxExists(UsageError):
    """``create_mailbox`` named a mailbox this node already has."""


class UnknownMailbox(UsageError):
    """A local call named a mailbox this node does not have."""


class NodeClosed(ReliableError):
    """The node is closed (or closing) and accepts no more work."""


class MailboxDeleted(ReliableError):
    """The mailbox a receive was waiting on was deleted."""


class WouldBlock(ReliableError):
    """A non-blocking call could not proceed without waiting; nothing was sent."""


class SendBufferFull(WouldBlock):
    """Non-blocking send refused: the node's send buffer is full."""


class MailboxFull(WouldBlock):
    """Non-blocking send refused: the destination mailbox is known to be full.

    This node learned it when an earlier message to the mailbox had to wait
    for room; it stays known until that message got in.
    """

    def __init__(self, peer: Any, mailbox: str) -> None:
        super().__init__(
            f"{format_address(peer)}/{mailbox}: mailbox full; wait for room with a "
            "blocking send, or retry later"
        )
        self.peer = peer
        self.mailbox = mailbox


class ReceiveTimeout(ReliableError, TimeoutError):
    """``receive`` found no message before its timeout."""


_Failure = TypeVar("_Failure", bound="DeliveryFailed")

#: How far a message had got when its send was given up (see :class:`SendTimeout`):
#: ``queued`` (no fragment sent), ``partial`` (withdrawn before its last fragment
#: left), ``parked`` (withdrawn from the receiver's full mailbox, confirmed by it),
#: ``unacknowledged`` (wholly sent, never acknowledged: it may have arrived).
Stage = Literal["queued", "partial", "parked", "unacknowledged"]

_NOT_DELIVERED = "it was not delivered: safe to send again"
_MAYBE_DELIVERED = "it may have been delivered: sending it again could deliver it twice"


class DeliveryFailed(ReliableError):
    """An accepted message was not confirmed delivered. ``peer`` is its destination.

    ``delivered`` is ``False`` when the message certainly did not reach a
    mailbox (safe to send again) and ``None`` when it may have (its
    acknowledgement may be what was lost). It was never delivered twice.
    """

    #: Whether the reason itself says the fate (refusals do); otherwise ``str()`` adds it.
    _states_fate = False

    def __init__(self, peer: Any, reason: str, *, delivered: bool | None = None) -> None:
        self._text = f"{format_address(peer)}: {reason}"
        super().__init__(self._text)
        self.peer = peer
        self.delivered = delivered

    def __str__(self) -> str:
        if self._states_fate:
            return self._text
        return f"{self._text}; {_NOT_DELIVERED if self.delivered is False else _MAYBE_DELIVERED}"

    def __reduce__(self) -> tuple[Any, ...]:
        # Subclasses take other arguments than ``args``: rebuild from the attributes
        # (so these errors copy and pickle, e.g. across a process pool).
        return (_restore, (type(self), self.args, self.__dict__.copy()))

    def with_delivered(self: _Failure, delivered: bool | None) -> _Failure:
        """A copy that says ``delivered`` (the core uses it per message of a batch)."""
        clone = copy.copy(self)
        clone.delivered = delivered
        return clone


def _restore(cls: type[DeliveryFailed], args: tuple[Any, ...], state: dict[str, Any]) -> Any:
    error = cls.__new__(cls, *args)
    error.__dict__.update(state)
    return error


class PeerUnreachable(DeliveryFailed):
    """Nothing was heard from the peer for ``after`` seconds while waiting on it.

    ``cause`` is set when the operating system said the peer cannot be reached
    (an ICMP port, host or network unreachable, or a send refused for want of
    a route) and the node failed at once on its word rather than waiting out
    ``Config.peer_timeout``; ``errno`` is then the OS's error number. It is
    also set, with no ``errno``, when the path's datagrams shrank (a PMTU
    black hole) below the size a message was already cut for: the peer still
    answers, but that message can no longer reach it.
    """

    def __init__(
        self,
        peer: Any,
        after: float,
        *,
        cause: str | None = None,
        errno: int | None = None,
        delivered: bool | None = None,
    ) -> None:
        reason = f"no answer for {after:.1f}s" if cause is None else cause
        super().__init__(peer, f"peer unreachable: {reason}", delivered=delivered)
        self.after = after
        self.cause = cause
        self.errno = errno


class PeerRestarted(DeliveryFailed):
    """The peer restarted (new incarnation) while the message was in flight."""

    def __init__(
        self,
        peer: Any,
        old_incarnation: int,
        new_incarnation: int,
        *,
        delivered: bool | None = None,
    ) -> None:
        super().__init__(
            peer,
            f"peer restarted (incarnation {old_incarnation:#x} -> {new_incarnation:#x}) "
            "with the message in flight",
            delivered=delivered,
        )
        self.old_incarnation = old_incarnation
        self.new_incarnation = new_incarnation


class PeerDroppedSession(DeliveryFailed):
    """The peer dropped our session while it held data from us.

    It hears nothing from us for ``Config.peer_timeout`` and releases what it
    was holding (a partial message, messages waiting for mailbox room). The
    message may or may not have been delivered before that.
    """

    def __init__(self, peer: Any) -> None:
        super().__init__(
            peer, "the peer dropped our session after a silence, with the message in flight"
        )


class AuthenticationFailed(DeliveryFailed):
    """The peer refused our datagrams' security: its key or mode differs from ours."""

    def __init__(self, peer: Any, reason: str, *, delivered: bool | None = None) -> None:
        super().__init__(peer, f"security check failed at the peer: {reason}", delivered=delivered)
        self.reason = reason


class PeerClosed(DeliveryFailed):
    """The peer closed before acknowledging the message."""

    def __init__(self, peer: Any, *, delivered: bool | None = None) -> None:
        super().__init__(peer, "peer closed before acknowledging the message", delivered=delivered)


class MailboxGone(PeerClosed):
    """The node holding ``mailbox`` is gone: it closed (and has not come back).

    A send to a node that said goodbye is not retried for ``Config.peer_timeout``:
    unless a new incarnation answers within a short grace, it fails with this
    error. A receive from a mailbox on another node fails with it when that
    node closes. A :class:`PeerClosed`, so code catching that catches it too.
    """

    def __init__(
        self, peer: Any, mailbox: str | None = None, *, delivered: bool | None = None
    ) -> None:
        what = "its mailboxes are" if mailbox is None else f"mailbox {mailbox!r} is"
        DeliveryFailed.__init__(
            self, peer, f"{what} gone: the node closed and has not come back", delivered=delivered
        )
        self.mailbox = mailbox


class ReceiveRefused(ReliableError):
    """The node holding a mailbox refused to let this node receive from it.

    ``reason`` is ``"not_granted"`` (its owner has not granted this node the
    receive right: ``Mailbox.grant``), ``"no_mailbox"`` (no such mailbox, or
    deleted), ``"port"`` (a port has one receiver, its owner) or ``"moved"``
    (ownership went to ``owner``, a ``host:port`` text: receive from there).
    """

    def __init__(self, peer: Any, mailbox: str, reason: str, owner: str | None = None) -> None:
        text = {
            "not_granted": "this node was not granted the right to receive from it "
            "(the owner calls grant() for this node's address)",
            "no_mailbox": "no such mailbox (never created, or deleted)",
            "port": "it is a port: only its owner receives from it",
            "moved": f"its ownership moved to {owner}: receive from {owner}/{mailbox}",
        }.get(reason, reason)
        super().__init__(f"{format_address(peer)}/{mailbox}: receive refused: {text}")
        self.peer = peer
        self.mailbox = mailbox
        self.reason = reason
        self.owner = owner


class MessageRejected(DeliveryFailed):
    """The peer received the message and refused it (``reason`` says why); not delivered."""

    _states_fate = True

    def __init__(self, peer: Any, reason: str) -> None:
        super().__init__(peer, f"message rejected by peer: {reason}", delivered=False)
        self.reason = reason


class MailboxNotFound(MessageRejected):
    """The destination node has no mailbox of that name (never created, or deleted)."""

    def __init__(self, peer: Any, mailbox: str) -> None:
        super().__init__(peer, f"no mailbox {mailbox!r} on that node")
        self.mailbox = mailbox


class MailboxClosed(MessageRejected):
    """The destination mailbox was closed (or deleted) before the message got in."""

    def __init__(self, peer: Any, mailbox: str) -> None:
        super().__init__(peer, f"mailbox {mailbox!r} is closed (or was deleted)")
        self.mailbox = mailbox


_TIMEOUT_TEXT: dict[str, str] = {
    "queued": "not sent within {t:g}s (the link, the peer's window or a full mailbox "
    "held it back); " + _NOT_DELIVERED,
    "partial": "not fully sent within {t:g}s and withdrawn (the receiver discards the "
    "part it got); " + _NOT_DELIVERED,
    "parked": "its mailbox had no room for it within {t:g}s and the receiver gave it "
    "back; " + _NOT_DELIVERED,
    "unacknowledged": "not acknowledged within {t:g}s; " + _MAYBE_DELIVERED,
}

_CANCEL_TEXT: dict[str, str] = {
    "queued": "send cancelled before any of it was sent; " + _NOT_DELIVERED,
    "partial": "send cancelled part-way (the receiver discards the part it got); " + _NOT_DELIVERED,
    "parked": "send cancelled while it waited for room in its mailbox, and the receiver "
    "gave it back; " + _NOT_DELIVERED,
}


class SendTimeout(DeliveryFailed, TimeoutError):
    """The message was not in its mailbox within the send timeout.

    ``stage`` says how far it got, and so ``delivered``: ``"queued"`` (never
    sent), ``"partial"`` (withdrawn before its last fragment left) and
    ``"parked"`` (withdrawn from the receiver's full mailbox, which confirmed
    it) were not delivered (``delivered`` is ``False``: safe to send again);
    ``"unacknowledged"`` was wholly sent but never acknowledged, so it may
    have arrived (``delivered`` is ``None``).
    """

    _states_fate = True

    def __init__(self, peer: Any, timeout: float, *, stage: Stage = "unacknowledged") -> None:
        super().__init__(
            peer,
            _TIMEOUT_TEXT[stage].format(t=timeout),
            delivered=None if stage == "unacknowledged" else False,
        )
        self.timeout = timeout
        self.stage = stage


class SendCancelled(DeliveryFailed):
    """The application cancelled the send and the message was withdrawn: never delivered.

    ``stage`` says where it was withdrawn from: ``"queued"`` (nothing sent
    yet), ``"partial"`` (part-way through sending) or ``"parked"`` (waiting
    at the receiver's full mailbox; the receiver confirmed it gave it back).
    A send that could no longer be withdrawn is not cancelled: it reports its
    real outcome instead.
    """

    _states_fate = True

    def __init__(self, peer: Any, *, stage: Stage = "queued") -> None:
        super().__init__(peer, _CANCEL_TEXT[stage], delivered=False)
        self.stage = stage


class SendAborted(DeliveryFailed):
    """This node closed before the peer acknowledged the message."""

    def __init__(self, peer: Any, *, delivered: bool | None = None) -> None:
        super().__init__(
            peer, "node closed before the peer acknowledged the message", delivered=delivered
        )


class NoServiceMember(DeliveryFailed):
    """No live member of an anycast service took the message.

    ``tried`` lists the members tried, in order, with why each failed. The
    message may have reached one of them (see the failover guarantee in
    docs/groups.md); ``delivered`` is ``False`` only when none of them can
    have it (or none was tried).
    """

    def __init__(
        self,
        service: str,
        tried: tuple[tuple[Any, str], ...] = (),
        *,
        delivered: bool | None = None,
    ) -> None:
        if tried:
            detail = "; ".join(f"{format_address(m)}: {why}" for m, why in tried)
            reason = f"every member tried failed ({detail})"
        else:
            reason = (
                "no live member is known: serve it somewhere, discover it on a group the "
                "members announce on, or list members statically"
            )
        super().__init__(f"anycast://{service}", reason, delivered=delivered if tried else False)
        self.service = service
        self.tried = tried
