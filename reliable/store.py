"""Durable mailbox stores: SQLite on disk, and an in-memory one for tests.

Theory of operation
-------------------
The protocol core records write intents (:mod:`reliable.durable`); the
adapters call :func:`sync_stores` once per loop turn (and right after a
``take`` from a durable mailbox), which commits each store's batch in one
transaction and reports the outcome to the core. That is the grouped
commit: everything that arrived in one turn costs one commit.

One SQLite file holds one mailbox: table ``messages`` (the rows, by the row
number the core gave them, which is commit order), ``meta`` (the
mailbox's name) and ``outbox_ids`` (the durable outbox message ids of the
messages it took in, stored in the same transaction as those messages, so
a restart still recognises a re-send: :mod:`reliable.outbox_ids`). The
connection runs in WAL mode, so a commit appends to the log instead of
rewriting pages, and in exclusive locking mode, so a second process opening
the same path fails at once (``StoreBusy``) instead of two nodes serving one
mailbox; the OS drops the lock when the owner dies, even by SIGKILL, and the
next open recovers from the WAL.

Sync policy (``sync=``), and what each guarantees:

``"grouped"`` (the default)
    one transaction per batch, ``synchronous=FULL``: the WAL is fsynced
    before the commit returns, so before any receipt leaves. After a crash
    of the process *or a power loss*, every acknowledged message not yet
    received is there, and no received one comes back.
``"message"``
    one transaction (one fsync) per message and per deletion: the same
    guarantee, at one fsync each — the classic; only for comparison, or when
    one message's commit must never wait for a batch.
``"os"``
    grouped transactions with ``synchronous=NORMAL``: no fsync on commit;
    the OS writes the WAL back when it likes (the WAL is fsynced at
    checkpoints). A crash of the process loses nothing (the OS has the
    data); a power loss or OS crash may lose the last acknowledged
    messages, or bring back the last received ones. The database is never
    corrupted either way.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
from collections.abc import Callable
from typing import Any

from . import errors
from .durable import WriteBatch
from .endpoint import Endpoint
from .message import Message
from .outbox_ids import REMEMBERED_ROWS

__all__ = [
    "GROUP_MAX",
    "SYNC_POLICIES",
    "Committer",
    "MemoryStore",
    "SqliteStore",
    "StoreBusy",
    "close_stores",
    "open_store",
    "sync_stores",
]

SYNC_POLICIES = ("grouped", "message", "os")
#: Most new messages one grouped commit of a mailbox stores; more wait for the next
#: commit. Bounds how long a commit (and so a receipt) takes.
GROUP_MAX = 1024
_I64 = 1 << 63
_NO_SOURCE = object()  # no row's source: the first row looks its source text up
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS messages (
    row INTEGER PRIMARY KEY,
    priority INTEGER NOT NULL,
    msg_type INTEGER NOT NULL,
    source TEXT NOT NULL,
    incarnation INTEGER NOT NULL,
    msg_id INTEGER NOT NULL,
    data BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS outbox_ids (
    outbox INTEGER NOT NULL,
    outbox_row INTEGER NOT NULL,
    floor INTEGER NOT NULL,
    PRIMARY KEY (outbox, outbox_row)
) WITHOUT ROWID;
"""


class StoreBusy(errors.UsageError):
    """The store's file is in use by another process (one node serves a durable mailbox)."""


def _store_ids(conn: sqlite3.Connection, ids: list[tuple[int, int, int]]) -> None:
    """Store delivered outbox ids ``(outbox, row, floor)`` and forget, per outbox, what
    its floor settles and what lies more than ``REMEMBERED_ROWS`` below its newest."""
    conn.executemany(
        "INSERT OR IGNORE INTO outbox_ids VALUES (?, ?, ?)",
        [(_signed(o), _signed(r), _signed(f)) for o, r, f in ids],
    )
    cut: dict[int, int] = {}
    for outbox, row, floor in ids:
        cut[outbox] = max(cut.get(outbox, 0), floor, row - REMEMBERED_ROWS)
    for outbox, below in cut.items():
        # Rows are stored signed; a row of 2**63 or more is unusual enough to keep.
        if below > 0 and below < _I64:
            conn.execute(
                "DELETE FROM outbox_ids WHERE outbox = ? AND outbox_row >= 0 AND outbox_row < ?",
                (_signed(outbox), below),
            )


