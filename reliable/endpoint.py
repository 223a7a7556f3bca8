"""The sans-I/O protocol core of one rmsg node.

An :class:`Endpoint` owns no socket, thread or clock. Its driver feeds it
datagrams (``receive_datagram(data, addr, now)``), timer expiries
(``handle_timer(now)`` once ``now >= get_timer()``) and send requests
(``send(...)``), and collects what it produced: ``datagrams_to_send(now)`` and
``next_event()``. Sending only queues. Randomness (incarnation ids, initial
sequence numbers) comes from the injected ``random.Random``, so a seeded
endpoint is fully deterministic.

Admission of a datagram, in order (each failure is counted, never raised):

1. it must pass the node's security mode (:mod:`reliable.security`: CRC, or
   MAC/AEAD tag; ``security.*``, answered with a rate-limited, unsealed
   AUTH_FAILED so a peer with the wrong key learns it at once) and decode
   (``malformed.*``);
2. it must be addressed to this incarnation or to none (``stale_incarnation``,
   answered with a rate-limited RESET so a peer that outlived our previous
   life learns of the restart at once);
3. it must not come from an incarnation that already ended
   (``dead_incarnation``);
4. a new peer needs a DATA or PING packet (``unknown_peer``), with
   ``validate_addresses`` a valid cookie — otherwise it is answered with a
   CHALLENGE carrying one and no state is kept (``unvalidated``), so a
   spoofed source address never gets state, and never gets more than one
   small reply per datagram — and room under ``max_peers``: when the table
   is full, the least recently heard idle session makes way (``evicted``);
   with none idle, the packet is dropped (``peer_limit``);
5. a new incarnation from a known address is a restart of that peer;
6. in the sealed modes, its packet number must be new (``replay``).

Sessions do not outlive their use (see :mod:`reliable.peer`): an idle
session whose peer stays silent, or one holding memory for a peer that went
silent, is dropped (``SessionDropped``, counted in ``sessions_dropped``). What
it had reached is kept as a :class:`~reliable.peer.Resumption` (at most
``remembered_sessions`` of them), so a peer heard from again continues where
it was.

A send may be withdrawn (``withdraw(ticket, now)``, when the application
cancels it) for as long as it can be: see :mod:`reliable.peer` and the
:class:`~reliable.peer.Withdrawal` it answers. Either way the ticket gets
exactly one outcome event.

Closing flushes: no new sends, outstanding messages get until the close
deadline to be acknowledged, then whatever is left fails, every peer is told
with a CLOSE packet, and a :class:`~reliable.events.Closed` event ends it.

The endpoint routes; its jobs live in rooms of their own, each handed the
few callables it needs:

* :mod:`reliable.gate`: what the node says to addresses it keeps no session
  for (CHALLENGE cookies, RESET, AUTH_FAILED), within the amplification and
  rate limits;
* :mod:`reliable.post_office`: the mailboxes, and the verdict on each
  arriving message, which must ride on the very acknowledgement that covers
  it (entered, deferred because the mailbox is full, staged for a durable
  mailbox's commit, refused); the endpoint's mailbox methods (``take``,
  ``wait_for_message``, ``create_mailbox``...) hand their work there. The
  default mailbox ``""`` always exists. A durable mailbox records write
  intents instead of doing I/O; the adapter commits them
  (``pending_writes``, ``writes_done``): see :mod:`reliable.durable`;
* :mod:`reliable.failover`: anycast sends, tried on one member at a time;
* :mod:`reliable.groups` and :mod:`reliable.anycast`: group streams and the
  service directory;
* :mod:`reliable.remote_mailbox` (``Endpoint.remote``): receivers on other
  nodes, transfers of a mailbox's ownership, remote management (``rmsg
  ctl``) and the prompt failure of sends to a node that closed; the endpoint
  routes it the node-message operations 16 and up and the session events.

A datagram's way in (``receive_datagram``) reads top to bottom: open and
decode; the kinds no session takes go to their handler through one table
(``_sessionless``: group and anycast kinds, CHALLENGE, AUTH_FAILED); the
rest pass the admission checks above and reach their session. The session
answers instead of calling back: ``PeerSession.on_packet`` returns the
messages the packet completed and keeps the receipts and failures it settled
in ``session.events``. The endpoint takes the events first
(``_take_events``), then judges each message in order (a node message by
``_on_node_message``, a table by type; any other by the post office) and
hands the verdict back (``PeerSession.took``) before anything is sent, so it
rides on the acknowledgement. ``docs/architecture.md`` draws it.

Logging: the logger ``reliable.endpoint`` (under ``reliable``; the library
adds only a ``NullHandler``, so nothing is printed unless the application
configures logging) reports what an operator acts on, never each datagram:
INFO when a session is established, a peer closes or restarts, a session is
dropped (idle, unreachable), and when a message or datagram is refused (a
mailbox verdict; a failed security check that was answered with
AUTH_FAILED, itself rate-limited per address); WARNING when a session is
evicted or a new peer turned away because ``max_peers`` is reached, and when
a peer refuses *our* datagrams (keys or modes differ); DEBUG for address
challenges and closing. The gate and the post office speak through this
logger too: an operator configures one. ``reliable.peer`` logs restarts and
unreachable peers.
"""

from __future__ import annotations

import json
import logging
import math
import random
import secrets
import struct
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Any
from zlib import crc32

from . import errors, events
from .addressing import GroupAddress, ServiceAddress, check_service_name
from .anycast import Services
from .config import Config
from .durable import MailboxStore, WriteBatch
from .failover import ANYCAST_POLICIES, Anycast, Failover
from .gate import Gate
from .groups import Groups
from .mailbox import ANY, Selector, check_mailbox_name
from .message import Message
from .node_messages import (
    Admitted,
    AdmittedMany,
    Cancel,
    Discarded,
    MalformedNodeMessage,
    NodeMessage,
    StatsReply,
    StatsRequest,
    decode_node_message,
)
from .outbox_ids import TAG_MAX
from .peer import PeerSession, Resumption, Withdrawal
from .post_office import DEFAULT_MAILBOX as DEFAULT_MAILBOX
from .post_office import PostOffice
from .post_office import check_lock as check_lock
from .receiver import MemoryBudget
from .remote_mailbox import FIRST_OP, Manage, RemoteMailboxes
from .security import (
    REFUSAL_TEXT,
    WRONG_MODE,
    Integrity,
    Security,
    SecurityError,
)
from .sender import OutgoingMessage
from .stats import NodeStats
from .timers import TimerHeap
from .wire import (
    BULK_REFUSED_LOW_FLAGS,
    GROUP_KINDS,
    MAX_MAILBOX_BYTES,
    MODE_FLAGS,
    MSG_TYPE_MAX,
    MSG_TYPE_MIN,
    PRIORITY_MAX,
    Kind,
    MalformedPacket,
    Packet,
    Verdict,
    check_crc,
    decode,
    decode_body,
    decode_bulk,
    encode_body,
    fragment_capacity,
)

__all__ = ["Endpoint", "Withdrawal"]

_log = logging.getLogger(__name__)

# The arguments send() checks itself are declared ``object``, named for what they accept:
# a compiled (mypyc) core checks declared types at the call and would raise TypeError
# there, before the check that says what to pass (UsageError, as the pure core raises).
Buffer = object  #: bytes, bytearray or memoryview; anything else is a UsageError
Integer = object  #: an int, not a bool; anything else is a UsageError

_CLOSE_COPIES = 2  # CLOSE is best-effort; a second copy survives a single loss
_MAX_NODE_BACKLOG = 64  # node messages queued to one peer before stats queries are shed
# Plain ints for the per-datagram path: looking up an enum member costs about 0.2 us.
_RESET = int(Kind.RESET)
_CLOSE = int(Kind.CLOSE)
_REMOTE_EVENTS = (  # what remote_mailbox.py must see: waiter answers, session ends
    events.MessageTaken,
    events.ReceiveFailed,
    events.PeerClosed,
    events.PeerUnreachable,
    events.PeerRestarted,
    events.SessionDropped,
)
#: Event types ``_emit`` must look at (exact types: its fast path checks ``type()``), the
#: subclasses of hooked events included; every other event is only queued.
_HOOKED_EVENTS = frozenset(
    cls
    for cls in vars(events).values()
    if isinstance(cls, type)
    and issubclass(cls, (events.GroupSendDone, events.PeerUnreachable, *_REMOTE_EVENTS))
)
#: The CRC-32 trailer (wire.with_crc), packed inline for unsealed datagrams.
_CRC = struct.Struct("!I")

#: Most (datagram size, mailbox) capacities Endpoint.send remembers before starting over.
_CAPACITIES_KEPT = 64


def _tagged(mailbox: str, outbox: str) -> str:
    """``mailbox`` tagged with outbox id ``outbox`` (checked: the name stays in bounds)."""
    if not outbox.startswith("/") or len(mailbox.encode()) + len(outbox) > MAX_MAILBOX_BYTES:
        raise errors.UsageError(
            f"mailbox name {mailbox[:20]!r} is too long for an outbox send: keep it within "
            f"{MAX_MAILBOX_BYTES - TAG_MAX} bytes"
        )
    return mailbox + outbox


