"""Receivers on other nodes, remote management, and prompt news of departed nodes.

Theory of operation
-------------------

**Pull, not push.** A mailbox lives on one node, its *owner*. A receiver on
another node does not subscribe; each receive it makes sends one ``Pull``
(a credit of one message) to the owner. The owner treats the pull exactly as
a local receive: it takes the first message the pull's selection chooses
or, finding none, queues the pull among the mailbox's waiting receivers
(:class:`~reliable.mailbox.Mailbox`'s waiter line, shared by local and remote
receivers). A message therefore goes to exactly one receiver across all
nodes, and waiting receivers are served in turn, longest waiting first,
whichever node they are on. Because a receiver holds at most one credit per
waiting receive, a burst is shared out in turn too: nobody can take a run of
messages while another receiver waits.

**Hand-over under a lock.** The owner takes the message *under a lock*
(:meth:`Endpoint.take` with ``lock``), so it stays in the mailbox (and on
disk, if durable), invisible to other receives, and sends it in a
``Handover``. It removes it only when the receiving node answers
``Taken(accepted=1)``; ``Taken(accepted=0)`` (the receive was cancelled
meanwhile) gives it back at once. Node messages ride the session's
reliable, ordered stream, so each of these arrives exactly once per session.
If the receiving node's session ends — it closed, restarted, or stayed
silent for ``Config.peer_timeout`` — every message handed to it and not yet
acknowledged goes back to the head of its mailbox for the next receiver,
and its waiting pulls are forgotten. A lock lease (``LEASE``) backs this
up. The receiving node remembers the identities of the messages it handed
to its application (``SEEN``, bounded) and acknowledges a second copy
without delivering it: a message requeued while its first copy was in fact
delivered (the receiving node was cut off, not dead) reaches the
application once if it comes back to the same node.

**Rights.** Only nodes the owner granted the receive right to
(:meth:`RemoteMailboxes.grant`, by address) may pull; others get a
``Refused`` naming why, and so does a pull from a port (one receiver: its
owner), from a mailbox that does not exist or was deleted (waiting pulls are
refused when it is deleted), or from one whose ownership moved (the refusal
names the new owner).

**Management.** ``Manage`` asks a node to inspect a mailbox, change its
limits or delete it; ``ManageReply`` answers with JSON or an error. A node
serves it only with ``Config.serve_stats`` and only to a peer on its own
host (a loopback or its own address: as ``ipcrm`` only for the owner);
in the sealed security modes only key holders get a session at all.

**Transfer of ownership.** :meth:`RemoteMailboxes.transfer` takes the
mailbox off the old owner's registry and sends ``Adopt``, one ``Move`` per
queued message (in order) and ``AdoptEnd`` to the new owner, which consents
by having created a plain mailbox of that name. The old owner keeps the
messages until ``Adopted`` says the new one holds every one; a refusal, or
the new owner's session ending first, puts the mailbox back. A sender
refused for a mailbox that moved is sent ``Moved``, and its node redirects
later sends for that mailbox; a waiting pull follows ``Refused(moved)``.
Hand-overs of moved messages name the node that first accepted them: their
``msg_id`` belongs to that node's session with the sender.

**Departed nodes.** A node that closes says so (CLOSE). A later send to
that address would otherwise be retried for ``Config.peer_timeout``; here it
gets a grace of ``gone_grace(config)`` for a new incarnation to answer, and
then fails with :class:`~reliable.errors.MailboxGone`. A node that comes
back (any packet from it) ends the grace.

Old nodes know none of the operations here (16-22): they count them as
``malformed.control`` and drop them, so a pull to an old node is never
answered and the receive ends by its timeout.

Wire formats are in ``docs/protocol.md`` (section 8).
"""

from __future__ import annotations

import json
import struct
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from . import errors, events
from .addressing import parse_address
from .config import Config
from .mailbox import Selector
from .message import Message
from .node_messages import MalformedNodeMessage, RawNodeMessage

if TYPE_CHECKING:
    from .node_messages import NodeMessage
    from .peer import PeerSession
    from .stats import NodeStats

__all__ = [
    "FIRST_OP",
    "Handover",
    "Manage",
    "ManageReply",
    "Pull",
    "PullCancel",
    "Refused",
    "RemoteMailboxes",
    "Taken",
    "decode_remote",
    "encode_remote",
    "gone_grace",
]

FIRST_OP = 16  #: the first operation code of this module (node_messages.py's end below it)
OP_PULL, OP_PULL_CANCEL, OP_HANDOVER, OP_TAKEN, OP_REFUSED, OP_MANAGE, OP_MANAGE_REPLY = range(
    16, 23
)
OP_ADOPT, OP_MOVE, OP_ADOPT_END, OP_ADOPTED, OP_MOVED = range(23, 28)
ADOPT_STATUS = ("ok", "no_mailbox", "port", "durable", "not_empty")
MOVED_MEMORY = 256  #: mailboxes a node remembers having handed to another owner
ORIGINS = 65536  #: moved messages whose first owner a node remembers (oldest forgotten)
SEEN = 4096  #: message identities a receiving node remembers, to deliver each once
LEASE_MIN = 60.0  #: seconds: the least lock lease of a handed-over message

REASONS = ("not_granted", "no_mailbox", "port", "moved")
ACTIONS = ("inspect", "set_limits", "delete", "grant", "revoke", "transfer")
STATUS_OK, STATUS_REFUSED, STATUS_ERROR = 0, 1, 2

_U32 = struct.Struct("!I")
_PULL = struct.Struct("!IiB")  # request, msg_type, except_type
_HANDOVER = struct.Struct("!IIiHQQ")  # request, key, msg_type, priority, src incarnation, msg id
_TAKEN = struct.Struct("!IB")  # key, accepted
_REFUSED = struct.Struct("!IB")  # request, reason
_MANAGE = struct.Struct("!IBqq")  # request, action, capacity, max_bytes (-1: None)
_MANAGE_REPLY = struct.Struct("!IB")  # request, status
_COUNTED = struct.Struct("!II")  # request, count
_ADOPTED = struct.Struct("!IBI")  # request, status, count


