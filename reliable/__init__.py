"""rmsg's library: reliable, exactly-once, in-order message passing over UDP.

The protocol core is :class:`Endpoint` (sans-I/O); :class:`Node` drives it with
a socket and a background thread, :class:`AsyncNode` with asyncio. Messages go
to one node (``host:port/mailbox``), to a multicast group or a subnet's
broadcast members (``multicast://239.1.2.3:7000/inbox``, ``broadcast://:7000``,
answered by a :class:`GroupReceipt`: ``send_group``), or to one member of a service
(``anycast://printer``). Only the standard library is imported here.

The library logs through the ``reliable`` logger and its children
(``reliable.endpoint``, ``reliable.peer``): sessions established, dropped
and restarted, unreachable peers, refusals and evictions. It prints nothing
unless the application configures logging (only a ``NullHandler`` is added),
e.g. ``logging.basicConfig(level=logging.INFO)``.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

# _compiled comes first: it decides compiled or pure before any core module loads.
from . import _compiled, errors, events, security, wire
from .addressing import (
    Address,
    GroupAddress,
    ServiceAddress,
    format_address,
    parse_address,
    parse_group,
    parse_service,
    resolve_address,
)
from .config import Config
from .endpoint import Endpoint, Withdrawal
from .errors import (
    AddressError,
    AuthenticationFailed,
    BindError,
    DeliveryFailed,
    MailboxClosed,
    MailboxDeleted,
    MailboxExists,
    MailboxFull,
    MailboxGone,
    MailboxNotFound,
    MessageRejected,
    MessageTooBig,
    MessageTooLarge,
    NodeClosed,
    NoServiceMember,
    PeerClosed,
    PeerRestarted,
    PeerUnreachable,
    ReceiveRefused,
    ReceiveTimeout,
    ReliableError,
    SendAborted,
    SendBufferFull,
    SendCancelled,
    SendTimeout,
    UnknownMailbox,
    UsageError,
    WouldBlock,
)
from .mailbox import Selector
from .message import GroupReceipt, Message, Receipt
from .node import BatchHandle, GroupSendHandle, Mailbox, Node, RemoteMailbox, SendHandle
from .outbox import Outbox

if TYPE_CHECKING:  # imported lazily at run time (see __getattr__), typed for checkers
    from .aio import (
        AsyncBatchHandle,
        AsyncGroupSendHandle,
        AsyncMailbox,
        AsyncNode,
        AsyncSendHandle,
    )
from .stats import MailboxStats, NodeStats, PeerStats

__all__ = [
    "Address",
    "GroupAddress",
    "GroupSendHandle",
    "AsyncGroupSendHandle",
    "GroupReceipt",
    "NoServiceMember",
    "ServiceAddress",
    "parse_group",
    "parse_service",
    "AddressError",
    "BindError",
    "AuthenticationFailed",
    "BatchHandle",
    "AsyncBatchHandle",
    "AsyncMailbox",
    "AsyncNode",
    "AsyncSendHandle",
    "Config",
    "DeliveryFailed",
    "Endpoint",
    "Mailbox",
    "MailboxClosed",
    "MailboxDeleted",
    "MailboxExists",
    "MailboxFull",
    "MailboxGone",
    "MailboxNotFound",
    "MailboxStats",
    "Message",
    "MessageRejected",
    "MessageTooBig",
    "MessageTooLarge",
    "Node",
    "NodeClosed",
    "NodeStats",
    "PeerClosed",
    "PeerRestarted",
    "PeerStats",
    "PeerUnreachable",
    "Receipt",
    "ReceiveRefused",
    "ReceiveTimeout",
    "Outbox",
    "RemoteMailbox",
    "ReliableError",
    "SendAborted",
    "SendBufferFull",
    "SendCancelled",
    "SendHandle",
    "SendTimeout",
    "Selector",
    "UnknownMailbox",
    "UsageError",
    "Withdrawal",
    "WouldBlock",
    "errors",
    "events",
    "format_address",
    "security",
    "parse_address",
    "resolve_address",
    "wire",
]

__version__ = "0.1.0"

#: True when the mypyc-compiled core runs, False for pure Python (see docs/performance.md).
__compiled__: bool = _compiled.ACTIVE

logging.getLogger(__name__).addHandler(logging.NullHandler())


_LAZY = (
    "AsyncNode",
    "AsyncMailbox",
    "AsyncSendHandle",
    "AsyncGroupSendHandle",
    "AsyncBatchHandle",
)


def __getattr__(name: str) -> object:
    # AsyncNode lives in its own module so importing reliable never imports asyncio.
    if name in _LAZY:
        from . import aio

        value = getattr(aio, name)
        globals()[name] = value  # from now on an ordinary attribute (API docs see it)
        return value
    raise AttributeError(f"module 'reliable' has no attribute {name!r}")
