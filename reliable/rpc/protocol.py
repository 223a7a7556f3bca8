"""The RPC protocol, sans-I/O: a client core and a server core over rmsg messages.

Theory of operation
-------------------
A call is one rmsg message (REQUEST) from the client's node to the server's
service mailbox (``rpc`` or ``rpc.<service>``, a port), and one message
(REPLY) back to the client's reply port. rmsg delivers each message at most
once, intact, and tells the sender whether it got in (a receipt naming the
receiving node's incarnation) or, when it failed, whether it *may* have
(``delivered`` ``False`` or ``None``). The cores here add what RPC needs on
top, without clocks or sockets: time arrives as ``now``, messages go out as
:class:`Outgoing` values the adapter sends, and their fates come back through
:meth:`ClientCore.sent` / :meth:`ClientCore.send_failed`.

**Call ids.** A call is named by ``(client incarnation, counter)``. The
incarnation is the client node's (64 random bits, new each process life), so
ids never repeat across client restarts, and a restarted client is never
answered from the cache with the reply to its previous life's call.

**At most once.** Only one message of a call may start the handler: the
*executable* attempt, sent once to one server (for anycast, once to each
member tried, and a member is tried only after the previous one provably did
not run the call). Every later REQUEST for the call is a *retry*: it never
starts the handler; the server answers it from its reply cache, or says it
has no record. The executable attempt names the server incarnation it is
meant for (``expect``; before its first call to a server the client learns
the incarnation from the receipt of a HELLO), and a server of any other
incarnation refuses it: a request that was on its way when the server
restarted can never run in the new life as well as the old. Since rmsg
delivers a message at most once to a node's life, the handler runs at most
once per call whatever is lost, duplicated, delayed or restarted.

**The reply cache** keeps each call's entry from arrival until ``cache_age``
seconds after it finished, at most ``cache_entries`` of them (the oldest
finished entry goes first; when every entry is still running, new calls are
refused with RESOURCE_EXHAUSTED, not run). Evicting an entry only loses the
answer to a later retry (which then gets "no record", and its client reports
the outcome unknown); it can never make a call run twice.

**What the client knows.** Once the executable attempt's receipt arrives,
the request is in the server's mailbox; the client then re-sends the call as
a retry every ``retry_interval`` while it waits, which fetches a reply the
server could not deliver (it is cached) and detects a server that died
(rmsg fails the retry: unreachable, or restarted) or restarted (the retry's
receipt names another incarnation). The table in docs/rpc.md lists the
outcome the client reports for each case: executed, not executed, or unknown.

**Deadlines** travel as the time left (milliseconds) when the request was
sent; the server counts from its arrival, so clocks need not agree (transit
time is spent twice, as in gRPC). A call whose deadline passed before a worker
took it is answered DEADLINE_EXCEEDED without starting; a running one is
signalled (:class:`CancelCall`). **Cancellation**: the client withdraws an
executable attempt that has not wholly left (then certainly not executed), or
else sends CANCEL; the server drops a queued call (CANCELLED, not executed)
or signals a running one, and answers with what happened.

**Back-pressure**: at most ``max_concurrency`` calls run and ``max_queued``
wait for a worker; a call beyond that is answered RESOURCE_EXHAUSTED at once
(not executed), never queued without bound.

Remote garbage (bad magic, truncated headers, unknown kinds) is a counted drop
(``dropped``), never an exception.
"""

from __future__ import annotations

import enum
import json
import struct
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .. import errors
from ..errors import format_address
from .status import Status

__all__ = [
    "CallDone",
    "CallId",
    "CancelCall",
    "ClientCore",
    "Outgoing",
    "ServerCore",
    "StartCall",
    "decode",
    "encode_cancel",
    "encode_reply",
    "encode_request",
    "error_body",
    "parse_error_body",
    "service_mailbox",
]

CallId = tuple[int, int]  #: (client node incarnation, counter)

MAGIC = b"rP"
VERSION = 1
NO_TIMEOUT = 0xFFFFFFFF  #: timeout_ms meaning "no deadline"
_HEAD = struct.Struct("!2sBB")  # magic, version, kind
_REQUEST = struct.Struct("!QQBIQ")  # incarnation, counter, flags, timeout_ms, expect
_REPLY = struct.Struct("!QQBB")  # incarnation, counter, status, executed
_REQUEST_ALL = struct.Struct("!2sBBQQBIQ")  # _HEAD and _REQUEST in one go
_REPLY_ALL = struct.Struct("!2sBBQQBB")  # _HEAD and _REPLY in one go
_CANCEL = struct.Struct("!QQ")
_EXECUTABLE = 0x01
_EXECUTED_CODE = {False: 0, True: 1, None: 2}
_EXECUTED_VALUE: dict[int, bool | None] = {0: False, 1: True, 2: None}
_STATUSES = {int(status): status for status in Status}  # Status(n) costs a microsecond


