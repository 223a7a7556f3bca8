"""Node messages: the mailbox outcome protocol and stats queries.

Node messages travel as ordinary reliable messages (sequenced,
acknowledged, retransmitted, deduplicated) marked with ``Flag.NODE``, so
they need no reliability machinery of their own and arrive exactly once, in
order with the data around them. They are addressed to the node, never to a
mailbox, and never reach the application.

Why they exist: a message to a full mailbox is acknowledged with a
``DEFERRED`` verdict (the node holds it, so the sender must not retransmit
it), but its sender still waits to learn whether it got in. ``Admitted`` and
``Discarded`` carry that second, later answer; ``Cancel`` is the sender
withdrawing a deferred message whose send timed out, and the answer to it
is one of the other two, so a timed-out send is never reported failed when it
was in fact delivered.

Every node message is one byte of operation code followed by its fields,
network byte order. See ``docs/protocol.md``.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from .wire import Verdict

__all__ = [
    "ADMITTED_MANY_MAX",
    "Admitted",
    "AdmittedMany",
    "Cancel",
    "Discarded",
    "MalformedNodeMessage",
    "NodeMessage",
    "Op",
    "RawNodeMessage",
    "StatsReply",
    "StatsRequest",
    "decode_node_message",
    "encode_node_message",
]

_U32 = struct.Struct("!I")
_ADMITTED = struct.Struct("!IBB")  # msg_id, taken, receiver label length
_DISCARDED = struct.Struct("!IB")  # msg_id, verdict
_MAX_LABEL = 255
_U16 = struct.Struct("!H")
#: Most message ids one ``AdmittedMany`` carries (803 bytes: one fragment at any MTU).
ADMITTED_MANY_MAX = 200


class Op(enum.IntEnum):
    ADMITTED = 1
    DISCARDED = 2
    CANCEL = 3
    STATS_REQUEST = 4
    STATS_REPLY = 5
    ADMITTED_MANY = 6


class MalformedNodeMessage(ValueError):
    """A node message that does not parse; the node counts and ignores it."""


@dataclass(frozen=True, slots=True)
class Admitted:
    """Deferred message ``msg_id`` entered its mailbox (``taken``: a receiver took it)."""

    msg_id: int
    taken: bool = False
    receiver: str = ""  #: who took it, when ``taken`` (a rendezvous)


@dataclass(frozen=True, slots=True)
class AdmittedMany:
    """Deferred messages ``msg_ids`` entered their mailbox (none taken by a receiver):
    one node message for a durable mailbox's whole commit, instead of one each."""

    msg_ids: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Discarded:
    """Deferred message ``msg_id`` will never enter its mailbox; ``verdict`` says why."""

    msg_id: int
    verdict: Verdict


@dataclass(frozen=True, slots=True)
class Cancel:
    """The sender withdraws deferred message ``msg_id`` (its send timed out)."""

    msg_id: int


@dataclass(frozen=True, slots=True)
class StatsRequest:
    """Asks the node for its statistics."""

    request: int


@dataclass(frozen=True, slots=True)
class StatsReply:
    """The answer to :class:`StatsRequest` ``request``: the node's stats as JSON."""

    request: int
    body: bytes


@dataclass(frozen=True, slots=True)
class RawNodeMessage:
    """A node message another module encoded itself (its first byte is its
    operation code): the remote-mailbox protocol, :mod:`reliable.remote_mailbox`."""

    payload: bytes


NodeMessage = (
    Admitted | AdmittedMany | Discarded | Cancel | StatsRequest | StatsReply | RawNodeMessage
)


def encode_node_message(msg: NodeMessage) -> bytes:
    if isinstance(msg, RawNodeMessage):
        return msg.payload
    if isinstance(msg, Admitted):
        label = msg.receiver.encode("utf-8")[:_MAX_LABEL]
        head = _ADMITTED.pack(msg.msg_id & 0xFFFFFFFF, int(msg.taken), len(label))
        return bytes([Op.ADMITTED]) + head + label
    if isinstance(msg, AdmittedMany):
        ids = msg.msg_ids
        head = bytes([Op.ADMITTED_MANY]) + _U16.pack(len(ids))
        return head + struct.pack(f"!{len(ids)}I", *(i & 0xFFFFFFFF for i in ids))
    if isinstance(msg, Discarded):
        return bytes([Op.DISCARDED]) + _DISCARDED.pack(msg.msg_id & 0xFFFFFFFF, msg.verdict)
    if isinstance(msg, Cancel):
        return bytes([Op.CANCEL]) + _U32.pack(msg.msg_id & 0xFFFFFFFF)
    if isinstance(msg, StatsRequest):
        return bytes([Op.STATS_REQUEST]) + _U32.pack(msg.request & 0xFFFFFFFF)
    return bytes([Op.STATS_REPLY]) + _U32.pack(msg.request & 0xFFFFFFFF) + msg.body


def decode_node_message(data: bytes) -> NodeMessage:
    """Parse one node message; raises :class:`MalformedNodeMessage`."""
    if not data:
        raise MalformedNodeMessage("empty node message")
    op, body = data[0], data[1:]
    try:
        if op == Op.ADMITTED:
            msg_id, taken, n = _ADMITTED.unpack_from(body)
            label = body[_ADMITTED.size :]
            if len(label) != n or taken > 1:
                raise MalformedNodeMessage("bad ADMITTED")
            return Admitted(msg_id, bool(taken), label.decode("utf-8"))
        if op == Op.ADMITTED_MANY:
            (count,) = _U16.unpack_from(body)
            if not 0 < count <= ADMITTED_MANY_MAX or len(body) != _U16.size + 4 * count:
                raise MalformedNodeMessage("bad ADMITTED_MANY")
            return AdmittedMany(struct.unpack_from(f"!{count}I", body, _U16.size))
        if op == Op.DISCARDED:
            if len(body) != _DISCARDED.size:
                raise MalformedNodeMessage("bad DISCARDED")
            msg_id, verdict = _DISCARDED.unpack(body)
            return Discarded(msg_id, Verdict(verdict))
        if op in (Op.CANCEL, Op.STATS_REQUEST):
            if len(body) != _U32.size:
                raise MalformedNodeMessage(f"bad {Op(op).name}")
            (value,) = _U32.unpack(body)
            return Cancel(value) if op == Op.CANCEL else StatsRequest(value)
        if op == Op.STATS_REPLY:
            (request,) = _U32.unpack_from(body)
            return StatsReply(request, bytes(body[_U32.size :]))
    except (struct.error, UnicodeDecodeError, ValueError) as exc:
        raise MalformedNodeMessage(str(exc)) from None
    raise MalformedNodeMessage(f"unknown node-message operation {op}")
