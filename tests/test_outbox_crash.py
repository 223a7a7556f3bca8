"""Durable outboxes survive SIGKILL of the sender: real processes, a real SQLite file,
killed at random points (issue 19).

The invariant, checked after several kills and restarts on the same outbox:
every message whose send was accepted (the child printed its number once
``send_nowait`` returned, i.e. once it was committed to the outbox) is
received, and no message is received twice — though the restarted sender has
a new incarnation, so the transport's duplicate filter does not know its
re-sends: the receiver's memory of outbox ids does. (A message stored in the
instant before the kill, before the child could print it, may be received
too: it was accepted, the log just did not hear of it.)
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from reliable import Node

pytestmark = pytest.mark.loopback
CHILD = Path(__file__).with_name("outbox_child.py")
ROOT = Path(__file__).resolve().parent.parent


def _start(path: Path, mode: str, dest: str, first: int = 0) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(
        [sys.executable, str(CHILD), str(path), mode, dest, str(first)],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.startswith("replaying"), f"child failed to start: {line!r}"
    return proc


@pytest.mark.parametrize(
    ("seed", "receiver"), [(1, "volatile"), (2, "volatile"), (3, "durable, restarted")]
)
def test_accepted_sends_survive_sigkill_and_are_received_exactly_once(
    tmp_path: Path, seed: int, receiver: str
) -> None:
    """With ``durable, restarted`` the receiving node keeps its mailbox in SQLite and is
    closed and started again (same file, same port) after every kill: its memory of
    outbox ids then comes back from the store, not from the living process."""
    rng = random.Random(seed)
    path = tmp_path / "outbox.db"
    store = str(tmp_path / "mailbox.db") if receiver != "volatile" else None
    accepted: set[int] = set()
    received: Counter[int] = Counter()
    caught = 0
    server = Node()
    port = server.address[1]
    box = server.create_mailbox("jobs", durable=store)
    dest = f"127.0.0.1:{port}/jobs"
    try:
        first = 0
        for _round in range(4):
            proc = _start(path, "send", dest, first)
            time.sleep(rng.uniform(0.05, 0.5))
            proc.send_signal(signal.SIGKILL)
            assert proc.stdout is not None
            out = proc.stdout.read()
            proc.wait(10)
            numbers = [int(x) for x in out.split()]
            accepted.update(numbers)
            first = max([first, *numbers]) + 10  # room for any stored, unprinted ones
            if store is not None:  # the receiver restarts too, on its file
                received.update(int(m.data) for m in box.receive_many(100_000, timeout=0))
                caught += server.stats().dropped.get("duplicate.outbox", 0)
                server.close()
                server = Node(f"127.0.0.1:{port}")
                box = server.create_mailbox("jobs", durable=store)
        proc = _start(path, "finish", dest)
        assert proc.stdout is not None
        assert proc.stdout.read().split() == ["done"]
        assert proc.wait(30) == 0
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            got = box.receive_many(1000, timeout=0.5)
            if not got and accepted <= set(received):
                break
            received.update(int(m.data) for m in got)
        caught += server.stats().dropped.get("duplicate.outbox", 0)
    finally:
        server.close()
    assert accepted, "the sender accepted nothing before the kills"
    twice = sorted(n for n, c in received.items() if c > 1)
    assert not twice, f"received more than once: {twice[:10]}"
    lost = sorted(accepted - set(received))
    assert not lost, f"accepted but never received: {lost[:10]} of {len(accepted)}"
    print(f"accepted {len(accepted)}, received {len(received)}, re-sends caught {caught}")
