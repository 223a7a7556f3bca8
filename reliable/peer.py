"""One remote peer: its incarnation, both stream halves, liveness and send deadlines.

Theory of operation
-------------------
A session is keyed by the peer's address and lives as long as the node does
(or until the peer closes). Within it, the pair of streams belongs to one
*incarnation* of the peer; when a packet reveals a new incarnation the streams
are reset: messages the old incarnation may have seen fail with
``PeerRestarted`` (we cannot know whether it delivered them before dying),
messages never transmitted go to the new incarnation, and nothing is silently
lost. Our own sequence numbering continues across the peer's restarts (see
``SendStream.peer_restarted``).

Liveness: while the session is *waiting* on the peer (messages outstanding,
the application waiting to receive from it specifically, or receive or
mailbox memory held for it) it must hear from the peer at least every
``peer_timeout`` seconds. Retransmissions probe while data is in flight;
otherwise PINGs do, with backoff up to ``max_probe_interval``. Silence past
the timeout fails every pending message with ``PeerUnreachable`` and raises a
``PeerUnreachable`` event once.

First contact: a peer never heard from may simply not have started yet (a
producer started before its consumer). With ``Config.wait_for_peer``, while
sends to such a peer are pending, neither silence nor the OS's refusals make
it unreachable: the session keeps probing, and each message fails only by
its own deadline. Without it, ``peer_timeout`` applies as to any peer. Once
the peer has been heard from, it is held to ``peer_timeout`` either way.
Until then the peer may keep no state for us and drop what we send unread
(address validation), so at most one ``max_datagram_size`` datagram goes
out, or a PING when the first fragment is larger: the CHALLENGE (or ACK)
that answers it comes before the big flight, not after it was wasted.

Expiry: a session is not kept just because its peer once spoke. An idle
session (not waiting) that hears nothing for ``idle_timeout`` is
``expired``, as QUIC's idle timeout closes a connection, and so is one
declared unreachable while it held memory for its peer (a sender that died
in the middle of a message: that one was probed first, as every waiting
session is). Idle sessions are not kept alive with probes: dropping one
costs its peer at most a validation round trip on its next message. The
endpoint then drops an expired session, keeping only a
:class:`Resumption`: the sequence numbers both streams had reached, so that
if the peer (the same incarnation) speaks again a new session continues
exactly there — what was delivered is recognised as a duplicate, and our
numbering never jumps back into a window the peer still holds.

A session dropped while it held data is *fenced*: the peer may still be
alive, and it forgot (as selectively acknowledged) fragments we no longer
have, so its messages below the fence can never complete here and must not
look delivered. Until the peer's packets show it gave up below the fence,
the new session accepts none of its data and answers with a DROPPED packet;
the peer fails those messages with ``PeerDroppedSession`` (which may or may
not have been delivered) and numbers on from there.

The operating system may know sooner: an ICMP port unreachable for a datagram
we sent, or a send refused for want of a route. The adapter hands such a
report to :meth:`PeerSession.on_unreachable`, and one small rule
(``_fails_on_report``) decides whether it ends the wait now, through the same
path as the timeout, or is ridden out (``Config.os_errors``). ICMP is not
authenticated, so the rule trusts a report only as far as the session's own
evidence allows: any report fails a peer never heard from (nothing says it is
alive; TCP aborts a connection attempt on the same grounds), but a peer that
has answered fails only on a definite report (port or protocol unreachable:
its host says nothing listens) and only once we have waited a retransmission
timeout without an answer. Network and host unreachables come from routing, which recovers;
RFC 1122 section 4.2.3.9 calls them soft, and so do we for a live session.

Mailbox outcomes: a message the peer acknowledged with a ``DEFERRED``
verdict is out of the send stream (nothing to retransmit) but not yet
delivered: it waits in ``deferred`` for the peer's node message saying
it entered its mailbox (the receipt) or never will (the error). While any
message to a mailbox is deferred, that mailbox is known to be full:
``full_mailboxes`` is what lets a non-blocking send say "would block" (a
``STAGED`` message, which a durable mailbox is committing, waits in
``deferred`` just the same but does not make its mailbox full). A
deferred message whose send times out is withdrawn with a ``Cancel``, and its
fate is whatever the peer answers, so a timeout is never reported for a
message that did get in.

Withdrawal (a send timeout, or the application cancelling the send): a
message none of whose fragments left is simply dropped from the queue; one
whose last fragment never left is abandoned (the receiver discards the part
it has once the base passes it); a deferred one is withdrawn with a
``Cancel`` as above. Those are certainly not delivered. A message wholly sent
but not yet acknowledged cannot be withdrawn: a timeout gives it up (it may
have arrived), a cancel lets it run to its real outcome — and if the receiver
then parks it, the cancel withdraws it from there. Every failure says
``delivered=False`` when the message's last fragment never left (see
``_fail``); every message gets exactly one outcome: its fate
(:mod:`reliable.fate`) changes only through one table, and ``_complete`` and
``_fail`` report it exactly when it enters a terminal state.

Logging (logger ``reliable.peer``): INFO when the peer restarts, WARNING when
it is declared unreachable or drops messages of ours below a fence (each
with how many messages failed), DEBUG for an OS report that is ridden out.
"""

from __future__ import annotations

import enum
import heapq
import ipaddress
import logging
import random
from dataclasses import dataclass
from typing import Any, Protocol

from . import errors, events
from .config import K_GRANULARITY, Config
from .congestion import NewReno
from .fate import (
    DEADLINE_MATTERS,
    DELIVERED_ON_ACK,
    RECLAIMING_STATES,
    TERMINAL,
    TRANSITIONS,
    Fate,
    FateInput,
    advance,
)
from .node_messages import Admitted, Cancel, Discarded, NodeMessage, encode_node_message
from .pmtud import PathMtu
from .receiver import Delivery, MemoryBudget, ReceiveStream, Screen
from .rtt import RttEstimator
from .security import ReplayWindow
from .sender import PERSISTENT_CONGESTION_PROBES, OutgoingMessage, SendStream
from .stats import PeerStats
from .wire import (
    ACK_DELAY_TICK,
    COOKIE_SIZE,
    DATA_NOTICES,
    DATA_SACK_RANGES,
    FRAGMENT_OVERHEAD,
    HEADER_OVERHEAD,
    MAX_NOTICES,
    MAX_SACK_RANGES,
    NOTICE_LIMIT,
    NOTICE_SIZE,
    PROBE_OVERHEAD,
    SECURITY_OVERHEAD,
    BulkFragment,
    Flag,
    Fragment,
    Kind,
    Packet,
    Verdict,
    data_budget,
    encode_body,
    encode_session,
    fragment_capacity,
    unwrap,
)

__all__ = ["PeerSession", "Resumption", "Withdrawal"]

_log = logging.getLogger(__name__)

#: Fewest fragments a socket-buffer-bounded window allows (a tiny buffer must not stall).
_MIN_BUFFER_WINDOW = 8
#: Datagrams sent to a peer before it first answers: the first data datagram (if small)
#: and PINGs, each drawing its own CHALLENGE or ACK (see PeerSession._first_contact).
FIRST_CONTACT_DATAGRAMS = 3
#: How much larger than the datagram the CHALLENGE timed the bundles of small messages
#: sent before the first acknowledgement of data may be (see PeerSession.bundle_size).
DATAGRAM_GROWTH = 4
#: Most PROBE_ACKs owed at once (a flood of probes earns no more answers).
_MAX_PROBE_ANSWERS = 4
# Plain ints on the per-packet paths (enum flag arithmetic is slow).
_ACK = int(Flag.ACK)
_ACK_NOW = int(Flag.ACK_NOW)
_NEVER = float("-inf")
_DATA = int(Kind.DATA)
# (the per-packet paths compare plain ints: an enum member's lookup costs about 0.2 us)
_ACK_KIND = int(Kind.ACK)
_PING = int(Kind.PING)
_PROBE = int(Kind.PROBE)
_PROBE_ACK = int(Kind.PROBE_ACK)
_DROPPED = int(Kind.DROPPED)
_ADMIT = FateInput.ADMIT  # (a module constant, for the reason above)
_PARKED = Fate.PARKED
_STAGED, _DEFERRED = int(Verdict.STAGED), int(Verdict.DEFERRED)  # notice codes, per message
#: What a pure ACK spends before its notices, at most: header, a cookie, every SACK range.
_ACK_ROOM = HEADER_OVERHEAD + SECURITY_OVERHEAD + COOKIE_SIZE + 8 * MAX_SACK_RANGES

