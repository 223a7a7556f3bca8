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


@pytest.mark.parametrize("seed", [1, 2])
def test_accepted_sends_survive_sigkill_and_are_received_exactly_once(
    tmp_path: Path, seed: int
) -> None:
    rng = random.Random(seed)
    path = tmp_path / "outbox.db"
    accepted: set[int] = set()
    with Node() as server:
        box = server.create_mailbox("jobs")
        dest = f"127.0.0.1:{server.address[1]}/jobs"
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
        proc = _start(path, "finish", dest)
        assert proc.stdout is not None
        assert proc.stdout.read().split() == ["done"]
        assert proc.wait(30) == 0
        received: Counter[int] = Counter()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            got = box.receive_many(1000, timeout=0.5)
            if not got and accepted <= set(received):
                break
            received.update(int(m.data) for m in got)
        assert accepted, "the sender accepted nothing before the kills"
        twice = sorted(n for n, c in received.items() if c > 1)
        assert not twice, f"received more than once: {twice[:10]}"
        lost = sorted(accepted - set(received))
        assert not lost, f"accepted but never received: {lost[:10]} of {len(accepted)}"
        stats = server.stats().dropped
    # The kills did leave something to send again (most seeds recognise a re-send too).
    print(
        f"accepted {len(accepted)}, received {len(received)}, re-sends caught "
        f"{stats.get('duplicate.outbox', 0)}"
    )
