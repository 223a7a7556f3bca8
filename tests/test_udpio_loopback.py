"""UDP GSO and GRO (reliable/udpio.py) on loopback, and their fallback forced."""

from __future__ import annotations

import select
import socket
import sys

import pytest

from reliable import Config, Node, udpio
from reliable.driver import drain_socket, open_socket, send_all

pytestmark = [
    pytest.mark.loopback,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="UDP GSO/GRO are Linux's"),
]


def _pair(offload: bool = True) -> tuple[socket.socket, socket.socket]:
    return (
        open_socket("127.0.0.1:0", offload=offload),
        open_socket("127.0.0.1:0", offload=offload),
    )


def _read(sock: socket.socket, want: int) -> list[bytes]:
    """Read until ``want`` datagrams came (bounded: 2 s, 200 wake-ups)."""
    got: list[bytes] = []
    for _ in range(200):
        if len(got) >= want:
            break
        ready, _, _ = select.select([sock], [], [], 2.0)
        if not ready:
            break
        got.extend(d for d, _ in drain_socket(sock, limit=1000))
    return got


def _datagrams() -> list[bytes]:
    # two runs (cut by a shorter datagram), and one larger than the run before it
    sizes = [1400] * 30 + [700] + [1200] * 50 + [1472]
    return [bytes([i % 251]) * n for i, n in enumerate(sizes)]


def test_runs_are_equal_sizes_to_one_address_up_to_the_kernel_limits() -> None:
    a, b = ("127.0.0.1", 1), ("127.0.0.1", 2)
    out = [(b"x" * 10, a)] * 3 + [(b"y" * 4, a)] + [(b"z" * 10, a), (b"z" * 10, b)]
    assert udpio.run_end(out, 0) == 4  # the shorter one ends the run, included
    assert udpio.run_end(out, 4) == 5  # another address
    many = [(b"q" * 100, a)] * 200
    assert udpio.run_end(many, 0) == udpio.GSO_MAX_SEGMENTS
    big = [(b"q" * 20_000, a)] * 10
    assert udpio.run_end(big, 0) == udpio.GSO_MAX_BYTES // 20_000


def test_gso_sends_a_run_in_one_call_and_gro_reads_split_it_again() -> None:
    tx, rx = _pair()
    try:
        offload_tx, offload_rx = udpio.offload_of(tx), udpio.offload_of(rx)
        if offload_tx is None or not offload_tx.gso or offload_rx is None or not offload_rx.gro:
            pytest.skip("this kernel has no UDP GSO/GRO")
        out = [(d, rx.getsockname()) for d in _datagrams()]
        assert send_all(tx, out, []) == len(out)
        assert offload_tx.gso_sends >= 2  # 82 datagrams in a handful of sendmsg calls
        assert _read(rx, len(out)) == [d for d, _ in out]  # each datagram, in order
        assert offload_rx.gro_reads >= 1
    finally:
        tx.close()
        rx.close()


def test_without_offload_the_same_datagrams_arrive(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RMSG_UDP_OFFLOAD", "0")
    tx, rx = _pair()
    try:
        assert udpio.offload_of(tx) is None and udpio.offload_of(rx) is None
        out = [(d, rx.getsockname()) for d in _datagrams()]
        assert send_all(tx, out, []) == len(out)
        assert _read(rx, len(out)) == [d for d, _ in out]
    finally:
        tx.close()
        rx.close()


def test_a_gso_send_the_kernel_refuses_turns_gso_off_and_falls_back() -> None:
    tx, rx = _pair()
    try:
        offload = udpio.offload_of(tx)
        if offload is None or not offload.gso:
            pytest.skip("this kernel has no UDP GSO")
        dest = rx.getsockname()
        # More segments than the kernel takes in one send: EINVAL, so GSO goes off.
        too_many = [b"s" * 10] * 1000  # (the kernel takes 64, or 128 since Linux 6.x)
        assert udpio.send_segments(tx, too_many, dest) is False
        assert offload.gso is False
        out = [(d, dest) for d in _datagrams()]
        assert send_all(tx, out, []) == len(out)  # one by one now
        assert offload.gso_sends == 0
        assert _read(rx, len(out)) == [d for d, _ in out]
    finally:
        tx.close()
        rx.close()


def test_a_wrapper_or_foreign_socket_gets_no_offload() -> None:
    s6 = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        assert udpio.enable(s6) is None
        assert udpio.enable(object()) is None
        assert udpio.offload_of(object()) is None
    finally:
        s6.close()


@pytest.mark.parametrize("offload", ["1", "0"])
def test_nodes_move_a_big_message_in_small_datagrams_with_and_without_offload(
    monkeypatch: pytest.MonkeyPatch, offload: str
) -> None:
    monkeypatch.setenv("RMSG_UDP_OFFLOAD", offload)
    config = Config(loopback_datagram_size=None)  # 1200-byte datagrams, as on a network
    data = bytes(range(256)) * 4096  # 1 MiB: about 900 datagrams
    with Node(config=config) as a, Node(config=config) as b:
        a.send(b.address, data, timeout=20)
        assert b.receive(timeout=20).data == data
        sent, got = udpio.offload_of(a._sock), udpio.offload_of(b._sock)
        if offload == "0":
            assert sent is None and got is None
        elif sent is not None and sent.gso:
            assert sent.gso_sends > 0
