"""Durable mailboxes, the core's half: which writes a mailbox owes its store, and when.

Theory of operation
-------------------
The protocol core is sans-I/O, and a durable mailbox does disk I/O, so the
two meet through *write intents*. The core never calls the store: it records
what must be written, the adapter (:func:`reliable.store.sync_stores`) takes
the intents as one batch per store (:meth:`Endpoint.pending_writes`), commits
each batch in one transaction, and reports back (:meth:`Endpoint.writes_done`).
Everything that must follow a commit waits in the core until that report:

* **Arrival.** A message admitted to a durable mailbox is *staged*, not
  queued: its sender's transport is answered with the ``DEFERRED`` verdict
  (the path a message to a full mailbox already takes, see
  :mod:`reliable.node_messages`), so the sender neither retransmits it nor counts
  it delivered. Only when the commit that inserted it is reported does it
  enter the queue (or go to a waiting receiver), and only then does the
  ``Admitted`` node message — the sender's receipt — leave. Hence: *a
  message is acknowledged to its sender only after it is committed.* Staged
  messages occupy room (capacity, max_bytes) as queued ones do, so a full
  durable mailbox parks further arrivals in memory exactly like a volatile
  one; a parked message is staged when room appears.
* **Receive.** Taking a message stages the deletion of its row. A receiver
  that was waiting is answered (``MessageTaken``) only once the deletion is
  committed; a direct ``take`` returns the message at once, and the adapter
  must commit before it hands it to the application (``sync_stores`` right
  after ``take``). So a message is never both handed out and still on disk
  after a crash.
* **Restart.** A store opened on an existing file hands the core its rows
  (``MailboxStore.restored``), in commit order; the core queues them again.
  Since a mailbox queues messages in the order they were committed (staging
  preserves arrival order, and parked messages are staged in the order they
  would have entered), pushing the rows in row order rebuilds the very same
  queue: every acknowledged, not yet received message is there, in order,
  exactly once.

Grouped commits fall out of this: every intent recorded during one loop
turn of the adapter goes into one transaction, so a burst of messages costs
one commit (one fsync, with the ``grouped`` sync policy), not one per
message. What a commit guarantees after a power loss, as opposed to a crash
of the process, is the store's sync policy (:mod:`reliable.store`).

Group (multicast) messages to a durable mailbox are stored too, but their
senders count them delivered when acknowledged, before the commit: the
guarantee above is for unicast sends.

The core stays testable on virtual time: a test gives it an in-memory store
(:class:`reliable.store.MemoryStore`) and plays the adapter's part.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from .message import Message

__all__ = ["DurableLog", "MailboxStore", "WriteBatch"]


class MailboxStore(Protocol):
    """What the core needs of a store: the rows it held when opened. It never calls it."""

    @property
    def restored(self) -> list[tuple[int, Message]]:
        """The stored messages, ``(row, message)`` in row (commit) order."""
        ...

    def commit(
        self,
        inserts: list[tuple[int, Message]],
        deletes: list[int],
        destroy: bool,
        ids: list[tuple[int, int, int, int]] | None = None,
    ) -> None:
        """Write one batch durably (per the store's sync policy); raise ``OSError`` or
        ``sqlite3.Error`` if it could not. ``ids``: the durable outbox message ids
        of inserted messages, ``(row, outbox, outbox row, floor)``, to store with
        them (a store offers them back as ``restored_ids``)."""
        ...

    def close(self) -> None: ...


@dataclass(slots=True, eq=False)
class WriteBatch:
    """One store's writes since the last commit: what the adapter commits in one go."""

    store: MailboxStore
    mailbox: str
    log: DurableLog
    inserts: list[tuple[int, Message]] = field(default_factory=list)  #: (row, message), in order
    deletes: list[int] = field(default_factory=list)  #: rows taken by receivers
    destroy: bool = False  #: the mailbox was deleted: remove everything it stored
    #: waiting receivers served meanwhile, answered once their deletes are committed
    handoffs: list[tuple[int, Message]] = field(default_factory=list)
    #: durable outbox message ids of inserted messages (``reliable.outbox_ids``):
    #: (the message's row, outbox, outbox row, floor), stored with their messages
    ids: list[tuple[int, int, int, int]] = field(default_factory=list)
    #: how many of the first ``inserts`` are messages put back (``DurableLog.put_back``),
    #: stored again: not new arrivals, and their rows are already known
    returned: int = 0


class DurableLog:
    """One durable mailbox's bookkeeping: row numbers and the writes not yet handed out."""

    __slots__ = (
        "deleting",
        "destroy",
        "first_row",
        "handoffs",
        "next_row",
        "returning",
        "rows",
        "staged",
        "store",
    )

    def __init__(self, store: MailboxStore) -> None:
        self.store = store
        restored = store.restored
        self.next_row = max((row for row, _ in restored), default=0) + 1
        #: below every row so far: a message put back takes the row before it
        self.first_row = min((row for row, _ in restored), default=self.next_row)
        self.returning: list[tuple[int, Message]] = []  # put back, to insert again
        self.rows: dict[Message, int] = {msg: row for row, msg in restored}
        self.staged: list[Message] = []  # admitted, to insert at the next commit
        self.deleting: list[int] = []  # rows of taken messages, to delete
        self.handoffs: list[tuple[int, Message]] = []  # (waiter ticket, message)
        self.destroy = False

    def remove(self, msg: Message) -> None:
        """``msg`` left the mailbox (taken by a receiver): its row goes."""
        row = self.rows.pop(msg, None)
        if row is not None:
            self.deleting.append(row)

    def put_back(self, msg: Message) -> None:
        """``msg``, taken (its row deleted, or to be), is back at the head of the mailbox:
        it is stored again, in a row before every other, so a restart restores it first.
        Its row is known at once: taken again, that row is deleted after its insert."""
        self.first_row -= 1
        self.rows[msg] = self.first_row
        self.returning.append((self.first_row, msg))

    def pending(self) -> bool:
        return bool(self.staged or self.deleting or self.handoffs or self.destroy or self.returning)

    def take_batch(self, mailbox: str, limit: int | None = None) -> WriteBatch:
        """What is owed to the store, as one batch: every deletion, and the first
        ``limit`` staged messages (all of them if None); the rest wait for the next."""
        cut = len(self.staged) if limit is None else min(limit, len(self.staged))
        returned, self.returning = self.returning, []
        inserts = list(returned)
        for msg in self.staged[:cut]:
            inserts.append((self.next_row, msg))
            self.next_row += 1
        batch = WriteBatch(
            self.store,
            mailbox,
            self,
            inserts,
            self.deleting,
            self.destroy,
            self.handoffs,
            returned=len(returned),
        )
        self.staged, self.deleting, self.handoffs = self.staged[cut:], [], []
        return batch

    def inserted(self, inserts: list[tuple[int, Message]]) -> None:
        self.rows.update({msg: row for row, msg in inserts})


def describe(store: Any) -> str:
    """How a store names itself in stats and errors (its path, if it has one)."""
    return str(getattr(store, "path", type(store).__name__))