class Endpoint:
    """One rmsg node's protocol state, for every peer it talks to.

    ``arrival_events=True`` queues a :class:`~reliable.events.MessageReceived`
    for every message that arrives, a tap for tests and simulations. It is off
    by default: the message itself waits in its mailbox either way, nothing in
    the adapters reads the event, and building one per message cost 5% of the
    core's instructions per streamed message.
    """

    # Slots, not an instance dict: an endpoint has more attributes than CPython shares
    # keys for (30), so without them each attribute access was a dict lookup.
    __slots__ = (
        "_anycast",
        "_arrival_events",
        "_buffered",
        "_capacities",
        "_close_deadline",
        "_closing",
        "_departed",
        "_departed_duplicates",
        "_departed_forged_acks",
        "_departed_retransmissions",
        "_dirty",
        "_ended",
        "_events",
        "_failover",
        "_gate",
        "_grace",
        "_group_tickets",
        "_groups",
        "_locking",
        "_loose",
        "_mailboxes",
        "_next_query",
        "_next_ticket",
        "_node_message_handlers",
        "_now",
        "_outgoing",
        "_packet_number",
        "_peers",
        "_post",
        "_receive_budget",
        "_redirects",
        "_resumable",
        "_rng",
        "_services",
        "_serving",
        "_sessionless",
        "_socket_buffer",
        "_timers",
        "_unfiled",
        "closed",
        "config",
        "datagrams_received",
        "datagrams_sent",
        "dropped",
        "incarnation",
        "outbox_ids",
        "remote",
        "security",
        "sessions_dropped",
    )

    def __init__(
        self,
        config: Config | None = None,
        *,
        rng: random.Random | None = None,
        security: Security | None = None,
        arrival_events: bool = False,
    ) -> None:
        self.config = config or Config()
        #: Queue a MessageReceived for every message that arrives (see its docstring).
        self._arrival_events = arrival_events
        self._rng = rng if rng is not None else random.Random()
        self.security: Security = security if security is not None else Integrity()
        if self.security.needs_unique_incarnation:
            # AEAD nonces are unique only while incarnations are: never from a seeded RNG.
            self.incarnation = secrets.randbits(64) or 1
        else:
            self.incarnation = self._rng.getrandbits(64) or 1
        self._packet_number = 0
        #: fragment_capacity by (datagram size, mailbox): asked on every send
        self._capacities: dict[tuple[int, str], int] = {}
        self._receive_budget = MemoryBudget(self.config.receive_memory)
        self._departed_retransmissions = 0
        self._departed_duplicates = 0
        self._departed_forged_acks = 0
        self.sessions_dropped: dict[str, int] = {}
        self._resumable: OrderedDict[Any, Resumption] = OrderedDict()  # dropped sessions
        self._peers: dict[Any, PeerSession] = {}
        self._timers = TimerHeap()  # sessions' deadlines; see reliable/timers.py
        self._dirty: dict[Any, None] = {}
        #: sessions whose output was taken but whose deadline is not yet refiled: filed at
        #: the next timer query, once for everything that touched them since (a received
        #: request and the reply sent to it cost one deadline, not two)
        self._unfiled: dict[Any, None] = {}
        self._events: deque[events.Event] = deque()
        self._ended: OrderedDict[tuple[Any, int], None] = OrderedDict()
        #: datagrams sent outside any session: the gate's replies, group output at close,
        #: farewells (not "control": that word is kept for node messages)
        self._loose: list[tuple[bytes, Any]] = []
        self._next_ticket = 1
        self._buffered = 0
        self.dropped: dict[str, int] = {}
        self.datagrams_received = 0
        self.datagrams_sent = 0
        self._closing = False
        self._close_deadline = math.inf
        self.closed = False
        self._now = 0.0  # the latest time a caller gave us, for stats ages
        self._next_query = 1
        #: the mailboxes, their admission verdicts and accounting (post_office.py)
        self._post = post = PostOffice(
            self.config,
            self._peers,
            emit=self._emit,
            drop=self._drop,
            mark_dirty=self._mark_dirty,
            clock=self._clock,
            on_deleted=self._mailbox_deleted,
            no_mailbox=self._no_mailbox,
            arrival_events=arrival_events,
        )
        self._mailboxes = post.mailboxes  # the same dict, read by stats
        self._locking = post.locking  # the same set: one test per timer query
        #: outbox message ids delivered here (the post office's; outbox_ids.py)
        self.outbox_ids = post.outbox_ids
        self._gate = Gate(
            self.incarnation,
            # Cookies must be unguessable off-path; a seeded RNG (a simulation) may be predictable.
            self._rng.randbytes(16) if rng is not None else secrets.token_bytes(16),
            self.config.max_challenges_per_second,
            seal=self._seal,
            queue=self._queue_loose,
            drop=self._drop,
        )
        self._groups = Groups(
            self.config,
            self._rng,
            self.incarnation,
            emit=self._emit,
            admit=post.deliver_group,
            screen=post.screen,
            drop=self._drop,
            budget=self._receive_budget,
        )
        self._services = Services(
            self.config,
            self._rng,
            self.incarnation,
            emit=self._emit,
            drop=self._drop,
            issue_cookie=self._gate.issue_cookie,
            cookie_valid=self._gate.cookie_valid,
        )
        self._failover = Failover(
            send=self.send, choose=self._services.choose, rtt=self._srtt, report=self._events.append
        )
        self._anycast = self._failover.attempts  # the same dict: one lookup per event
        #: Handlers of the packets no session takes, by kind (every other kind goes on to
        #: the session checks in receive_datagram). Each takes (packet, source, datagram
        #: size, now).
        self._sessionless: dict[int, Callable[[Packet, Any, int, float], None]] = {
            kind: self._groups.on_packet for kind in GROUP_KINDS
        }
        #: Handlers of node messages, by type (see _on_node_message).
        self._node_message_handlers: dict[type, Callable[[PeerSession, Any, float], None]] = {
            Admitted: self._handle_outcome,
            Discarded: self._handle_outcome,
            AdmittedMany: self._handle_admitted_many,
            Cancel: self._handle_cancel,
            StatsRequest: self._handle_stats_request,
            StatsReply: self._handle_stats_reply,
        }
        self._sessionless.update(
            {
                Kind.SOLICIT: self._handle_solicit,
                Kind.ANNOUNCE: self._handle_service,
                Kind.WITHDRAW: self._handle_service,
                Kind.CHALLENGE: self._handle_challenge,
                Kind.AUTH_FAILED: self._handle_auth_failed,
            }
        )
        self._outgoing: dict[int, tuple[Any, OutgoingMessage]] = {}  # ticket -> (peer, message)
        self._group_tickets: set[int] = set()  # group sends awaiting their GroupSendDone
        self._socket_buffer: int | None = None  # the kernel receive buffer (set_receive_buffer)
        #: receivers on other nodes, remote management, departed nodes (remote_mailbox.py)
        self.remote = RemoteMailboxes(
            self.config, self, emit=self._emit, drop=self._drop, clock=lambda: self._now
        )
        self._departed = self.remote.departed_peers  # the same dicts: one lookup on hot paths
        self._serving = self.remote._serving  # (never rebound): a waiter answer routes here
        self._redirects = self.remote.redirects
        self._grace = self.remote.grace

    # ------------------------------------------------------------ application

    def send(
        self,
        dest: Any,
        data: Buffer,
        *,
        now: float,
        msg_type: Integer = 0,
        priority: Integer = 0,
        mailbox: str = "",
        timeout: float | None = None,
        deadline: float | None = None,
        outbox: str = "",
    ) -> int:
        """Queue ``data`` for ``dest``; returns the ticket its events will carry.

        ``outbox`` is a durable outbox's message id (``outbox_ids.format_tag``): it
        travels with the mailbox name so that the receiving node delivers a
        re-send after the sender's restart only once.

        A message not acknowledged ``timeout`` seconds after ``now`` (or by the
        absolute ``deadline``, when a caller already spent part of its timeout
        waiting for buffer space) is abandoned and fails with ``SendTimeout``.

        Raises a :class:`~reliable.errors.UsageError` for an invalid request and
        :class:`~reliable.errors.SendBufferFull` or
        :class:`~reliable.errors.NodeClosed` when it cannot be taken now;
        in every case nothing was queued.
        """
        # Each check is called only for a value of another type than the usual one, so the
        # common send makes no call per argument (the checks take ``object``: a compiled
        # core raises the same UsageError as a pure one).
        if type(data) is not bytes:
            data = message_bytes(data)
        if type(msg_type) is not int:
            msg_type = check_integer(msg_type, "msg_type")
        if type(priority) is not int:
            priority = check_integer(priority, "priority")
        if not (  # check_message's common case, inline (it says what is wrong)
            MSG_TYPE_MIN <= msg_type <= MSG_TYPE_MAX
            and 0 <= priority <= PRIORITY_MAX
            and (length := len(data)) <= self.config.max_message_size
            and mailbox == ""  # (a named mailbox's name is checked by the call)
        ):
            self.check_message(data, msg_type=msg_type, priority=priority, mailbox=mailbox)
            length = len(data)
        if timeout is not None:
            check_timeout(timeout, "timeout")
        self._now = now
        if self._closing or (
            self._buffered
            + (self._groups.buffered() if self._groups._groups else 0)  # (its first test)
            + length
            > self.config.send_buffer
        ):
            self._check_room(length)  # raises, saying why
        if self._redirects:
            dest = self.remote.redirect(dest, mailbox)  # the mailbox moved to another node
        session = self._peers.get(dest)
        if session is not None and mailbox in session.full_mailboxes:
            raise errors.MailboxFull(dest, mailbox)
        if outbox:
            mailbox = _tagged(mailbox, outbox)
        peer = session if session is not None else self._peer_for_send(dest, now)
        if self._departed and peer.incarnation is None:
            self.remote.sending(dest, now)  # it said goodbye: fail soon unless it is back
        # peer.current_datagram_size(), inline (once per message)
        datagram = peer.cc.window // 4
        if datagram < self.config.max_datagram_size:
            datagram = self.config.max_datagram_size
        if peer.datagram_size < datagram:
            datagram = peer.datagram_size
        size = self._capacities.get((datagram, mailbox), 0)
        if not size:
            if len(self._capacities) >= _CAPACITIES_KEPT:
                self._capacities.clear()
            size = self._capacities[datagram, mailbox] = fragment_capacity(datagram, mailbox)
        # (positional: a class called with keywords builds a dict of them, once per message)
        msg = OutgoingMessage(
            self._next_ticket,
            data,
            msg_type,
            priority,
            mailbox,
            now,  # created
            deadline if deadline is not None or timeout is None else now + timeout,
            timeout,
            size,  # fragment_size
            -(-length // size) or 1,  # count (an empty message: one fragment)
        )
        self._next_ticket += 1
        self._buffered += length
        self._outgoing[msg.ticket] = (dest, msg)
        peer.enqueue(msg, now)
        self._dirty[dest] = None
        return msg.ticket

    def withdraw(self, ticket: int, now: float) -> Withdrawal:
        """The application cancelled send ``ticket``: withdraw it if it still can be.

        A message not wholly sent yet is withdrawn at once
        (``Withdrawal.WITHDRAWN``: its ``MessageFailed`` carrying
        :class:`~reliable.errors.SendCancelled` is queued). One parked at the
        receiver's full mailbox is asked back (``REQUESTED``: its outcome
        event says whether it was given back or got in first). One wholly
        sent and awaiting its acknowledgement cannot be withdrawn
        (``CONTINUES``: its real outcome follows; if the receiver parks it,
        it is asked back then). An anycast send's current attempt is
        withdrawn the same way and no other member is tried; a group send
        is never withdrawn (``CONTINUES``: its ``GroupReceipt`` follows).
        ``UNKNOWN``: its outcome was already reported (or no such ticket).
        Whatever the answer, the ticket gets exactly one outcome event.
        """
        self._now = now
        inner = self._failover.withdraw(ticket) if self._anycast else None
        if inner is not None:
            ticket = inner
        elif ticket in self._group_tickets:
            return Withdrawal.CONTINUES
        entry = self._outgoing.get(ticket)
        if entry is None:
            return Withdrawal.UNKNOWN
        dest, msg = entry
        session = self._peers.get(dest)
        if session is None:  # pragma: no cover - a session fails its messages before it goes
            return Withdrawal.UNKNOWN
        self._dirty[dest] = None
        answer = session.withdraw(msg, now)
        self._take_events(session)
        return answer

    def check_message(self, data: bytes, *, msg_type: int, priority: int, mailbox: str) -> None:
        """Raise a :class:`~reliable.errors.UsageError` if ``send`` would refuse these."""
        if (
            type(msg_type) is int  # (so not a bool)
            and type(priority) is int
            and MSG_TYPE_MIN <= msg_type <= MSG_TYPE_MAX
            and 0 <= priority <= PRIORITY_MAX
            and len(data) <= self.config.max_message_size
            and type(mailbox) is str
            and (
                not mailbox
                or (mailbox.isascii() and len(mailbox) <= MAX_MAILBOX_BYTES and "/" not in mailbox)
            )
        ):
            return  # the common case, checked without a call per argument
        check_integer(msg_type, "msg_type")
        check_integer(priority, "priority")
        if len(data) > self.config.max_message_size:
            raise errors.MessageTooLarge(
                f"message is {len(data)} bytes, over Config.max_message_size "
                f"({self.config.max_message_size}); split it or raise the limit"
            )
        if not MSG_TYPE_MIN <= msg_type <= MSG_TYPE_MAX:
            raise errors.UsageError(f"msg_type must fit in a signed 32-bit integer, got {msg_type}")
        if not 0 <= priority <= PRIORITY_MAX:
            raise errors.UsageError(f"priority must be between 0 and 65535, got {priority}")
        check_mailbox_name(mailbox)

    def watch(self, peer: Any, now: float) -> None:
        """Start liveness checks of ``peer`` for a receive waiting specifically on it."""
        self._peer_for_send(peer, now).watch(now)
        self._dirty[peer] = None

    def unwatch(self, peer: Any, now: float) -> None:
        """End what :meth:`watch` started: ``peer`` is no longer checked for that receive."""
        session = self._peers.get(peer)
        if session is not None:
            session.unwatch(now)
            self._dirty[peer] = None  # its deadline may have moved

    def close(self, now: float, timeout: float = 2.0) -> None:
        """Begin a graceful close: flush for at most ``timeout`` seconds, then tell peers.

        Called again while closing, it can only bring the deadline closer
        (``close(now, 0)`` ends the flush at once).
        """
        check_timeout(timeout, "timeout")
        if self.closed:
            return
        self._closing = True
        self._close_deadline = min(self._close_deadline, now + timeout)
        self._maybe_finish_close(now)

    @property
    def closing(self) -> bool:
        return self._closing

    @property
    def challenges_sent(self) -> int:
        """Address-validation challenges sent to new addresses (see :mod:`reliable.gate`)."""
        return self._gate.challenges_sent

    def set_receive_buffer(self, nbytes: int | None) -> None:
        """Tell the core how many bytes the socket's kernel receive buffer holds.

        Adapters call this. Each peer's advertised window is then kept to what
        fits in half of that buffer at the fragment sizes the peer sends: the
        kernel drops whatever overflows it, and a sender that grows its window
        into that drop point loses a run of datagrams at once (6% of a 16 MiB
        message's on loopback). ``None`` (the default) sets no such bound.
        """
        self._socket_buffer = nbytes
        for session in self._peers.values():
            session.socket_buffer = nbytes

    def in_flight(self, dest: Any) -> bool:
        """Whether data sent to ``dest`` awaits acknowledgement (the link to it is busy).

        Adapters use it to batch: a send to a busy peer can wait a moment for
        others to share its datagram; a send to an idle one should leave now.
        """
        session = self._peers.get(dest)
        return session is not None and bool(session.sender.unacked)

    def has_events(self) -> bool:
        """Whether ``next_event`` has something (cheap)."""
        return bool(self._events)

    def has_output(self) -> bool:
        """Whether ``datagrams_to_send`` or ``next_event`` may have something (cheap)."""
        return bool(
            self._dirty
            or self._loose
            or self._events
            or self._groups.pending
            or self._services.pending
            or self.owes_writes()
        )

    def owes_writes(self) -> bool:
        """Whether a durable mailbox has writes for the adapter to commit (cheap)."""
        return self._post.owes_writes()

    def quiet(self) -> bool:
        """Whether nothing is under way: no datagram queued, no session waiting on its
        peer, no group or service timer, not closing. The only timers left, if any,
        are idle sessions' expiries: a simulation may stop here. (Events not yet
        taken do not count.)"""
        return not (
            self._dirty
            or self._loose
            or self._groups.pending
            or self._services.pending
            or self.owes_writes()
            or self._closing
            or self._groups.deadline() is not None
            or self._services.deadline() is not None
            or bool(self._grace)
            or any(s.wait_since is not None for s in self._peers.values())
        )

    def next_event(self) -> events.Event | None:
        """The oldest event not yet taken, or ``None``."""
        return self._events.popleft() if self._events else None

    # ---------------------------------------------------------------- network

    def receive_datagram(self, data: bytes, addr: Any, now: float) -> None:
        """Take one datagram that arrived from ``addr``."""
        if self.closed:
            return
        self._now = now
        self.datagrams_received += 1
        try:
            security = self.security
            if type(security) is Integrity:
                # Integrity.open, inline (the CRC and the mode bits: once per datagram)
                end = check_crc(data)
                if ((data[4] << 8) | data[5]) & MODE_FLAGS:
                    raise SecurityError("security.sealed", WRONG_MODE)
                packet_number = None
                body: bytes | memoryview = memoryview(data)[:end]
                # (a DATA packet that carries acks, and every ACK, is no bulk fragment:
                # decode_bulk's first test, read here without the two calls)
                if not data[5] & BULK_REFUSED_LOW_FLAGS and self._bulk(body, addr, now):
                    return  # the next fragment of a big message, taken without a Packet
            else:
                packet_number, body = security.open(data)
                if packet_number is None and self._bulk(body, addr, now):
                    return  # the next fragment of a big message, taken without a Packet
            pkt = decode_body(body)
        except SecurityError as refused:
            if not self._auth_failed_reply(data, addr, now):
                self._drop(refused.reason)
                if refused.refusal:
                    self._gate.refuse(data, addr, refused.refusal, now)
            return
        except MalformedPacket as malformed:
            self._drop("malformed." + malformed.reason)
            session = self._peers.get(addr)
            if session is not None and malformed.reason == "checksum":
                session.corrupt += 1
            return
        handle = self._sessionless.get(pkt.kind)
        if handle is not None:  # group and anycast kinds, CHALLENGE, AUTH_FAILED
            handle(pkt, addr, len(data), now)
            return
        if pkt.dst_incarnation not in (0, self.incarnation):
            self._drop("stale_incarnation")
            if pkt.kind not in (Kind.RESET, Kind.CLOSE):
                self._gate.reset(addr, pkt.src_incarnation, now, len(data))
            return
        if self._ended and (addr, pkt.src_incarnation) in self._ended:  # (no key made if none)
            self._drop("dead_incarnation")
            return
        session = self._peers.get(addr)
        if session is None:
            if pkt.kind not in (Kind.DATA, Kind.PING):
                self._drop("unknown_peer")
                return
            if self.config.validate_addresses and not self._gate.cookie_valid(pkt, addr, now):
                self._drop("unvalidated")
                self._gate.challenge(pkt, addr, len(data), now)
                return
            # Only a validated address may evict: spoofed sources must not push live peers out.
            if len(self._peers) >= self.config.max_peers and not self._evict_idle(now):
                self._drop("peer_limit")
                _log.warning(
                    "turned away %s: Config.max_peers=%d sessions, none idle",
                    errors.format_address(addr),
                    self.config.max_peers,
                )
                return
            session = self._new_peer(addr, now)
        if session.incarnation is None:
            session.incarnation = pkt.src_incarnation
            _log.info(
                "session with %s established (its incarnation %016x)",
                errors.format_address(addr),
                pkt.src_incarnation,
            )
        elif session.incarnation != pkt.src_incarnation:
            if pkt.kind == Kind.RESET and pkt.dst_incarnation != self.incarnation:
                self._drop("stale_reset")
                return
            old = session.incarnation
            self._remember_ended(addr, old)
            session.restart(pkt.src_incarnation, now)
            self._take_events(session)
            self._post.forget_parked(addr, old)
        elif pkt.kind == _RESET:
            self._drop("stale_reset")
            return
        if packet_number is not None and not session.replay.accept(packet_number):
            self._drop("replay")
            return
        if self._departed:
            self.remote.heard(addr)
        self._dirty[addr] = None
        deliveries = session.on_packet(pkt, now, self.incarnation)
        if session.events:
            self._take_events(session)  # what its acknowledgements settled, first
        post = self._post
        while deliveries is not None:  # each whole message, judged before any ack is built
            for d in deliveries:
                if d.for_node:
                    self._on_node_message(session, d.data, now)
                else:
                    verdict = post.deliver(session, d, now)
                    if verdict is not None:  # (None: it entered)
                        session.took(d, verdict)
            deliveries = session.delivered(now)  # the rest of the packet
        if pkt.kind == _CLOSE:
            # after its final acks: what it acknowledged on the way out is delivered
            self._peer_closed(session, now)
            return
        if self._closing:
            self._maybe_finish_close(now)

    def _bulk(self, body: bytes | memoryview, addr: Any, now: float) -> bool:
        """Take ``body`` if it is the next middle fragment of a message the peer at ``addr``
        is sending us, in the simplest form of DATA (``wire.decode_bulk``): the rest of
        ``receive_datagram`` for it, without a Packet. False, having changed nothing,
        for anything else (and always in a keyed mode, whose packet numbers the replay
        window must see)."""
        frag = decode_bulk(body)
        if frag is None or self._departed:
            return False
        session = self._peers.get(addr)
        src = frag[1]
        if (
            session is None
            or session.incarnation != src
            or frag[2] not in (0, self.incarnation)
            or (addr, src) in self._ended
            or not session.on_bulk(frag, now)
        ):
            return False
        self._dirty[addr] = None
        if self._closing:
            self._maybe_finish_close(now)
        return True

    def handle_unreachable(
        self,
        addr: Any,
        reason: str,
        now: float,
        *,
        errno: int | None = None,
        soft: bool = False,
    ) -> bool:
        """The operating system says ``addr`` cannot be reached; ``reason`` says how.

        Adapters call this for an ICMP error about a datagram sent to ``addr``
        (e.g. "connection refused (the OS reported ICMP port unreachable)") or
        a send the OS refused at once ("network is unreachable"), with the OS's
        ``errno`` if there is one. ``soft`` marks a report that routing may take
        back (network or host unreachable) rather than the peer's host refusing.
        Unless ``Config.os_errors`` is ``"ignore"``, a peer we wait on then fails
        at once with ``PeerUnreachable`` naming ``reason`` — subject to the
        session's own evidence that it is alive (see :mod:`reliable.peer`).
        Returns whether a peer failed on it; a report about an address the
        node keeps no session for changes nothing.
        """
        session = self._peers.get(addr)
        if session is None or self.closed:
            return False
        self._now = now
        failed = session.on_unreachable(reason, now, errno=errno, soft=soft)
        self._take_events(session)
        if not self._drop_if_expired(session):
            self._dirty[addr] = None  # its deadline moved
        if failed and self._closing:
            self._maybe_finish_close(now)
        return failed

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, Any]]:
        """Every datagram due now, with its destination address."""
        if not (self._dirty or self._loose or self._groups.pending or self._services.pending):
            return []  # nothing touched since the last call (an adapter asks after each step)
        out = self._loose
        self._loose = []
        if self._dirty and not self.closed:
            dirty = self._dirty
            self._dirty = {}
            inc = self.incarnation
            seal = self._seal
            plain = type(self.security) is Integrity  # a CRC, no packet number: inline
            unfiled = self._unfiled
            for addr in dirty:
                session = self._peers.get(addr)
                if session is not None:
                    for body in session.datagrams(now, inc):
                        if plain:
                            out.append((body + _CRC.pack(crc32(body)), addr))
                        else:
                            out.append((seal(body), addr))
                    if session.events:  # messages that failed for the path's size
                        self._take_events(session)
                    unfiled[addr] = None  # its deadline, refiled at the next timer query
        if (self._groups.pending or self._services.pending) and not self.closed:
            self._group_output(out, now)
        self.datagrams_sent += len(out)
        return out

    def _group_output(self, out: list[tuple[bytes, Any]], now: float) -> None:
        for pkt, dest in self._groups.datagrams(now) + self._services.datagrams(now):
            out.append((self._seal(encode_body(pkt)), dest))

    def _seal(self, body: bytes) -> bytes:
        number = self._packet_number
        self._packet_number = number + 1
        return self.security.seal(body, self.incarnation, number)

    # ------------------------------------------------ packets no session takes

    def _handle_service(self, pkt: Packet, addr: Any, size: int, now: float) -> None:
        """ANNOUNCE or WITHDRAW: the anycast directory's."""
        self._services.on_packet(pkt, addr, now)

    def _handle_solicit(self, pkt: Packet, addr: Any, size: int, now: float) -> None:
        """SOLICIT: a member answers for its groups, a server for its services."""
        if pkt.src_incarnation != self.incarnation:
            if pkt.cookie is not None:  # unicast: "do you serve this, at this address?"
                self._services.confirm_request(pkt, addr)
                return
            self._services.solicited(pkt.group, now)
        self._groups.on_packet(pkt, addr, size, now)

    def _handle_challenge(self, pkt: Packet, addr: Any, size: int, now: float) -> None:
        """The peer wants our address proven: echo its cookie from now on."""
        session = self._peers.get(addr)
        if session is None or pkt.dst_incarnation != self.incarnation or pkt.cookie is None:
            self._drop("stray_challenge")
            return
        session.on_challenge(pkt.cookie, now)
        self._dirty[addr] = None

    def _auth_failed_reply(self, data: bytes, addr: Any, now: float) -> bool:
        """An AUTH_FAILED is never sealed; a sealed node takes it here. Was it one?"""
        if len(data) < 4 or data[3] != Kind.AUTH_FAILED:
            return False
        try:
            pkt = decode(data)
        except MalformedPacket:
            return False
        self._handle_auth_failed(pkt, addr, len(data), now)
        return True

    def _handle_auth_failed(self, pkt: Packet, addr: Any, size: int, now: float) -> None:
        """AUTH_FAILED: a peer refuses our datagrams (keys or modes differ)."""
        session = self._peers.get(addr)
        if session is None or pkt.dst_incarnation != self.incarnation:
            self._drop("stray_auth_failed")  # the echo is what proves it answers us
            return
        self._drop("auth_failed")
        error = errors.AuthenticationFailed(addr, REFUSAL_TEXT.get(pkt.refusal, "refused"))
        _log.warning("%s", error)
        self._emit(events.PeerRejectedUs(peer=addr, error=error))
        session.fail_all(error)
        self._take_events(session)

    # ----------------------------------------------------------------- timers

    def get_timer(self) -> float | None:
        """Absolute time of the next timer, or ``None``.

        A query: it changes no protocol state (it only refreshes the timer index).
        """
        if self.closed:
            return None
        if self._dirty or self._unfiled:
            self._refile_dirty()
        first = self._timers.earliest(self._deadline_of)
        if not (self._locking or self._grace or self._closing):
            # the common case: only sessions, groups and services have timers
            groups = self._groups
            services = self._services
            # (their deadline()'s first test, inline: no group open, no service served or
            # discovered, asked after every datagram)
            if not (groups._groups or services._announce_at or services.directory):
                return first
            earliest = first
            for part in (groups.deadline(), services.deadline()):
                if part is not None and (earliest is None or part < earliest):
                    earliest = part
            return earliest
        deadlines = [] if first is None else [first]
        for part in (
            self._groups.deadline(),
            self._services.deadline(),
            self._post.lock_deadline(),
        ):
            if part is not None:
                deadlines.append(part)
        if self._grace:
            deadlines.append(min(self._grace.values()))  # sends to departed nodes
        if self._closing:
            deadlines.append(self._close_deadline)
            linger = self._groups.linger_until()
            if linger is not None and linger > self._now:
                deadlines.append(linger)
        return min(deadlines, default=None)

    def handle_timer(self, now: float) -> None:
        """Run every timer that is due at ``now``."""
        if self.closed:
            return
        self._now = now
        self._refile_dirty()
        for addr in self._timers.due(now, self._deadline_of):
            session = self._peers[addr]
            session.on_timer(now)
            if session.events:
                self._take_events(session)
            if not self._drop_if_expired(session):
                self._dirty[addr] = None
        groups_due = self._groups.deadline()
        if groups_due is not None and groups_due <= now:
            self._groups.on_timer(now)
        services_due = self._services.deadline()
        if services_due is not None and services_due <= now:
            self._services.on_timer(now)
        if self._locking:
            self._post.expire_locks(now)
        if self._grace:
            self.remote.on_timer(now)
        if self._closing:
            self._maybe_finish_close(now)

    def _deadline_of(self, addr: Any) -> float | None:
        """A session's deadline as last computed: every change to a session marks it dirty,
        and dirty sessions are refiled (recomputed) before any timer query, so this is its
        real deadline without computing it again each time its entry reaches the top."""
        session = self._peers.get(addr)
        return None if session is None else session.filed_deadline

    def _refile_dirty(self) -> None:
        """Sessions touched since the last query may have moved their deadlines earlier:
        those whose output was taken since (``_unfiled``) and those with output pending."""
        timers = self._timers
        peers = self._peers
        if self._unfiled:
            unfiled = self._unfiled
            self._unfiled = {}
            for addr in unfiled:
                session = peers.get(addr)
                if session is not None and addr not in self._dirty:
                    session.filed_deadline = deadline = session.deadline()
                    timers.update(addr, deadline)
        if self._dirty:
            for addr in self._dirty:
                session = peers.get(addr)
                if session is not None:
                    session.filed_deadline = deadline = session.deadline()
                    timers.update(addr, deadline)

    # ------------------------------------------------------------------ stats

    def stats(self, now: float | None = None) -> NodeStats:
        """A snapshot; mailbox times are ages before ``now`` (default: the latest time seen)."""
        at = self._now if now is None else now
        return NodeStats(
            incarnation=self.incarnation,
            peers=tuple(s.stats() for s in self._peers.values()),
            mailboxes=tuple(box.stats(at) for box in self._mailboxes.values()),
            dropped=self._drop_counts(),
            datagrams_received=self.datagrams_received,
            datagrams_sent=self.datagrams_sent,
            send_buffer_bytes=self._buffered,
            mailbox_bytes=self._post.held,
            mailbox_memory=self.config.mailbox_memory,
            receive_bytes=self._receive_budget.used,
            receive_memory=self._receive_budget.limit,
            challenges_sent=self._gate.challenges_sent,
            departed_retransmissions=self._departed_retransmissions,
            departed_duplicates=self._departed_duplicates,
            sessions_dropped=dict(self.sessions_dropped),
            groups=tuple(self._groups.stats() + self._services.stats()),
        )

    def _drop_counts(self) -> dict[str, int]:
        """``dropped``, with forged acknowledgements (counted by the sessions) added."""
        counts = dict(self.dropped)
        forged = self._departed_forged_acks + sum(s.bogus_acks for s in self._peers.values())
        if forged:
            counts["forged_ack"] = forged
        return counts

    def query_stats(self, dest: Any, now: float) -> int:
        """Ask node ``dest`` for its statistics; the answer is a ``StatsReceived`` event.

        Returns the request number the event will carry.
        """
        if self._closing:
            raise errors.NodeClosed("the node is closing and accepts no new messages")
        self._now = now
        request = self._next_query
        self._next_query += 1
        self._peer_for_send(dest, now).send_node_message(StatsRequest(request), now)
        self._dirty[dest] = None
        return request

    # ------------------------------- mailboxes (their work is the post office's)

    def create_mailbox(
        self,
        name: str,
        *,
        capacity: int | None = None,
        max_bytes: int | None = None,
        port: bool = False,
        store: MailboxStore | None = None,
        now: float,
    ) -> int:
        """Create mailbox ``name``; returns its owner token.

        ``capacity`` bounds the messages it holds (0: rendezvous, None: no
        limit) and ``max_bytes`` their bytes. A *port* delivers only to its
        owner: ``take``/``wait_for_message`` must present the token. With a
        ``store`` the mailbox is durable (:mod:`reliable.durable`): it starts
        with the messages the store restored, in order.
        """
        return self._post.create_mailbox(name, capacity, max_bytes, port, store, now)

    def post(
        self,
        mailbox: str,
        data: bytes,
        *,
        source: Any,
        msg_type: int = 0,
        priority: int = 0,
        now: float,
    ) -> Verdict | None:
        """A message from this node into its own ``mailbox``, without the transport
        (a local post: ``source`` is the node's own address). It is judged and
        admitted as an arriving message is: it enters, goes to a waiting
        receiver, parks while the mailbox is full, or (durable) is staged until
        committed. Returns None, or the verdict that refused it (also counted as
        a ``refused.*`` drop). Its ``incarnation`` is 0: no session hears of it.
        """
        self._now = now
        return self._post.post(mailbox, data, source, msg_type, priority, now)

    # ---------------------------------------------------- durable mailboxes

    def pending_writes(self, limit: int | None = None) -> list[WriteBatch]:
        """What durable mailboxes owe their stores, one batch per store; the
        adapter commits each (in one transaction) and reports :meth:`writes_done`.
        ``limit``: most new messages per batch (the rest stay owed)."""
        return self._post.pending_writes(limit)

    def durable_stores(self) -> list[MailboxStore]:
        """The stores of the durable mailboxes (to close with the node)."""
        return self._post.durable_stores()

    def writes_done(self, batch: WriteBatch, now: float, error: Exception | None = None) -> None:
        """``batch`` was committed (``error`` None) or could not be.

        Committed messages enter their mailbox and their senders get their
        receipts; receivers served meanwhile get their messages. If the commit
        failed, the messages it would have stored are refused to their senders
        (``MessageRejected``) and the failure is counted (``store.failed``);
        receivers still get theirs (its row may then come back after a restart).
        """
        self._now = now
        self._post.writes_done(batch, now, error)

    def has_mailbox(self, name: str) -> bool:
        """Whether this node has a mailbox called ``name``."""
        return self._post.has_mailbox(name)

    def is_port_of(self, name: str, owner: int) -> bool:
        """Whether mailbox ``name`` is a port whose owner token is ``owner``."""
        return self._post.is_port_of(name, owner)

    def mailbox_names(self) -> list[str]:
        """The names of this node's mailboxes (the default one is ``""``)."""
        return self._post.mailbox_names()

    def close_mailbox(self, name: str, now: float, *, owner: int | None = None) -> None:
        """Refuse new messages (senders get ``MailboxClosed``); queued ones stay receivable.

        A port is managed by its owner only: ``owner`` must be its token.
        """
        self._post.close_mailbox(name, now, owner)

    def set_limits(
        self,
        name: str,
        capacity: int | None,
        max_bytes: int | None,
        now: float,
        *,
        owner: int | None = None,
    ) -> None:
        """Change mailbox ``name``'s capacity and max_bytes at run time (see
        :meth:`~reliable.mailbox.Mailbox.set_limits`); the default mailbox's too. A port's
        by its owner."""
        self._now = now
        self._post.set_limits(name, capacity, max_bytes, now, owner)

    def open_mailbox(self, name: str, *, owner: int | None = None) -> None:
        """Accept messages again after :meth:`close_mailbox`."""
        self._post.open_mailbox(name, owner)

    def delete_mailbox(self, name: str, now: float, *, owner: int | None = None) -> None:
        """Remove the mailbox: parked senders get ``MailboxClosed``, later ones
        ``MailboxNotFound``; queued messages are discarded; waiting receives fail.

        A port is deleted by its owner only (``owner``), and should be once the
        owner is gone: nobody else can ever receive what it would accept.
        """
        self._post.delete_mailbox(name, now, owner)

    def take(
        self,
        mailbox: str = DEFAULT_MAILBOX,
        selector: Selector | None = None,
        *,
        owner: int | None = None,
        receiver: str = "",
        lock: float | None = None,
        now: float,
    ) -> Message | None:
        """The message ``selector`` chooses from ``mailbox``, if one is there; never waits.

        With ``lock`` (seconds) it is taken under a lock instead (see
        :meth:`ack`): invisible to other receives until acknowledged, released,
        or the lock expires. From a durable mailbox, the adapter must commit
        (``sync_stores``) before it hands a removed message out.
        """
        self._now = now
        post = self._post
        if lock is None and selector is None and not post.locking:
            # PostOffice.take's common case, inline: the head of a mailbox we may read
            box = post.mailboxes.get(mailbox)
            if box is not None and (box.owner is None or owner == box.owner):
                msg = box.take_head(receiver, now)
                if msg is not None:
                    post.held -= len(msg.data)
                return msg
        return post.take(mailbox, selector, owner, receiver, lock, now)

    def peek(
        self,
        mailbox: str = DEFAULT_MAILBOX,
        selector: Selector | None = None,
        *,
        owner: int | None = None,
        now: float,
    ) -> Message | None:
        """The message :meth:`take` would return, left in the mailbox (browse)."""
        return self._post.peek(mailbox, selector, owner, now)

    def ack(self, mailbox: str, msg: Message, *, owner: int | None = None, now: float) -> bool:
        """Remove ``msg``, taken under a lock, for good. False if its lock had expired
        (then it went back to the mailbox, and may have been received again)."""
        self._now = now
        return self._post.ack(mailbox, msg, owner, now)

    def release(self, mailbox: str, msg: Message, *, owner: int | None = None, now: float) -> bool:
        """Give ``msg``, taken under a lock, back to the mailbox; False if the lock had expired."""
        self._now = now
        return self._post.release(mailbox, msg, owner, now)

    def put_back(
        self, msg: Message, *, owner: int | None = None, locked: bool = False, now: float
    ) -> bool:
        """Return ``msg``, taken from its mailbox (``msg.mailbox``), as if it had never
        been: for a receive that gave up in the instant it was answered (cancelled,
        interrupted), whose message must not be lost, since its sender got its receipt.

        It goes to the longest-waiting receive it suits, or back to the head of its
        priority; taken under a lock (``locked``), it is released. A durable mailbox
        stores it again, first (commit before relying on it, as after a take). False, and
        nothing changes, if it cannot go back: its mailbox was deleted, it was cut
        (``max_size`` with ``truncate``: part of it is gone), or its lock expired
        (then it is back already).
        """
        self._now = now
        return self._post.put_back(msg, owner, locked, now)

    def remove_message(
        self, mailbox: str, msg: Message, *, owner: int | None = None, now: float
    ) -> bool:
        """Explicit delete: remove ``msg`` (peeked, or locked) from its mailbox.
        False if it is no longer there (received, or deleted, meanwhile)."""
        self._now = now
        return self._post.remove_message(mailbox, msg, owner, now)

    def wait_for_message(
        self,
        mailbox: str = DEFAULT_MAILBOX,
        selector: Selector | None = None,
        *,
        owner: int | None = None,
        receiver: str = "",
        lock: float | None = None,
        now: float,
    ) -> int:
        """Queue a receive that found nothing (call :meth:`take` first); returns its ticket.

        The answer is a ``MessageTaken`` event, or ``ReceiveFailed`` if the
        mailbox is deleted. Waiting receives are served first come, first served.
        """
        self._now = now
        return self._post.wait_for_message(mailbox, selector, owner, receiver, lock, now)

    def take_any(
        self,
        mailboxes: list[tuple[str, int | None]],
        selector: Selector | None = None,
        *,
        receiver: str = "",
        lock: float | None = None,
        now: float,
    ) -> Message | None:
        """The first message ``selector`` chooses from any of ``mailboxes`` (``(name,
        owner)`` pairs), if one is there; never waits (a select over queues).

        "First" is the highest priority among the mailboxes' heads; between equal
        priorities, the mailbox listed first. ``msg.mailbox`` says which it came
        from. As :meth:`take` otherwise (raises ``MessageTooBig`` as it does).
        """
        self._now = now  # as the take it makes
        return self._post.take_any(mailboxes, selector, receiver, lock, now)

    def wait_for_any(
        self,
        mailboxes: list[tuple[str, int | None]],
        selector: Selector | None = None,
        *,
        receiver: str = "",
        lock: float | None = None,
        now: float,
    ) -> int:
        """Queue one receive in the line of every mailbox of ``mailboxes`` (call
        :meth:`take_any` first); returns its ticket.

        The first mailbox to serve it answers (``MessageTaken``, the message's
        ``mailbox`` says which); at that moment it leaves every other line, so it
        gets exactly one message. If one of them is deleted meanwhile, the receive
        fails (``ReceiveFailed``) and leaves the others' lines too.
        """
        self._now = now
        return self._post.wait_for_any(mailboxes, selector, receiver, lock, now)

    def cancel_wait(self, ticket: int) -> bool:
        """Withdraw a waiting receive; False if it was already answered (see its event)."""
        remote = self.remote.cancel(ticket, self._now)
        if remote is not None:
            return remote
        return self._post.cancel_wait(ticket)

    # ------------------------------------------------------ group addressing

    def open_group(self, group: GroupAddress, now: float, *, join: bool = False) -> None:
        """Watch ``group``'s membership (to send to it); with ``join``, become a member.

        Members receive the group's messages into the mailbox each message names.
        The driver must already receive datagrams sent to ``group.sockaddr``.
        """
        self._check_group(group)
        if self._closing:
            raise errors.NodeClosed("the node is closing")
        self._now = now
        self._groups.open(group.name, group.sockaddr, group.url, now, join=join)

    def leave_group(self, group: GroupAddress, now: float) -> None:
        """Stop being a member (a LEAVE tells the others); the group stays watched."""
        self._now = now
        self._groups.leave(group.name, now)

    def is_open_group(self, group: GroupAddress) -> bool:
        """Whether ``group`` is open here (joined, or opened to send to it)."""
        return self._groups.is_open(group.name)

    def is_member(self, group: GroupAddress) -> bool:
        """Whether this node joined ``group``."""
        return self._groups.is_member(group.name)

    def group_members(self, group: GroupAddress) -> dict[Any, int]:
        """Live members of ``group`` as heard here: address -> incarnation."""
        return self._groups.members(group.name)

    def send_group(
        self,
        group: GroupAddress,
        data: bytes,
        *,
        now: float,
        msg_type: int = 0,
        priority: int = 0,
        timeout: float | None = None,
    ) -> int:
        """Queue ``data`` for every live member of ``group``; returns the ticket.

        A :class:`~reliable.events.GroupSendDone` event carrying a
        :class:`~reliable.message.GroupReceipt` answers it once every member it
        was meant for has answered, left, or let ``timeout`` (default
        ``Config.group_timeout``) pass. Opens the group if needed; a group just
        opened knows no members until they answer its SOLICIT.
        """
        data = message_bytes(data)
        self._check_group(group)
        self.check_message(data, msg_type=msg_type, priority=priority, mailbox=group.mailbox)
        check_timeout(timeout, "timeout", positive=True)
        self._check_room(len(data))
        self._now = now
        # checked above: a valid group, a node still open
        self._groups.open(group.name, group.sockaddr, group.url, now, join=False)
        ticket = self._next_ticket
        self._next_ticket += 1
        self._group_tickets.add(ticket)
        self._groups.send(
            group.name,
            ticket,
            data,
            msg_type=msg_type,
            priority=priority,
            mailbox=group.mailbox,
            fragment_size=fragment_capacity(
                self.config.max_datagram_size, group.mailbox, group.name
            ),
            deadline=now + (self.config.group_timeout if timeout is None else timeout),
            now=now,
        )
        return ticket

    def _check_group(self, group: GroupAddress) -> None:
        if not isinstance(group, GroupAddress):
            raise errors.UsageError(f"expected a GroupAddress, got {group!r}")
        if not group.host:
            raise errors.UsageError(
                f"{group} has no address yet: the adapter resolves broadcast://:PORT to "
                "its subnet's broadcast address"
            )

    def _check_room(self, size: int) -> None:
        """Raise unless the node is open and its one send buffer (unicast, group and anycast
        messages together) has room for ``size`` more bytes."""
        if self._closing:
            raise errors.NodeClosed("the node is closing and accepts no new messages")
        held = self._buffered + self._groups.buffered()
        if held + size > self.config.send_buffer:
            raise errors.SendBufferFull(
                f"send buffer full ({held} of {self.config.send_buffer} bytes "
                "awaiting acknowledgement); wait for receipts or raise Config.send_buffer"
            )

    # ---------------------------------------------------------------- anycast

    def serve(self, service: str, announce_on: list[GroupAddress], now: float) -> None:
        """Announce that this node serves ``service`` on each discovery group given."""
        check_service_name(service)
        groups = {}
        for group in announce_on:
            self.open_group(group, now)
            groups[group.name] = group.sockaddr
        self._now = now
        self._services.serve(service, groups, now)

    def unserve(self, service: str) -> None:
        """Withdraw ``service``: a WITHDRAW goes to each discovery group it was announced on."""
        self._services.unserve(service)

    def discover(self, group: GroupAddress, now: float) -> None:
        """Learn the services announced on ``group`` (members answer its SOLICIT at once)."""
        self.open_group(group, now)

    def add_service_members(self, service: str, members: list[Any]) -> None:
        """Members of ``service`` known without announcements (a static list)."""
        check_service_name(service)
        self._services.add_static(service, list(members))

    def service_members(self, service: str) -> list[Any]:
        """Members a send to ``service`` may go to now: announced first, then static."""
        return self._services.candidates(service)

    def send_anycast(
        self,
        service: ServiceAddress,
        data: bytes,
        *,
        now: float,
        msg_type: int = 0,
        priority: int = 0,
        timeout: float | None = None,
        policy: str = "round-robin",
    ) -> int:
        """Queue ``data`` for one live member of ``service``; returns the ticket.

        The answer is a ``MessageDelivered`` whose ``peer`` is the member that
        took it (``failovers`` lists members tried before), or a
        ``MessageFailed`` with :class:`~reliable.errors.NoServiceMember` once
        every candidate failed, or ``SendTimeout``.
        """
        data = message_bytes(data)
        if policy not in ANYCAST_POLICIES:
            raise errors.UsageError(
                f"anycast policy must be one of {', '.join(ANYCAST_POLICIES)}, got {policy!r}"
            )
        self.check_message(data, msg_type=msg_type, priority=priority, mailbox=service.mailbox)
        check_timeout(timeout, "timeout")
        self._check_room(len(data))
        member = self._failover.first_member(service.service, policy)
        self._now = now
        attempt = Anycast(
            self._next_ticket,
            service,
            data,
            msg_type,
            priority,
            None if timeout is None else now + timeout,
            policy,
        )
        self._next_ticket += 1
        self._failover.start(attempt, member, now)
        return attempt.ticket

    def _srtt(self, member: Any) -> float | None:
        session = self._peers.get(member)
        return None if session is None else session.rtt.srtt

    # ---------------------------------------------------- node messages

    def _on_node_message(self, session: PeerSession, payload: bytes, now: float) -> None:
        """A node message from ``session``'s peer (:mod:`reliable.node_messages`): the
        remote-mailbox protocol's operations go there, the rest to their handler by type."""
        if payload and payload[0] >= FIRST_OP:
            self.remote.on_node_message(session, payload, now)
            return
        try:
            ctl = decode_node_message(payload)
        except MalformedNodeMessage:
            self._drop("malformed.control")
            return
        handle = self._node_message_handlers.get(type(ctl))
        if handle is not None:
            handle(session, ctl, now)

    def _handle_outcome(self, session: PeerSession, ctl: Admitted | Discarded, now: float) -> None:
        """What became of a message of ours the peer had parked."""
        session.on_outcome(ctl, now)
        self._take_events(session)

    def _handle_admitted_many(self, session: PeerSession, ctl: AdmittedMany, now: float) -> None:
        """A durable mailbox's commit let in several of our parked messages: settled as
        one batch (PeerSession.on_admitted_many), their events taken once."""
        session.on_admitted_many(ctl.msg_ids, now)
        self._take_events(session)

    def _handle_cancel(self, session: PeerSession, ctl: Cancel, now: float) -> None:
        """The peer withdrew a message it sent us (if it is parked here)."""
        self._post.withdraw_parked(session, ctl.msg_id)

    def _handle_stats_request(self, session: PeerSession, ctl: StatsRequest, now: float) -> None:
        if len(session.sender.node_messages) >= _MAX_NODE_BACKLOG:
            self._drop("shed.stats")  # it asks faster than it reads: answer later asks
        elif self.config.serve_stats:
            body = json.dumps(self.stats(now).as_dict(), default=str).encode()
            session.send_node_message(StatsReply(ctl.request, body), now)
        else:
            self._drop("stats_refused")

    def _handle_stats_reply(self, session: PeerSession, ctl: StatsReply, now: float) -> None:
        self._emit(events.StatsReceived(peer=session.addr, request=ctl.request, body=ctl.body))

    def peers(self) -> list[Any]:
        """The addresses of the peers this endpoint has a session with."""
        return list(self._peers)

    # ------------------------------------------- remote receivers, management

    def pull(
        self,
        owner: Any,
        mailbox: str,
        selector: Selector | None = None,
        *,
        receiver: str = "",
        now: float,
    ) -> int:
        """Receive from ``mailbox`` on node ``owner``: a waiting receive whose ticket is
        answered by ``MessageTaken`` or ``ReceiveFailed``, as :meth:`wait_for_message`'s;
        :meth:`cancel_wait` withdraws it. See :mod:`reliable.remote_mailbox`."""
        if self._closing:
            raise errors.NodeClosed("the node is closing and accepts no new receives")
        check_mailbox_name(mailbox)
        self._now = now
        ticket = self._post.new_waiter()
        self.remote.pull(owner, mailbox, selector or ANY, receiver, ticket, now)
        return ticket

    def manage(self, dest: Any, request: Manage, now: float) -> int:
        """Ask node ``dest`` to inspect or manage a mailbox (``rmsg ctl``); the answer
        is a ``ManageAnswered`` event carrying the returned request number."""
        if self._closing:
            raise errors.NodeClosed("the node is closing and accepts no new messages")
        self._now = now
        return self.remote.manage(dest, request, now)

    def send_node_message_to(self, peer: Any, message: NodeMessage, now: float) -> None:
        """Queue a node message for ``peer`` (its session is made if need be)."""
        self._peer_for_send(peer, now).send_node_message(message, now)
        self._dirty[peer] = None

    def has_session(self, peer: Any) -> bool:
        """Whether this endpoint has a session with ``peer``."""
        return peer in self._peers

    def has_heard(self, peer: Any) -> bool:
        """Whether the session with ``peer`` has heard from it (knows its incarnation)."""
        session = self._peers.get(peer)
        return session is not None and session.incarnation is not None

    def port_owner(self, name: str) -> int | None:
        """A port's owner token (management on the owner's behalf); None for a mailbox."""
        return self._post.port_owner(name)

    def is_durable(self, name: str) -> bool:
        """Whether mailbox ``name`` is durable (kept in an SQLite file)."""
        return self._post.is_durable(name)

    def detach_mailbox(
        self, name: str, owner_text: str, now: float
    ) -> tuple[list[Message], int | None, int | None]:
        """Take mailbox ``name`` off this node for a transfer of ownership to
        ``owner_text``: returns its queued messages (in order) and its limits.

        Parked senders get ``MailboxClosed`` (safe to send again: they are told
        where it went), waiting receivers ``ReceiveRefused("moved")``. Refused
        for the default mailbox, a port, a durable mailbox, and one holding
        messages under a lock (ack or release them first).
        """
        self._now = now
        return self._post.detach_mailbox(name, owner_text, now)

    def reattach_mailbox(
        self,
        name: str,
        capacity: int | None,
        max_bytes: int | None,
        msgs: list[Message],
        now: float,
    ) -> None:
        """Undo :meth:`detach_mailbox` (the transfer failed): the mailbox and its
        messages are back, in order (ahead of any created here meanwhile)."""
        self._post.reattach_mailbox(name, capacity, max_bytes, msgs, now)

    def adopt_message(self, name: str, msg: Message, now: float) -> None:
        """A message moved here with ``name``'s ownership: it enters (see Mailbox.adopt)."""
        self._now = now
        self._post.adopt_message(name, msg, now)

    def fail_departed(self, peer: Any) -> bool:
        """A node that said goodbye did not answer within the grace: fail what waits on
        it with ``MailboxGone``. False if it did answer (it is back)."""
        session = self._peers.get(peer)
        if session is None:
            return True
        if session.incarnation is not None:
            return False
        session.fail_all(errors.MailboxGone(peer))
        self._take_events(session)
        self._dirty[peer] = None
        return True

    # --------------------------------------------------------------- internal

    def _emit(self, event: events.Event) -> None:
        if type(event) not in _HOOKED_EVENTS:
            if not self._anycast:
                self._events.append(event)  # the per-message events, checked in one lookup
                return
        elif type(event) is events.MessageTaken and not self._serving:
            self._events.append(event)  # a local receive's answer: no remote pull to route
            return
        if self._anycast and isinstance(event, (events.MessageDelivered, events.MessageFailed)):
            attempt = self._anycast.pop(event.ticket, None)
            if attempt is not None:
                self._failover.outcome(attempt, event, self._now, self._closing)
                return
        if isinstance(event, _REMOTE_EVENTS):
            if isinstance(event, (events.MessageTaken, events.ReceiveFailed)):
                if self.remote.intercept(event, self._now):
                    return  # a pull from another node was served (or refused)
            else:
                self.remote.observe(event, self._now)
        if isinstance(event, events.GroupSendDone):
            self._group_tickets.discard(event.ticket)
        if isinstance(event, (events.PeerUnreachable, events.PeerClosed)):
            self._services.member_down(event.peer, _short_reason_of_event(event))
        self._events.append(event)

    def _take_events(self, session: PeerSession) -> None:
        """What ``session`` produced since it was last asked, in order: each message's
        outcome leaves the send buffer, then goes where any event goes (:meth:`_emit`)."""
        produced = session.events
        if not produced:
            return
        session.events = []  # (an event's consequences may call the session again)
        outgoing = self._outgoing
        plain = not self._anycast
        for event in produced:
            if plain and type(event) is events.MessageDelivered:
                # The per-message receipt (_emit's common case, inline)
                entry = outgoing.pop(event.ticket, None)
                if entry is not None:
                    self._buffered -= len(entry[1].data)
                self._events.append(event)
                continue
            if isinstance(event, (events.MessageDelivered, events.MessageFailed)):
                entry = outgoing.pop(event.ticket, None)
                if entry is not None:
                    self._buffered -= len(entry[1].data)
            self._emit(event)

    def _new_peer(self, addr: Any, now: float) -> PeerSession:
        session = PeerSession(
            addr,
            self.config,
            self._rng,
            now,
            admission=self._post,
            budget=self._receive_budget,
            resume=self._resumable.pop(addr, None),
        )
        session.socket_buffer = self._socket_buffer
        self._peers[addr] = session
        return session

    def _peer_for_send(self, addr: Any, now: float) -> PeerSession:
        session = self._peers.get(addr)
        if session is None:
            if len(self._peers) >= self.config.max_peers and not self._evict_idle(now):
                raise errors.UsageError(
                    f"the node already tracks Config.max_peers={self.config.max_peers} peers, "
                    "none of them idle; raise the limit"
                )
            session = self._new_peer(addr, now)
        return session

    def _drop(self, reason: str) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1

    def _mark_dirty(self, addr: Any) -> None:
        """The session with ``addr`` has something to send (or a deadline moved)."""
        self._dirty[addr] = None

    def _clock(self) -> float:
        return self._now

    def _mailbox_deleted(self, name: str) -> None:
        self.remote.mailbox_deleted(name)

    def _no_mailbox(self, source: Any, name: str) -> None:
        """A message asked for mailbox ``name``, not here: if it moved, say where."""
        if name in self.remote.moved:
            self.remote.tell_moved(source, name, self._now)

    def _queue_loose(self, datagram: bytes, addr: Any) -> None:
        """Send ``datagram`` outside any session (a reply from the gate, a farewell)."""
        self._loose.append((datagram, addr))

    def _remember_ended(self, addr: Any, incarnation: int) -> None:
        self._ended[(addr, incarnation)] = None
        while len(self._ended) > self.config.remembered_incarnations:
            self._ended.popitem(last=False)

    def _peer_closed(self, session: PeerSession, now: float) -> None:
        assert session.incarnation is not None
        _log.info("peer %s closed its session", errors.format_address(session.addr))
        self._emit(events.PeerClosed(peer=session.addr, incarnation=session.incarnation))
        session.fail_all(errors.PeerClosed(session.addr))
        self._take_events(session)
        self._remember_ended(session.addr, session.incarnation)
        self._remove_session(session)
        if self._closing:
            self._maybe_finish_close(now)

    def _remove_session(self, session: PeerSession) -> None:
        """Forget ``session``: what it held is released, its counters go to the node's."""
        if session.incarnation is not None:
            self._post.forget_parked(session.addr, session.incarnation)
        session.receiver.release()
        gone = session.stats()
        self._departed_retransmissions += gone.retransmissions
        self._departed_duplicates += gone.duplicates
        self._departed_forged_acks += gone.forged_acks
        del self._peers[session.addr]
        self._dirty.pop(session.addr, None)
        self._unfiled.pop(session.addr, None)

    def _drop_session(self, session: PeerSession, reason: str) -> None:
        """Forget a session nobody needs any more; a later one resumes where it stood."""
        released = session.holds_memory()
        resumption = session.resumption()  # before what it holds is released: that sets the fence
        # Nothing is pending (an idle session), or it already failed (an unreachable one).
        session.fail_all(errors.PeerUnreachable(session.addr, self._now - session.last_heard))
        self._take_events(session)
        self._remove_session(session)
        self._resumable[session.addr] = resumption
        self._resumable.move_to_end(session.addr)
        while len(self._resumable) > self.config.remembered_sessions:
            self._resumable.popitem(last=False)
        self.sessions_dropped[reason] = self.sessions_dropped.get(reason, 0) + 1
        _log.log(
            logging.WARNING if reason == "evicted" else logging.INFO,
            "dropped the session with %s (%s%s); released %d bytes",
            errors.format_address(session.addr),
            reason,
            f": Config.max_peers={self.config.max_peers} reached" if reason == "evicted" else "",
            released,
        )
        self._emit(events.SessionDropped(peer=session.addr, reason=reason, released=released))

    def _drop_if_expired(self, session: PeerSession) -> bool:
        """Drop ``session`` if it says nobody needs it any more; returns whether it did."""
        if not session.expired:
            return False
        self._drop_session(session, "idle" if session.idle() else "unreachable")
        return True

    def _evict_idle(self, now: float) -> bool:
        """Make room under ``max_peers`` by dropping the least recently heard idle session."""
        idle = [s for s in self._peers.values() if s.idle()]
        if not idle:
            return False
        self._now = now
        self._drop_session(min(idle, key=lambda s: s.last_heard), "evicted")
        return True

    def _maybe_finish_close(self, now: float) -> None:
        if self.closed:
            return
        linger = self._groups.linger_until()
        pending = (
            self._groups.has_outstanding()
            or (linger is not None and linger > now)
            or any(s.has_pending() for s in self._peers.values())
        )
        if pending and now < self._close_deadline:
            return
        self._groups.flush_acks()
        self._group_output(self._loose, now)  # final acks, before the LEAVEs
        self._groups.close("closing", now)
        for service in list(self._services.served):
            self._services.unserve(service)
        self._group_output(self._loose, now)
        for session in self._peers.values():
            session.fail_all(errors.SendAborted(session.addr))
            self._take_events(session)
        # Flush whatever the sessions still owe (final acks), then say goodbye.
        for addr, session in self._peers.items():
            for body in session.datagrams(now, self.incarnation):
                self._loose.append((self._seal(body), addr))
            self._take_events(session)
            if session.incarnation is not None:
                bye = session.farewell(now, self.incarnation)
                # two copies, each its own packet number (a replay window drops repeats)
                self._loose.extend((self._seal(bye), addr) for _ in range(_CLOSE_COPIES))
        self.closed = True
        _log.debug("closed; peers told: %d", len(self._peers))
        self._emit(events.Closed())


