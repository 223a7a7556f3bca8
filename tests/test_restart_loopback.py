"""A receiver killed with SIGKILL and restarted on the same port: the sender sees a new
incarnation, nothing in flight is silently lost, and new messages flow."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest

from reliable import Config, Node, PeerRestarted, events

pytestmark = pytest.mark.loopback

RECEIVER = """
import sys
from reliable import Node
with Node(sys.argv[1]) as node:
    print("ready", node.incarnation, flush=True)
    while True:
        msg = node.receive()
        print(msg.data.decode(), flush=True)
"""


def start_receiver(port: int) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", RECEIVER, f"127.0.0.1:{port}"],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.startswith("ready"), line
    return proc


def _read_lines(proc: subprocess.Popen[str], count: int, timeout: float) -> list[str]:
    lines: list[str] = []
    assert proc.stdout is not None
    stdout = proc.stdout
    reader = threading.Thread(
        target=lambda: lines.extend(stdout.readline().strip() for _ in range(count)), daemon=True
    )
    reader.start()
    reader.join(timeout)
    return lines


def test_sigkilled_receiver_comes_back_as_a_new_incarnation(port: int) -> None:
    seen: list[events.Event] = []
    dest = f"127.0.0.1:{port}"
    first = start_receiver(port)
    second = None
    try:
        # Ride out the crash: by default the OS's "port unreachable" for the message sent
        # into the void fails it at once (tests/test_os_errors.py), before the restart.
        config = Config(peer_timeout=10.0, os_errors="ignore")
        with Node(config=config, on_event=seen.append) as a:
            a.send(dest, b"before the crash")
            old_incarnation = a.stats().peers[0].incarnation
            first.kill()  # SIGKILL: no CLOSE, no goodbye
            first.wait()
            in_flight = a.send_nowait(dest, b"sent into the void")
            time.sleep(0.2)
            second = start_receiver(port)
            # What was transmitted to the old life is reported, not silently dropped:
            assert in_flight.wait(10)
            assert isinstance(in_flight.exception(), PeerRestarted)
            # An application retries what failed with PeerRestarted; the retry reaches the new life.
            for attempt in range(3):
                try:
                    receipt = a.send(dest, b"after the restart", timeout=10)
                    break
                except PeerRestarted:
                    assert attempt < 2
            assert receipt.incarnation != old_incarnation
            restarts = [e for e in seen if isinstance(e, events.PeerRestarted)]
            assert [(r.old_incarnation, r.new_incarnation) for r in restarts] == [
                (old_incarnation, receipt.incarnation)
            ]
            assert _read_lines(second, 1, 5) == ["after the restart"]
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