def gone_grace(config: Config) -> float:
    """Seconds a send to a node that closed waits for a new incarnation to answer:
    long enough for one retransmission of a lost first datagram, far below
    ``peer_timeout``."""
    return min(config.peer_timeout, 1.5 * config.initial_rto)


# ------------------------------------------------------------------ messages


@dataclass(frozen=True, slots=True)
class Pull:
    """A credit of one: hand one message of ``mailbox`` that the selection admits."""

    request: int
    mailbox: str
    msg_type: int = 0
    except_type: bool = False
    receiver: str = ""  #: a label for the owner's stats


@dataclass(frozen=True, slots=True)
class PullCancel:
    """The receive behind pull ``request`` gave up (timeout, cancellation)."""

    request: int


@dataclass(frozen=True, slots=True)
class Handover:
    """Message for pull ``request``; ``key`` names it in the answer (:class:`Taken`)."""

    request: int
    key: int
    msg_type: int
    priority: int
    source: str  #: the original sender, ``host:port``
    incarnation: int  #: the original sender's incarnation
    msg_id: int
    data: bytes
    origin: str = ""  #: the node that accepted it, if not the owner (it moved since)


@dataclass(frozen=True, slots=True)
class Taken:
    """The receiving node took handed-over message ``key`` (or, not ``accepted``,
    gives it back: nobody waits for it any more)."""

    key: int
    accepted: bool


@dataclass(frozen=True, slots=True)
class Refused:
    """Pull ``request`` is refused; ``reason`` is one of :data:`REASONS`; ``detail``
    is the new owner's address for ``moved``."""

    request: int
    reason: str
    detail: str = ""


@dataclass(frozen=True, slots=True)
class Manage:
    """Inspect, set the limits of, delete, grant or revoke a mailbox (``ACTIONS``)."""

    request: int
    action: str
    mailbox: str
    capacity: int | None = None
    max_bytes: int | None = None
    node: str = ""  #: grant/revoke: the node's ``host:port``


@dataclass(frozen=True, slots=True)
class ManageReply:
    """The answer to :class:`Manage` ``request``: ``STATUS_OK`` with a JSON body, or an
    error text."""

    request: int
    status: int
    body: bytes


@dataclass(frozen=True, slots=True)
class Adopt:
    """Transfer ``request``: take over ``mailbox`` (the new owner created it, empty);
    ``granted`` lists the nodes with the receive right. Its messages follow."""

    request: int
    mailbox: str
    granted: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Move:
    """One message of transfer ``request``, in the mailbox's order."""

    request: int
    msg_type: int
    priority: int
    source: str
    incarnation: int
    msg_id: int
    data: bytes
    origin: str = ""  #: the node that accepted it, if not the old owner


@dataclass(frozen=True, slots=True)
class AdoptEnd:
    """Transfer ``request`` is complete: ``count`` messages were moved."""

    request: int
    count: int


@dataclass(frozen=True, slots=True)
class Adopted:
    """The new owner's answer to transfer ``request``: ``status`` one of
    :data:`ADOPT_STATUS` (``ok``: it holds the ``count`` messages now)."""

    request: int
    status: str
    count: int = 0


@dataclass(frozen=True, slots=True)
class Moved:
    """To a sender whose message was refused: ``mailbox`` now lives at ``owner``."""

    mailbox: str
    owner: str


RemoteOperation = (
    Pull
    | PullCancel
    | Handover
    | Taken
    | Refused
    | Manage
    | ManageReply
    | Adopt
    | Move
    | AdoptEnd
    | Adopted
    | Moved
)


def _text(value: str, limit: int = 255) -> bytes:
    raw = value.encode("utf-8")
    if len(raw) > limit:
        raise ValueError(f"text over {limit} bytes")
    return bytes([len(raw)]) + raw


def _read_text(body: bytes, at: int) -> tuple[str, int]:
    n = body[at]
    raw = body[at + 1 : at + 1 + n]
    if len(raw) != n:
        raise ValueError("truncated text")
    return raw.decode("utf-8"), at + 1 + n


def _limit(value: int | None) -> int:
    return -1 if value is None else value


def encode_remote(msg: RemoteOperation) -> bytes:
    """The node-message payload of ``msg`` (operation byte first)."""
    if isinstance(msg, Pull):
        head = _PULL.pack(msg.request & 0xFFFFFFFF, msg.msg_type, int(msg.except_type))
        return bytes([OP_PULL]) + head + _text(msg.mailbox) + _text(msg.receiver[:64])
    if isinstance(msg, PullCancel):
        return bytes([OP_PULL_CANCEL]) + _U32.pack(msg.request & 0xFFFFFFFF)
    if isinstance(msg, Handover):
        head = _HANDOVER.pack(
            msg.request & 0xFFFFFFFF,
            msg.key & 0xFFFFFFFF,
            msg.msg_type,
            msg.priority,
            msg.incarnation,
            msg.msg_id & 0xFFFFFFFFFFFFFFFF,
        )
        return bytes([OP_HANDOVER]) + head + _text(msg.source) + _text(msg.origin) + msg.data
    if isinstance(msg, Taken):
        return bytes([OP_TAKEN]) + _TAKEN.pack(msg.key & 0xFFFFFFFF, int(msg.accepted))
    if isinstance(msg, Refused):
        head = _REFUSED.pack(msg.request & 0xFFFFFFFF, REASONS.index(msg.reason) + 1)
        return bytes([OP_REFUSED]) + head + _text(msg.detail)
    if isinstance(msg, Manage):
        head = _MANAGE.pack(
            msg.request & 0xFFFFFFFF,
            ACTIONS.index(msg.action) + 1,
            _limit(msg.capacity),
            _limit(msg.max_bytes),
        )
        return bytes([OP_MANAGE]) + head + _text(msg.mailbox) + _text(msg.node)
    if isinstance(msg, ManageReply):
        return bytes([OP_MANAGE_REPLY]) + _MANAGE_REPLY.pack(msg.request, msg.status) + msg.body
    if isinstance(msg, Adopt):
        names = b"".join(_text(g) for g in msg.granted)
        return (
            bytes([OP_ADOPT])
            + _U32.pack(msg.request)
            + _text(msg.mailbox)
            + bytes([len(msg.granted)])
            + names
        )
    if isinstance(msg, Move):
        head = _HANDOVER.pack(
            msg.request,
            0,
            msg.msg_type,
            msg.priority,
            msg.incarnation,
            msg.msg_id & 0xFFFFFFFFFFFFFFFF,
        )
        return bytes([OP_MOVE]) + head + _text(msg.source) + _text(msg.origin) + msg.data
    if isinstance(msg, AdoptEnd):
        return bytes([OP_ADOPT_END]) + _COUNTED.pack(msg.request, msg.count)
    if isinstance(msg, Adopted):
        status = ADOPT_STATUS.index(msg.status)
        return bytes([OP_ADOPTED]) + _ADOPTED.pack(msg.request, status, msg.count)
    return bytes([OP_MOVED]) + _text(msg.mailbox) + _text(msg.owner)