class Kind(enum.IntEnum):
    REQUEST = 1
    REPLY = 2
    CANCEL = 3
    HELLO = 4  #: learns the server's incarnation before a first call (ignored by servers)


def service_mailbox(service: str) -> str:
    """The mailbox a service's requests go to: ``rpc``, or ``rpc.<service>``."""
    return "rpc" if not service else f"rpc.{service}"


# ------------------------------------------------------------------ wire format


@dataclass(slots=True, kw_only=True)  # not frozen: a frozen __init__ costs 3x
class Request:
    call_id: CallId
    executable: bool
    timeout_ms: int  #: time left when sent, or NO_TIMEOUT
    expect: int  #: the server incarnation the client sends it to
    reply_mailbox: str
    method: str
    codec: str
    payload: bytes


@dataclass(slots=True, kw_only=True)  # not frozen: a frozen __init__ costs 3x
class Reply:
    call_id: CallId
    status: Status
    executed: bool | None
    codec: str
    body: bytes  #: the encoded result (OK), else ``error_body``


@dataclass(slots=True, kw_only=True)  # not frozen: a frozen __init__ costs 3x
class Cancel:
    call_id: CallId
    reply_mailbox: str


_STR8: dict[str, bytes] = {}  # method, mailbox and codec names seen: each call repeats them


def _str8(text: str) -> bytes:
    known = _STR8.get(text)
    if known is not None:
        return known
    raw = text.encode()
    if len(raw) > 255:
        raise errors.UsageError(f"{text[:20]!r}... is over 255 bytes of UTF-8; shorten it")
    if len(_STR8) >= 4096:
        _STR8.clear()
    encoded = _STR8[text] = bytes((len(raw),)) + raw
    return encoded


def _read_str8(data: bytes, at: int) -> tuple[str, int]:
    if at >= len(data):
        raise ValueError("truncated string")
    n = data[at]
    end = at + 1 + n
    if end > len(data):
        raise ValueError("truncated string")
    return data[at + 1 : end].decode(), end


def encode_request(request: Request) -> bytes:
    return _pack_request(
        request.call_id,
        request.executable,
        request.timeout_ms,
        request.expect,
        request.reply_mailbox,
        request.method,
        request.codec,
        request.payload,
    )


def _pack_request(
    call_id: CallId,
    executable: bool,
    timeout_ms: int,
    expect: int,
    reply_mailbox: str,
    method: str,
    codec: str,
    payload: bytes,
) -> bytes:
    inc, counter = call_id
    return b"".join(
        (
            _REQUEST_ALL.pack(
                MAGIC,
                VERSION,
                Kind.REQUEST,
                inc,
                counter,
                _EXECUTABLE if executable else 0,
                timeout_ms,
                expect,
            ),
            _str8(reply_mailbox),
            _str8(method),
            _str8(codec),
            payload,
        )
    )


def encode_reply(reply: Reply) -> bytes:
    return _pack_reply(reply.call_id, reply.status, reply.executed, reply.codec, reply.body)


def _pack_reply(
    call_id: CallId, status: Status, executed: bool | None, codec: str, body: bytes
) -> bytes:
    inc, counter = call_id
    head = _REPLY_ALL.pack(
        MAGIC, VERSION, Kind.REPLY, inc, counter, status, _EXECUTED_CODE[executed]
    )
    return b"".join((head, _str8(codec), body))


def encode_cancel(cancel: Cancel) -> bytes:
    inc, counter = cancel.call_id
    return b"".join(
        (
            _HEAD.pack(MAGIC, VERSION, Kind.CANCEL),
            _CANCEL.pack(inc, counter),
            _str8(cancel.reply_mailbox),
        )
    )


@dataclass(frozen=True, slots=True)
class Hello:
    pass


HELLO = _HEAD.pack(MAGIC, VERSION, Kind.HELLO)


def decode(data: bytes) -> Request | Reply | Cancel | Hello:
    """Parse one RPC message; raises ``ValueError`` for anything malformed."""
    if len(data) < _HEAD.size:
        raise ValueError("too short")
    magic, version, kind = _HEAD.unpack_from(data)
    if magic != MAGIC or version != VERSION:
        raise ValueError("not an rmsg RPC message")
    at = _HEAD.size
    try:
        if kind == Kind.REQUEST:
            _, _, _, inc, counter, flags, timeout_ms, expect = _REQUEST_ALL.unpack_from(data)
            at = _REQUEST_ALL.size
            reply_mailbox, at = _read_str8(data, at)
            method, at = _read_str8(data, at)
            codec, at = _read_str8(data, at)
            return Request(
                call_id=(inc, counter),
                executable=bool(flags & _EXECUTABLE),
                timeout_ms=timeout_ms,
                expect=expect,
                reply_mailbox=reply_mailbox,
                method=method,
                codec=codec,
                payload=data[at:],
            )
        if kind == Kind.REPLY:
            _, _, _, inc, counter, status, executed = _REPLY_ALL.unpack_from(data)
            at = _REPLY_ALL.size
            codec, at = _read_str8(data, at)
            if executed not in _EXECUTED_VALUE:
                raise ValueError("bad executed flag")
            known = _STATUSES.get(status)
            if known is None:
                raise ValueError(f"unknown status {status}")
            return Reply(
                call_id=(inc, counter),
                status=known,
                executed=_EXECUTED_VALUE[executed],
                codec=codec,
                body=data[at:],
            )
        if kind == Kind.HELLO:
            return Hello()
        if kind == Kind.CANCEL:
            inc, counter = _CANCEL.unpack_from(data, at)
            reply_mailbox, at = _read_str8(data, at + _CANCEL.size)
            return Cancel(call_id=(inc, counter), reply_mailbox=reply_mailbox)
    except (struct.error, UnicodeDecodeError) as exc:
        raise ValueError(f"malformed: {exc}") from None
    raise ValueError(f"unknown kind {kind}")