def _short_reason_of_event(event: events.PeerUnreachable | events.PeerClosed) -> str:
    return "unreachable" if isinstance(event, events.PeerUnreachable) else "closed"


def message_bytes(data: object) -> bytes:
    """``data`` as ``bytes``, or a :class:`~reliable.errors.UsageError` saying what to pass."""
    if isinstance(data, bytes):
        return data
    if isinstance(data, (bytearray, memoryview)):
        return bytes(data)
    hint = "; encode text first, e.g. text.encode()" if isinstance(data, str) else ""
    raise errors.UsageError(
        f"a message is bytes, bytearray or memoryview, got {type(data).__name__}{hint}"
    )


def check_integer(value: object, name: str) -> int:
    """``value``, or a :class:`~reliable.errors.UsageError` unless it is an int (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise errors.UsageError(f"{name} must be an integer, got {value!r}")
    return value


def check_timeout(timeout: float | None, name: str, *, positive: bool = False) -> None:
    """Raise a :class:`~reliable.errors.UsageError` unless ``timeout`` is None or a
    finite number of seconds, >= 0 (> 0 if ``positive``)."""
    if timeout is None:
        return
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise errors.UsageError(f"{name} must be a number of seconds or None, got {timeout!r}")
    if not math.isfinite(timeout) or timeout < 0 or (positive and timeout == 0):
        bound = "> 0" if positive else ">= 0"
        raise errors.UsageError(f"{name} must be a finite number of seconds {bound}, got {timeout}")