def decode_remote(data: bytes) -> RemoteOperation:
    """Parse a node-message payload of this module; raises ``MalformedNodeMessage``."""
    if not data:
        raise MalformedNodeMessage("empty node message")
    op, body = data[0], bytes(data[1:])
    try:
        if op == OP_PULL:
            request, msg_type, except_type = _PULL.unpack_from(body)
            name, at = _read_text(body, _PULL.size)
            label, at = _read_text(body, at)
            if at != len(body) or except_type > 1:
                raise ValueError("bad PULL")
            return Pull(request, name, msg_type, bool(except_type), label)
        if op == OP_PULL_CANCEL:
            if len(body) != _U32.size:
                raise ValueError("bad PULL_CANCEL")
            return PullCancel(_U32.unpack(body)[0])
        if op == OP_HANDOVER:
            request, key, msg_type, priority, inc, msg_id = _HANDOVER.unpack_from(body)
            source, at = _read_text(body, _HANDOVER.size)
            origin, at = _read_text(body, at)
            return Handover(
                request, key, msg_type, priority, source, inc, msg_id, body[at:], origin
            )
        if op == OP_TAKEN:
            key, accepted = _TAKEN.unpack(body)
            if accepted > 1:
                raise ValueError("bad TAKEN")
            return Taken(key, bool(accepted))
        if op == OP_REFUSED:
            request, reason = _REFUSED.unpack_from(body)
            detail, at = _read_text(body, _REFUSED.size)
            if at != len(body) or not 1 <= reason <= len(REASONS):
                raise ValueError("bad REFUSED")
            return Refused(request, REASONS[reason - 1], detail)
        if op == OP_MANAGE:
            request, action, capacity, max_bytes = _MANAGE.unpack_from(body)
            name, at = _read_text(body, _MANAGE.size)
            node, at = _read_text(body, at)
            if at != len(body) or not 1 <= action <= len(ACTIONS):
                raise ValueError("bad MANAGE")
            if capacity < -1 or max_bytes < -1:
                raise ValueError("bad MANAGE limits")
            return Manage(
                request,
                ACTIONS[action - 1],
                name,
                None if capacity == -1 else capacity,
                None if max_bytes == -1 else max_bytes,
                node,
            )
        if op == OP_MANAGE_REPLY:
            request, status = _MANAGE_REPLY.unpack_from(body)
            if status > STATUS_ERROR:
                raise ValueError("bad MANAGE_REPLY")
            return ManageReply(request, status, body[_MANAGE_REPLY.size :])
        if op == OP_ADOPT:
            (request,) = _U32.unpack_from(body)
            name, at = _read_text(body, _U32.size)
            granted = []
            count, at = body[at], at + 1
            for _ in range(count):
                node, at = _read_text(body, at)
                granted.append(node)
            if at != len(body):
                raise ValueError("bad ADOPT")
            return Adopt(request, name, tuple(granted))
        if op == OP_MOVE:
            request, _key, msg_type, priority, inc, msg_id = _HANDOVER.unpack_from(body)
            source, at = _read_text(body, _HANDOVER.size)
            origin, at = _read_text(body, at)
            return Move(request, msg_type, priority, source, inc, msg_id, body[at:], origin)
        if op == OP_ADOPT_END:
            request, count = _COUNTED.unpack(body)
            return AdoptEnd(request, count)
        if op == OP_ADOPTED:
            request, status, count = _ADOPTED.unpack(body)
            return Adopted(request, ADOPT_STATUS[status], count)
        if op == OP_MOVED:
            name, at = _read_text(body, 0)
            owner, at = _read_text(body, at)
            if at != len(body):
                raise ValueError("bad MOVED")
            return Moved(name, owner)
    except (struct.error, UnicodeDecodeError, ValueError, IndexError) as exc:
        raise MalformedNodeMessage(str(exc)) from None
    raise MalformedNodeMessage(f"unknown node-message operation {op}")


# ------------------------------------------------------------------- state


@dataclass(slots=True)
class _Serving:
    """Owner side: a remote receiver's pull, waiting in a mailbox's line."""

    peer: Any
    request: int
    mailbox: str


@dataclass(slots=True)
class _Pulling:
    """Receiving side: one of our receives, waiting on a remote mailbox."""

    owner: Any
    mailbox: str
    selector: Selector
    receiver: str
    follows: int = 0  #: times it followed the mailbox to a new owner


@dataclass(slots=True)
class _Transfer:
    """Old owner's side: a mailbox whose messages are on their way to ``to``."""

    mailbox: str
    to: Any
    messages: list[Message]
    capacity: int | None
    max_bytes: int | None
    granted: set[Any]
    asked_by: tuple[Any, int] | None = None  #: a remote ``rmsg ctl transfer`` to answer