def _signed(value: int) -> int:
    """A 64-bit unsigned id as SQLite's signed INTEGER (and back with :func:`_unsigned`)."""
    value &= (1 << 64) - 1
    return value - (1 << 64) if value >= _I64 else value


def _unsigned(value: int) -> int:
    return value + (1 << 64) if value < 0 else value


def _source_text(source: Any) -> str:
    return json.dumps(list(source) if isinstance(source, tuple) else source)


def _source_value(text: str) -> Any:
    value = json.loads(text)
    return tuple(value) if isinstance(value, list) else value


class SqliteStore:
    """One durable mailbox in an SQLite file (see the module docstring for ``sync``)."""

    def __init__(
        self, path: str | os.PathLike[str], mailbox: str, *, sync: str = "grouped"
    ) -> None:
        if sync not in SYNC_POLICIES:
            raise errors.UsageError(f"sync must be one of {', '.join(SYNC_POLICIES)}; got {sync!r}")
        self.path = os.fspath(path)
        self.mailbox = mailbox
        self.sync = sync
        self.commits = 0  #: transactions committed
        self._sources: dict[Any, str] = {}  # source address -> its stored text
        try:
            conn = sqlite3.connect(
                self.path, isolation_level=None, check_same_thread=False, timeout=0
            )
        except sqlite3.Error as exc:
            raise errors.UsageError(
                f"cannot open durable mailbox store {self.path}: {exc}"
            ) from None
        self._conn = conn
        try:
            # Exclusive before the first access: no shared memory, and the lock is ours.
            conn.execute("PRAGMA locking_mode=EXCLUSIVE")
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(f"PRAGMA synchronous={'NORMAL' if sync == 'os' else 'FULL'}")
            conn.execute("BEGIN IMMEDIATE")  # takes the lock now, not at the first message
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)
        except sqlite3.OperationalError as exc:
            conn.close()
            if "locked" in str(exc) or "busy" in str(exc):
                raise StoreBusy(
                    f"durable mailbox store {self.path} is in use by another process; "
                    "one node at a time serves a durable mailbox"
                ) from None
            raise errors.UsageError(f"cannot use {self.path} as a mailbox store: {exc}") from None
        except sqlite3.DatabaseError as exc:
            conn.close()
            raise errors.UsageError(f"{self.path} is not a mailbox store: {exc}") from None
        self._check_name(mailbox)
        rows = conn.execute(
            "SELECT row, priority, msg_type, source, incarnation, msg_id, data "
            "FROM messages ORDER BY row"
        ).fetchall()
        ids = conn.execute("SELECT outbox, outbox_row, floor FROM outbox_ids").fetchall()
        conn.execute("COMMIT")
        #: durable outbox message ids delivered here: (outbox, row, floor) (outbox_ids.py)
        self.restored_ids: list[tuple[int, int, int]] = [
            (_unsigned(outbox), _unsigned(row), _unsigned(floor)) for outbox, row, floor in ids
        ]
        self.restored: list[tuple[int, Message]] = [
            (
                row,
                Message(
                    source=_source_value(source),
                    data=bytes(data),
                    msg_type=msg_type,
                    priority=priority,
                    mailbox=mailbox,
                    msg_id=_unsigned(msg_id),
                    incarnation=_unsigned(incarnation),
                ),
            )
            for row, priority, msg_type, source, incarnation, msg_id, data in rows
        ]

    def _check_name(self, mailbox: str) -> None:
        found = self._conn.execute("SELECT value FROM meta WHERE key = 'mailbox'").fetchone()
        if found is None:
            self._conn.execute("INSERT INTO meta VALUES ('mailbox', ?)", (mailbox,))
        elif found[0] != mailbox:
            self._conn.execute("ROLLBACK")
            self._conn.close()
            raise errors.UsageError(
                f"{self.path} stores mailbox {found[0]!r}, not {mailbox!r}; "
                "give each durable mailbox its own file"
            )

    def commit(
        self,
        inserts: list[tuple[int, Message]],
        deletes: list[int],
        destroy: bool,
        ids: list[tuple[int, int, int, int]] | None = None,
    ) -> None:
        """Write one batch: one transaction, or (``sync="message"``) one per row.

        ``ids``: outbox message ids of inserted messages, ``(row, outbox, outbox
        row, floor)``, stored in the same transaction as their messages; each
        outbox's ids below its floor (or more than ``REMEMBERED_ROWS`` below its
        newest) are forgotten, as the node's memory forgets them."""
        # A batch comes from a few senders: each one's source text is made once, not per
        # row (json.dumps was a sixth of a 1024-row commit's time).
        # The commit thread holds the GIL for this loop (SQLite lets go of it only inside
        # executemany and COMMIT), and the node's loop waits for it meanwhile: a run of
        # rows from one sender (the usual batch) reuses the previous row's source text
        # and incarnation, and an id in signed range (all but 1 in 2**63) is stored as is.
        sources = self._sources
        if len(sources) > 4096:
            sources.clear()
        rows: list[tuple[Any, ...]] = []
        append = rows.append
        source: Any = _NO_SOURCE
        incarnation = -1
        text = ""
        stored = 0
        for row, m in inserts:
            if m.source is not source or m.incarnation != incarnation:
                source, incarnation = m.source, m.incarnation
                found = sources.get(source)
                if found is None:
                    found = sources[source] = _source_text(source)
                text, stored = found, _signed(incarnation)
            msg_id = m.msg_id
            append(
                (
                    row,
                    m.priority,
                    m.msg_type,
                    text,
                    stored,
                    msg_id if 0 <= msg_id < _I64 else _signed(msg_id),
                    m.data,
                )
            )
        conn = self._conn
        insert = "INSERT OR REPLACE INTO messages VALUES (?, ?, ?, ?, ?, ?, ?)"
        delete = "DELETE FROM messages WHERE row = ?"
        by_row = {row: (outbox, orow, floor) for row, outbox, orow, floor in ids or ()}
        if self.sync == "message":
            for values in rows:
                tagged = by_row.get(values[0])

                def one(v: tuple[Any, ...] = values, t: Any = tagged) -> None:
                    conn.execute(insert, v)
                    if t is not None:
                        _store_ids(conn, [t])

                self._transaction(one)
            for row in deletes:
                self._transaction(lambda r=row: conn.execute(delete, (r,)))
        else:

            def write() -> None:
                conn.executemany(insert, rows)
                conn.executemany(delete, [(r,) for r in deletes])
                if by_row:
                    _store_ids(conn, list(by_row.values()))

            self._transaction(write)
        if destroy:

            def wipe() -> None:
                conn.execute("DELETE FROM messages")
                conn.execute("DELETE FROM outbox_ids")

            self._transaction(wipe)

    def _transaction(self, work: Any) -> None:
        conn = self._conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            work()
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
        self.commits += 1

    def count(self) -> int:
        """Rows stored now (committed)."""
        return int(self._conn.execute("SELECT count(*) FROM messages").fetchone()[0])

    def close(self) -> None:
        self._conn.close()

    def __repr__(self) -> str:
        return f"<SqliteStore {self.path} mailbox={self.mailbox!r} sync={self.sync}>"


