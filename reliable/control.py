"""Deprecated: node messages moved to :mod:`reliable.node_messages` (issue 18: "control"
meant four things). The old names keep working here, with a warning."""

from __future__ import annotations

import warnings

from .node_messages import *  # noqa: F403
from .node_messages import (
    MalformedNodeMessage,
    NodeMessage,
    RawNodeMessage,
    decode_node_message,
    encode_node_message,
)
from .node_messages import __all__ as _names

warnings.warn(
    "reliable.control is deprecated: use reliable.node_messages",
    DeprecationWarning,
    stacklevel=2,
)

ControlMessage = NodeMessage
MalformedControl = MalformedNodeMessage
RawControl = RawNodeMessage
encode_control = encode_node_message
decode_control = decode_node_message

__all__ = [
    *_names,
    "ControlMessage",
    "MalformedControl",
    "RawControl",
    "decode_control",
    "encode_control",
]