@dataclass(slots=True)
class _Adopting:
    """New owner's side: a transfer arriving."""

    mailbox: str
    status: str
    granted: tuple[str, ...]
    count: int = 0


_ENDS = (events.PeerClosed, events.PeerUnreachable, events.PeerRestarted, events.SessionDropped)
MAX_FOLLOWS = 4  #: moves a waiting remote receive follows before it gives up


def address_text(addr: Any) -> str:
    return errors.format_address(addr)


def _same_host(peer: Any, own: Any) -> bool:
    host = peer[0] if isinstance(peer, tuple) and peer else None
    if not isinstance(host, str):
        return False
    if host.startswith("127.") or host in ("::1", "localhost"):
        return True
    return isinstance(own, tuple) and bool(own) and own[0] == host


class RemoteNode(Protocol):
    """The node calls the remote-mailbox protocol makes: the mailbox calls any receiver
    makes (take, wait, ack, release), the management and transfer calls it serves for
    other nodes, and a few about sessions (keep one alive while a pull waits on it,
    send a node message). :class:`~reliable.endpoint.Endpoint` is one; nothing else of
    the endpoint is reached (its events, drops and time come as callables)."""

    def take(
        self,
        mailbox: str,
        selector: Selector | None = None,
        *,
        owner: int | None = None,
        receiver: str = "",
        lock: float | None = None,
        now: float,
    ) -> Message | None: ...

    def wait_for_message(
        self,
        mailbox: str,
        selector: Selector | None = None,
        *,
        owner: int | None = None,
        receiver: str = "",
        lock: float | None = None,
        now: float,
    ) -> int: ...

    def cancel_wait(self, ticket: int) -> bool: ...

    def ack(self, mailbox: str, msg: Message, *, owner: int | None = None, now: float) -> bool: ...

    def release(
        self, mailbox: str, msg: Message, *, owner: int | None = None, now: float
    ) -> bool: ...

    def has_mailbox(self, name: str) -> bool: ...

    def port_owner(self, name: str) -> int | None: ...

    def is_durable(self, name: str) -> bool: ...

    def set_limits(
        self,
        name: str,
        capacity: int | None,
        max_bytes: int | None,
        now: float,
        *,
        owner: int | None = None,
    ) -> None: ...

    def delete_mailbox(self, name: str, now: float, *, owner: int | None = None) -> None: ...

    def stats(self, now: float | None = None) -> NodeStats: ...

    def detach_mailbox(
        self, name: str, owner_text: str, now: float
    ) -> tuple[list[Message], int | None, int | None]: ...

    def reattach_mailbox(
        self,
        name: str,
        capacity: int | None,
        max_bytes: int | None,
        msgs: list[Message],
        now: float,
    ) -> None: ...

    def adopt_message(self, name: str, msg: Message, now: float) -> None: ...

    def watch(self, peer: Any, now: float) -> None: ...

    def unwatch(self, peer: Any, now: float) -> None: ...

    def has_session(self, peer: Any) -> bool: ...

    def has_heard(self, peer: Any) -> bool: ...

    def fail_departed(self, peer: Any) -> bool: ...

    def send_node_message_to(self, peer: Any, message: NodeMessage, now: float) -> None: ...