class MemoryStore:
    """A store in memory, for tests on virtual time: :meth:`crashed` is what a
    restart would find, i.e. only what was committed."""

    def __init__(
        self,
        restored: list[tuple[int, Message]] | None = None,
        ids: list[tuple[int, int, int]] | None = None,
    ) -> None:
        self.rows: dict[int, Message] = dict(restored or [])
        self.restored = sorted(self.rows.items())
        self.ids: list[tuple[int, int, int]] = list(ids or [])  #: outbox ids committed
        self.restored_ids = list(self.ids)
        self.commits = 0
        self.fail = False  #: make the next commits fail (an I/O error)

    def commit(
        self,
        inserts: list[tuple[int, Message]],
        deletes: list[int],
        destroy: bool,
        ids: list[tuple[int, int, int, int]] | None = None,
    ) -> None:
        if self.fail:
            raise OSError("simulated I/O error")
        for row, msg in inserts:
            self.rows[row] = msg
        for row in deletes:
            self.rows.pop(row, None)
        self.ids.extend((outbox, orow, floor) for _row, outbox, orow, floor in ids or ())
        if destroy:
            self.rows.clear()
            self.ids.clear()
        self.commits += 1

    def crashed(self) -> MemoryStore:
        """A fresh store holding exactly what was committed (a restart after a crash)."""
        return MemoryStore(sorted(self.rows.items()), self.ids)

    def close(self) -> None:
        pass


