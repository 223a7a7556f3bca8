"""Durable outboxes: sends that survive the sender's crash (issue 19).

Theory of operation
-------------------
``node.open_outbox(PATH)`` gives a node an outbox in an SQLite file (WAL
mode, exclusive locking: one process at a time, as a durable mailbox).
``outbox.send(dest, data)`` first commits the send to the file — that is
when it is *accepted*; a bad argument fails before, and nothing is stored —
then sends it as ``node.send`` does. When its outcome is known (a receipt,
or an error the application gets as from ``node.send``), its row is settled
and deleted. If the process dies first, however it dies, the row is still
in the file, and the next ``open_outbox(PATH)`` sends it again: a message
accepted before the crash is retried after the restart.

A re-send must not be delivered twice, and the transport cannot tell: the
restarted node has a new incarnation. So each outbox send carries a stable
id — the outbox's id (random, made with the file) and its row — and the
receiving node remembers the ids it delivered (:mod:`reliable.outbox_ids`,
where the bounds are). With each id goes the outbox's *floor*: every row
below it is deleted on disk, so it will never be sent again, and the
receiver may forget it. Deletions are committed lazily, with the next
accepted send (one transaction for both) or :meth:`Outbox.flush`, so
settling costs no fsync of its own; the floor only counts committed
deletions, which keeps the promise true across a crash.

What is guaranteed, exactly:

* **Accepted means stored.** Once ``send`` or ``send_nowait`` returned (or,
  for ``send``, once it got past storing: it raised something other than a
  ``UsageError``), the message is in the file. With ``sync="message"`` (the
  default) the commit is fsynced: that holds after a power loss too; with
  ``sync="os"`` only after a crash of the process.
* **Retried after a restart.** Every stored, unsettled send is sent again by
  the next ``open_outbox`` on the file, in the order accepted
  (``outbox.replayed`` holds their handles). A send whose outcome was known
  before the crash is not retried — unless its deletion had not been
  committed yet, in which case it is re-sent and the receiver's memory
  catches it.
* **Delivered once** while the receiving node remembers the id: it does
  unless it restarted in between (a durable mailbox stores the ids with its
  messages: a restart on its file remembers them), or more than ``REMEMBERED_OUTBOXES``
  other outboxes, or more than ``REMEMBERED_ROWS`` of this outbox's sends
  above its floor, came between. Past those bounds a re-send is delivered
  again: at least once, never lost.
* **Failures are the application's while it runs.** A send that fails while
  the node is up (refused, timed out, peer unreachable) reports its error
  as ``node.send`` would, and is settled: the outbox does not retry it.
  It covers the sender's crash, not a destination that stays away.

Outbox sends go to one node's mailbox (not a group or anycast service), and
the mailbox name must leave room for the id (``outbox_ids.TAG_MAX`` bytes).
A node that knows nothing of outboxes refuses them (no such mailbox).
"""

from __future__ import annotations

import heapq
import json
import os
import secrets
import sqlite3
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from . import errors
from .addressing import Address
from .outbox_ids import TAG_MAX, format_tag
from .wire import MAX_MAILBOX_BYTES

if TYPE_CHECKING:
    from .aio import AsyncNode, AsyncSendHandle
    from .message import Receipt
    from .node import Node, SendHandle

__all__ = [
    "OUTBOX_SYNC",
    "AsyncOutbox",
    "Outbox",
    "OutboxRow",
    "OutboxStore",
    "check_outbox_mailbox",
    "settle_outbox_send",
]

#: What a commit of an accepted send means: fsynced ("message") or left to the OS ("os").
OUTBOX_SYNC = ("message", "os")
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS sends (
    row INTEGER PRIMARY KEY AUTOINCREMENT,
    dest TEXT NOT NULL,
    mailbox TEXT NOT NULL,
    msg_type INTEGER NOT NULL,
    priority INTEGER NOT NULL,
    data BLOB NOT NULL
);
"""


@dataclass(frozen=True, slots=True)
class OutboxRow:
    """A send the outbox holds: accepted, its outcome not yet settled on disk."""

    row: int
    dest: Address
    mailbox: str
    msg_type: int
    priority: int
    data: bytes


def check_outbox_mailbox(mailbox: str) -> None:
    """An outbox send's mailbox name must leave room for its id in the name field."""
    if len(mailbox.encode("utf-8")) + TAG_MAX > MAX_MAILBOX_BYTES:
        raise errors.UsageError(
            f"mailbox name {mailbox[:20]!r} is too long for an outbox send: keep it within "
            f"{MAX_MAILBOX_BYTES - TAG_MAX} bytes of UTF-8"
        )