class RemoteMailboxes:
    """The remote-mailbox protocol of one node.

    The endpoint routes to it the node-message payloads of operations
    ``FIRST_OP`` and up (:meth:`on_node_message`), the waiter events of the pulls
    it serves (:meth:`intercept`), the session events it must see
    (:meth:`observe`), and its timer. It works through the node's calls
    (:class:`RemoteNode`) like any receiver does, and reports through ``emit``
    (events), ``drop`` (counted drops) and ``clock`` (the endpoint's time).
    """

    def __init__(
        self,
        config: Config,
        node: RemoteNode,
        *,
        emit: Callable[[events.Event], None],
        drop: Callable[[str], None],
        clock: Callable[[], float],
    ) -> None:
        self._node = node
        self._config = config
        self._emit = emit
        self._drop = drop
        self._clock = clock
        self.lease = max(LEASE_MIN, 4 * config.peer_timeout)
        self.grants: dict[str, set[Any]] = {}  #: mailbox -> nodes granted the receive right
        self.moved: dict[str, str] = {}  #: mailbox -> its new owner's ``host:port``
        self.local_address: Any = None  #: set by the adapter: this node's own address
        # owner side
        self._serving: dict[int, _Serving] = {}  # waiter ticket -> the remote pull it serves
        self._by_request: dict[tuple[Any, int], int] = {}  # (peer, request) -> waiter ticket
        self._assigned: dict[tuple[Any, int], tuple[str, Message]] = {}  # (peer, key) -> msg
        self._next_key = 1
        # receiving side
        self._pulls: dict[int, _Pulling] = {}  # our waiter ticket -> the remote receive
        self._seen: OrderedDict[tuple[Any, ...], None] = OrderedDict()
        self._manage: dict[int, None] = {}  # management requests awaiting their reply
        self._next_manage = 1
        # transfers of ownership
        self._transfers: dict[int, _Transfer] = {}  # our request -> a mailbox on its way
        self._adopting: dict[tuple[Any, int], _Adopting] = {}  # (old owner, request) -> state
        self.redirects: dict[tuple[Any, str], Any] = {}  #: (old owner, mailbox) -> new owner
        # Messages that moved here: the node that accepted them, whose session their
        # msg_id belongs to (it names them, with the source, for the receivers' dedupe).
        self._origins: OrderedDict[Message, str] = OrderedDict()
        # departed nodes
        self.departed_peers: OrderedDict[Any, None] = OrderedDict()  #: nodes that said CLOSE
        self.grace: dict[Any, float] = {}  #: address -> when a silent send to it fails
        self.handed_over = 0
        self.returned = 0
        self.requeued = 0
        self.duplicates = 0

    # ------------------------------------------------------------- owner side

    def grant(self, mailbox: str, node: Any) -> None:
        """Let ``node`` (an address) receive from ``mailbox``."""
        self.grants.setdefault(mailbox, set()).add(node)

    def revoke(self, mailbox: str, node: Any, now: float) -> None:
        """Take the receive right back; ``node``'s waiting pulls are refused."""
        nodes = self.grants.get(mailbox)
        if nodes is not None:
            nodes.discard(node)
        for ticket, serving in list(self._serving.items()):
            mine = serving.peer == node and serving.mailbox == mailbox
            if mine and self._node.cancel_wait(ticket):
                self._forget_serving(ticket)
                self._send(node, Refused(serving.request, "not_granted"), now)

    def granted(self, mailbox: str) -> list[Any]:
        return sorted(self.grants.get(mailbox, ()), key=repr)

    def receivers(self, mailbox: str) -> dict[str, int]:
        """Remote receivers of ``mailbox``: waiting pulls and unacknowledged hand-overs."""
        waiting = sum(1 for s in self._serving.values() if s.mailbox == mailbox)
        assigned = sum(1 for name, _m in self._assigned.values() if name == mailbox)
        return {"waiting": waiting, "handed_over": assigned}

    def mailbox_deleted(self, mailbox: str) -> None:
        """The mailbox is gone: forget its grants and its hand-overs (their locks went
        with it); the waiting pulls are refused through their ``ReceiveFailed``."""
        self.grants.pop(mailbox, None)
        for key, (name, _msg) in list(self._assigned.items()):
            if name == mailbox:
                del self._assigned[key]
                self._node.unwatch(key[0], self._clock())

    def _on_pull(self, session: PeerSession, pull: Pull, now: float) -> None:
        peer = session.addr
        refusal = self._refusal(pull.mailbox, peer)
        if refusal is not None:
            self._send(peer, Refused(pull.request, *refusal), now)
            return
        selector = Selector.of(None, pull.msg_type, pull.except_type)
        label = pull.receiver or address_text(peer)
        ep = self._node
        try:
            msg = ep.take(pull.mailbox, selector, receiver=label, lock=self.lease, now=now)
        except errors.UsageError:
            self._send(peer, Refused(pull.request, "port"), now)
            return
        if msg is not None:
            self._hand_over(peer, pull.request, msg, now)
            return
        ticket = ep.wait_for_message(
            pull.mailbox, selector, receiver=label, lock=self.lease, now=now
        )
        self._serving[ticket] = _Serving(peer, pull.request, pull.mailbox)
        self._by_request[(peer, pull.request)] = ticket

    def _refusal(self, mailbox: str, peer: Any) -> tuple[str, str] | None:
        if mailbox in self.moved:
            return ("moved", self.moved[mailbox])
        if not self._node.has_mailbox(mailbox):
            return ("no_mailbox", "")
        if self._node.port_owner(mailbox) is not None:
            return ("port", "")
        if peer not in self.grants.get(mailbox, ()):
            return ("not_granted", "")
        return None

    def _hand_over(self, peer: Any, request: int, msg: Message, now: float) -> None:
        key = self._next_key
        self._next_key = (key + 1) & 0xFFFFFFFF or 1
        self._assigned[(peer, key)] = (msg.mailbox, msg)
        self._node.watch(peer, now)  # until it answers: a receiving node that dies is noticed
        self.handed_over += 1
        self._send(
            peer,
            Handover(
                request=request,
                key=key,
                msg_type=msg.msg_type,
                priority=msg.priority,
                source=address_text(msg.source),
                incarnation=msg.incarnation,
                msg_id=msg.msg_id,
                data=msg.data,
                origin=self._origins.pop(msg, ""),
            ),
            now,
        )

    def _on_taken(self, session: PeerSession, taken: Taken, now: float) -> None:
        entry = self._assigned.pop((session.addr, taken.key), None)
        if entry is None:
            self._drop("remote.stray_taken")
            return
        self._node.unwatch(session.addr, now)
        name, msg = entry
        if not self._node.has_mailbox(name):
            return
        if taken.accepted:
            self._node.ack(name, msg, now=now)
        else:
            self.returned += 1
            self._node.release(name, msg, now=now)

    def _on_pull_cancel(self, session: PeerSession, cancel: PullCancel) -> None:
        ticket = self._by_request.get((session.addr, cancel.request))
        if ticket is not None and self._node.cancel_wait(ticket):
            self._forget_serving(ticket)
        # Otherwise its Handover is already on its way; the receiving node gives it back.

    def _forget_serving(self, ticket: int) -> _Serving | None:
        serving = self._serving.pop(ticket, None)
        if serving is not None:
            self._by_request.pop((serving.peer, serving.request), None)
        return serving

    def intercept(self, event: events.Event, now: float) -> bool:
        """Route a waiter event of a pull we serve; returns whether it was one."""
        if isinstance(event, events.MessageTaken):
            serving = self._forget_serving(event.waiter)
            if serving is None:
                return False
            self._hand_over(serving.peer, serving.request, event.message, now)
            return True
        if isinstance(event, events.ReceiveFailed):
            serving = self._forget_serving(event.waiter)
            if serving is None:
                return False
            error = event.error
            if isinstance(error, errors.ReceiveRefused) and error.reason == "moved":
                refusal = Refused(serving.request, "moved", error.owner or "")
            else:
                refusal = Refused(serving.request, "no_mailbox")
            self._send(serving.peer, refusal, now)
            return True
        return False

    def _peer_gone(self, peer: Any, now: float) -> None:
        """``peer``'s session ended: forget its pulls, requeue what it was handed
        (in that order: a requeued message must not go back to it)."""
        for ticket, serving in list(self._serving.items()):
            if serving.peer == peer:
                self._node.cancel_wait(ticket)
                self._forget_serving(ticket)
        for key, (name, msg) in list(self._assigned.items()):
            if key[0] != peer:
                continue
            del self._assigned[key]
            self._node.unwatch(peer, now)
            if self._node.has_mailbox(name) and self._node.release(name, msg, now=now):
                self.requeued += 1

    # -------------------------------------------------------- receiving side

    def pull(
        self, owner: Any, mailbox: str, selector: Selector, receiver: str, ticket: int, now: float
    ) -> None:
        """Our receive ``ticket`` waits on ``owner``'s ``mailbox``; its answer is a
        ``MessageTaken`` or ``ReceiveFailed`` event carrying ``ticket``."""
        if selector.source is not None:
            raise errors.UsageError(
                "a receive from a mailbox on another node cannot select by source; "
                "select by msg_type, or receive on the owner node"
            )
        self._pulls[ticket] = _Pulling(owner, mailbox, selector, receiver)
        self._send_pull(ticket, now)
        self._node.watch(owner, now)  # a dead owner must not leave the receive blocked

    def _send_pull(self, ticket: int, now: float) -> None:
        pulling = self._pulls[ticket]
        sel = pulling.selector
        pull = Pull(ticket, pulling.mailbox, sel.msg_type, sel.except_type, pulling.receiver)
        self._send(pulling.owner, pull, now)

    def cancel(self, ticket: int, now: float) -> bool | None:
        """Withdraw our remote receive ``ticket``: True if it was still waiting, False
        if it was answered, None if it is not a remote receive."""
        pulling = self._pulls.pop(ticket, None)
        if pulling is None:
            return None
        self._node.unwatch(pulling.owner, now)
        if self._node.has_session(pulling.owner):
            self._send(pulling.owner, PullCancel(ticket), now)
        return True

    def is_pull(self, ticket: int) -> bool:
        return ticket in self._pulls

    def _on_handover(self, session: PeerSession, h: Handover, now: float) -> None:
        owner = session.addr
        identity = (h.origin or address_text(owner), h.source, h.incarnation, h.msg_id)
        pulling = self._pulls.get(h.request)
        if identity in self._seen:
            # A requeued copy of one we delivered: acknowledge it, deliver nothing.
            self.duplicates += 1
            self._send(owner, Taken(h.key, True), now)
            if pulling is not None and pulling.owner == owner:
                self._send_pull(h.request, now)  # its credit went on the duplicate
            return
        if pulling is None or pulling.owner != owner:
            self._send(owner, Taken(h.key, False), now)  # nobody waits for it now
            return
        try:
            source: Any = parse_address(h.source)
        except errors.AddressError:
            source = h.source
        msg = Message(
            source=source,
            data=h.data,
            msg_type=h.msg_type,
            priority=h.priority,
            mailbox=f"{address_text(owner)}/{pulling.mailbox}",
            msg_id=h.msg_id,
            incarnation=h.incarnation,
        )
        del self._pulls[h.request]
        self._node.unwatch(owner, now)
        self._seen[identity] = None
        while len(self._seen) > SEEN:
            self._seen.popitem(last=False)
        self._send(owner, Taken(h.key, True), now)
        self._emit(events.MessageTaken(waiter=h.request, message=msg))

    def _on_refused(self, session: PeerSession, refused: Refused, now: float) -> None:
        pulling = self._pulls.get(refused.request)
        if pulling is None or pulling.owner != session.addr:
            return
        if refused.reason == "moved" and pulling.follows < MAX_FOLLOWS:
            try:
                owner = parse_address(refused.detail)
            except errors.AddressError:
                owner = None
            if owner is not None:
                # Follow the mailbox to its new owner: the same receive, asked there.
                self._node.unwatch(pulling.owner, now)
                pulling.owner = owner
                pulling.follows += 1
                self._send_pull(refused.request, now)
                self._node.watch(owner, now)
                return
        del self._pulls[refused.request]
        self._node.unwatch(session.addr, now)
        error = errors.ReceiveRefused(
            session.addr, pulling.mailbox, refused.reason, refused.detail or None
        )
        self._emit(events.ReceiveFailed(waiter=refused.request, error=error))

    def _fail_pulls(self, owner: Any, error: errors.ReliableError, now: float) -> None:
        for ticket, pulling in list(self._pulls.items()):
            if pulling.owner == owner:
                del self._pulls[ticket]
                self._node.unwatch(owner, now)
                self._emit(events.ReceiveFailed(waiter=ticket, error=error))

    # ------------------------------------------------------------ management

    def manage(self, dest: Any, request: Manage, now: float) -> int:
        """Send a management request; the answer is a ``StatsReceived``-like
        ``ManageAnswered`` event (see :meth:`on_node_message`). Returns its number."""
        number = self._next_manage
        self._next_manage += 1
        self._manage[number] = None
        msg = Manage(
            number,
            request.action,
            request.mailbox,
            request.capacity,
            request.max_bytes,
            request.node,
        )
        self._send(dest, msg, now)
        return number

    def _on_manage(self, session: PeerSession, req: Manage, now: float) -> None:
        peer = session.addr
        if not self._config.serve_stats:
            self._reply(peer, req.request, STATUS_REFUSED, "this node does not serve management")
            return
        if not _same_host(peer, self.local_address):
            self._reply(
                peer,
                req.request,
                STATUS_REFUSED,
                "management is allowed only from the owner node's host",
            )
            return
        if req.action == "transfer":
            try:
                to = parse_address(req.node)
                self.transfer(req.mailbox, to, now, asked_by=(peer, req.request))
            except errors.UsageError as exc:
                self._reply(peer, req.request, STATUS_ERROR, str(exc))
            return  # answered when the new owner has it (or refused it)
        try:
            body = self._perform(req, now)
        except errors.UsageError as exc:
            self._reply(peer, req.request, STATUS_ERROR, str(exc))
            return
        self._reply(peer, req.request, STATUS_OK, json.dumps(body, default=str))

    def _perform(self, req: Manage, now: float) -> dict[str, Any]:
        ep = self._node
        name = req.mailbox
        if not ep.has_mailbox(name):
            raise errors.UnknownMailbox(f"no mailbox {name!r} on that node")
        if req.action == "set_limits":
            ep.set_limits(name, req.capacity, req.max_bytes, now, owner=ep.port_owner(name))
        elif req.action == "delete":
            ep.delete_mailbox(name, now, owner=ep.port_owner(name))
            return {"mailbox": name, "deleted": True}
        elif req.action in ("grant", "revoke"):
            try:
                node = parse_address(req.node)
            except errors.AddressError as exc:
                raise errors.UsageError(f"grant/revoke needs a node host:port: {exc}") from None
            if req.action == "grant":
                self.grant(name, node)
            else:
                self.revoke(name, node, now)
        return self.describe(name, now)

    def describe(self, name: str, now: float) -> dict[str, Any]:
        """What ``rmsg ctl inspect`` shows of mailbox ``name``."""
        info: dict[str, Any] = self._node.stats(now).mailbox(name).as_dict()
        info.update(
            {
                "name": name,
                "owner": address_text(self.local_address) if self.local_address else None,
                "granted": [address_text(n) for n in self.granted(name)],
                "remote_receivers": self.receivers(name),
            }
        )
        return info

    def _reply(self, peer: Any, request: int, status: int, text: str) -> None:
        self._send(peer, ManageReply(request, status, text.encode("utf-8")), self._clock())

    # ------------------------------------------------------------- transfer

    def transfer(
        self, mailbox: str, to: Any, now: float, asked_by: tuple[Any, int] | None = None
    ) -> int:
        """Move ``mailbox`` (its queued messages, limits and grants) to node ``to``,
        which must have created an empty mailbox of that name. Returns the request
        number its ``ManageAnswered`` event will carry."""
        granted = set(self.grants.get(mailbox, ()))
        msgs, capacity, max_bytes = self._node.detach_mailbox(mailbox, address_text(to), now)
        number = self._next_manage
        self._next_manage += 1
        self._manage[number] = None
        self._transfers[number] = _Transfer(
            mailbox, to, msgs, capacity, max_bytes, granted, asked_by
        )
        self._remember_moved(mailbox, address_text(to))
        self._send(to, Adopt(number, mailbox, tuple(sorted(address_text(g) for g in granted))), now)
        for msg in msgs:
            move = Move(
                number,
                msg.msg_type,
                msg.priority,
                address_text(msg.source),
                msg.incarnation,
                msg.msg_id,
                msg.data,
                self._origins.pop(msg, "") or address_text(self.local_address or "here"),
            )
            self._send(to, move, now)
        self._send(to, AdoptEnd(number, len(msgs)), now)
        return number

    def _remember_moved(self, mailbox: str, owner: str) -> None:
        self.moved[mailbox] = owner
        while len(self.moved) > MOVED_MEMORY:
            del self.moved[next(iter(self.moved))]

    def tell_moved(self, source: Any, mailbox: str, now: float) -> None:
        """A message for a mailbox that moved was refused: tell its sender where it went."""
        owner = self.moved.get(mailbox)
        if owner is not None and source is not None and self._node.has_session(source):
            self._send(source, Moved(mailbox, owner), now)

    def redirect(self, dest: Any, mailbox: str) -> Any:
        """Where a send to ``dest``'s ``mailbox`` goes: the latest owner we heard of."""
        for _ in range(MAX_FOLLOWS):
            newer = self.redirects.get((dest, mailbox))
            if newer is None or newer == dest:
                break
            dest = newer
        return dest

    def _on_moved(self, session: PeerSession, moved: Moved) -> None:
        try:
            owner = parse_address(moved.owner)
        except errors.AddressError:
            self._drop("malformed.control")
            return
        self.redirects[(session.addr, moved.mailbox)] = owner
        while len(self.redirects) > MOVED_MEMORY:
            del self.redirects[next(iter(self.redirects))]

    def _on_adopt(self, session: PeerSession, adopt: Adopt) -> None:
        ep = self._node
        if not ep.has_mailbox(adopt.mailbox):
            status = "no_mailbox"
        elif ep.port_owner(adopt.mailbox) is not None:
            status = "port"
        elif ep.is_durable(adopt.mailbox):
            status = "durable"
        else:
            status = "ok"
        key = (session.addr, adopt.request)
        self._adopting[key] = _Adopting(adopt.mailbox, status, adopt.granted)

    def _on_move(self, session: PeerSession, move: Move, now: float) -> None:
        state = self._adopting.get((session.addr, move.request))
        if state is None or state.status != "ok" or not self._node.has_mailbox(state.mailbox):
            return
        try:
            source: Any = parse_address(move.source)
        except errors.AddressError:
            source = move.source
        msg = Message(
            source=source,
            data=move.data,
            msg_type=move.msg_type,
            priority=move.priority,
            mailbox=state.mailbox,
            msg_id=move.msg_id,
            incarnation=move.incarnation,
        )
        self._origins[msg] = move.origin or address_text(session.addr)
        while len(self._origins) > ORIGINS:
            self._origins.popitem(last=False)
        self._node.adopt_message(state.mailbox, msg, now)
        state.count += 1

    def _on_adopt_end(self, session: PeerSession, end: AdoptEnd, now: float) -> None:
        state = self._adopting.pop((session.addr, end.request), None)
        if state is None:
            return
        if state.status == "ok":
            for text in state.granted:
                try:
                    self.grant(state.mailbox, parse_address(text))
                except errors.AddressError:
                    continue
            self.moved.pop(state.mailbox, None)  # it is ours (again)
        self._send(session.addr, Adopted(end.request, state.status, state.count), now)

    def _on_adopted(self, session: PeerSession, adopted: Adopted, now: float) -> None:
        transfer = self._transfers.get(adopted.request)
        if transfer is None or transfer.to != session.addr:
            return
        del self._transfers[adopted.request]
        if adopted.status == "ok" and adopted.count == len(transfer.messages):
            body = {
                "mailbox": transfer.mailbox,
                "owner": address_text(transfer.to),
                "moved": adopted.count,
            }
            self._finish_transfer(adopted.request, transfer, STATUS_OK, json.dumps(body))
            return
        why = {
            "no_mailbox": f"it has no mailbox {transfer.mailbox!r}: create it there (empty) first",
            "port": "its mailbox of that name is a port",
            "durable": "its mailbox of that name is durable (move the file instead)",
        }.get(adopted.status, f"it took {adopted.count} of {len(transfer.messages)} messages")
        self._undo_transfer(transfer, now)
        self._finish_transfer(
            adopted.request,
            transfer,
            STATUS_ERROR,
            f"{address_text(transfer.to)} refused the mailbox: {why}; it stays here",
        )

    def _undo_transfer(self, transfer: _Transfer, now: float) -> None:
        self.moved.pop(transfer.mailbox, None)
        self._node.reattach_mailbox(
            transfer.mailbox, transfer.capacity, transfer.max_bytes, transfer.messages, now
        )
        for node in transfer.granted:
            self.grant(transfer.mailbox, node)

    def _finish_transfer(self, number: int, transfer: _Transfer, status: int, text: str) -> None:
        if transfer.asked_by is not None:
            peer, request = transfer.asked_by
            self._reply(peer, request, status, text)
        if self._manage.pop(number, 1) is None:
            self._emit(
                events.ManageAnswered(
                    peer=transfer.to, request=number, status=status, body=text.encode("utf-8")
                )
            )

    def _transfer_failed(self, peer: Any, now: float) -> None:
        """The new owner went away mid-transfer: the mailbox stays (comes back) here."""
        for number, transfer in list(self._transfers.items()):
            if transfer.to != peer:
                continue
            del self._transfers[number]
            self._undo_transfer(transfer, now)
            self._finish_transfer(
                number,
                transfer,
                STATUS_ERROR,
                f"{address_text(peer)} went away during the transfer; the mailbox stays here",
            )

    # ------------------------------------------------------- departed nodes

    def departed(self, peer: Any) -> None:
        """``peer`` said goodbye (CLOSE)."""
        self.departed_peers[peer] = None
        self.departed_peers.move_to_end(peer)
        while len(self.departed_peers) > self._config.remembered_incarnations:
            self.departed_peers.popitem(last=False)

    def sending(self, peer: Any, now: float) -> None:
        """A send or pull to ``peer`` on a session that has not heard from it yet."""
        if peer in self.departed_peers and peer not in self.grace:
            self.grace[peer] = now + gone_grace(self._config)

    def deadline(self) -> float | None:
        return min(self.grace.values(), default=None)

    def on_timer(self, now: float) -> None:
        for peer, due in list(self.grace.items()):
            if due > now:
                continue
            del self.grace[peer]
            if not self._node.fail_departed(peer):
                self.departed_peers.pop(peer, None)  # it came back
                continue
            self._fail_pulls(peer, errors.MailboxGone(peer, None), now)

    def heard(self, peer: Any) -> None:
        """A packet from a live incarnation of ``peer``: it is not gone."""
        if peer in self.departed_peers:
            self.departed_peers.pop(peer, None)
            self.grace.pop(peer, None)

    # ---------------------------------------------------------------- routing

    def on_node_message(self, session: PeerSession, payload: bytes, now: float) -> None:
        try:
            ctl = decode_remote(payload)
        except MalformedNodeMessage:
            self._drop("malformed.control")
            return
        if isinstance(ctl, Pull):
            self._on_pull(session, ctl, now)
        elif isinstance(ctl, PullCancel):
            self._on_pull_cancel(session, ctl)
        elif isinstance(ctl, Handover):
            self._on_handover(session, ctl, now)
        elif isinstance(ctl, Taken):
            self._on_taken(session, ctl, now)
        elif isinstance(ctl, Refused):
            self._on_refused(session, ctl, now)
        elif isinstance(ctl, Manage):
            self._on_manage(session, ctl, now)
        elif isinstance(ctl, Adopt):
            self._on_adopt(session, ctl)
        elif isinstance(ctl, Move):
            self._on_move(session, ctl, now)
        elif isinstance(ctl, AdoptEnd):
            self._on_adopt_end(session, ctl, now)
        elif isinstance(ctl, Adopted):
            self._on_adopted(session, ctl, now)
        elif isinstance(ctl, Moved):
            self._on_moved(session, ctl)
        elif ctl.request in self._manage:
            del self._manage[ctl.request]
            self._emit(
                events.ManageAnswered(
                    peer=session.addr, request=ctl.request, status=ctl.status, body=ctl.body
                )
            )

    def observe(self, event: events.Event, now: float) -> None:
        """Session events: a departed owner fails our pulls; a departed receiving
        node gets its hand-overs requeued."""
        if self._transfers and isinstance(event, _ENDS):
            self._transfer_failed(event.peer, now)
        if isinstance(event, events.PeerClosed):
            self.departed(event.peer)
            self._peer_gone(event.peer, now)
            self._fail_pulls(event.peer, errors.MailboxGone(event.peer, None), now)
        elif isinstance(event, events.PeerUnreachable):
            self._peer_gone(event.peer, now)
            error = errors.PeerUnreachable(
                event.peer, event.silent_for, cause=event.cause, errno=event.errno
            )
            self._fail_pulls(event.peer, error, now)
        elif isinstance(event, events.SessionDropped):
            self._peer_gone(event.peer, now)
            self._fail_pulls(event.peer, errors.PeerUnreachable(event.peer, 0.0), now)
        elif isinstance(event, events.PeerRestarted):
            self._peer_gone(event.peer, now)
            # The new life never heard our pulls: ask it again (it refuses, if the
            # mailbox did not survive the restart).
            for ticket, pulling in self._pulls.items():
                if pulling.owner == event.peer:
                    self._send_pull(ticket, now)

    def _send(self, peer: Any, msg: RemoteOperation, now: float) -> None:
        self._node.send_node_message_to(peer, RawNodeMessage(encode_remote(msg)), now)
        if self.departed_peers and not self._node.has_heard(peer):
            self.sending(peer, now)
