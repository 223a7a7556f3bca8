"""Status codes and the errors an RPC call ends with.

Every call ends in exactly one outcome: its result (status ``OK``) or an
:class:`RpcError` carrying a :class:`Status` (gRPC's codes and numbers), the
details as text, and ``executed``, what the client knows about the handler:

* ``True``: the handler ran on the server (it started; a failure arrived as
  its status, the exception's type name and message);
* ``False``: the handler did not run and never will for this call, so calling
  again cannot run it twice;
* ``None``: unknown — the request may have reached the server, and the
  server may have run it (or may still), but the client cannot learn which.

A remote exception never travels as a pickled object: only its status, its
type name and its message cross the network (:class:`RemoteError`).
"""

from __future__ import annotations

import enum
from typing import Any

from ..errors import ReliableError, UsageError, format_address

__all__ = ["MarshalError", "RemoteError", "RpcError", "Status"]


class Status(enum.IntEnum):
    """gRPC's status codes, with gRPC's numbers (``rmsg call`` exits with them)."""

    OK = 0
    CANCELLED = 1
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    RESOURCE_EXHAUSTED = 8
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14


_EXECUTED_TEXT = {
    True: "the handler ran",
    False: "it was not executed: safe to call again",
    None: "it may have been executed",
}


class RpcError(ReliableError):
    """A call that did not return a result.

    Raise it from a handler to answer with a chosen ``status`` (the client
    gets a :class:`RemoteError` with that status and your message).
    """

    def __init__(
        self,
        status: Status,
        details: str = "",
        *,
        executed: bool | None = None,
        peer: Any = None,
        method: str = "",
    ) -> None:
        self.status = Status(status)
        self.details = details
        self.executed = executed
        self.peer = peer
        self.method = method
        super().__init__(str(self))

    def __str__(self) -> str:
        where = f"{self.method}() at {format_address(self.peer)}: " if self.method else ""
        text = f"{where}{self.status.name}"
        if self.details:
            text += f": {self.details}"
        return f"{text} ({_EXECUTED_TEXT[self.executed]})"


class RemoteError(RpcError):
    """The handler raised: ``type_name`` and the message (``details``) of its exception.

    ``executed`` is ``True``: the handler ran, and may have had effects before it
    raised.
    """

    def __init__(
        self,
        status: Status,
        type_name: str,
        details: str,
        *,
        peer: Any = None,
        method: str = "",
    ) -> None:
        self.type_name = type_name
        super().__init__(status, details, executed=True, peer=peer, method=method)

    def __str__(self) -> str:
        where = f"{self.method}() at {format_address(self.peer)}: " if self.method else ""
        return f"{where}{self.status.name}: {self.type_name}: {self.details} (the handler ran)"


class MarshalError(UsageError):
    """An argument (or a result) the codec cannot carry; nothing was sent."""