class OutboxStore:
    """The outbox's file: accepted sends, by row (the order they were accepted).

    Thread-safe: sends and settlements may come from any thread.
    """

    def __init__(self, path: str | os.PathLike[str], *, sync: str = "message") -> None:
        if sync not in OUTBOX_SYNC:
            raise errors.UsageError(f"sync must be one of {', '.join(OUTBOX_SYNC)}; got {sync!r}")
        self.path = os.fspath(path)
        self.sync = sync
        self.commits = 0  #: transactions committed
        self._lock = threading.Lock()
        try:
            conn = sqlite3.connect(
                self.path, isolation_level=None, check_same_thread=False, timeout=0
            )
        except sqlite3.Error as exc:
            raise errors.UsageError(f"cannot open outbox {self.path}: {exc}") from None
        self._conn = conn
        try:
            conn.execute("PRAGMA locking_mode=EXCLUSIVE")
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(f"PRAGMA synchronous={'NORMAL' if sync == 'os' else 'FULL'}")
            conn.execute("BEGIN IMMEDIATE")
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)
            found = conn.execute("SELECT value FROM meta WHERE key = 'outbox'").fetchone()
            if found is None:
                self.id = secrets.randbits(64) or 1
                conn.execute("INSERT INTO meta VALUES ('outbox', ?)", (str(self.id),))
            else:
                self.id = int(found[0])
            rows = conn.execute(
                "SELECT row, dest, mailbox, msg_type, priority, data FROM sends ORDER BY row"
            ).fetchall()
            seq = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'sends'").fetchone()
            self._sequence = 0 if seq is None else int(seq[0])
            conn.execute("COMMIT")
        except sqlite3.OperationalError as exc:
            conn.close()
            if "locked" in str(exc) or "busy" in str(exc):
                raise errors.UsageError(
                    f"outbox {self.path} is in use by another process; one node at a time "
                    "sends from an outbox"
                ) from None
            raise errors.UsageError(f"cannot use {self.path} as an outbox: {exc}") from None
        except (sqlite3.DatabaseError, ValueError) as exc:
            conn.close()
            raise errors.UsageError(f"{self.path} is not an outbox: {exc}") from None
        #: the sends the file held when opened, in the order they were accepted
        self.restored: list[OutboxRow] = [
            OutboxRow(row, _address(dest), mailbox, msg_type, priority, bytes(data))
            for row, dest, mailbox, msg_type, priority, data in rows
        ]
        # Rows are never reused, even after every send was deleted (AUTOINCREMENT): a
        # receiver may remember a settled row's id, and would take a new send under it
        # for a re-send.
        self._next_row = max([self._sequence, *(r.row for r in self.restored)]) + 1
        self._on_disk = [r.row for r in self.restored]  # a heap: rows not deleted on disk
        heapq.heapify(self._on_disk)
        self._deleted: set[int] = set()  # settled, deletion committed (lazy heap removal)
        self._settled: list[int] = []  # settled, deletion not yet committed
        self._closed = False

    @property
    def pending(self) -> int:
        """Sends accepted and not settled yet."""
        with self._lock:
            return len(self._on_disk) - len(self._deleted) - len(self._settled)

    def floor(self) -> int:
        """The lowest row not yet deleted on disk (the next row if none): every row
        below it is settled for good and will never be sent again."""
        with self._lock:
            return self._floor()

    def _floor(self) -> int:
        heap, deleted = self._on_disk, self._deleted
        while heap and heap[0] in deleted:
            deleted.discard(heapq.heappop(heap))
        return heap[0] if heap else self._next_row

    def add(
        self, dest: Address, mailbox: str, msg_type: int, priority: int, data: bytes
    ) -> tuple[int, str]:
        """Store an accepted send (committed when this returns, with any deletions owed);
        returns its row and the tag (its id, and the floor) it travels with."""
        return self.add_many(dest, mailbox, msg_type, priority, [data])[0]

    def add_many(
        self, dest: Address, mailbox: str, msg_type: int, priority: int, datas: list[bytes]
    ) -> list[tuple[int, str]]:
        """Store several accepted sends in one transaction (one fsync); their rows and
        tags, in order."""
        where = json.dumps(list(dest))
        with self._lock:
            if self._closed:
                raise errors.NodeClosed(f"outbox {self.path} is closed")
            first = self._next_row
            rows = [
                (first + i, where, mailbox, msg_type, priority, data)
                for i, data in enumerate(datas)
            ]
            settled = self._settled
            conn = self._conn
            conn.execute("BEGIN IMMEDIATE")
            try:
                if settled:
                    conn.executemany("DELETE FROM sends WHERE row = ?", [(r,) for r in settled])
                conn.executemany("INSERT INTO sends VALUES (?, ?, ?, ?, ?, ?)", rows)
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
            self.commits += 1
            self._next_row = first + len(datas)
            self._deleted.update(settled)
            self._settled = []
            for values in rows:
                heapq.heappush(self._on_disk, values[0])
            floor = self._floor()
            return [(values[0], format_tag(self.id, values[0], floor)) for values in rows]

    def tag(self, row: int) -> str:
        """The tag a restored send travels with when it is sent again."""
        with self._lock:
            return format_tag(self.id, row, self._floor())

    def settle(self, row: int) -> None:
        """The send's outcome is known: its row goes (committed with the next send, or
        :meth:`flush`). Cheap; any thread."""
        with self._lock:
            self._settled.append(row)

    def flush(self) -> None:
        """Commit the deletions owed now."""
        with self._lock:
            self._flush()

    def _flush(self) -> None:
        if not self._settled or self._closed:
            return
        conn = self._conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.executemany("DELETE FROM sends WHERE row = ?", [(r,) for r in self._settled])
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
        self.commits += 1
        self._deleted.update(self._settled)
        self._settled = []

    def count(self) -> int:
        """Rows in the file now (committed), settled-but-not-deleted ones included."""
        with self._lock:
            return int(self._conn.execute("SELECT count(*) FROM sends").fetchone()[0])

    def close(self) -> None:
        """Commit the deletions owed and close the file (the node closes)."""
        with self._lock:
            if self._closed:
                return
            try:
                self._flush()
            finally:
                self._closed = True
                self._conn.close()

    def __repr__(self) -> str:
        return f"<OutboxStore {self.path} id={self.id:x} sync={self.sync}>"