_REASON_TEXT = {
    Verdict.TOO_LARGE: "larger than the receiver's max_message_size (or its mailbox's max_bytes)",
    Verdict.REFUSED: "refused by the receiving application",
    Verdict.NO_MEMORY: "the receiving node's mailbox memory (Config.mailbox_memory) is full",
}

#: Packets that show a fenced session's peer still sending from before the fence.
_FENCED_KINDS = frozenset({Kind.DATA, Kind.PING, Kind.ACK})


def _plain(mailbox: str) -> str:
    """The mailbox a name on the wire names: without a durable outbox's message id
    (``jobs/o.<outbox>.<row>.<floor>``, see outbox_ids.py), which is ours, not the user's."""
    return mailbox.partition("/")[0]


class Withdrawal(enum.Enum):
    """What withdrawing a send (``Endpoint.withdraw``) did."""

    #: Withdrawn, never delivered: its ``MessageFailed`` (``SendCancelled``,
    #: ``delivered=False``) is already queued.
    WITHDRAWN = "withdrawn"
    #: It waits at the receiver's full mailbox: a ``Cancel`` went to take it back.
    #: Its outcome event says what happened: ``SendCancelled``, or a receipt if a
    #: receiver took it first.
    REQUESTED = "requested"
    #: Wholly sent and awaiting its acknowledgement: it cannot be withdrawn now
    #: (if the receiver parks it, it will be). Its outcome event follows as usual.
    CONTINUES = "continues"
    #: No pending send has this ticket: its outcome was already reported.
    UNKNOWN = "unknown"


class Admission(Protocol):
    """The one question a session asks while it handles a packet: the node's post office
    (:class:`~reliable.post_office.PostOffice`), bound once, when the session is made.

    Everything else a packet produces the session hands back (see :meth:`PeerSession.on_packet`)
    and the endpoint acts on it. The screen cannot wait for that: its answer (refuse the
    message a first fragment starts, before its other fragments are held) decides whether
    the receive stream keeps the fragment, and so what the acknowledgement built from this
    very packet says.
    """

    def screen(self, frag: Fragment, source: Any = None) -> Verdict | None:
        """A refusal of the message ``frag`` starts, from ``source``; None to receive it."""


@dataclass(frozen=True, slots=True)
class Resumption:
    """Where a dropped session's streams stood, for a later session with the same peer."""

    incarnation: int | None
    next_seq: int  #: our next sequence number to the peer
    next_msg_id: int
    expected: int | None  #: the peer's next sequence number to us (None: it sent nothing)
    last_msg_id: int | None
    #: One past what was dropped with data held for the peer; None if nothing was.
    fence: int | None = None


def path_datagram_size(addr: Any, config: Config) -> int:
    """The datagram size for a peer at ``addr``.

    A loopback path's MTU is 64 KiB and nothing on it fragments or drops a
    large datagram, so a loopback peer gets ``Config.loopback_datagram_size``:
    a 64 KiB message then costs two datagrams, not 56, and small messages
    bundle by the dozen. Every other peer gets ``Config.max_datagram_size``,
    which suits any Internet path.
    """
    if config.loopback_datagram_size is None or not isinstance(addr, tuple) or not addr:
        return config.max_datagram_size
    try:
        loopback = ipaddress.ip_address(str(addr[0]).partition("%")[0]).is_loopback
    except ValueError:
        return config.max_datagram_size
    return config.loopback_datagram_size if loopback else config.max_datagram_size