def open_store(
    durable: str | os.PathLike[str] | None, mailbox: str, sync: str
) -> SqliteStore | None:
    """The store for ``create_mailbox(..., durable=PATH, sync=...)``, or None (volatile)."""
    if durable is None:
        if sync != "grouped":
            raise errors.UsageError("sync= applies to durable mailboxes; give durable=PATH too")
        return None
    return SqliteStore(durable, mailbox, sync=sync)


def sync_stores(endpoint: Endpoint, now: float) -> int:
    """Commit every durable mailbox's pending writes and report them to the core.

    The adapters call it once per loop turn, before sending what the core
    produced, and right after a ``take`` from a durable mailbox, before the
    message is handed out. Returns the number of batches committed. A commit
    may make more work (a committed message handed to a waiting receiver
    must have its row deleted), so it runs until nothing is owed (a few
    rounds at most: each round only deletes what the previous inserted).
    """
    done = 0
    for _round in range(4):
        batches = endpoint.pending_writes()
        if not batches:
            break
        for batch in batches:
            done += 1
            _commit(endpoint, batch, now)
    return done


def _commit(endpoint: Endpoint, batch: WriteBatch, now: float) -> None:
    try:
        _write(batch)
    except (OSError, sqlite3.Error) as exc:
        endpoint.writes_done(batch, now, exc)
    else:
        endpoint.writes_done(batch, now)
    if batch.destroy:
        batch.store.close()  # the mailbox was deleted: its store is done


def _write(batch: WriteBatch) -> None:
    """Commit ``batch`` to its store (outbox ids only when it has some: a store of
    one's own need not know of them)."""
    if batch.ids:
        batch.store.commit(batch.inserts, batch.deletes, batch.destroy, ids=batch.ids)
    else:
        batch.store.commit(batch.inserts, batch.deletes, batch.destroy)


def close_stores(endpoint: Endpoint, now: float) -> None:
    """Commit what is owed and close every durable mailbox's store (the node is closing)."""
    sync_stores(endpoint, now)
    for store in endpoint.durable_stores():
        store.close()


