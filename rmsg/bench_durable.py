"""``rmsg bench --durable``: how fast a durable mailbox accepts messages, beside
SQLite's own grouped inserts on the same disk and a volatile mailbox, in one run.

Three figures per round, rounds interleaved so drift on a shared machine hits
each alike (the report gives medians):

* **durable**: a sender node keeps ``window`` 1 KiB messages unconfirmed
  (``send_nowait``) to a durable mailbox on a node in another process, over
  loopback, for ``duration`` seconds; the rate is receipts per second. A
  receipt means the message is committed (docs/mailboxes.md), so this is the
  rate at which messages become durable. The receiving node reports how
  many commits it made, hence rows per commit.
* **sqlite**: the ceiling for this design: the standard library's sqlite3
  inserting rows of the same size into the same schema, on the same disk,
  with the same pragmas (WAL, exclusive locking, the sync policy's
  ``synchronous``), ``rows`` per transaction, one process, nothing else.
  For ``sync="message"`` a transaction holds one row.
* **volatile**: the same sender to a mailbox without ``durable=``.
* **local**: the *local* accept rate: ``node.post`` into a durable mailbox
  of the bench's own node (no network), counted when committed (a durable
  mailbox's message enters its queue only once its commit is done, so the
  queue's length is the committed count). It shows what the durable path
  itself costs, without the transport the network figure also measures.

The **durable** figure is the *network* accept rate. Both are printed,
labelled as such.

The target (issue 19) is durable >= 0.5x sqlite. Loopback only; every loop is
bounded in count and in time.
"""

from __future__ import annotations

import os
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["DurableFigures", "format_durable_report", "run_durable_bench", "sqlite_rate"]

SIZE = 1024  #: bytes per message (and per stored row's data)
MAX_MESSAGES = 2_000_000  # bound on every loop, on top of its time bound

_HOST = r"""
import sys
from reliable import Node
path, sync = sys.argv[1], sys.argv[2]
node = Node("127.0.0.1:0")
if path == "-":
    box = node.create_mailbox("bench")
else:
    box = node.create_mailbox("bench", durable=path, sync=sync)
print(node.address[1], flush=True)
sys.stdin.read()  # until the bench is done with us
stores = node._endpoint.durable_stores()  # the bench's own peek at the store's counter
print(box.stats().messages, sum(store.commits for store in stores), flush=True)
node.close()
"""


@dataclass(frozen=True, slots=True)
class DurableFigures:
    """Medians over rounds (messages per second), and what one commit held."""

    sync: str
    rows: int  #: rows per SQLite transaction in the ceiling measurement
    durable: float
    sqlite: float
    volatile: float
    local: float  #: node.post into a durable mailbox, committed (msgs/s)
    rows_per_commit: float  #: durable: messages stored per commit, on average
    rounds: int
    directory: str

    @property
    def ratio(self) -> float:
        return self.durable / self.sqlite if self.sqlite else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ratio": self.ratio}


def sqlite_rate(directory: str, sync: str, rows: int, duration: float) -> float:
    """Rows/s the standard library's sqlite3 inserts on ``directory``'s disk:
    ``rows`` rows of :data:`SIZE` bytes per transaction, the store's schema and pragmas."""
    from reliable.store import _SCHEMA

    fd, path = tempfile.mkstemp(suffix=".db", dir=directory)
    os.close(fd)
    os.unlink(path)
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA locking_mode=EXCLUSIVE")
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={'NORMAL' if sync == 'os' else 'FULL'}")
        for statement in _SCHEMA.split(";"):
            if statement.strip():
                conn.execute(statement)
        per = 1 if sync == "message" else rows
        data = b"\x5a" * SIZE
        row = 0
        started = time.monotonic()
        end = started + duration
        while row < MAX_MESSAGES and time.monotonic() < end:
            batch = [(row + i, 0, 0, '["127.0.0.1", 1]', 1, row + i, data) for i in range(per)]
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany("INSERT INTO messages VALUES (?, ?, ?, ?, ?, ?, ?)", batch)
            conn.execute("COMMIT")
            row += per
        return row / (time.monotonic() - started)
    finally:
        conn.close()
        for suffix in ("", "-wal", "-shm"):
            if os.path.exists(path + suffix):
                os.unlink(path + suffix)


#: Most posts a local round keeps uncommitted (bounds the memory it uses).
LOCAL_WINDOW = 8192
#: Most posts one local round makes (1 KiB each: bounds the file and the mailbox memory).
LOCAL_MAX = 150_000


