"""The post office: a node's mailboxes, and the verdict on every message that arrives.

Theory of operation. Admitting a message is part of acknowledging it: the
verdict (entered, deferred because the mailbox is full, staged while a
durable mailbox commits it, refused) must ride on the very acknowledgement
that covers the message, so the session asks here (:meth:`PostOffice.deliver`)
before it acknowledges. A message is judged twice: by its first fragment,
before the rest is buffered (:meth:`PostOffice.screen`: no such mailbox,
closed, too large, node memory full), and whole, when it enters.

Accounting. ``held`` is every byte in every mailbox, parked and locked
messages included, and is kept under ``Config.mailbox_memory``. A message
*parked* at a full mailbox stays charged to its sender's session
(``PeerSession.parked``: the sender's window does not reopen for it) until
it enters, is taken, or is discarded; then the sender is told
(``Admitted``, ``Discarded``: node messages), and a message a
commit let in is announced with its commit's others (``AdmittedMany``).
Messages tagged with a durable outbox's id are delivered once even when
re-sent after the sender's restart (:mod:`reliable.outbox_ids`).

Receiving is ``take`` (never waits) and ``wait_for_message`` /
``wait_for_any`` (a ticket answered by a ``MessageTaken`` or
``ReceiveFailed`` event); a message handed straight to a waiting receiver
is a *handoff*. See :mod:`reliable.mailbox` for one mailbox's semantics and
:mod:`reliable.durable` for the commits a durable one waits for.

The endpoint keeps the public calls (:class:`~reliable.endpoint.Endpoint`'s
mailbox methods, documented there, hand their work here) and hands the post
office what it needs of the node: its configuration, its sessions (read
only: to tell a sender what became of its parked message), and callables to
queue events, count drops, mark a session for output, read the latest time,
and tell the remote-mailbox protocol that a mailbox went away or that a
message asked for one that moved.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from . import errors, events
from .config import Config
from .durable import DurableLog, MailboxStore, WriteBatch
from .mailbox import ANY, Mailbox, Selector, check_mailbox_name
from .message import Message
from .node_messages import ADMITTED_MANY_MAX, Admitted, AdmittedMany, Discarded
from .outbox_ids import DeliveredIds, parse_tagged
from .peer import PeerSession
from .receiver import Delivery
from .wire import Fragment, Verdict

__all__ = ["CONVERSATION", "DEFAULT_MAILBOX", "PostOffice", "check_lock"]

# The node's operator log is one logger, whichever module of the core speaks (see endpoint.py).
_log = logging.getLogger("reliable.endpoint")

DEFAULT_MAILBOX = ""
_WIRE_ID_MASK = 0xFFFFFFFF

#: Seconds since we last sent a peer data within which a request from it is taken to be
#: part of a conversation, so that our reply may carry its ack (Config.reply_ack_delay).
CONVERSATION = 1.0


class PostOffice:
    """The mailboxes of one node, their admission verdicts and their accounting.

    ``peers`` is the endpoint's session table (read, never changed here);
    ``emit`` queues an event, ``drop`` counts a drop by its reason,
    ``mark_dirty`` says a session has something to send, ``clock`` is the
    latest time the node was given, ``on_deleted`` is told a mailbox is gone
    and ``no_mailbox`` that a message asked for a mailbox that is not here.
    """

    def __init__(
        self,
        config: Config,
        peers: dict[Any, PeerSession],
        *,
        emit: Callable[[events.Event], None],
        drop: Callable[[str], None],
        mark_dirty: Callable[[Any], None],
        clock: Callable[[], float],
        on_deleted: Callable[[str], None],
        no_mailbox: Callable[[Any, str], None],
        arrival_events: bool = False,
    ) -> None:
        self.config = config
        self._peers = peers
        self._emit = emit
        self._drop = drop
        self._mark_dirty = mark_dirty
        self._clock = clock
        self._on_deleted = on_deleted
        self._no_mailbox = no_mailbox
        #: Queue a MessageReceived for every message that arrives (Endpoint's docstring).
        self._arrival_events = arrival_events
        self.mailboxes: dict[str, Mailbox] = {}
        self.held = 0  #: bytes in all mailboxes, parked and locked included
        self._waiting: dict[int, str] = {}  # receive ticket -> mailbox name
        # A receive from a set of mailboxes waits in each one's line under one ticket.
        self._waiting_sets: dict[int, list[str]] = {}
        self._next_waiter = 1
        self._next_owner = 1
        self._handoffs = 0  # messages handed straight to a waiting receiver
        self._durable: dict[str, Mailbox] = {}  # durable mailboxes, by name
        self.locking: set[str] = set()  #: mailboxes holding messages taken under a lock
        self._retired: list[Mailbox] = []  # deleted durable mailboxes owing their store a write
        self._posted = 0  # local posts so far: their message ids
        #: outbox message ids delivered here (outbox_ids.py), and those of messages parked
        #: or staged, by (source, incarnation, msg_id), until they enter or are discarded
        self.outbox_ids = DeliveredIds()
        self._outbox_pending: dict[tuple[Any, int, int], tuple[int, int, int]] = {}
        self._create(
            DEFAULT_MAILBOX, self.config.inbox_capacity, self.config.inbox_bytes, None, 0.0
        )

    def new_waiter(self) -> int:
        """A ticket for a waiting receive (local, or a pull from another node)."""
        ticket = self._next_waiter
        self._next_waiter += 1
        return ticket

    # --------------------------------------------------------- registry

    def create_mailbox(
        self,
        name: str,
        capacity: int | None,
        max_bytes: int | None,
        port: bool,
        store: MailboxStore | None,
        now: float,
    ) -> int:
        """As :meth:`Endpoint.create_mailbox <reliable.endpoint.Endpoint.create_mailbox>`."""
        check_mailbox_name(name)
        if name in self.mailboxes:
            raise errors.MailboxExists(f"mailbox {name!r} already exists on this node")
        if store is not None and capacity == 0:
            raise errors.UsageError(
                "a rendezvous mailbox (capacity=0) holds nothing to store; "
                "give a durable mailbox a capacity of at least 1, or None"
            )
        owner = self._next_owner
        self._next_owner += 1
        self._create(name, capacity, max_bytes, owner if port else None, now)
        if store is not None:
            self._make_durable(self.mailboxes[name], store)
        return owner

    def _make_durable(self, box: Mailbox, store: MailboxStore) -> None:
        box.log = DurableLog(store)
        # The outbox message ids its messages came with (oldest floor first: a later,
        # higher floor then forgets what it settles): re-sends are still recognised.
        restored_ids: list[tuple[int, int, int]] = getattr(store, "restored_ids", [])
        for outbox, row, floor in sorted(restored_ids, key=lambda i: i[2]):
            self.outbox_ids.remember(outbox, row, floor)
        for _row, msg in store.restored:
            msg = replace(msg, mailbox=box.name)
            box.log.rows[msg] = _row
            box.restore(msg)
            self.held += len(msg.data)
        self._durable[box.name] = box

    def _create(
        self, name: str, capacity: int | None, max_bytes: int | None, owner: int | None, now: float
    ) -> None:
        self.mailboxes[name] = Mailbox(
            name,
            capacity=capacity,
            max_bytes=max_bytes,
            owner=owner,
            on_unpark=self._unparked,
            on_handoff=self._handed_off,
            now=now,
            on_fail=self._wait_failed,
        )

    def has_mailbox(self, name: str) -> bool:
        """As :meth:`Endpoint.has_mailbox <reliable.endpoint.Endpoint.has_mailbox>`."""
        return name in self.mailboxes

    def is_port_of(self, name: str, owner: int) -> bool:
        """As :meth:`Endpoint.is_port_of <reliable.endpoint.Endpoint.is_port_of>`."""
        box = self.mailboxes.get(name)
        return box is not None and box.owner is not None and box.owner == owner

    def mailbox_names(self) -> list[str]:
        """As :meth:`Endpoint.mailbox_names <reliable.endpoint.Endpoint.mailbox_names>`."""
        return list(self.mailboxes)

    def port_owner(self, name: str) -> int | None:
        """As :meth:`Endpoint.port_owner <reliable.endpoint.Endpoint.port_owner>`."""
        box = self.mailboxes.get(name)
        return None if box is None else box.owner

    def is_durable(self, name: str) -> bool:
        """As :meth:`Endpoint.is_durable <reliable.endpoint.Endpoint.is_durable>`."""
        return name in self._durable

    def close_mailbox(self, name: str, now: float, owner: int | None) -> None:
        """As :meth:`Endpoint.close_mailbox <reliable.endpoint.Endpoint.close_mailbox>`."""
        box = self._box(name, owner=owner, managing=True)
        box.open = False
        self._discard_parked(box, lambda _m: True, Verdict.MAILBOX_CLOSED)

    def set_limits(
        self, name: str, capacity: int | None, max_bytes: int | None, now: float, owner: int | None
    ) -> None:
        """As :meth:`Endpoint.set_limits <reliable.endpoint.Endpoint.set_limits>`."""
        box = self.mailboxes.get(name)
        if box is not None and name != DEFAULT_MAILBOX:
            box = self._box(name, owner=owner, managing=True)
        elif box is None:
            raise errors.UnknownMailbox(f"no mailbox {name!r} on this node; create it first")
        if capacity == 0 and box.log is not None:
            raise errors.UsageError("a durable mailbox cannot be a rendezvous (capacity=0)")
        box.set_limits(capacity, max_bytes, now)

    def open_mailbox(self, name: str, owner: int | None) -> None:
        """As :meth:`Endpoint.open_mailbox <reliable.endpoint.Endpoint.open_mailbox>`."""
        self._box(name, owner=owner, managing=True).open = True

    def delete_mailbox(self, name: str, now: float, owner: int | None) -> None:
        """As :meth:`Endpoint.delete_mailbox <reliable.endpoint.Endpoint.delete_mailbox>`."""
        box = self._box(name, owner=owner, managing=True)
        self._on_deleted(name)
        self._discard_parked(box, lambda _m: True, Verdict.MAILBOX_CLOSED)
        self.held -= box.queue.bytes + box.locked_bytes
        box.drop_queued()
        box.locked.clear()
        box.locked_bytes = 0
        if box.log is not None:
            # Staged messages never enter: their senders hear so, and the store is emptied.
            staged, box.log.staged = box.log.staged, []
            box.uncommitted(staged)
            for msg in staged:
                self.held -= len(msg.data)
                self._tell_discarded(msg, Verdict.MAILBOX_CLOSED)
            box.log.destroy = True
            del self._durable[name]
            self._retired.append(box)
        for ticket in list(box.waiters):
            box.cancel_wait(ticket)
            self._waiting.pop(ticket, None)
            self._leave_other_lines(ticket, None)
            error = errors.MailboxDeleted(f"mailbox {name!r} was deleted while waiting on it")
            self._emit(events.ReceiveFailed(waiter=ticket, error=error))
        del self.mailboxes[name]

    def _box(self, name: str, *, owner: int | None = None, managing: bool = False) -> Mailbox:
        box = self.mailboxes.get(name)
        if box is None:
            raise errors.UnknownMailbox(f"no mailbox {name!r} on this node; create it first")
        if managing and name == DEFAULT_MAILBOX:
            raise errors.UsageError("the default mailbox cannot be closed or deleted")
        if box.owner is not None and owner != box.owner:
            doing = "closes, opens or deletes" if managing else "receives from"
            raise errors.UsageError(
                f"mailbox {name!r} is a port: only its owner (the handle that created it) "
                f"{doing} it"
            )
        return box

    # ------------------------------------------------ durable mailboxes

    def pending_writes(self, limit: int | None) -> list[WriteBatch]:
        """As :meth:`Endpoint.pending_writes <reliable.endpoint.Endpoint.pending_writes>`."""
        batches = [box.log.take_batch(box.name) for box in self._retired if box.log]
        self._retired.clear()
        for box in self._durable.values():
            if box.log is not None and box.log.pending():
                batches.append(box.log.take_batch(box.name, limit))
        if self._outbox_pending:
            # Outbox message ids go to the store with their messages, so that a restart
            # of this node still recognises a re-send of what it delivered (outbox_ids.py).
            pending = self._outbox_pending
            for batch in batches:
                for row, msg in batch.inserts:
                    key = pending.get((msg.source, msg.incarnation, msg.msg_id))
                    if key is not None:
                        batch.ids.append((row, *key))
        return batches

    def durable_stores(self) -> list[MailboxStore]:
        """As :meth:`Endpoint.durable_stores <reliable.endpoint.Endpoint.durable_stores>`."""
        return [box.log.store for box in self._durable.values() if box.log is not None]

    def writes_done(self, batch: WriteBatch, now: float, error: Exception | None) -> None:
        """As :meth:`Endpoint.writes_done <reliable.endpoint.Endpoint.writes_done>`."""
        box = self.mailboxes.get(batch.mailbox)
        live = box is not None and box.log is batch.log
        # Messages put back are stored again, not arriving: their rows are known already.
        arrived = batch.inserts[batch.returned :] if batch.returned else batch.inserts
        msgs = [msg for _row, msg in arrived]
        if error is None and live:
            assert box is not None
            batch.log.inserted(arrived)
            admits = self._receipts(msgs)
            box.committed(msgs, now)
            for session, (ids, nbytes) in admits.items():
                # Their window back: once per sender, not per message (PeerSession.release
                # weighs the window before and after, a tenth of a commit's report).
                session.release(nbytes)
                # Their receipts: one AdmittedMany per sender for the whole commit, not one
                # node message per message (each one a reliable message of its own).
                for at in range(0, len(ids), ADMITTED_MANY_MAX):
                    chunk = ids[at : at + ADMITTED_MANY_MAX]
                    outcome = Admitted(chunk[0]) if len(chunk) == 1 else AdmittedMany(tuple(chunk))
                    session.send_node_message(outcome, now)
                self._mark_dirty(session.addr)
        elif msgs:
            if error is not None:
                self._drop("store.failed")
            verdict = Verdict.REFUSED if error is not None else Verdict.MAILBOX_CLOSED
            for msg in msgs:
                self.held -= len(msg.data)
                self._tell_discarded(msg, verdict)
            if live:
                assert box is not None
                box.uncommitted(msgs)
        elif error is not None:
            self._drop("store.failed")
        for ticket, msg in batch.handoffs:
            self._emit(events.MessageTaken(ticket, msg))  # (positional: no keyword dict)

    def _receipts(self, msgs: list[Message]) -> dict[PeerSession, tuple[list[int], int]]:
        """A commit's messages entered their mailbox: per live sender session, the ids
        it is owed receipts for and the bytes its window gets back, in one pass.

        A commit's messages come in runs from one sender (its window's worth), so
        the session is looked up once per run of the same source and incarnation,
        not per message. Group messages owe nobody a receipt (their senders counted
        them delivered when acknowledged); an outbox message's id is settled."""
        ids_of: dict[PeerSession, list[int]] = {}
        bytes_of: dict[PeerSession, int] = {}
        outbox = bool(self._outbox_pending)
        source: Any = ids_of  # (no message's source)
        incarnation = -1
        session: PeerSession | None = None
        ids: list[int] | None = None
        nbytes = 0
        for msg in msgs:
            if msg.group is not None:
                continue
            if outbox:
                self._outbox_settled(msg, True)
            if msg.source is not source or msg.incarnation != incarnation:
                if session is not None:
                    bytes_of[session] = bytes_of.get(session, 0) + nbytes
                source, incarnation = msg.source, msg.incarnation
                session = self._live_session(msg)
                ids = None if session is None else ids_of.setdefault(session, [])
                nbytes = 0
            if ids is not None:
                ids.append(msg.msg_id)
                nbytes += len(msg.data)
        if session is not None:
            bytes_of[session] = bytes_of.get(session, 0) + nbytes
        return {s: (ids, bytes_of[s]) for s, ids in ids_of.items()}

    def owes_writes(self) -> bool:
        """As :meth:`Endpoint.owes_writes <reliable.endpoint.Endpoint.owes_writes>`."""
        if self._retired:
            return True
        durable = self._durable  # (empty unless a durable mailbox exists: asked per receive)
        return bool(durable) and any(
            box.log is not None and box.log.pending() for box in durable.values()
        )

    # -------------------------------------------------------- receiving

    def take(
        self,
        mailbox: str,
        selector: Selector | None,
        owner: int | None,
        receiver: str,
        lock: float | None,
        now: float,
    ) -> Message | None:
        """As :meth:`Endpoint.take <reliable.endpoint.Endpoint.take>`."""
        box = self.mailboxes.get(mailbox)
        if box is None or (box.owner is not None and owner != box.owner):
            box = self._box(mailbox, owner=owner)  # raises, saying why
        if lock is None and selector is None and not self.locking:
            # The common receive: the head of the queue, or None (no lock to check)
            msg = box.take_head(receiver, now)
            if msg is not None:
                self.held -= len(msg.data)
            return msg
        # Checked before any narrowing: inside an ``if lock is not None`` the compiled
        # core would pass the value as a float, and True would arrive as 1.0.
        check_lock(lock)
        if lock is not None:
            _check_truncate(selector, lock)
        if self.locking:
            self.expire_locks(now)
        elif selector is None and lock is None and not box.queue.count and not box.parked.count:
            return None  # the poll of an empty mailbox
        msg = box.take(selector or ANY, receiver, now, lock)
        if msg is not None:
            if lock is None:
                self.held -= len(msg.data)
            else:
                self.locking.add(mailbox)
            if selector is not None:
                msg = selector.fit(msg)  # max_size with truncate: cut, once counted whole
        return msg

    def put_back(self, msg: Message, owner: int | None, locked: bool, now: float) -> bool:
        """As :meth:`Endpoint.put_back <reliable.endpoint.Endpoint.put_back>`."""
        box = self.mailboxes.get(msg.mailbox)
        if box is None or msg.truncated or (box.owner is not None and owner != box.owner):
            return False
        if not box.put_back(msg, now, locked):
            return False
        if locked:
            self.locking.add(box.name)  # released; or, handed on, locked again
        else:
            self.held += len(msg.data)  # in a mailbox again (a hand-off counts it out)
        return True

    def peek(
        self, mailbox: str, selector: Selector | None, owner: int | None, now: float
    ) -> Message | None:
        """As :meth:`Endpoint.peek <reliable.endpoint.Endpoint.peek>`."""
        box = self._box(mailbox, owner=owner)
        self.expire_locks(now)
        return box.peek(selector or ANY)

    def ack(self, mailbox: str, msg: Message, owner: int | None, now: float) -> bool:
        """As :meth:`Endpoint.ack <reliable.endpoint.Endpoint.ack>`."""
        box = self._box(mailbox, owner=owner)
        if box.ack(msg, now):
            self.held -= len(msg.data)
            return True
        return False

    def release(self, mailbox: str, msg: Message, owner: int | None, now: float) -> bool:
        """As :meth:`Endpoint.release <reliable.endpoint.Endpoint.release>`."""
        box = self._box(mailbox, owner=owner)
        return box.release(msg, now)

    def remove_message(self, mailbox: str, msg: Message, owner: int | None, now: float) -> bool:
        """As :meth:`Endpoint.remove_message <reliable.endpoint.Endpoint.remove_message>`."""
        box = self._box(mailbox, owner=owner)
        if box.remove(msg, now):
            self.held -= len(msg.data)
            return True
        return False

    def expire_locks(self, now: float) -> None:
        for name in list(self.locking):
            box = self.mailboxes.get(name)
            if box is not None:
                box.expire_locks(now)
            if box is None or not box.locked:
                self.locking.discard(name)

    def lock_deadline(self) -> float | None:
        deadlines = [
            d
            for name in self.locking
            if (box := self.mailboxes.get(name)) is not None
            if (d := box.lock_deadline()) is not None
        ]
        return min(deadlines, default=None)

    def wait_for_message(
        self,
        mailbox: str,
        selector: Selector | None,
        owner: int | None,
        receiver: str,
        lock: float | None,
        now: float,
    ) -> int:
        """As :meth:`Endpoint.wait_for_message <reliable.endpoint.Endpoint.wait_for_message>`."""
        box = self.mailboxes.get(mailbox)
        if box is None or (box.owner is not None and owner != box.owner):
            box = self._box(mailbox, owner=owner)  # raises, saying why
        ticket = self._next_waiter  # (new_waiter, inline)
        self._next_waiter = ticket + 1
        # Both checks pass a plain wait (no lock, no selector) without a call. (Not
        # ``if lock is not None``: narrowed, a compiled core would unbox True to 1.0.)
        if lock is not None or selector is not None:
            check_lock(lock)
            _check_truncate(selector, lock)
        self._waiting[ticket] = mailbox
        box.wait(ticket, selector or ANY, receiver, lock)
        return ticket

    def take_any(
        self,
        mailboxes: list[tuple[str, int | None]],
        selector: Selector | None,
        receiver: str,
        lock: float | None,
        now: float,
    ) -> Message | None:
        """As :meth:`Endpoint.take_any <reliable.endpoint.Endpoint.take_any>`."""
        chosen: tuple[str, int | None] | None = None
        best = -1
        sel = selector or ANY
        for name, owner in mailboxes:
            box = self._box(name, owner=owner)
            source = box.parked if box.rendezvous and lock is None else box.queue
            head = source.peek(sel)
            if head is not None and head.priority > best:
                chosen, best = (name, owner), head.priority
        if chosen is None:
            return None
        return self.take(chosen[0], selector, chosen[1], receiver, lock, now)

    def wait_for_any(
        self,
        mailboxes: list[tuple[str, int | None]],
        selector: Selector | None,
        receiver: str,
        lock: float | None,
        now: float,
    ) -> int:
        """As :meth:`Endpoint.wait_for_any <reliable.endpoint.Endpoint.wait_for_any>`."""
        if not mailboxes:
            raise errors.UsageError("give at least one mailbox to receive from")
        names = [name for name, _ in mailboxes]
        if len(set(names)) != len(names):
            raise errors.UsageError(f"each mailbox once, please: {names}")
        boxes = [self._box(name, owner=owner) for name, owner in mailboxes]
        check_lock(lock)
        _check_truncate(selector, lock)
        ticket = self.new_waiter()
        self._waiting[ticket] = names[0]
        if len(boxes) > 1:
            self._waiting_sets[ticket] = names
        for box in boxes:
            box.wait(ticket, selector or ANY, receiver, lock)
        return ticket

    def _leave_other_lines(self, ticket: int, served_by: str | None) -> bool:
        """A receive from a set of mailboxes was answered (by ``served_by``) or failed:
        it leaves every other mailbox's line. True if it was still waiting anywhere."""
        names = self._waiting_sets.pop(ticket, None)
        if names is None:
            return False
        left = False
        for name in names:
            box = self.mailboxes.get(name)
            if name != served_by and box is not None and box.cancel_wait(ticket):
                left = True
        return left

    def cancel_wait(self, ticket: int) -> bool:
        """As :meth:`Endpoint.cancel_wait <reliable.endpoint.Endpoint.cancel_wait>`."""
        if ticket in self._waiting_sets:
            self._waiting.pop(ticket, None)
            return self._leave_other_lines(ticket, None)
        name = self._waiting.pop(ticket, None)
        box = None if name is None else self.mailboxes.get(name)
        return box is not None and box.cancel_wait(ticket)

    # -------------------------------------------------------- admission

    def screen(self, frag: Fragment, source: Any = None) -> Verdict | None:
        """Judge a message (from ``source``) by its first fragment, before buffering the rest."""
        name = frag.mailbox
        if "/" in name:  # an outbox's id tags the name (outbox_ids.py): judge the mailbox
            parsed = parse_tagged(name)
            if parsed is not None:
                name = parsed[0]
        return self._judge(name, frag.total_len, source)

    def _judge(self, name: str, size: int, source: Any) -> Verdict | None:
        box = self.mailboxes.get(name)
        if box is None:
            self._drop("refused.no_mailbox")
            _log_refusal(source, name, size, Verdict.NO_MAILBOX)
            self._no_mailbox(source, name)  # the remote-mailbox protocol: did it move?
            return Verdict.NO_MAILBOX
        verdict = None
        if not box.open:
            verdict = Verdict.MAILBOX_CLOSED
        elif box.max_bytes is not None and size > box.max_bytes and not box.fits(size):
            verdict = Verdict.TOO_LARGE
        elif self.held + size > self.config.mailbox_memory:
            verdict = Verdict.NO_MEMORY
        if verdict is not None:
            box.refused += 1
            self._drop("refused." + verdict.name.lower())
            _log_refusal(source, name, size, verdict)
        return verdict

    def deliver(self, session: PeerSession, d: Delivery, now: float) -> Verdict | None:
        if "/" in d.mailbox:
            return self._deliver_outbox(session, d, now)
        box = self.mailboxes.get(d.mailbox)
        size = len(d.data)
        if (
            box is None
            or not box.open
            or (box.max_bytes is not None and size > box.max_bytes)
            or self.held + size > self.config.mailbox_memory
        ):  # maybe a refusal: _judge decides (and counts and logs it)
            verdict = self._judge(d.mailbox, size, session.addr)
            if verdict is not None:
                return verdict
        assert session.incarnation is not None
        if self._arrival_events:
            msg = self._arrived(session.addr, session.incarnation, d, None)
        else:  # _arrived without its event, inline: once per message (positional: a
            # class called with keywords builds a dict of them)
            msg = Message(
                session.addr,  # source
                d.data,
                d.msg_type,
                d.priority,
                d.mailbox,
                d.msg_id,
                session.incarnation,
            )
            self.held += size
        # Held first (PeerSession.hold, inline): a rendezvous may hand it over (and
        # release it) inside offer().
        session.parked += size
        handoffs = self._handoffs
        box = self.mailboxes[d.mailbox]
        admitted = box.offer(msg, now)
        if admitted and box.log is None:
            session.parked -= size  # it went straight in: nothing parked (unhold)
            sender = session.sender
            if (
                self._handoffs != handoffs
                and self.config.reply_ack_delay > 0
                and sender.packets_sent
                and now - sender.last_send_time < CONVERSATION
            ):
                # A waiting receiver has it, and we talk to that peer both ways (not a
                # one-way stream, whose acks clock the sender): the reply may carry the
                # ack (receiver.py).
                session.receiver.await_reply(now + self.config.reply_ack_delay)
            return None
        # Durable, with room: staged until its commit (the mailbox is not full); else parked.
        return Verdict.STAGED if admitted else Verdict.DEFERRED

    def _deliver_outbox(self, session: PeerSession, d: Delivery, now: float) -> Verdict | None:
        """A message tagged with an outbox id (``jobs/o.<outbox>.<row>.<floor>``): a
        re-send of one delivered before is acknowledged and not delivered again."""
        parsed = parse_tagged(d.mailbox)
        if parsed is None:
            return self._judge(d.mailbox, len(d.data), session.addr)  # no such mailbox
        name, outbox, row, floor = parsed
        if self.outbox_ids.seen(outbox, row, floor):
            self._drop("duplicate.outbox")
            return None  # it is in (or went through) its mailbox already: acknowledge it
        d.mailbox = name
        verdict = self.deliver(session, d, now)
        if verdict is None:
            self.outbox_ids.remember(outbox, row, floor)
        elif verdict is Verdict.STAGED or verdict is Verdict.DEFERRED:
            self.outbox_ids.remember(outbox, row, floor)
            assert session.incarnation is not None
            pending_key = (session.addr, session.incarnation, d.msg_id)
            self._outbox_pending[pending_key] = (outbox, row, floor)
        return verdict

    def _outbox_settled(self, msg: Message, entered: bool) -> None:
        """A parked or staged outbox message entered its mailbox, or never will: a
        re-send of it must then be delivered."""
        key = self._outbox_pending.pop((msg.source, msg.incarnation, msg.msg_id), None)
        if key is not None and not entered:
            self.outbox_ids.forget(key[0], key[1])

    def deliver_group(
        self, sender: Any, incarnation: int, url: str, d: Delivery, now: float
    ) -> Verdict | None:
        """A group message is whole and in order: into its mailbox (or parked), or refused."""
        verdict = self._judge(d.mailbox, len(d.data), sender)
        if verdict is not None:
            return verdict
        msg = self._arrived(sender, incarnation, d, url)
        # Parked or not, it is the member's now: the mailbox memory cap bounds what parks.
        self.mailboxes[d.mailbox].offer(msg, now)
        return None

    def post(
        self, mailbox: str, data: bytes, source: Any, msg_type: int, priority: int, now: float
    ) -> Verdict | None:
        """As :meth:`Endpoint.post <reliable.endpoint.Endpoint.post>`."""
        verdict = self._judge(mailbox, len(data), source)
        if verdict is not None:
            return verdict
        self._posted += 1
        msg = Message(
            source=source,
            data=data,
            msg_type=msg_type,
            priority=priority,
            mailbox=mailbox,
            msg_id=self._posted,
            incarnation=0,
        )
        self.held += len(data)
        self.mailboxes[mailbox].offer(msg, now)
        return None

    def _arrived(self, source: Any, incarnation: int, d: Delivery, group: str | None) -> Message:
        """The message a delivery makes, announced as an event and counted as held."""
        msg = Message(
            source=source,
            data=d.data,
            msg_type=d.msg_type,
            priority=d.priority,
            mailbox=d.mailbox,
            msg_id=d.msg_id,
            incarnation=incarnation,
            group=group,
        )
        if self._arrival_events:
            self._emit(
                events.MessageReceived(
                    peer=source,
                    data=d.data,
                    msg_type=d.msg_type,
                    priority=d.priority,
                    mailbox=d.mailbox,
                    msg_id=d.msg_id,
                    incarnation=incarnation,
                )
            )
        self.held += len(d.data)
        return msg

    # -------------------------------------- parked messages' accounting

    def _unparked(self, msg: Message, receiver: str | None) -> None:
        """A parked message got in (or, with ``receiver``, was taken): tell its sender."""
        if msg.group is not None:
            return  # a group's sender counted it delivered when it parked
        if self._outbox_pending:
            self._outbox_settled(msg, True)
        session = self._live_session(msg)
        if session is not None:
            session.release(len(msg.data))
            outcome = Admitted(msg.msg_id, taken=receiver is not None, receiver=receiver or "")
            session.send_node_message(outcome, self._clock())
            self._mark_dirty(session.addr)

    def _handed_off(self, ticket: int, msg: Message) -> None:
        self._handoffs += 1
        self._waiting.pop(ticket, None)
        if self._waiting_sets:
            self._leave_other_lines(ticket, msg.mailbox)
        box = self.mailboxes.get(msg.mailbox)
        if box is not None and box.locked and msg in box.locked:
            self.locking.add(box.name)  # still held, under a lock
        else:
            self.held -= len(msg.data) + msg.truncated  # held whole, even if handed out cut
        if self._durable:
            box = self._durable.get(msg.mailbox)
            if box is not None and box.log is not None:
                box.log.handoffs.append((ticket, msg))  # answered once its deletion commits
                return
        self._emit(events.MessageTaken(ticket, msg))  # (positional: no keyword dict)

    def _wait_failed(self, ticket: int, error: Exception) -> None:
        """A waiting receive fails (its ``max_size`` is too small for the message it wanted)."""
        self._waiting.pop(ticket, None)
        self._leave_other_lines(ticket, None)
        assert isinstance(error, errors.ReliableError)
        self._emit(events.ReceiveFailed(waiter=ticket, error=error))

    def _discard_parked(
        self, box: Mailbox, predicate: Callable[[Message], bool], verdict: Verdict
    ) -> int:
        """Withdraw parked messages and tell their senders ``verdict``; returns how many."""
        removed = box.remove_parked(predicate)
        for msg in removed:
            self.held -= len(msg.data)
            self._tell_discarded(msg, verdict)
        return len(removed)

    def _tell_discarded(self, msg: Message, verdict: Verdict) -> None:
        """A deferred message will never enter its mailbox: tell its sender ``verdict``."""
        if self._outbox_pending:
            self._outbox_settled(msg, False)
        session = self._live_session(msg) if msg.group is None else None
        if session is not None:
            session.release(len(msg.data))
            session.send_node_message(Discarded(msg.msg_id, verdict), self._clock())
            self._mark_dirty(session.addr)

    def forget_parked(self, addr: Any, incarnation: int) -> None:
        """A peer's incarnation ended: its parked messages have nobody waiting on them."""
        session = self._peers.get(addr)
        for box in self._durable.values():
            # Staged ones still get stored (the sender was told they may have arrived),
            # but nobody will hear their receipt: their window bytes are free now.
            assert box.log is not None
            for msg in box.log.staged:
                if session is not None and msg.source == addr and msg.incarnation == incarnation:
                    session.release(len(msg.data))
        for box in self.mailboxes.values():
            if not box.parked:
                continue
            removed = box.remove_parked(
                lambda m: m.source == addr and m.incarnation == incarnation and m.group is None
            )
            for msg in removed:
                self.held -= len(msg.data)
                if self._outbox_pending:
                    self._outbox_settled(msg, False)
                if session is not None:
                    session.release(len(msg.data))

    def withdraw_parked(self, session: PeerSession, wire_id: int) -> None:
        """The sender withdrew a message (``Cancel``; ``wire_id`` is its id as the wire
        carries it): if it is parked here, it leaves and the sender hears ``CANCELLED``.
        Not parked: it already got in (or was discarded), and that answer is on its way."""
        inc = session.incarnation

        def withdrawn(m: Message) -> bool:
            return (
                m.source == session.addr
                and m.incarnation == inc
                and m.msg_id & _WIRE_ID_MASK == wire_id
            )

        for box in self.mailboxes.values():
            if box.parked and self._discard_parked(box, withdrawn, Verdict.CANCELLED):
                break

    def _live_session(self, msg: Message) -> PeerSession | None:
        session = self._peers.get(msg.source)
        if session is None or session.incarnation != msg.incarnation:
            return None
        return session

    # ------------------------------------------- transfers of ownership

    def detach_mailbox(
        self, name: str, owner_text: str, now: float
    ) -> tuple[list[Message], int | None, int | None]:
        """As :meth:`Endpoint.detach_mailbox <reliable.endpoint.Endpoint.detach_mailbox>`."""
        box = self.mailboxes.get(name)
        if box is None:
            raise errors.UnknownMailbox(f"no mailbox {name!r} on this node")
        if name == DEFAULT_MAILBOX or box.owner is not None:
            raise errors.UsageError(
                f"mailbox {name!r} cannot be transferred: the default mailbox and ports stay "
                "with their node"
            )
        if box.log is not None:
            raise errors.UsageError(
                f"mailbox {name!r} is durable: close it here and open its file on the new node"
            )
        if box.locked:
            raise errors.UsageError(
                f"mailbox {name!r} has {len(box.locked)} messages taken under a lock (or handed "
                "to a receiver on another node); ack or release them, then transfer"
            )
        msgs: list[Message] = []
        while (msg := box.queue.take()) is not None:
            msgs.append(msg)
            self.held -= len(msg.data)
        self._discard_parked(box, lambda _m: True, Verdict.MAILBOX_CLOSED)
        for ticket in list(box.waiters):
            box.cancel_wait(ticket)
            self._waiting.pop(ticket, None)
            self._leave_other_lines(ticket, None)
            error = errors.ReceiveRefused("this node", name, "moved", owner_text)
            self._emit(events.ReceiveFailed(waiter=ticket, error=error))
        self._on_deleted(name)
        del self.mailboxes[name]
        return msgs, box.capacity, box.max_bytes

    def reattach_mailbox(
        self,
        name: str,
        capacity: int | None,
        max_bytes: int | None,
        msgs: list[Message],
        now: float,
    ) -> None:
        """As :meth:`Endpoint.reattach_mailbox <reliable.endpoint.Endpoint.reattach_mailbox>`."""
        if name not in self.mailboxes:
            self._create(name, capacity, max_bytes, None, now)
        box = self.mailboxes[name]
        for msg in reversed(msgs):
            self.held += len(msg.data)
            box.queue.push_front(msg)

    def adopt_message(self, name: str, msg: Message, now: float) -> None:
        """As :meth:`Endpoint.adopt_message <reliable.endpoint.Endpoint.adopt_message>`."""
        self.held += len(msg.data)
        self.mailboxes[name].adopt(msg, now)


