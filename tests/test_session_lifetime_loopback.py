"""Senders SIGKILLed in the middle of big messages, over real UDP on 127.0.0.1.

Before sessions could expire, a 12 MiB partial message stayed reserved for
good, and a handful of them locked live peers' large messages out.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from reliable import Config, Node, PeerUnreachable

from .conftest import free_port

pytestmark = pytest.mark.loopback

# A sender that starts a big message and blocks; the test kills it mid-transfer. Its
# datagrams are cut for a real path (1200 bytes, not loopback's 64 KiB), so the 12 MiB
# take some 10,000 datagrams: at loopback's size the whole message could arrive between
# the test seeing it under way and the kill, leaving an idle session, not a dead one.
SENDER = """
import sys
from reliable import Config, Node
node = Node(config=Config(peer_timeout=60.0, loopback_datagram_size=None))
print("ready", flush=True)
node.send_nowait(sys.argv[1], bytes(int(sys.argv[2])))
sys.stdin.read()
"""

CONFIG = Config(peer_timeout=1.0, receive_memory=64 << 20)


def _wait(predicate: object, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return True
        time.sleep(0.02)
    return False


def _start_sender(dest: str, size: int) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", SENDER, dest, str(size)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stdout.readline().startswith("ready")
    return proc


def test_memory_of_senders_killed_mid_message_comes_back_and_live_peers_get_through() -> None:
    with Node(config=CONFIG) as receiver:
        dest = "{}:{}".format(*receiver.address)
        senders = []
        try:
            seen: set[object] = set()

            def new_holder() -> bool:
                holders = {p.address for p in receiver.stats().peers if p.held_bytes} - seen
                seen.update(holders)
                return bool(holders)

            for _ in range(6):
                proc = _start_sender(dest, 12 << 20)
                senders.append(proc)
                # Kill it once its message is under way here (memory reserved for it).
                assert _wait(new_holder, 10.0)
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(5)
        finally:
            for proc in senders:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait(5)
        # Each dead sender's session and reservation go within peer_timeout and a probe.
        assert _wait(lambda: receiver.stats().receive_bytes == 0, 10.0)
        stats = receiver.stats()
        assert stats.peers == ()
        assert stats.sessions_dropped == {"unreachable": 6}
        # A live peer's 8 MiB message gets through, and fast.
        with Node(config=CONFIG) as live:
            receipt = live.send(dest, bytes(8 << 20), timeout=20)
            assert receipt.size == 8 << 20
        assert len(receiver.receive(timeout=5).data) == 8 << 20


def test_a_producer_started_before_its_consumer_delivers_once_the_consumer_is_up() -> None:
    """ZeroMQ users start either side first; the closed port's ICMP refusals are ridden out."""
    port = free_port()
    with Node(config=Config(wait_for_peer=True)) as producer:
        handle = producer.send_nowait(f"127.0.0.1:{port}", b"first", timeout=15)
        time.sleep(1.5)  # nobody there yet: the kernel answers "port unreachable"
        assert not handle.done()
        assert producer.stats().peers[0].os_errors > 0
        with Node(f"127.0.0.1:{port}") as consumer:
            assert handle.result(timeout=10).size == 5
            assert consumer.receive(timeout=5).data == b"first"


def test_by_default_a_closed_port_fails_the_send_at_once() -> None:
    with Node() as producer, pytest.raises(PeerUnreachable, match="refused"):
        producer.send(f"127.0.0.1:{free_port()}", b"x", timeout=15)