class PeerSession:
    """State for one peer address."""

    # Slots, not an instance dict: a session has more attributes than CPython shares
    # keys for (30), so without them every attribute read and write on the
    # per-datagram path went through a dict lookup.
    __slots__ = (
        "_budget",
        "_deadlines",
        "_earlier_duplicates",
        "_earlier_shed",
        "_record_room",
        "_record_room_size",
        "_rest",
        "_rest_ack_now",
        "_rest_average",
        "_rest_index",
        "_rest_last",
        "_screen",
        "addr",
        "bogus_acks",
        "bogus_outcomes",
        "bulk",
        "bulk_path",
        "bulk_taken",
        "bytes_received",
        "bytes_sent",
        "cc",
        "config",
        "cookie",
        "corrupt",
        "datagram_size",
        "deferred",
        "events",
        "expired",
        "fence",
        "fenced_out",
        "filed_deadline",
        "full_mailboxes",
        "heard",
        "incarnation",
        "last_heard",
        "last_probe",
        "messages_failed",
        "messages_received",
        "messages_sent",
        "os_errors",
        "packets_received",
        "parked",
        "ping_now",
        "pmtu",
        "probe_answers",
        "probe_backoff",
        "receiver",
        "record_average",
        "replay",
        "rtt",
        "sender",
        "shrunk_at",
        "shrunk_backoff",
        "socket_buffer",
        "tell_dropped",
        "unreachable",
        "wait_since",
        "watchers",
    )

    def __init__(
        self,
        addr: Any,
        config: Config,
        rng: random.Random,
        now: float,
        *,
        admission: Admission | None = None,
        budget: MemoryBudget | None = None,
        resume: Resumption | None = None,
    ) -> None:
        self.addr = addr
        self._budget = budget if budget is not None else MemoryBudget(config.receive_memory)
        self._screen: Screen | None = None
        if admission is not None:
            self._screen = lambda frag: admission.screen(frag, addr)
        #: What the session produced for its owner (receipts, failures, restarts), in
        #: order; the endpoint takes them after each call (``Endpoint._take_events``).
        #: A message's event is also the news that it no longer occupies the send buffer.
        self.events: list[events.Event] = []
        #: The bundle being taken (see :meth:`delivered`): its fragments, the next
        #: one's index, the running fragment-size average, the packet's ACK_NOW, and
        #: the index of the fragment that counts for the ack policy.
        self._rest: tuple[Fragment, ...] | None = None
        self._rest_index = 0
        self._rest_average = 0.0
        self._rest_ack_now = False
        self._rest_last = 0
        self.config = config
        #: Largest datagram this session sends; the path decides (see ``path_datagram_size``),
        #: and path MTU discovery raises it where the path's size is not known.
        self.datagram_size = path_datagram_size(addr, config)
        known = self.datagram_size != config.max_datagram_size  # loopback: no discovery
        self.pmtu = PathMtu(self.datagram_size, None if known else config.pmtu_max)
        self.probe_answers: list[int] = []  # PROBE numbers the peer sent us, to answer
        #: When a black hole last shrank the datagrams, and the sender's backoff then:
        #: what tells a message cut too big for the path apart from one merely lost.
        self.shrunk_at: float | None = None
        self.shrunk_backoff = 0
        self.bulk = False  # sent a message of several datagrams: discovery pays off now
        #: whether DATA may take on_bulk, the fast path (tests turn it off to compare)
        self.bulk_path = True
        self.bulk_taken = 0  # DATA packets that took it
        self.incarnation: int | None = None
        self.rtt = RttEstimator(
            initial_rto=config.initial_rto,
            min_rto=config.min_rto,
            # Several probes must fit in peer_timeout, or backoff alone would declare
            # a lossy but live peer dead.
            max_rto=max(config.min_rto, min(config.max_rto, config.peer_timeout / 4)),
            max_ack_delay=config.max_ack_delay,
            granularity=K_GRANULARITY,
        )
        # Config counts the windows in datagrams; the controller counts bytes.
        size = self.datagram_size
        self.cc = NewReno(
            initial_cwnd=config.initial_cwnd * size,
            min_cwnd=config.min_cwnd * size,
            max_datagram=size,
        )
        initial_seq = rng.getrandbits(32)  # drawn even when resuming: one rng stream either way
        if resume is None:
            self.sender = SendStream(config, self.rtt, self.cc, initial_seq)
        else:
            self.sender = SendStream(config, self.rtt, self.cc, resume.next_seq, resume.next_msg_id)
            self.incarnation = resume.incarnation
        self.receiver = ReceiveStream(config, self._screen, self._budget)
        if resume is not None and resume.expected is not None:
            self.receiver.resume(resume.expected, resume.last_msg_id)
        #: Set on a session resumed after data was dropped: see "Expiry" above.
        self.fence = None if resume is None else resume.fence
        self.tell_dropped = False  # a DROPPED packet is due
        self.fenced_out = 0  # DATA packets refused from before the fence
        self.deferred: dict[int, OutgoingMessage] = {}  # by msg_id
        self.full_mailboxes: dict[str, int] = {}  # mailbox -> our messages deferred there
        self.last_heard = now
        self.wait_since: float | None = None
        self.watchers = 0
        self.unreachable = False
        self.expired = False  # nobody needs this session any more: the endpoint drops it
        # Heard from this peer incarnation at all (a dropped session's record says so too)?
        self.heard = resume is not None and resume.incarnation is not None
        self.last_probe = float("-inf")
        self.probe_backoff = 0
        self.ping_now = False
        self.parked = 0  # bytes from this peer parked here, waiting for mailbox room
        self.socket_buffer: int | None = None  # the kernel receive buffer, if the adapter said
        self.record_average = 0.0  # moving average of this peer's fragment sizes on the wire
        self.cookie: bytes | None = None  # the peer's validation cookie, echoed until it knows us
        self.replay = ReplayWindow()  # the peer incarnation's packet numbers (sealed modes)
        self._deadlines: list[tuple[float, int, OutgoingMessage]] = []
        self._record_room_size = 0  # the datagram size _record_room was computed for
        self._record_room = 0  # data_budget(_record_room_size)
        #: :meth:`deadline` when the endpoint last refiled this session (see timers.py)
        self.filed_deadline: float | None = None
        # cumulative counters (the streams are replaced on a restart)
        self.packets_received = 0
        self.bogus_acks = 0
        self.bogus_outcomes = 0  # node-message outcomes naming no message of ours
        self.corrupt = 0
        self.os_errors = 0  # the OS's reports that the peer cannot be reached
        self.messages_sent = 0
        self.messages_failed = 0
        self.messages_received = 0
        self.bytes_sent = 0
        self.bytes_received = 0
        self._earlier_duplicates = 0  # counted by receive streams that restarts replaced
        self._earlier_shed = 0

    # ------------------------------------------------------------ application

    def enqueue(self, msg: OutgoingMessage, now: float) -> None:
        if msg.count > 1:
            self.bulk = True
        sender = self.sender  # SendStream.enqueue, inline: once per message
        sender.queue.append(msg)
        levels = sender.levels
        levels[msg.priority] = levels.get(msg.priority, 0) + 1
        if msg.deadline is not None:
            heapq.heappush(self._deadlines, (msg.deadline, msg.ticket, msg))
        self.unreachable = False
        if self.wait_since is None:  # _update_wait, knowing a message is now pending
            self.wait_since = now

    def watch(self, now: float) -> None:
        """The application waits to receive from this peer: keep checking it is alive."""
        self.watchers += 1
        self.unreachable = False
        self._update_wait(now)

    def unwatch(self, now: float) -> None:
        self.watchers = max(0, self.watchers - 1)
        self._update_wait(now)

    def hold(self, nbytes: int) -> None:
        """A message from this peer parked here: its bytes narrow the window."""
        self.parked += nbytes

    def unhold(self, nbytes: int) -> None:
        """Undo :meth:`hold` for a message that did not have to park after all."""
        self.parked -= nbytes

    def release(self, nbytes: int) -> None:
        """Parked bytes left parking (admitted, taken or discarded): reopen the window."""
        before = self.window()
        self.parked = max(0, self.parked - nbytes)
        if before < self.config.max_window // 2 <= self.window():
            self.receiver.ack_now = True  # window update, so a blocked sender resumes

    def current_datagram_size(self) -> int:
        """The size to fill datagrams to now: the path's, but at least four per window.

        As Linux sizes TSO bursts: a window of two huge datagrams leaves loss
        detection nothing to compare, so every loss waits for the probe timeout.
        """
        # min(datagram_size, max(max_datagram_size, window // 4)), compared in place: asked
        # for every message sent and every datagram (cc.window is an int)
        quarter = self.cc.window // 4
        floor = self.config.max_datagram_size
        if quarter < floor:
            quarter = floor
        size = self.datagram_size
        return size if size <= quarter else quarter

    def bundle_size(self) -> int:
        """How full to pack the next datagram of bundled small messages.

        :meth:`current_datagram_size`, except between the CHALLENGE and the
        first acknowledgement of data: then at most ``DATAGRAM_GROWTH`` times
        the datagram the challenge timed (never below ``max_datagram_size``).
        A lost datagram's probe waits for as long as the path might take to
        carry it at the rate the samples have shown
        (:meth:`RttEstimator.serialization_bound`), and the challenge times
        only the first contact, one small datagram (133 bytes for a 64-byte
        message), so it shows a very low rate: one 25 KB bundle of everything
        queued meanwhile, lost, waited ``initial_rto`` (1 s) for its probe
        against a 22 ms RTO. Bundles of at most ``max_datagram_size`` keep that
        wait to about ten round trips, and the first acknowledgement of data
        times them. A large message is cut when it is queued (and again if the
        path's size changes before it starts) and keeps that size once started.
        """
        size = self.current_datagram_size()
        sender = self.sender
        rtt = self.rtt
        if not sender.data_timed and rtt.srtt is not None and rtt.sampled_size < size:
            grown = max(self.config.max_datagram_size, DATAGRAM_GROWTH * rtt.sampled_size)
            size = min(size, grown)
        return size

    def window(self) -> int:
        """The receive window to advertise, in fragments.

        Fragments may be small, so the receive memory budget bounds their
        bytes. And when the adapter said how big the socket's kernel buffer
        is, the window holds what fits in half of it at this peer's fragment
        sizes: beyond that the kernel drops datagrams before we see them.
        """
        config = self.config
        room = (config.receive_backlog - self.parked) // config.max_datagram_size
        receiver = self.receiver
        span = 0 if not receiver.ranges else receiver.held_span()  # (0 with no ranges)
        window = config.max_window - span
        if room < window:
            window = room
        if window < 0:
            window = 0
        if self.socket_buffer and self.record_average:
            fits = int(self.socket_buffer / 2 / self.record_average)
            window = min(window, max(_MIN_BUFFER_WINDOW, fits))
        return window

    def send_node_message(self, message: NodeMessage, now: float) -> None:
        """Queue a node message for the peer (reliable, ahead of waiting data)."""
        payload = encode_node_message(message)
        size = fragment_capacity(self.current_datagram_size(), "")
        self.sender.node_messages.append(
            OutgoingMessage(
                ticket=0,
                data=payload,
                msg_type=0,
                priority=0,
                mailbox="",
                created=now,
                deadline=None,
                timeout=None,
                fragment_size=size,
                count=max(1, -(-len(payload) // size)),
                for_node=True,
            )
        )
        self._update_wait(now)

    # ---------------------------------------------------------------- network

    def on_packet(self, pkt: Packet, now: float, my_incarnation: int) -> list[Delivery] | None:
        """Process a verified packet from the current incarnation of this peer.

        Returns the whole messages its fragments completed, or None. The caller
        (the endpoint) judges each, tells the session with :meth:`took`, and then
        calls :meth:`delivered`, which goes on with the rest of the packet: the
        packet is not done until ``delivered`` returns None. A message's verdict
        (parked, say) narrows the window the next fragment of a bundle meets, so
        the session stops after every fragment that completed one. What the
        packet settled of ours (acknowledgements, refusals) waits in
        :attr:`events`.
        """
        self.cookie = None  # it has state for us now: no more echoing
        self.last_heard = now
        self.heard = True
        self.unreachable = False
        self.probe_backoff = 0
        self.packets_received += 1
        if pkt.dst_incarnation == my_incarnation and pkt.flags & _ACK:
            self._on_ack(pkt, now)
        if self.fence is not None and pkt.kind in _FENCED_KINDS:
            frag = pkt.fragment
            if frag is not None and not self.receiver.before_fence(frag, self.fence):
                self.fence = None  # it gave up below the fence: its stream goes on from its base
            else:
                self.tell_dropped = True
                self.fenced_out += pkt.kind == Kind.DATA
                self._update_wait(now)
                return None
        kind = pkt.kind
        if kind == _DATA and not pkt.bundle:
            # One fragment (every datagram of a big message): delivered()'s loop, unrolled
            frag = pkt.fragment
            assert frag is not None
            size = FRAGMENT_OVERHEAD + len(frag.payload)
            average = self.record_average
            self.record_average = average + (size - average) / 8 if average else size
            deliveries = self.receiver.on_fragment(
                frag,
                now,
                has_room=self.parked < self.config.receive_backlog,
                ack_now=bool(pkt.flags & _ACK_NOW),
            )
            if deliveries:
                for d in deliveries:  # counted now; took() uncounts a refused one
                    if not d.for_node:
                        self.messages_received += 1
                        self.bytes_received += len(d.data)
                return deliveries  # delivered() finishes the packet
        elif kind == _DATA:
            self._rest = pkt.fragments
            self._rest_index = 0
            self._rest_average = self.record_average
            self._rest_ack_now = bool(pkt.flags & _ACK_NOW)
            self._rest_last = len(pkt.bundle)
            return self.delivered(now)
        elif kind == _PING:
            self.receiver.ack_now = True
        elif kind == _PROBE:
            if len(self.probe_answers) < _MAX_PROBE_ANSWERS:
                self.probe_answers.append(pkt.probe)
        elif kind == _PROBE_ACK:
            if self.pmtu.on_ack(pkt.probe, now):
                self.datagram_size = self.pmtu.size  # the next messages are cut for it
                self._recut()  # and so are the queued ones not yet started
                self.shrunk_at = None  # what was cut for a larger size may fit again
        elif kind == _DROPPED:
            self._peer_dropped(pkt, my_incarnation)
        self._update_wait(now)
        return None

    def took(self, d: Delivery, verdict: Verdict) -> None:
        """The endpoint's verdict on a message :meth:`on_packet` returned, when it did
        not simply enter: the verdict rides on the next acknowledgement."""
        self.receiver.add_notice(d.msg_id, verdict, d.last_seq)
        if verdict is not Verdict.DEFERRED and verdict is not Verdict.STAGED:
            self.messages_received -= 1  # refused: not received after all
            self.bytes_received -= len(d.data)

    def delivered(self, now: float) -> list[Delivery] | None:
        """Go on with the packet once the endpoint has judged the messages it returned:
        the next messages a bundle's fragments complete, or None when the packet is done.

        A bundle stops after each fragment that completed messages, because what
        the endpoint does with them can change how the next fragment is taken (a
        parked message narrows the window, a node message may widen it again).
        """
        fragments = self._rest
        if fragments is None:
            self._update_wait(now)
            return None
        receiver = self.receiver
        backlog = self.config.receive_backlog
        average = self._rest_average
        ack_now = self._rest_ack_now
        last = self._rest_last
        i = self._rest_index
        end = len(fragments)
        while i < end:
            frag = fragments[i]
            size = FRAGMENT_OVERHEAD + len(frag.payload)
            average = average + (size - average) / 8 if average else size
            deliveries = receiver.on_fragment(
                frag,
                now,
                has_room=self.parked < backlog,
                ack_now=ack_now,
                counts=i == last,  # the ack policy counts datagrams, not fragments
            )
            i += 1
            if deliveries:
                self._rest_index = i
                self._rest_average = average
                for d in deliveries:  # counted now; took() uncounts a refused one
                    if not d.for_node:
                        self.messages_received += 1
                        self.bytes_received += len(d.data)
                return deliveries
        self._rest = None
        self.record_average = average
        self._update_wait(now)
        return None

    def on_bulk(self, frag: BulkFragment, now: float) -> bool:
        """:meth:`on_packet` for a DATA packet in its simplest form (``wire.decode_bulk``)
        carrying the next middle fragment of the message being reassembled: the work
        on_packet does for it, without a Packet or a Fragment. False, having changed
        nothing, for anything else (the endpoint then decodes it and calls on_packet).

        The endpoint has checked what it checks before on_packet: the packet is
        from this peer's incarnation, addressed to ours, not replayed.
        """
        if (
            not self.bulk_path
            or self.fence is not None
            or self.parked >= self.config.receive_backlog
        ):
            return False
        ack_now, _, _, seq, base, msg_id, index, count, total_len, payload = frag
        if not self.receiver.take_middle(
            seq, base, msg_id, index, count, total_len, payload, now, ack_now
        ):
            return False
        # on_packet's bookkeeping (the packet carries no ack state: no ACK flag)
        self.cookie = None
        self.last_heard = now
        self.heard = True
        self.unreachable = False
        self.probe_backoff = 0
        self.packets_received += 1
        size = FRAGMENT_OVERHEAD + len(payload)
        average = self.record_average
        self.record_average = average + (size - average) / 8 if average else size
        self._update_wait(now)
        self.bulk_taken += 1
        return True

    def _recut(self) -> None:
        """The path's datagram size changed: cut the queued messages that have not started
        for the size a message queued now gets.

        A message's fragment size and count are fixed once its first fragment is
        sent (the receiver reassembles by them), but until then nothing of it is on
        the wire: messages queued before discovery confirmed a larger size go in
        fewer, larger datagrams, and after a black hole in datagrams the path
        still carries.
        """
        datagram = self.current_datagram_size()
        for msg in self.sender.queue:
            if msg.next_index == 0:  # (not started)
                size = fragment_capacity(datagram, msg.mailbox)
                if size != msg.fragment_size:
                    msg.fragment_size = size
                    msg.count = max(1, -(-len(msg.data) // size))

    def _on_ack(self, pkt: Packet, now: float) -> None:
        sender = self.sender
        for wire_id, code in pkt.notices:
            msg = sender.message_by_wire_id(wire_id)
            if msg is None:
                continue
            if code in (_STAGED, _DEFERRED):  # (compared as ints: no Verdict made)
                staged = code == _STAGED  # being stored: its mailbox has room
                if msg.fate is _PARKED and msg.staged == staged:
                    # The same notice again: a durable mailbox's acks carry it until our
                    # base passes its message (about 1.4 times per message at window 256).
                    continue
                if msg.for_node or not msg.fully_sent:
                    # Only a whole application message can be parked: garbage, ignored.
                    self.bogus_outcomes += 1
                    continue
                # Acknowledged below, or by a later ack; not yet delivered.
                msg.staged = staged
                reclaiming = msg.fate in RECLAIMING_STATES
                if msg.step(FateInput.DEFER) in RECLAIMING_STATES and not reclaiming:
                    self._take_back(msg, now)  # cancelled while wholly sent: parked, so it can
            else:
                sender.abandon(msg)
                self._refuse(msg, Verdict(code))
        outcome = sender.on_ack(pkt.ack, pkt.sacks, pkt.ack_delay * ACK_DELAY_TICK, pkt.window, now)
        if outcome.bogus:
            self.bogus_acks += 1
        for msg in outcome.completed:
            if msg.fate in DELIVERED_ON_ACK:  # (_acknowledged's common case, inline)
                self._complete(msg, now)
            else:
                self._acknowledged(msg, now)

    def _acknowledged(self, msg: OutgoingMessage, now: float) -> None:
        """Every fragment of ``msg`` reached the peer: delivered, unless its mailbox deferred it."""
        if msg.fate in DELIVERED_ON_ACK:
            self._complete(msg, now)
        else:  # parked: out of the send stream, waiting for its outcome
            msg.step(FateInput.ACKED)
            self.deferred[msg.msg_id] = msg
            if not msg.staged:
                name = _plain(msg.mailbox)
                self.full_mailboxes[name] = self.full_mailboxes.get(name, 0) + 1

    def on_outcome(self, outcome: Admitted | Discarded, now: float) -> None:
        """The peer's node message about one of our deferred messages."""
        msg_id = unwrap(outcome.msg_id, self.sender.next_msg_id)
        msg = self.deferred.get(msg_id)
        if msg is not None:
            self._settle(msg, outcome, now)
            return
        msg = self.sender.by_msg_id.get(msg_id)
        if msg is None or msg.for_node:
            self.bogus_outcomes += 1
            return
        # The outcome overtook the acknowledgement: the peer judged the whole message,
        # so its sequence numbers need no more tracking and its fate is known now.
        self.sender.abandon(msg)
        self._settle(msg, outcome, now)

    def on_admitted_many(self, msg_ids: tuple[int, ...], now: float) -> None:
        """The peer's ``AdmittedMany``: a durable mailbox's commit let in ``msg_ids``.

        One pass over the commit's ids (up to ``ADMITTED_MANY_MAX``), and the
        session's wait weighed once at the end, instead of :meth:`on_outcome`
        per id (an ``Admitted`` made for each, the wait weighed after each).
        A commit's messages were all staged (the mailbox had room), so none
        counts in ``full_mailboxes``. An id that is not a deferred message of
        ours (the receipt overtook the acknowledgement, or garbage) takes the
        one-at-a-time path."""
        deferred = self.deferred
        next_msg_id = self.sender.next_msg_id
        complete = self._complete
        for wire_id in msg_ids:
            msg = deferred.pop(unwrap(wire_id, next_msg_id), None)
            if msg is None:
                self.on_outcome(Admitted(wire_id), now)
                continue
            if not msg.staged:  # (parked while full, then staged: _undefer's count)
                name = _plain(msg.mailbox)
                left = self.full_mailboxes[name] - 1
                if left:
                    self.full_mailboxes[name] = left
                else:
                    del self.full_mailboxes[name]
            complete(msg, now, None, _ADMIT)
        self._update_wait(now)

    def _peer_dropped(self, pkt: Packet, my_incarnation: int) -> None:
        """The peer dropped what we sent it below a fence: those messages fail."""
        if pkt.dst_incarnation != my_incarnation:
            self.bogus_outcomes += 1  # not addressed to this life of ours
            return
        fence = unwrap(pkt.ack, self.sender.next_seq)
        lost = self.sender.abandon_below(fence)
        lost += [m for m in self.deferred.values() if m.first_seq < fence]
        if lost:
            _log.warning(
                "peer %s had dropped our session; messages failed (PeerDroppedSession): %d",
                errors.format_address(self.addr),
                sum(not msg.for_node for msg in lost),
            )
        for msg in lost:
            self._undefer(msg)
            self._fail(msg, FateInput.LOST, errors.PeerDroppedSession(self.addr))

    def _undefer(self, msg: OutgoingMessage) -> None:
        """``msg`` no longer waits at the peer for mailbox room (if it did)."""
        if self.deferred.pop(msg.msg_id, None) is not None and not msg.staged:
            name = _plain(msg.mailbox)
            left = self.full_mailboxes[name] - 1
            if left:
                self.full_mailboxes[name] = left
            else:
                del self.full_mailboxes[name]

    def _settle(self, msg: OutgoingMessage, outcome: Admitted | Discarded, now: float) -> None:
        self._undefer(msg)
        if isinstance(outcome, Admitted):
            receiver = outcome.receiver if outcome.taken else None
            self._complete(msg, now, receiver=receiver, event=FateInput.ADMIT)
        else:
            self._refuse(msg, outcome.verdict)
        self._update_wait(now)

    def _refuse(self, msg: OutgoingMessage, verdict: Verdict) -> None:
        """The peer said ``msg`` will never enter its mailbox: it fails with the reason."""
        error: errors.DeliveryFailed
        if verdict == Verdict.CANCELLED:
            # Given back: whether we asked because it timed out or was cancelled decides.
            event = FateInput.RECLAIMED
            if advance(msg.fate, event) is Fate.CANCELLED:
                error = errors.SendCancelled(self.addr, stage="parked")
            else:
                error = errors.SendTimeout(self.addr, msg.timeout or 0.0, stage="parked")
        else:
            event = FateInput.REFUSE
            if verdict == Verdict.NO_MAILBOX:
                error = errors.MailboxNotFound(self.addr, _plain(msg.mailbox))
            elif verdict == Verdict.MAILBOX_CLOSED:
                error = errors.MailboxClosed(self.addr, _plain(msg.mailbox))
            else:
                error = errors.MessageRejected(self.addr, _REASON_TEXT.get(verdict, "refused"))
        self._fail(msg, event, error)

    def withdraw(self, msg: OutgoingMessage, now: float) -> Withdrawal:
        """The application cancelled ``msg``: withdraw it if it can still be withdrawn."""
        before = msg.fate
        if before in TERMINAL:
            return Withdrawal.UNKNOWN
        if not msg.fully_sent:  # only a message still SENDING can be short of its last fragment
            stage: errors.Stage = "partial" if msg.started else "queued"
            self.sender.abandon(msg)
            self._fail(msg, FateInput.WITHDRAW, errors.SendCancelled(self.addr, stage=stage))
            self._update_wait(now)
            return Withdrawal.WITHDRAWN
        if msg.step(FateInput.CANCEL) in RECLAIMING_STATES:
            if before not in RECLAIMING_STATES:
                self._take_back(msg, now)  # parked: ask for it back
            return Withdrawal.REQUESTED  # (or its timeout already did)
        return Withdrawal.CONTINUES  # see _on_ack: withdrawn if it turns out parked

    def _take_back(self, msg: OutgoingMessage, now: float) -> None:
        """Ask the peer to give back a parked message; its answer decides the outcome."""
        self.send_node_message(Cancel(msg.msg_id), now)

    def mailbox_full(self, mailbox: str) -> bool:
        """Whether a message of ours still waits for room in ``mailbox`` of this peer."""
        return mailbox in self.full_mailboxes

    def on_challenge(self, cookie: bytes, now: float) -> None:
        """The peer keeps no state for us until we prove our address: echo its cookie.

        It dropped what we sent, so that goes again at once, cookie attached.
        """
        self.last_heard = now  # it answered: it is alive
        self.heard = True
        if cookie == self.cookie:
            return  # another answer to the same first flight: already resent with it
        self.cookie = cookie
        self.sender.handshake_sample(now)
        self.sender.resend_now(now)
        if not self.sender.flight and not self.sender.can_send():
            self.ping_now = True

    def restart(self, new_incarnation: int, now: float) -> None:
        """The peer came back as ``new_incarnation``: end the old session cleanly."""
        old = self.incarnation
        assert old is not None
        lost = self.sender.peer_restarted() + self._drop_deferred()
        self._earlier_duplicates += self.receiver.duplicates
        self._earlier_shed += self.receiver.shed
        self.receiver.release()
        self.receiver = ReceiveStream(self.config, self._screen, self._budget)
        self.replay = ReplayWindow()
        self.incarnation = new_incarnation
        restarted = events.PeerRestarted(
            peer=self.addr, old_incarnation=old, new_incarnation=new_incarnation
        )
        failing = sum(not msg.for_node for msg in lost)
        _log.info(
            "peer %s restarted (incarnation %016x -> %016x)%s",
            errors.format_address(self.addr),
            old,
            new_incarnation,
            f"; messages it may have seen failed (PeerRestarted): {failing}" if failing else "",
        )
        self.events.append(restarted)
        for msg in lost:
            self._fail(msg, FateInput.LOST, errors.PeerRestarted(self.addr, old, new_incarnation))
        self._update_wait(now)

    def fail_all(self, error: errors.DeliveryFailed) -> int:
        """Abandon every pending message with ``error`` (peer closed, node closing).

        Returns how many of the application's messages failed.
        """
        abandoned = self.sender.abandon_all() + self._drop_deferred()
        for msg in abandoned:
            self._fail(msg, FateInput.LOST, error)
        return sum(not msg.for_node for msg in abandoned)

    def _drop_deferred(self) -> list[OutgoingMessage]:
        dropped = list(self.deferred.values())
        self.deferred.clear()
        self.full_mailboxes.clear()
        return dropped

    def has_pending(self) -> bool:
        return self.sender.has_outstanding() or bool(self.deferred)

    def holds_memory(self) -> int:
        """Bytes this node holds for the peer: reorder buffer, partial message, parked."""
        return self.receiver.held + self.parked

    def idle(self) -> bool:
        """Whether nothing depends on this session: it may be dropped to make room."""
        return not (self.watchers or self.has_pending() or self.holds_memory())

    def resumption(self) -> Resumption:
        """Where both streams stand, for a later session with the same peer incarnation.

        Call it before the receive stream is released: what it holds sets the fence.
        """
        receiver = self.receiver
        fence = receiver.fence()
        if fence is None and self.parked:
            fence = receiver.expected  # its parked messages are dropped with the session
        if self.fence is not None:
            fence = self.fence if fence is None else max(fence, self.fence)
        return Resumption(
            incarnation=self.incarnation,
            next_seq=self.sender.next_seq,
            next_msg_id=self.sender.next_msg_id,
            expected=receiver.expected,
            last_msg_id=receiver.last_msg_id,
            fence=fence,
        )

    # ----------------------------------------------------------------- output

    def datagrams(self, now: float, my_incarnation: int) -> list[bytes]:
        """Everything this session wants to send now."""
        sender = self.sender
        receiver = self.receiver
        # sender.can_send(), called only when it may be true: with nothing queued or lost
        # it is false whenever data is in flight or no message is outstanding (a session
        # touched by what it received, the DATA sender once its flight is out)
        if (
            sender.queue
            or sender.node_messages
            or sender.lost
            or (sender.by_msg_id and not sender.flight)
        ):
            send = sender.can_send()
        else:
            send = False
        if not (
            send
            or self.tell_dropped
            or self.ping_now
            or self.probe_answers
            or self.bulk
            # receiver.wants_ack(now), inline
            or receiver.ack_now
            or (receiver.ack_requested and not receiver.reply_wait)
            or (receiver.ack_deadline is not None and now >= receiver.ack_deadline)
        ):
            return []  # nothing due (a session touched by what it received, say)
        out: list[bytes] = []
        dst = self.incarnation or 0
        if self.tell_dropped:
            self.tell_dropped = False
            if self.fence is not None:
                dropped = Packet(
                    kind=Kind.DROPPED,
                    window=self.window(),
                    src_incarnation=my_incarnation,
                    dst_incarnation=dst,
                    ack=self.fence,
                )
                out.append(encode_body(dropped))
        ack_flag = _ACK if receiver.expected is not None else 0
        first_contact = not self.heard and self.cookie is None  # (_first_contact, inline)
        # Before first contact, one small datagram until the peer answers; a larger one
        # is a PING instead. The first time, PINGs go with it (see _first_contact).
        first_send = send and first_contact and not sender.flight
        first_send = first_send and self.last_probe == _NEVER
        if (send and first_contact) and (
            sender.flight or sender.next_record_bytes() > self._first_budget()
        ):
            send = False
        if send:
            if first_contact:
                budget = self._first_budget()
            else:
                # bundle_size() is the datagram size once data is timed: skip the call (and
                # current_datagram_size's, inline)
                if sender.data_timed:
                    size = self.cc.window // 4
                    floor = self.config.max_datagram_size
                    if size < floor:
                        size = floor
                    if self.datagram_size < size:
                        size = self.datagram_size
                else:
                    size = self.bundle_size()
                if size != self._record_room_size:  # data_budget, kept for the last size
                    self._record_room_size = size
                    self._record_room = data_budget(size)
                budget = self._record_room
            ack, ack_delay, sacks, notices = receiver.ack_fields(
                now, DATA_SACK_RANGES, DATA_NOTICES
            )
            window = self.window()
            while True:
                step = sender.next_datagram(now, budget)
                if step is None:
                    break
                records, record_flags, retransmission = step
                if (  # sender.can_send(), as above
                    sender.queue
                    or sender.node_messages
                    or sender.lost
                    or (sender.by_msg_id and not sender.flight)
                ):
                    more = sender.can_send()
                else:
                    more = False
                flags = ack_flag | record_flags | (_ACK_NOW if retransmission or not more else 0)
                out.append(
                    encode_session(
                        _DATA,
                        flags,
                        window,
                        my_incarnation,
                        dst,
                        ack,
                        ack_delay,
                        sacks,
                        notices,
                        self.cookie,
                        None,
                        records,
                    )
                )
                if not more or first_contact:
                    break
            if out:
                self.ping_now = False
                complete = (
                    len(receiver.ranges) <= DATA_SACK_RANGES
                    and len(receiver.notices) <= DATA_NOTICES
                )
                if complete:  # receiver.ack_sent(), inline (once per DATA datagram)
                    receiver.ack_pending = 0
                    receiver.ack_now = False
                    receiver.ack_requested = False
                    receiver.reply_wait = False
                    receiver.ack_deadline = None
                    receiver.first_unacked_time = None
                # else: the piggybacked state was partial; a full ACK follows below
        if first_send:
            self.last_probe = now  # on_timer repeats a PING if no answer comes
            pings = FIRST_CONTACT_DATAGRAMS - send
            out.extend(
                self._bare_packet(Kind.PING, now, my_incarnation, ack_flag) for _ in range(pings)
            )
        if (  # receiver.wants_ack(now), inline
            receiver.ack_now
            or (receiver.ack_requested and not receiver.reply_wait)
            or (receiver.ack_deadline is not None and now >= receiver.ack_deadline)
            or self.ping_now
        ):
            kind = _PING if self.ping_now else _ACK_KIND
            out.append(self._bare_packet(kind, now, my_incarnation, ack_flag))
            receiver.ack_sent()
            self.ping_now = False
        if self.probe_answers:
            for number in self.probe_answers:
                out.append(self._probe_packet(Kind.PROBE_ACK, number, 0, my_incarnation))
            self.probe_answers.clear()
        if self.bulk and self.pmtu.probe is None and self.heard and self.cookie is None and dst:
            self._probe_path(now, my_incarnation, out)
        return out

    def _first_contact(self) -> bool:
        """Whether the peer may keep no state for us yet: never heard from, no cookie.

        A peer that validates addresses drops everything from an unknown
        address unread and answers with a CHALLENGE, so a first flight of a
        whole congestion window (650 KB of 64 KiB loopback datagrams) would be
        sent only to be dropped, and sent again. Until the peer answers, at
        most one datagram of ``max_datagram_size`` goes out: a small message
        still costs no round trip with a peer that needs no validation, and a
        larger first datagram is replaced by a PING, which draws the
        CHALLENGE (or, from a peer that keeps state for us, an ACK) in a
        round trip with nothing dropped.

        With no RTT known, a lost first datagram waits ``initial_rto`` (1 s)
        for its probe; the whole window it replaces was never all lost. So the
        first time, PINGs go with it, ``FIRST_CONTACT_DATAGRAMS`` datagrams in
        all: at 19% loss each way, no answer comes back 4% of the time instead
        of 34%.
        """
        return not self.heard and self.cookie is None

    def _first_budget(self) -> int:
        """Record bytes the one datagram sent before first contact may carry."""
        return data_budget(self.config.max_datagram_size)

    def _probe_path(self, now: float, my_incarnation: int, out: list[bytes]) -> None:
        """Send a path MTU probe if discovery wants one and there is data it would help.

        Discovery starts with the first message of several datagrams: small
        messages gain little from larger datagrams, and a probe costs one.
        """
        if not self.sender.has_outstanding():
            return
        probe = self.pmtu.next_probe(now, self.rtt.rto)
        if probe is not None:
            # Padded so that sealed it is exactly the size it tests: unsealed it is as
            # large as the largest unsealed DATA datagram of that size (which reserves
            # room for sealing too).
            padding = probe.size - SECURITY_OVERHEAD - HEADER_OVERHEAD - PROBE_OVERHEAD
            out.append(self._probe_packet(Kind.PROBE, probe.number, padding, my_incarnation))

    def _probe_packet(self, kind: Kind, number: int, padding: int, my_incarnation: int) -> bytes:
        """A PROBE or PROBE_ACK: no acknowledgement state, so its size is exact."""
        return encode_body(
            Packet(
                kind=kind,
                window=self.window(),
                src_incarnation=my_incarnation,
                dst_incarnation=self.incarnation or 0,
                probe=number,
                padding=padding,
            )
        )

    def farewell(self, now: float, my_incarnation: int) -> bytes:
        """The CLOSE for this peer, carrying our final acknowledgement state.

        A message the peer sent us and we acknowledged must not be reported
        to it as failed just because that acknowledgement was lost: the CLOSE
        repeats it, and the peer processes it before failing what is left.
        """
        ack_flag = _ACK if self.receiver.expected is not None else 0
        return self._bare_packet(Kind.CLOSE, now, my_incarnation, ack_flag)

    def _bare_packet(self, kind: int, now: float, my_incarnation: int, ack_flag: int) -> bytes:
        # As many notices as the datagram has room for (at least MAX_NOTICES, which
        # always fit): a durable mailbox owes one per message until its sender's base
        # passes it, and the ack cannot pass a notice it leaves out.
        receiver = self.receiver
        if receiver.notices:
            room = self.current_datagram_size() - _ACK_ROOM
            ack = receiver.ack_state(
                now, max_notices=max(MAX_NOTICES, min(NOTICE_LIMIT, room // NOTICE_SIZE))
            )
        else:  # (no notice owed: the room for them is not worked out, once per ACK sent)
            ack = receiver.ack_state(now)
        return encode_session(
            kind,
            ack_flag,
            self.window(),
            my_incarnation,
            self.incarnation or 0,
            ack.ack,
            ack.ack_delay,
            ack.sacks,
            ack.notices,
            self.cookie,
        )

    # ----------------------------------------------------------------- timers

    def deadline(self) -> float | None:
        """Earliest time :meth:`on_timer` has work to do.

        Asked after every packet (through the endpoint's timer heap), so it
        compares in place rather than building a list of candidates.
        """
        wait_since = self.wait_since
        if wait_since is None:
            earliest: float | None = self.last_heard + self.config.idle_timeout
        elif self.unreachable:
            earliest = None
        else:
            sender = self.sender
            if sender.flight:  # _next_probe's case with data in flight, inline
                last = self.last_heard
                if self.last_probe > last:
                    last = self.last_probe
                if sender.last_send_time > last:
                    last = sender.last_send_time
                earliest = last + self.config.max_probe_interval
            else:
                earliest = self._next_probe()
            # (not _awaits_first_contact(), which is false once the peer was heard)
            if self.heard or not self._awaits_first_contact():
                last_heard = self.last_heard
                silence = (last_heard if last_heard > wait_since else wait_since) + (
                    self.config.peer_timeout
                )
                if silence < earliest:
                    earliest = silence
        sender = self.sender  # SendStream.deadline, inline
        candidate = sender.loss_time
        if candidate is None and sender.flight:
            candidate = sender.probe_deadline()
        if candidate is not None and (earliest is None or candidate < earliest):
            earliest = candidate
        candidate = self.receiver.ack_deadline
        if candidate is not None and (earliest is None or candidate < earliest):
            earliest = candidate
        probe = self.pmtu.probe
        if probe is not None and (earliest is None or probe.deadline < earliest):
            earliest = probe.deadline
        deadlines = self._deadlines
        while deadlines and deadlines[0][2].fate not in DEADLINE_MATTERS:
            heapq.heappop(deadlines)
        if deadlines and (earliest is None or deadlines[0][0] < earliest):
            earliest = deadlines[0][0]
        return earliest

    def on_timer(self, now: float) -> None:
        self.sender.on_timer(now)
        pmtu = self.pmtu
        if pmtu.probe is not None:
            pmtu.on_timer(now)
        if (
            pmtu.size > pmtu.base
            and self.sender.backoff >= PERSISTENT_CONGESTION_PROBES
            and pmtu.on_black_hole(now)
        ):
            self.datagram_size = pmtu.size  # full-size datagrams stopped getting through
            self._recut()  # and messages not yet started are cut for the base size again
            self.shrunk_at = now
            self.shrunk_backoff = self.sender.backoff
        elif self.shrunk_at is not None:
            self._fail_cut_too_big(now)
        while self._deadlines and self._deadlines[0][0] <= now:
            _, _, msg = heapq.heappop(self._deadlines)
            if msg.fate not in DEADLINE_MATTERS:
                continue
            if msg.fate is Fate.PARKED:
                # The peer holds it: withdraw it, and let its answer decide the outcome.
                msg.step(FateInput.TIMEOUT)
                self._take_back(msg, now)
            else:
                stage: errors.Stage = (
                    "unacknowledged" if msg.fully_sent else "partial" if msg.started else "queued"
                )
                self.sender.abandon(msg)
                error = errors.SendTimeout(self.addr, msg.timeout or 0.0, stage=stage)
                self._fail(msg, FateInput.TIMEOUT, error)
        if self.receiver.ack_deadline is not None and now >= self.receiver.ack_deadline:
            self.receiver.ack_now = True
        self._update_wait(now)
        if self.wait_since is None:
            # Idle, and silent for idle_timeout: nothing here is worth keeping.
            if now >= self.last_heard + self.config.idle_timeout:
                self.expired = True
            return
        if self.unreachable:
            return
        silent_since = max(self.last_heard, self.wait_since)
        if now >= silent_since + self.config.peer_timeout and not self._awaits_first_contact():
            self._declare_unreachable(now, now - silent_since)
        elif now >= self._next_probe():
            self.ping_now = True
            self.last_probe = now
            self.probe_backoff += 1

    def _next_probe(self) -> float:
        """When to PING a silent peer we wait on.

        With data in flight the retransmissions are the probes, but their
        backoff spaces them up to ``peer_timeout / 4`` apart: only a handful
        would fit in the timeout, and on a lossy path all of them can be lost
        to a live peer. Once the gap since anything was sent exceeds
        ``max_probe_interval``, PINGs (which the peer answers with its
        acknowledgements) keep checking at that pace.
        """
        if self.sender.flight:
            last = max(self.last_heard, self.last_probe, self.sender.last_send_time)
            return last + self.config.max_probe_interval
        return max(self.last_heard, self.last_probe) + self._probe_interval()

    def _awaits_first_contact(self) -> bool:
        """Sends wait for a peer never heard from to start (``Config.wait_for_peer``)."""
        return self.config.wait_for_peer and not self.heard and self.has_pending()

    def _probe_interval(self) -> float:
        return min(self.rtt.backed_off(self.probe_backoff), self.config.max_probe_interval)

    def _update_wait(self, now: float) -> None:
        sender = self.sender  # has_pending and holds_memory, inline: after every packet
        if (
            self.watchers > 0
            or sender.queue
            or sender.node_messages
            or sender.by_msg_id
            or self.deferred
            or self.receiver.held + self.parked > 0
        ):
            if self.wait_since is None:
                self.wait_since = now
        else:
            self.wait_since = None

    def on_unreachable(
        self, cause: str, now: float, *, errno: int | None = None, soft: bool = False
    ) -> bool:
        """The operating system says the peer cannot be reached; ``cause`` says how.

        ``soft`` marks a report that routing may take back (network or host
        unreachable), as opposed to the peer's host refusing the datagram.
        Returns whether the session failed on it (see ``_fails_on_report``).
        """
        self.os_errors += 1
        if not self._fails_on_report(now, soft):
            _log.debug(
                "OS reports %s: %s; not failing on it", errors.format_address(self.addr), cause
            )
            return False
        assert self.wait_since is not None  # a session nothing waits on does not fail
        silent_for = now - max(self.last_heard, self.wait_since)
        self._declare_unreachable(now, silent_for, cause=cause, errno=errno)
        return True

    def _fails_on_report(self, now: float, soft: bool) -> bool:
        """Whether an OS report of unreachability ends the wait now, or is ridden out.

        The one place that decides, so a policy (``Config.os_errors``, or a
        session told to wait for a peer that has not started) changes it here.
        """
        if self.config.os_errors == "ignore" or self.wait_since is None or self.unreachable:
            return False  # ignoring them, or nothing waits on the peer
        if not self.heard:
            # Nothing says it is alive: believe the OS, unless sends wait for the peer
            # to start (Config.wait_for_peer), for which a refusal is the expected news.
            return not self._awaits_first_contact()
        # It has answered before: ICMP is unauthenticated and routes recover, so only a
        # refusal from its host counts, once it owes us an answer: a retransmission
        # timeout of silence while we wait (a healthy peer answers sooner).
        return not soft and now - max(self.last_heard, self.wait_since) >= self.rtt.rto

    def _fail_cut_too_big(self, now: float) -> None:
        """Fail the messages cut for datagrams larger than the path now carries.

        A message's fragments are fixed once it is cut (their count is on the
        wire), so one cut before a black hole may never fit the path again: its
        datagrams vanish each time they are retransmitted, while the session's
        small pings are answered, so ``peer_timeout`` never fires either. The
        evidence that it is the path and not loss: ``PERSISTENT_CONGESTION_PROBES``
        more probe timeouts since the fall, with the peer heard after it. Then
        every application message that does not fit fails with
        ``PeerUnreachable`` (with a ``cause`` that says why); the others carry on.
        """
        shrunk_at = self.shrunk_at
        assert shrunk_at is not None
        backoff = self.sender.backoff
        if backoff < self.shrunk_backoff:  # progress since the fall restarted the count
            self.shrunk_backoff = 0
        if backoff < self.shrunk_backoff + PERSISTENT_CONGESTION_PROBES:
            return
        if self.last_heard <= shrunk_at:  # silence: peer_timeout's to judge, not ours
            return
        size = self.datagram_size
        fits: dict[str, int] = {}
        too_big: list[OutgoingMessage] = []
        needed = 0  # the smallest datagram one of them needs
        for msg in self.sender.messages():
            if msg.for_node:
                continue
            room = fits.get(msg.mailbox)
            if room is None:
                room = fits[msg.mailbox] = fragment_capacity(size, msg.mailbox)
            payload = min(msg.fragment_size, len(msg.data))
            if payload > room:
                too_big.append(msg)
                wanted = size + payload - room
                needed = wanted if not needed else min(needed, wanted)
        if not too_big:
            self.shrunk_backoff = backoff  # the next verdict waits for more evidence
            return
        # The losses say "black hole", but a receiver out of memory drops full-size data
        # just the same while it answers pings: a probe of the size they need, which
        # carries no data, tells the two apart (answered: the path carries it).
        carried = self.pmtu.confirm(needed)
        if carried is None:
            self.bulk = True  # so _probe_path sends it
            return
        if carried:
            self.datagram_size = self.pmtu.size = max(self.pmtu.size, self.pmtu.low)
            self.shrunk_at = None
            return
        self.shrunk_backoff = backoff
        cause = (
            f"the path no longer carries the datagrams this message was cut for "
            f"(its size fell to {size} bytes after a black hole, and a sent message's "
            "fragments cannot be cut again)"
        )
        for msg in too_big:
            self.sender.abandon(msg)
            # delivered stays unknown for a wholly sent message (_fail says False otherwise)
            error = errors.PeerUnreachable(self.addr, now - shrunk_at, cause=cause)
            self._fail(msg, FateInput.LOST, error)
        _log.warning(
            "peer %s: %d messages cut too big for the path's %d-byte datagrams failed",
            errors.format_address(self.addr),
            len(too_big),
            size,
        )

    def _declare_unreachable(
        self,
        now: float,
        silent_for: float,
        *,
        cause: str | None = None,
        errno: int | None = None,
    ) -> None:
        self.unreachable = True
        self.wait_since = None
        self.events.append(
            events.PeerUnreachable(peer=self.addr, silent_for=silent_for, cause=cause, errno=errno)
        )
        failed = self.fail_all(
            errors.PeerUnreachable(self.addr, silent_for, cause=cause, errno=errno)
        )
        _log.warning(
            "peer %s unreachable (%s); messages to it failed: %d",
            errors.format_address(self.addr),
            cause if cause is not None else f"silent for {silent_for:.1f} s",
            failed,
        )
        # Memory held for a silent peer (a sender that died mid-message) is released now.
        self.expired = not self.watchers and self.holds_memory() > 0

    # --------------------------------------------------------------- outcomes

    def _complete(
        self,
        msg: OutgoingMessage,
        now: float,
        receiver: str | None = None,
        event: FateInput = FateInput.ACKED,
    ) -> None:
        """``msg`` reached its mailbox (``ADMIT``: after waiting parked): report it, once."""
        moves = TRANSITIONS[msg.fate]  # (OutgoingMessage.step and advance, inline)
        msg.fate = moves[event] if event in moves else advance(msg.fate, event)  # (raises)
        if msg.for_node:
            return
        self.messages_sent += 1
        self.bytes_sent += len(msg.data)
        assert self.incarnation is not None
        # (positional: a class called with keywords builds a dict of them, per message)
        self.events.append(
            events.MessageDelivered(
                msg.ticket,
                self.addr,
                len(msg.data),  # size
                msg.count,  # fragments
                msg.transmissions,
                now - msg.created,  # elapsed
                self.incarnation,
                msg.mailbox if "/" not in msg.mailbox else _plain(msg.mailbox),
                event is _ADMIT,  # deferred
                receiver,
            )
        )

    def _fail(self, msg: OutgoingMessage, event: FateInput, error: errors.DeliveryFailed) -> None:
        """``event`` ends ``msg`` in failure: report ``error``, once."""
        msg.step(event)
        if msg.for_node:
            return
        if error.delivered is None and not msg.fully_sent:
            # Its last fragment never left: the receiver cannot have completed it.
            error = error.with_delivered(False)
        self.messages_failed += 1
        self.events.append(events.MessageFailed(ticket=msg.ticket, peer=self.addr, error=error))

    # ------------------------------------------------------------------ stats

    def stats(self) -> PeerStats:
        rtt = self.rtt
        return PeerStats(
            address=self.addr,
            incarnation=self.incarnation,
            srtt=rtt.srtt,
            rttvar=rtt.rttvar,
            rto=rtt.rto,
            min_rtt=None if rtt.srtt is None else rtt.min_rtt,
            cwnd=self.cc.window,
            peer_window=self.sender.peer_window,
            in_flight=len(self.sender.flight),
            queued_messages=len(self.sender.messages()),
            packets_sent=self.sender.packets_sent,
            retransmissions=self.sender.retransmissions,
            packets_received=self.packets_received,
            duplicates=self._earlier_duplicates + self.receiver.duplicates,
            shed=self._earlier_shed + self.receiver.shed,
            corrupt=self.corrupt,
            os_errors=self.os_errors,
            messages_sent=self.messages_sent,
            messages_failed=self.messages_failed,
            messages_received=self.messages_received,
            bytes_sent=self.bytes_sent,
            bytes_received=self.bytes_received,
            unreachable=self.unreachable,
            forged_acks=self.bogus_acks,
            held_bytes=self.holds_memory(),
        )
