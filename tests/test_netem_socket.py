"""The in-process carrier: FaultySocket impairs sends, and receives when asked."""

from __future__ import annotations

import socket
import time

import pytest

from netem.socket import FaultySocket
from reliable import Config, Node
from reliable.driver import open_socket

pytestmark = pytest.mark.loopback


def plain() -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    s.settimeout(2)
    return s


def test_outgoing_delay_and_loss() -> None:
    sink = plain()
    sock = FaultySocket(open_socket("127.0.0.1:0"), "delay 40ms")
    start = time.monotonic()
    sock.sendto(b"late", sink.getsockname())
    assert sink.recvfrom(100)[0] == b"late"
    assert time.monotonic() - start >= 0.035
    lossy = FaultySocket(open_socket("127.0.0.1:0"), "loss 100%")
    lossy.sendto(b"gone", sink.getsockname())
    assert lossy.counters.dropped == 1
    for s in (sock, lossy):
        s.close()
    sink.close()


def test_incoming_delay_keeps_the_source_address() -> None:
    sock = FaultySocket(open_socket("127.0.0.1:0"), "", incoming="delay 50ms")
    sock.setblocking(True)
    sender = plain()
    start = time.monotonic()
    sender.sendto(b"hi", sock.getsockname())
    data, addr = sock.recvfrom(100)
    assert (data, addr) == (b"hi", sender.getsockname())
    assert time.monotonic() - start >= 0.045
    sock.close()
    sender.close()


def test_incoming_loss_and_duplication_are_counted() -> None:
    sock = FaultySocket(open_socket("127.0.0.1:0"), "", incoming="loss 50% duplicate 20%", seed=3)
    sock.setblocking(True)
    sender = plain()
    for i in range(200):
        sender.sendto(b"%d" % i, sock.getsockname())
    time.sleep(0.3)
    sock.setblocking(False)
    got = []
    while True:
        try:
            got.append(sock.recvfrom(100)[0])
        except BlockingIOError:
            break
    c = sock.incoming_counters
    assert c.seen == 200 and len(got) == c.delivered
    assert 60 < len(got) < 160 and c.duplicated > 0
    sock.close()
    sender.close()


def test_one_wrapped_socket_makes_both_directions_bad_for_a_node() -> None:
    config = Config(peer_timeout=20.0, initial_rto=0.2)
    bad = FaultySocket(
        open_socket("127.0.0.1:0"), "loss 20% delay 1ms", incoming="loss 20% duplicate 5%", seed=4
    )
    with Node(sock=bad, config=config) as a, Node(config=config) as b:
        handles = [a.send_nowait(b.address, b"x%d" % i) for i in range(300)]
        assert [b.receive(timeout=20).data for _ in handles] == [b"x%d" % i for i in range(300)]
        for i in range(100):
            b.send_nowait(a.address, b"y%d" % i)
        assert [a.receive(timeout=20).data for _ in range(100)] == [b"y%d" % i for i in range(100)]
    assert bad.counters.dropped > 0 and bad.incoming_counters.dropped > 0