def error_body(type_name: str, message: str) -> bytes:
    """A failed call's reply body: its exception's type name and message, as JSON."""
    return json.dumps([type_name, message]).encode()


def parse_error_body(body: bytes) -> tuple[str, str]:
    try:
        value = json.loads(body)
        if isinstance(value, list) and len(value) == 2:
            return str(value[0]), str(value[1])
    except (ValueError, UnicodeDecodeError):
        pass
    return "", body[:200].decode(errors="replace")


@dataclass(slots=True)  # not frozen: one per message, and a frozen __init__ costs 3x
class Outgoing:
    """A message for the adapter to send: ``send_nowait(dest, data, mailbox=..., timeout=...)``.

    ``key`` (client side) names it when its fate is reported back.
    """

    dest: Any
    mailbox: str
    data: bytes
    key: int = 0
    timeout: float | None = None


# ------------------------------------------------------------------- the server


class _State(enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"


@dataclass(slots=True)
class _Entry:
    state: _State
    peer: Any
    reply_mailbox: str
    deadline: float | None
    request: Request | None  #: kept until the call starts
    reply: bytes = b""
    done_at: float = 0.0
    signalled: bool = False  #: a CancelCall went out for it


@dataclass(slots=True, kw_only=True)  # not frozen: one per call (see Outgoing)
class StartCall:
    """Run ``method`` now (the adapter decodes ``payload`` with ``codec``), then ``finish``."""

    call_id: CallId
    peer: Any
    method: str
    codec: str
    payload: bytes
    deadline: float | None  #: on the server's clock, or None


@dataclass(frozen=True, slots=True, kw_only=True)
class CancelCall:
    """Ask running call ``call_id`` to stop: its client cancelled it, or its deadline passed."""

    call_id: CallId
    reason: str  #: "cancelled" or "deadline"


@dataclass(slots=True)
class ServerStats:
    started: int = 0  #: handlers started
    duplicates: int = 0  #: requests for a call already known (answered from the cache)
    no_record: int = 0  #: retries for calls this server has no entry for
    refused: int = 0  #: calls answered RESOURCE_EXHAUSTED
    expired: int = 0  #: calls whose deadline passed before they started
    evicted: int = 0  #: cache entries dropped (age or room)
    dropped: int = 0  #: malformed messages ignored


class ServerCore:
    """One service's server side: admission, the reply cache, deadlines, cancellation.

    ``has_method`` says whether a method name exists (others are answered
    UNIMPLEMENTED without running anything).
    """

    def __init__(
        self,
        has_method: Callable[[str], bool],
        *,
        max_concurrency: int = 8,
        max_queued: int = 16,
        cache_entries: int = 10_000,
        cache_age: float = 300.0,
        incarnation: int = 0,
    ) -> None:
        if max_concurrency < 1 or max_queued < 0 or cache_entries < 1 or cache_age <= 0:
            raise errors.UsageError(
                "max_concurrency and cache_entries must be at least 1, max_queued at least 0, "
                "cache_age more than 0"
            )
        self._has_method = has_method
        self.incarnation = incarnation
        self.max_concurrency = max_concurrency
        self.max_queued = max_queued
        self.cache_entries = cache_entries
        self.cache_age = cache_age
        self._entries: dict[CallId, _Entry] = {}
        self._done: OrderedDict[CallId, None] = OrderedDict()  # finished, oldest first
        self._active: dict[CallId, _Entry] = {}  # queued or running: the ones with timers
        self._queue: deque[CallId] = deque()
        self._running = 0
        self._out: list[Outgoing] = []
        self._events: deque[CancelCall] = deque()
        self.closing = False  #: :meth:`close` was called: no call starts any more
        self.stats = ServerStats()

    @property
    def running(self) -> int:
        return self._running

    def room(self) -> int:
        """How many more calls may queue before the next is refused RESOURCE_EXHAUSTED:
        an adapter takes up to this many requests off the port in one read."""
        return max(0, self.max_concurrency + self.max_queued - self._running - len(self._queue))

    def cached(self) -> int:
        """Entries held now (queued, running and finished)."""
        return len(self._entries)

    # -------------------------------------------------------------- inputs

    def receive(self, data: bytes, source: Any, now: float) -> None:
        """A message taken from the service mailbox, sent by ``source``."""
        try:
            msg = decode(data)
        except ValueError:
            self.stats.dropped += 1
            return
        if isinstance(msg, Request):
            self._on_request(msg, source, now)
        elif isinstance(msg, Cancel):
            self._on_cancel(msg, source, now)
        elif isinstance(msg, Hello):
            pass  # its receipt told the client our incarnation
        else:
            self.stats.dropped += 1

    def _on_request(self, req: Request, source: Any, now: float) -> None:
        entry = self._entries.get(req.call_id)
        if entry is not None:
            self.stats.duplicates += 1
            if entry.state is _State.DONE:
                self._out.append(Outgoing(source, req.reply_mailbox, entry.reply))
            return  # queued or running: its reply follows
        if req.executable and req.expect != self.incarnation:
            # Sent to a previous life of this node, which may have run it: never run it here.
            self.stats.no_record += 1
            self._reply_to(
                source,
                req.reply_mailbox,
                req.call_id,
                Status.UNAVAILABLE,
                None,
                error_body(
                    "",
                    "the server restarted while the call was on its way; "
                    "its previous life may have run it",
                ),
            )
            return
        if req.executable and self.closing:
            self.stats.refused += 1
            self._reply_to(
                source,
                req.reply_mailbox,
                req.call_id,
                Status.UNAVAILABLE,
                False,
                error_body("", "the server is closing; the call was not executed"),
            )
            return
        if not req.executable:
            self.stats.no_record += 1
            self._reply_to(
                source,
                req.reply_mailbox,
                req.call_id,
                Status.UNAVAILABLE,
                None,
                error_body(
                    "",
                    "the server has no record of this call (its reply expired from "
                    "the cache, or the request never arrived)",
                ),
            )
            return
        deadline = None if req.timeout_ms == NO_TIMEOUT else now + req.timeout_ms / 1000.0
        self._evict(now)
        if len(self._entries) >= self.cache_entries:
            self.stats.refused += 1
            self._reply_to(
                source,
                req.reply_mailbox,
                req.call_id,
                Status.RESOURCE_EXHAUSTED,
                False,
                error_body("", "the server's reply cache is full of running calls"),
            )
            return
        entry = _Entry(_State.QUEUED, source, req.reply_mailbox, deadline, req)
        self._entries[req.call_id] = entry
        self._active[req.call_id] = entry
        if not self._has_method(req.method):
            self._finish(
                req.call_id,
                entry,
                Status.UNIMPLEMENTED,
                False,
                error_body("", f"no method {req.method!r}"),
                now,
            )
        elif deadline is not None and deadline <= now:
            self.stats.expired += 1
            self._finish(
                req.call_id,
                entry,
                Status.DEADLINE_EXCEEDED,
                False,
                error_body("", "the deadline passed before the call arrived"),
                now,
            )
        elif self._running + len(self._queue) >= self.max_concurrency + self.max_queued:
            self.stats.refused += 1
            self._finish(
                req.call_id,
                entry,
                Status.RESOURCE_EXHAUSTED,
                False,
                error_body(
                    "",
                    f"the server is busy ({self._running} calls running, "
                    f"{len(self._queue)} waiting)",
                ),
                now,
            )
        else:
            self._queue.append(req.call_id)

    def _on_cancel(self, cancel: Cancel, source: Any, now: float) -> None:
        entry = self._entries.get(cancel.call_id)
        if entry is None:
            return  # never arrived or long forgotten: nothing to stop
        if entry.state is _State.QUEUED:
            self._queue.remove(cancel.call_id)
            self._finish(
                cancel.call_id,
                entry,
                Status.CANCELLED,
                False,
                error_body("", "cancelled by the client before it started"),
                now,
            )
        elif entry.state is _State.RUNNING:
            if not entry.signalled:
                entry.signalled = True
                self._events.append(CancelCall(call_id=cancel.call_id, reason="cancelled"))
        else:
            self._out.append(Outgoing(source, cancel.reply_mailbox, entry.reply))

    def close(self, now: float) -> None:
        """The server stops taking calls: every queued call is answered UNAVAILABLE,
        not executed (its client may call again elsewhere), and later executable
        requests are refused the same way. Running calls finish as usual
        (:meth:`finish`); retries are still answered from the cache."""
        self.closing = True
        while self._queue:
            call_id = self._queue.popleft()
            self._finish(
                call_id,
                self._entries[call_id],
                Status.UNAVAILABLE,
                False,
                error_body("", "the server closed before the call started; it was not executed"),
                now,
            )

    def start_next(self, now: float) -> StartCall | None:
        """The next queued call to run, if a worker is free (``max_concurrency``)."""
        while self._queue and self._running < self.max_concurrency:
            call_id = self._queue.popleft()
            entry = self._entries[call_id]
            req = entry.request
            assert req is not None
            if entry.deadline is not None and entry.deadline <= now:
                self.stats.expired += 1
                self._finish(
                    call_id,
                    entry,
                    Status.DEADLINE_EXCEEDED,
                    False,
                    error_body("", "the deadline passed before a worker was free"),
                    now,
                )
                continue
            entry.state = _State.RUNNING
            entry.request = None
            self._running += 1
            self.stats.started += 1
            return StartCall(
                call_id=call_id,
                peer=entry.peer,
                method=req.method,
                codec=req.codec,
                payload=req.payload,
                deadline=entry.deadline,
            )
        return None

    def finish(
        self,
        call_id: CallId,
        status: Status,
        body: bytes,
        now: float,
        *,
        executed: bool = True,
        codec: str = "json",
    ) -> None:
        """A started call ended: reply with ``status`` and ``body`` (result or ``error_body``).

        ``executed=False`` when the handler was never entered (its arguments did
        not decode or bind).
        """
        entry = self._entries.get(call_id)
        if entry is None or entry.state is not _State.RUNNING:
            raise errors.UsageError(f"call {call_id} is not running")
        self._running -= 1
        self._finish(call_id, entry, status, executed, body, now, codec)

    def _finish(
        self,
        call_id: CallId,
        entry: _Entry,
        status: Status,
        executed: bool | None,
        body: bytes,
        now: float,
        codec: str = "json",
    ) -> None:
        entry.state = _State.DONE
        entry.request = None
        entry.done_at = now
        self._active.pop(call_id, None)
        entry.reply = _pack_reply(call_id, status, executed, codec, body)
        self._done[call_id] = None
        self._out.append(Outgoing(entry.peer, entry.reply_mailbox, entry.reply))

    def _reply_to(
        self,
        dest: Any,
        mailbox: str,
        call_id: CallId,
        status: Status,
        executed: bool | None,
        body: bytes,
    ) -> None:
        data = _pack_reply(call_id, status, executed, "json", body)
        self._out.append(Outgoing(dest, mailbox, data))

    def _evict(self, now: float) -> None:
        while self._done:
            call_id = next(iter(self._done))
            entry = self._entries[call_id]
            if len(self._entries) < self.cache_entries and entry.done_at + self.cache_age > now:
                break
            del self._done[call_id]
            del self._entries[call_id]
            self.stats.evicted += 1

    # ------------------------------------------------------------- outputs

    def outgoing(self) -> list[Outgoing]:
        """Replies to send (each to the client's reply port)."""
        out, self._out = self._out, []
        return out

    def next_event(self) -> CancelCall | None:
        return self._events.popleft() if self._events else None

    def get_timer(self) -> float | None:
        """When :meth:`handle_timer` has work: a cache expiry or a running call's deadline."""
        # Asked after every step (three times a call): no list, no min() of one.
        first: float | None = None
        if self._done:
            first = self._entries[next(iter(self._done))].done_at + self.cache_age
        for entry in self._active.values():
            deadline = entry.deadline
            if (
                deadline is not None
                and (first is None or deadline < first)
                and (
                    entry.state is _State.QUEUED
                    or (entry.state is _State.RUNNING and not entry.signalled)
                )
            ):
                first = deadline
        return first

    def handle_timer(self, now: float) -> None:
        self._evict(now)
        for call_id, entry in list(self._active.items()):
            if entry.deadline is None or entry.deadline > now:
                continue
            if entry.state is _State.RUNNING and not entry.signalled:
                entry.signalled = True
                self._events.append(CancelCall(call_id=call_id, reason="deadline"))
            elif entry.state is _State.QUEUED:
                self._queue.remove(call_id)
                self.stats.expired += 1
                self._finish(
                    call_id,
                    entry,
                    Status.DEADLINE_EXCEEDED,
                    False,
                    error_body("", "the deadline passed before a worker was free"),
                    now,
                )


# ------------------------------------------------------------------- the client


@dataclass(frozen=True, slots=True, kw_only=True)
class CallDone:
    """The one outcome of call ``counter``.

    ``body`` is the encoded result when ``status`` is OK, else ``error_body``
    (``type_name`` and ``details`` already parsed from it).
    """

    counter: int
    status: Status
    executed: bool | None
    codec: str
    body: bytes
    peer: Any
    type_name: str = ""
    details: str = ""


@dataclass(slots=True, kw_only=True)
class _Call:
    counter: int
    members: list[Any]  #: candidates; the current target is members[0]
    mailbox: str
    method: str
    codec: str
    payload: bytes
    deadline: float | None
    anycast: bool
    reached: int | None = None  #: incarnation known to hold the executable attempt
    maybe: bool = False  #: the executable attempt may have reached the target
    sends: dict[int, str] = field(default_factory=dict)  #: key -> "exec" | "retry" | "cancel"
    next_retry: float | None = None
    cancelled_at: float | None = None
    tried: list[tuple[Any, str]] = field(default_factory=list)  #: members that did not run it

    @property
    def target(self) -> Any:
        return self.members[0]

    def outstanding(self, kind: str) -> bool:
        return kind in self.sends.values()


@dataclass(slots=True)
class ClientStats:
    calls: int = 0
    retries: int = 0  #: retry requests sent
    failovers: int = 0  #: anycast calls moved to another member
    late: int = 0  #: replies for calls already finished
    dropped: int = 0  #: malformed replies ignored


_NOT_EXECUTED_STATUS: list[tuple[type[BaseException], Status]] = [
    (errors.MailboxNotFound, Status.NOT_FOUND),
    (errors.SendTimeout, Status.DEADLINE_EXCEEDED),
    (errors.SendCancelled, Status.CANCELLED),
    (errors.MailboxClosed, Status.UNAVAILABLE),
    (errors.MessageRejected, Status.RESOURCE_EXHAUSTED),
    (errors.WouldBlock, Status.RESOURCE_EXHAUSTED),
]


def _status_of(error: BaseException) -> Status:
    for kind, status in _NOT_EXECUTED_STATUS:
        if isinstance(error, kind):
            return status
    return Status.UNAVAILABLE


class ClientCore:
    """The calls of one client (one node incarnation), their attempts and their outcomes.

    ``reply_mailbox`` is the client's reply port on its node. ``retry_interval``
    (seconds): how often a call whose request is known to be at the server is
    re-sent as a retry while it waits, and how long a cancelled call waits
    for the server to say what became of it.
    """

    def __init__(
        self, incarnation: int, reply_mailbox: str, *, retry_interval: float = 1.0
    ) -> None:
        if retry_interval <= 0:
            raise errors.UsageError(f"retry_interval must be more than 0, got {retry_interval}")
        self.incarnation = incarnation
        self.reply_mailbox = reply_mailbox
        self.retry_interval = retry_interval
        self._counter = 0
        self._key = 0
        self._calls: dict[int, _Call] = {}
        self._keys: dict[int, int] = {}  # send key -> counter
        self._out: list[Outgoing] = []
        self._withdraw: list[int] = []
        self._done: deque[CallDone] = deque()
        self._incarnations: dict[Any, int] = {}  # server address -> its incarnation, as known
        self._hellos: dict[int, tuple[Any, str]] = {}  # HELLO send key -> (server, mailbox)
        self._waiting: dict[tuple[Any, str], list[int]] = {}  # calls waiting on a HELLO
        self.stats = ClientStats()

    def pending(self) -> int:
        return len(self._calls)

    # -------------------------------------------------------------- inputs

    def start(
        self,
        members: list[Any],
        mailbox: str,
        method: str,
        codec: str,
        payload: bytes,
        *,
        deadline: float | None,
        now: float,
        anycast: bool = False,
    ) -> int:
        """Begin a call to the first of ``members`` (anycast: then the others, in
        order, each only after the previous provably did not run it); returns its counter."""
        if not members:
            raise errors.UsageError("a call needs at least one destination")
        _str8(method)
        _str8(codec)
        self._counter += 1
        call = _Call(
            counter=self._counter,
            members=list(members),
            mailbox=mailbox,
            method=method,
            codec=codec,
            payload=payload,
            deadline=deadline,
            anycast=anycast,
        )
        self._calls[call.counter] = call
        self.stats.calls += 1
        if deadline is not None and deadline <= now:
            self._end(
                call, Status.DEADLINE_EXCEEDED, False, "the deadline passed before it was sent"
            )
        else:
            self._send(call, "exec", now)
        return call.counter

    def cancel(self, counter: int, now: float) -> None:
        """The application gave up on the call: withdraw it, or ask the server to stop it.

        The outcome follows as usual: CANCELLED and not executed if it was
        withdrawn or the server had not started it; the server's answer if it
        had; CANCELLED and unknown if no answer came within ``retry_interval``.
        """
        call = self._calls.get(counter)
        if call is None or call.cancelled_at is not None:
            return
        call.cancelled_at = now
        if not call.sends and call.reached is None and not call.maybe:
            self._end(call, Status.CANCELLED, False, "cancelled before it was sent")
            return
        for key, kind in call.sends.items():
            if kind == "exec":
                self._withdraw.append(key)
        if call.reached is not None or call.maybe:
            self._send(call, "cancel", now)

    def sent(self, key: int, incarnation: int, now: float) -> None:
        """Message ``key`` is in its mailbox at a node of ``incarnation`` (its receipt)."""
        if key in self._hellos:
            server, mailbox = self._hellos.pop(key)
            self._incarnations[server] = incarnation
            for counter in self._waiting.pop((server, mailbox), []):
                waiting = self._calls.get(counter)
                if waiting is not None and waiting.target == server:
                    self._send(waiting, "exec", now)
            return
        call, kind = self._pop(key)
        if call is None:
            return
        if kind == "exec":
            self._incarnations[call.target] = incarnation
            call.reached = incarnation
            call.next_retry = now + self.retry_interval
            if call.cancelled_at is not None:
                self._send(call, "cancel", now)
        elif kind == "retry":
            if call.reached is None:
                call.reached = incarnation  # the server's record (or its lack) answers now
            elif incarnation != call.reached:
                self._end(call, Status.UNAVAILABLE, None, "the server restarted during the call")

    def send_failed(self, key: int, error: BaseException, now: float) -> None:
        """Message ``key`` failed: a ``DeliveryFailed`` (or a ``WouldBlock`` at once)."""
        if isinstance(error, errors.PeerRestarted):
            self._incarnations[error.peer] = error.new_incarnation
        if key in self._hellos:
            server, mailbox = self._hellos.pop(key)
            for counter in self._waiting.pop((server, mailbox), []):
                waiting = self._calls.get(counter)
                if waiting is None or waiting.target != server:
                    continue
                if isinstance(error, errors.PeerRestarted):
                    self._send(waiting, "exec", now)  # no call went: now we know the new life
                else:
                    self._exec_failed(waiting, error, False, now)
            return
        call, kind = self._pop(key)
        if call is None or kind == "cancel":
            return
        delivered = getattr(error, "delivered", False)
        if kind == "exec":
            self._exec_failed(call, error, delivered, now)
            return
        # a retry failed: the server may be gone, and it may have run the call
        self._retry_failed(call, error, now)

    def _exec_failed(
        self, call: _Call, error: BaseException, delivered: bool | None, now: float
    ) -> None:
        if delivered is False:
            call.tried.append((call.target, type(error).__name__))
            if (
                call.anycast
                and len(call.members) > 1
                and call.cancelled_at is None
                and not isinstance(error, (errors.SendTimeout, errors.SendCancelled))
            ):
                self._failover(call, now)
            elif isinstance(error, errors.MailboxNotFound):
                self._end(
                    call,
                    Status.NOT_FOUND,
                    False,
                    f"nothing serves mailbox {call.mailbox!r} there (is the service name right?)",
                )
            else:
                self._end(call, _status_of(error), False, str(error))
            return
        call.maybe = True
        if isinstance(error, errors.SendTimeout):
            self._end(call, Status.DEADLINE_EXCEEDED, None, str(error))
        elif isinstance(error, errors.PeerRestarted) or call.cancelled_at is not None:
            self._end(call, Status.UNAVAILABLE, None, str(error))
        elif call.deadline is None or call.deadline > now:
            self._send(call, "retry", now)  # ask the same incarnation what it has
        else:
            self._end(call, Status.UNAVAILABLE, None, str(error))

    def _retry_failed(self, call: _Call, error: BaseException, now: float) -> None:
        if isinstance(error, errors.SendCancelled):
            return
        if isinstance(error, errors.WouldBlock):
            call.next_retry = now + self.retry_interval
            return
        status = (
            Status.DEADLINE_EXCEEDED
            if isinstance(error, errors.SendTimeout)
            else (Status.UNAVAILABLE)
        )
        self._end(call, status, None, str(error))

    def receive(self, data: bytes, source: Any, now: float) -> None:
        """A message from the client's reply port, sent by ``source``."""
        try:
            msg = decode(data)
        except ValueError:
            self.stats.dropped += 1
            return
        if not isinstance(msg, Reply) or msg.call_id[0] != self.incarnation:
            self.stats.dropped += 1
            return
        call = self._calls.get(msg.call_id[1])
        if call is None or source != call.target:
            self.stats.late += 1
            return
        type_name, details = ("", "") if msg.status is Status.OK else parse_error_body(msg.body)
        if (
            msg.executed is False
            and call.anycast
            and msg.status in (Status.RESOURCE_EXHAUSTED, Status.UNAVAILABLE)
            and len(call.members) > 1
            and call.cancelled_at is None
        ):
            busy = msg.status is Status.RESOURCE_EXHAUSTED
            call.tried.append((call.target, "busy" if busy else "closing"))
            self._failover(call, now)
            return
        self._end(
            call,
            msg.status,
            msg.executed,
            details,
            body=msg.body,
            codec=msg.codec,
            type_name=type_name,
        )

    # ------------------------------------------------------------- outputs

    def outgoing(self) -> list[Outgoing]:
        out, self._out = self._out, []
        return out

    def withdrawals(self) -> list[int]:
        """Keys of sends to withdraw (``SendHandle.cancel()``); their fate comes back as usual."""
        out, self._withdraw = self._withdraw, []
        return out

    def next_event(self) -> CallDone | None:
        return self._done.popleft() if self._done else None

    def get_timer(self) -> float | None:
        if not self._calls:
            return None
        times: list[float] = []
        for call in self._calls.values():
            if call.deadline is not None and not call.outstanding("exec"):
                times.append(call.deadline)
            if call.next_retry is not None and not call.outstanding("retry"):
                times.append(call.next_retry)
            if call.cancelled_at is not None and not call.outstanding("exec"):
                times.append(call.cancelled_at + self.retry_interval)
        return min(times) if times else None

    def handle_timer(self, now: float) -> None:
        for call in list(self._calls.values()):
            sending = call.outstanding("exec")
            gave_up = call.cancelled_at
            if gave_up is not None and not sending and now >= gave_up + self.retry_interval:
                self._end(
                    call,
                    Status.CANCELLED,
                    self._unknown(call),
                    "cancelled; the server did not say whether it had started",
                )
                continue
            if call.deadline is not None and now >= call.deadline and not sending:
                self._end(
                    call,
                    Status.DEADLINE_EXCEEDED,
                    self._unknown(call),
                    "no reply before the deadline",
                )
                continue
            if (
                call.next_retry is not None
                and now >= call.next_retry
                and not call.outstanding("retry")
            ):
                self._send(call, "retry", now)

    # ------------------------------------------------------------- helpers

    def _unknown(self, call: _Call) -> bool | None:
        return None if call.reached is not None or call.maybe else False

    def _pop(self, key: int) -> tuple[_Call | None, str]:
        counter = self._keys.pop(key, None)
        call = None if counter is None else self._calls.get(counter)
        if call is None:
            return None, ""
        return call, call.sends.pop(key)

    def _failover(self, call: _Call, now: float) -> None:
        self.stats.failovers += 1
        call.members.pop(0)
        call.reached = None
        call.maybe = False
        call.next_retry = None
        if call.deadline is not None and call.deadline <= now:
            self._end(call, Status.DEADLINE_EXCEEDED, False, "no member ran it before the deadline")
        else:
            self._send(call, "exec", now)

    def _send(self, call: _Call, kind: str, now: float) -> None:
        call_id = (self.incarnation, call.counter)
        expect = self._incarnations.get(call.target)
        if kind == "exec" and expect is None:
            # First contact: learn the server's incarnation before any call goes, so a
            # request can never run in a life of the server it was not meant for.
            waiting = self._waiting.setdefault((call.target, call.mailbox), [])
            waiting.append(call.counter)
            if len(waiting) == 1:
                self._key += 1
                self._hellos[self._key] = (call.target, call.mailbox)
                left = None if call.deadline is None else call.deadline - now
                self._out.append(Outgoing(call.target, call.mailbox, HELLO, self._key, left))
            return
        if kind == "cancel":
            data = encode_cancel(Cancel(call_id=call_id, reply_mailbox=self.reply_mailbox))
            timeout: float | None = self.retry_interval
        else:
            left = None if call.deadline is None else call.deadline - now
            timeout_ms = (
                NO_TIMEOUT if left is None else max(0, min(int(left * 1000), NO_TIMEOUT - 1))
            )
            data = _pack_request(
                call_id,
                kind == "exec",
                timeout_ms,
                expect or 0,
                self.reply_mailbox,
                call.method,
                call.codec,
                call.payload if kind == "exec" else b"",
            )
            timeout = left
            if kind == "retry":
                self.stats.retries += 1
                call.next_retry = now + self.retry_interval
        self._key += 1
        call.sends[self._key] = kind
        self._keys[self._key] = call.counter
        self._out.append(Outgoing(call.target, call.mailbox, data, self._key, timeout))

    def _end(
        self,
        call: _Call,
        status: Status,
        executed: bool | None,
        details: str,
        *,
        body: bytes = b"",
        codec: str = "json",
        type_name: str = "",
    ) -> None:
        if call.cancelled_at is not None and status is not Status.CANCELLED:
            # The application cancelled it: whatever came back (the handler's result, an
            # error, a failure of the transport), the outcome is CANCELLED, with what is
            # known of whether it ran. A result that arrived before cancel() is kept.
            said = "answered OK" if status is Status.OK else f"{status.name}: {details}"
            details = f"cancelled; the server {said}" if executed is True else f"cancelled; {said}"
            status, body, codec, type_name = Status.CANCELLED, b"", "json", ""
        del self._calls[call.counter]
        for key, kind in call.sends.items():
            self._keys.pop(key, None)
            if kind == "exec" and status is not Status.OK:
                self._withdraw.append(key)
        if status is not Status.OK and call.tried and executed is False:
            tried = ", ".join(f"{format_address(m)} ({why})" for m, why in call.tried)
            details = f"{details} [tried: {tried}]" if call.anycast else details
        self._done.append(
            CallDone(
                counter=call.counter,
                status=status,
                executed=executed,
                codec=codec,
                body=body,
                peer=call.target,
                type_name=type_name,
                details=details,
            )
        )