def _address(text: str) -> Address:
    value: Any = json.loads(text)
    if not isinstance(value, list):
        raise ValueError(f"bad destination {text!r}")
    return tuple(value)


def settle_outbox_send(store: OutboxStore, row: int, error: BaseException | None) -> None:
    """A send's outcome is known: settle its row, unless the node closed under it (then it
    stays, and the next ``open_outbox`` sends it again)."""
    if not isinstance(error, errors.NodeClosed | errors.SendAborted):
        store.settle(row)


class _Outboxes:
    """What both adapters' outboxes read from their store."""

    store: OutboxStore

    @property
    def id(self) -> int:
        """The outbox's id (random, made with the file): half of each send's message id."""
        return self.store.id

    @property
    def pending(self) -> int:
        """Sends accepted and not settled yet."""
        return self.store.pending


class Outbox(_Outboxes):
    """A :class:`reliable.Node`'s durable outbox (``node.open_outbox(PATH)``): sends that
    are stored before they go out, so that a crash of this process does not lose them."""

    def __init__(self, node: Node, store: OutboxStore) -> None:
        self._node = node
        self.store = store
        #: the sends the file held when opened, sent again (their outcomes, in order)
        self.replayed: list[SendHandle] = []

    def send(
        self,
        dest: str | tuple[Any, ...],
        data: bytes,
        *,
        msg_type: int = 0,
        priority: int = 0,
        mailbox: str | None = None,
        timeout: float | None = None,
    ) -> Receipt:
        """As :meth:`reliable.Node.send` (one node's mailbox), but the message is stored
        in the outbox before it goes out: if this process dies before its outcome
        is known, the next ``open_outbox`` on the file sends it again."""
        handle = self._node._outbox_send(
            self.store, dest, data, msg_type, priority, mailbox, timeout, block=True
        )
        try:
            return handle.result()
        except BaseException:
            handle.cancel()
            raise

    def send_nowait(
        self,
        dest: str | tuple[Any, ...],
        data: bytes,
        *,
        msg_type: int = 0,
        priority: int = 0,
        mailbox: str | None = None,
        timeout: float | None = None,
    ) -> SendHandle:
        """As :meth:`reliable.Node.send_nowait`, stored first (see :meth:`send`)."""
        return self._node._outbox_send(
            self.store, dest, data, msg_type, priority, mailbox, timeout, block=False
        )

    def send_many(
        self,
        dest: str | tuple[Any, ...],
        messages: Iterable[bytes],
        *,
        msg_type: int = 0,
        priority: int = 0,
        mailbox: str | None = None,
        timeout: float | None = None,
    ) -> list[SendHandle]:
        """Store every message of ``messages`` for ``dest`` in **one** commit (one fsync
        for all: the way to send many through an outbox quickly), then send them in
        order; returns their handles. Every message is checked before any is stored.
        Blocks while the node's send buffer is full, as ``node.send_many`` does."""
        return self._node._outbox_send_many(
            self.store, dest, list(messages), msg_type, priority, mailbox, timeout
        )

    def flush(self) -> None:
        """Commit the deletions of settled sends now (they are otherwise committed with
        the next send, or when the node closes)."""
        self.store.flush()

    def __repr__(self) -> str:
        return f"<Outbox {self.store.path} pending={self.pending}>"