def local_rate(path: str, sync: str, duration: float) -> float:
    """Posts/s into a durable mailbox at ``path`` of a node in this process, counted
    once committed: the durable path without the transport."""
    from reliable import Node

    payload = b"\x5a" * SIZE
    with Node() as node:
        box = node.create_mailbox("bench", durable=path, sync=sync)
        posted = 0
        started = time.monotonic()
        end = started + duration
        while posted < LOCAL_MAX and time.monotonic() < end:
            if posted - box.stats().messages >= LOCAL_WINDOW:
                time.sleep(0.0005)  # the commit thread is behind: let it catch up
                continue
            for _ in range(256):
                node.post("bench", payload)
            posted += 256
        limit = time.monotonic() + 60
        while box.stats().messages < posted and time.monotonic() < limit:
            time.sleep(0.0005)
        committed = box.stats().messages
        elapsed = time.monotonic() - started
        box.delete()  # empties the file: the next round starts alike
    return committed / elapsed


def _node_rate(path: str, sync: str, duration: float, window: int) -> tuple[float, float]:
    """Receipts/s from a sender to a mailbox in another process (``path`` "-":
    volatile); and the host's rows per commit (0 when volatile)."""
    from reliable import Node

    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOST, path, sync],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert proc.stdin is not None and proc.stdout is not None
    try:
        port = int(proc.stdout.readline())
        payload = b"\x5a" * SIZE
        with Node() as node:
            dest = f"127.0.0.1:{port}/bench"
            node.send(dest, payload, timeout=10)  # warm-up: the session is up
            outstanding: deque[Any] = deque()
            sent = 0
            started = time.monotonic()
            end = started + duration
            while sent < MAX_MESSAGES and time.monotonic() < end:
                if len(outstanding) >= window:
                    outstanding.popleft().result(60)
                outstanding.append(node.send_nowait(dest, payload))
                sent += 1
            for handle in outstanding:
                handle.result(60)
            elapsed = time.monotonic() - started
        out, _ = proc.communicate("", timeout=60)
        stored, commits = (int(x) for x in out.split())
        return sent / elapsed, (stored / commits if commits else 0.0)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def run_durable_bench(
    *,
    sync: str = "grouped",
    rows: int = 100,
    duration: float = 1.0,
    rounds: int = 3,
    window: int = 256,
    directory: str | None = None,
    progress: Callable[[str], None] = lambda _text: None,
) -> DurableFigures:
    """Measure ``rounds`` interleaved rounds of the three figures (module docstring)."""
    parent = directory or os.getcwd()
    durable: list[float] = []
    grouped: list[float] = []
    sqlite: list[float] = []
    volatile: list[float] = []
    local: list[float] = []
    with tempfile.TemporaryDirectory(dir=parent, prefix="rmsg-bench-") as scratch:
        for i in range(rounds):
            progress(f"round {i + 1}/{rounds}: durable ({sync})")
            path = os.path.join(scratch, f"bench-{i}.db")
            rate, per_commit = _node_rate(path, sync, duration, window)
            durable.append(rate)
            grouped.append(per_commit)
            progress(f"round {i + 1}/{rounds}: sqlite, {rows} rows per transaction")
            sqlite.append(sqlite_rate(scratch, sync, rows, duration))
            progress(f"round {i + 1}/{rounds}: volatile")
            volatile.append(_node_rate("-", sync, duration, window)[0])
            progress(f"round {i + 1}/{rounds}: local posts ({sync})")
            local.append(local_rate(os.path.join(scratch, f"local-{i}.db"), sync, duration))
    return DurableFigures(
        sync=sync,
        rows=1 if sync == "message" else rows,
        durable=statistics.median(durable),
        sqlite=statistics.median(sqlite),
        volatile=statistics.median(volatile),
        local=statistics.median(local),
        rows_per_commit=statistics.median(grouped),
        rounds=rounds,
        directory=parent,
    )


def format_durable_report(fig: DurableFigures) -> str:
    lines = [
        f"durable mailbox accept rate, 1 KiB messages, sync={fig.sync}, disk of {fig.directory}",
        f"(medians of {fig.rounds} interleaved round{'s' if fig.rounds != 1 else ''})",
        "",
        f"  {'what':<54} {'msgs/s':>10} {'x sqlite':>9}",
        f"  {'network accept rate (remote sender; receipt = committed)':<54} "
        f"{fig.durable:>10,.0f} {fig.ratio:>9.2f}",
        f"  {'local accept rate (node.post, counted once committed)':<54} "
        f"{fig.local:>10,.0f} {(fig.local / fig.sqlite if fig.sqlite else 0):>9.2f}",
        f"  {f'sqlite3 inserts, {fig.rows} rows per transaction (ceiling)':<54} "
        f"{fig.sqlite:>10,.0f} {1.0:>9.2f}",
        f"  {'volatile mailbox, network (no durable=)':<54} {fig.volatile:>10,.0f} "
        f"{(fig.volatile / fig.sqlite if fig.sqlite else 0):>9.2f}",
        "",
        f"  network: {fig.rows_per_commit:.1f} messages per commit on average; "
        f"target >= 0.5x sqlite: network {'met' if fig.ratio >= 0.5 else 'not met'}, "
        f"local {'met' if fig.local >= 0.5 * fig.sqlite else 'not met'}",
    ]
    return "\n".join(lines)