class Committer:
    """Grouped commits across loop turns, on a thread of its own that never waits for the loop.

    An adapter that committed inside its loop turn would stop reading its
    socket for the length of an fsync; senders then have nothing acknowledged
    (not even with ``DEFERRED``) and stall once their windows are full, so a
    commit groups only what arrived in one turn. Instead the adapter calls
    :meth:`turn` every loop turn: it reports commits that finished (the core
    then sends their receipts) and hands what the turn staged to the commit
    thread — added to the batch already waiting for that store, if there is
    one, so everything that arrives while a commit runs goes into the next
    transaction: the longer an fsync takes, the more the next one carries.
    The thread commits what waits as soon as the commit before it is done,
    without waiting for the loop to come round (that wait, half a
    millisecond at the median, left the disk idle a quarter of the time), and
    it is woken only when it sleeps: a busy thread takes the next batch
    without a wake-up. A message waits for at most the commit in flight and
    its own; no timer is involved, so an idle mailbox commits a lone message
    at once. One transaction carries at most about :data:`GROUP_MAX` new
    messages per mailbox (a turn adds at most that many to a waiting batch
    that has fewer).

    The thread touches only the batches and their stores, never the core:
    :meth:`turn`, :meth:`flush` and :meth:`close` run on the adapter's side
    (its lock held) and do all the reporting. When a commit finishes the
    thread calls ``wake`` (thread-safe), and the adapter runs a turn soon.
    :meth:`flush` commits synchronously (after waiting for the thread to
    finish what it was given): for a receive, whose deletion must be
    committed before the message is handed out, and for management calls.
    """

    def __init__(self, wake: Callable[[], None]) -> None:
        self._wake = wake
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)  # the thread waits here for batches
        self._idle = threading.Condition(self._lock)  # flush waits here for the thread
        self._queued: list[WriteBatch] = []  # handed over, not yet taken by the thread
        self._thread: threading.Thread | None = None
        self._busy = False  # the thread is committing what it took
        self._sleeping = False  # the thread waits for batches (to be woken)
        self._stop = False
        self._done: list[tuple[WriteBatch, Exception | None]] = []
        self.commits = 0  #: batches committed (or failed) on the thread

    @property
    def ready(self) -> bool:
        """Whether finished commits wait to be reported (cheap; any thread)."""
        return bool(self._done)

    def turn(self, endpoint: Endpoint, now: float) -> None:
        """One adapter loop turn: report what finished, hand over what the turn staged."""
        if self._done:
            self._report(endpoint, now)
        if not endpoint.owes_writes():
            return
        batches = endpoint.pending_writes(GROUP_MAX)
        if not batches:
            return
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._run, name="rmsg-durable-commit", daemon=True
            )
            self._thread.start()
        with self._lock:
            queued = self._queued
            for batch in batches:
                if not _joined(queued, batch):
                    queued.append(batch)
            if self._sleeping:
                self._work.notify()

    def flush(self, endpoint: Endpoint, now: float) -> None:
        """Wait for the thread to commit what it was given, report it, and commit
        everything owed now."""
        if not (self._busy or self._queued or self._done or endpoint.owes_writes()):
            return  # nothing durable going on: the common case, kept cheap
        with self._lock:
            while self._busy or self._queued:
                self._idle.wait()
        self._report(endpoint, now)
        sync_stores(endpoint, now)

    def close(self, endpoint: Endpoint, now: float) -> None:
        """Commit what is owed, stop the thread and close the stores (the node closes)."""
        self.flush(endpoint, now)
        if self._thread is not None:
            with self._lock:
                self._stop = True
                self._work.notify()
            self._thread.join(5.0)
        for store in endpoint.durable_stores():
            store.close()

    def _report(self, endpoint: Endpoint, now: float) -> None:
        with self._lock:
            done, self._done = self._done, []
        for batch, error in done:
            endpoint.writes_done(batch, now, error)
            if batch.destroy:
                batch.store.close()

    def _run(self) -> None:
        lock = self._lock
        while True:
            with lock:
                while not self._queued and not self._stop:
                    self._sleeping = True
                    self._work.wait()
                    self._sleeping = False
                if not self._queued:
                    return  # stopped, with nothing left
                batches, self._queued = self._queued, []
                self._busy = True
            results: list[tuple[WriteBatch, Exception | None]] = []
            for batch in batches:
                try:
                    _write(batch)
                except Exception as exc:  # any store failure refuses the batch's messages
                    results.append((batch, exc))
                else:
                    results.append((batch, None))
            with lock:
                self._done.extend(results)
                self.commits += len(results)
                self._busy = False
                if not self._queued:
                    self._idle.notify_all()
            self._wake()


def _joined(queued: list[WriteBatch], batch: WriteBatch) -> bool:
    """Add ``batch`` to the batch of the same mailbox log already waiting in ``queued``
    (so that they commit in one transaction), if that is the same as committing them
    one after the other; returns whether it did.

    Rows are never reused (new messages take rows above every other, messages put
    back rows below), so a merged batch's inserts-then-deletes equal the two
    batches' in turn. Not merged: a batch of messages put back (their count,
    ``returned``, is about its first inserts), a batch after a mailbox's
    destruction, or into a batch that already holds ``GROUP_MAX`` new messages."""
    if batch.returned:
        return False
    for waiting in reversed(queued):
        if waiting.log is batch.log:
            if waiting.destroy or len(waiting.inserts) >= GROUP_MAX:
                return False
            waiting.inserts.extend(batch.inserts)
            waiting.deletes.extend(batch.deletes)
            waiting.handoffs.extend(batch.handoffs)
            waiting.ids.extend(batch.ids)
            waiting.destroy = batch.destroy
            return True
    return False