class AsyncOutbox(_Outboxes):
    """An :class:`reliable.AsyncNode`'s durable outbox (see :class:`Outbox`). Storing a
    send is a commit (an fsync with ``sync="message"``): it runs on a worker thread,
    so the event loop goes on meanwhile."""

    def __init__(self, node: AsyncNode, store: OutboxStore) -> None:
        self._node = node
        self.store = store
        #: the sends the file held when opened, sent again (their outcomes, in order)
        self.replayed: list[AsyncSendHandle] = []

    async def send(
        self,
        dest: str | tuple[Any, ...],
        data: bytes,
        *,
        msg_type: int = 0,
        priority: int = 0,
        mailbox: str | None = None,
        timeout: float | None = None,
    ) -> Receipt:
        """As :meth:`reliable.AsyncNode.send`, stored first (see :meth:`Outbox.send`)."""
        handle = await self._node._outbox_send(
            self.store, dest, data, msg_type, priority, mailbox, timeout, block=True
        )
        return await handle

    async def send_nowait(
        self,
        dest: str | tuple[Any, ...],
        data: bytes,
        *,
        msg_type: int = 0,
        priority: int = 0,
        mailbox: str | None = None,
        timeout: float | None = None,
    ) -> AsyncSendHandle:
        """As :meth:`reliable.AsyncNode.send_nowait`, stored first; a coroutine here
        (storing awaits its commit), which returns the handle once it is accepted."""
        return await self._node._outbox_send(
            self.store, dest, data, msg_type, priority, mailbox, timeout, block=False
        )

    async def send_many(
        self,
        dest: str | tuple[Any, ...],
        messages: Iterable[bytes],
        *,
        msg_type: int = 0,
        priority: int = 0,
        mailbox: str | None = None,
        timeout: float | None = None,
    ) -> list[AsyncSendHandle]:
        """As :meth:`Outbox.send_many`: one commit for all, then sent in order."""
        return await self._node._outbox_send_many(
            self.store, dest, list(messages), msg_type, priority, mailbox, timeout
        )

    def flush(self) -> None:
        """Commit the deletions of settled sends now (see :meth:`Outbox.flush`)."""
        self.store.flush()

    def __repr__(self) -> str:
        return f"<AsyncOutbox {self.store.path} pending={self.pending}>"