_VERDICT_TEXT = {
    Verdict.NO_MAILBOX: "no such mailbox",
    Verdict.MAILBOX_CLOSED: "the mailbox is closed",
    Verdict.TOO_LARGE: "larger than the mailbox accepts",
    Verdict.NO_MEMORY: "mailbox memory (Config.mailbox_memory) is full",
}


def _log_refusal(source: Any, mailbox: str, size: int, verdict: Verdict) -> None:
    if _log.isEnabledFor(logging.INFO):
        _log.info(
            "refused a %d-byte message from %s for mailbox %r: %s",
            size,
            "a group member" if source is None else errors.format_address(source),
            mailbox,
            _VERDICT_TEXT.get(verdict, verdict.name.lower()),
        )


def check_lock(lock: float | None) -> None:
    """A receive's lock (visibility timeout) is None or a positive number of seconds.

    Call it with the argument as received: a compiled core unboxes a value
    narrowed to ``float`` (``True`` becomes ``1.0``), so a check after an
    ``is not None`` test would pass a bool.
    """
    if lock is None:
        return
    if isinstance(lock, bool) or not isinstance(lock, (int, float)) or not 0 < lock < math.inf:
        raise errors.UsageError(f"lock must be a positive number of seconds, got {lock!r}")


def _check_truncate(selector: Selector | None, lock: float | None) -> None:
    if lock is not None and selector is not None and selector.truncate:
        raise errors.UsageError(
            "truncate=True cannot be combined with lock=: a locked message is acknowledged "
            "whole; receive it with a large enough max_size (or without a lock)"
        )
