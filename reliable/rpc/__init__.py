"""Remote procedure calls over rmsg, executed at most once.

See docs/rpc.md. :mod:`.protocol` is the sans-I/O core (client and server
state, the reply cache, the wire format); :mod:`.client` and :mod:`.server`
are its blocking and asyncio adapters over :class:`reliable.Node` and
:class:`reliable.AsyncNode`; :mod:`.codec` marshals arguments; :mod:`.status`
holds the status codes and errors.
"""

from __future__ import annotations

from .client import AsyncClient, Call, Client
from .codec import Codec, JsonCodec, MsgpackCodec, available_codecs, get_codec
from .server import AsyncServer, CallContext, Server, current_call
from .status import MarshalError, RemoteError, RpcError, Status

__all__ = [
    "AsyncClient",
    "AsyncServer",
    "Call",
    "CallContext",
    "Client",
    "Codec",
    "JsonCodec",
    "MarshalError",
    "MsgpackCodec",
    "RemoteError",
    "RpcError",
    "Server",
    "Status",
    "available_codecs",
    "current_call",
    "get_codec",
]
