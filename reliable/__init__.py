"""rmsg's library: reliable, exactly-once, in-order message passing over UDP.

The protocol core is :class:`Endpoint` (sans-I/O); :class:`Node` drives it with
a socket and a background thread, :class:`AsyncNode` with asyncio. Only the
standard library is imported here.
"""

from __future__ import annotations

from . import events, wire
from .addressing import format_address, parse_address, resolve_address
from .config import Config
from .endpoint import Endpoint
from .errors import (
    AddressError,
    DeliveryFailed,
    MessageRejected,
    MessageTooLarge,
    NodeClosed,
    PeerClosed,
    PeerRestarted,
    PeerUnreachable,
    ReceiveTimeout,
    ReliableError,
    SendAborted,
    SendBufferFull,
    SendTimeout,
    UsageError,
)
from .message import Message, Receipt
from .node import Node, SendHandle
from .stats import NodeStats, PeerStats

__all__ = [
    "AddressError",
    "AsyncNode",
    "Config",
    "DeliveryFailed",
    "Endpoint",
    "Message",
    "MessageRejected",
    "MessageTooLarge",
    "Node",
    "NodeClosed",
    "NodeStats",
    "PeerClosed",
    "PeerRestarted",
    "PeerStats",
    "PeerUnreachable",
    "Receipt",
    "ReceiveTimeout",
    "ReliableError",
    "SendAborted",
    "SendBufferFull",
    "SendHandle",
    "SendTimeout",
    "UsageError",
    "events",
    "format_address",
    "parse_address",
    "resolve_address",
    "wire",
]

__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    # AsyncNode lives in its own module so importing reliable never imports asyncio.
    if name == "AsyncNode":
        from .aio import AsyncNode

        return AsyncNode
    raise AttributeError(f"module 'reliable' has no attribute {name!r}")
