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
        # One message a datagram (each waits for its receipt) until the incoming side has
        # dropped one: bundling can pack a burst into so few datagrams that none is lost.
        sent = 0
        while bad.incoming_counters.dropped == 0 and sent < 500:
            b.send(a.address, b"y%d" % sent)
            sent += 1
        assert [a.receive(timeout=20).data for _ in range(sent)] == [
            b"y%d" % i for i in range(sent)
        ]
    assert bad.counters.dropped > 0 and bad.incoming_counters.dropped > 0


# ---------------------------------------------------------------- drop-in sockets


def test_a_plain_udp_client_runs_unchanged_on_a_faulty_socket() -> None:
    """connect/send/recv/recv_into/settimeout: what a UDP client does, with and without incoming."""
    server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    server.bind(("127.0.0.1", 0))
    server.settimeout(2)
    for incoming in (None, "delay 1ms"):
        with FaultySocket.bind(("127.0.0.1", 0), "delay 1ms", incoming=incoming) as sock:
            assert sock.gettimeout() is None and sock.getblocking()
            sock.settimeout(0.2)
            assert sock.gettimeout() == 0.2 and sock.type == socket.SOCK_DGRAM
            with pytest.raises(OSError, match="connect"):
                sock.send(b"nowhere")
            sock.connect(server.getsockname())
            assert sock.getpeername() == server.getsockname()
            assert sock.send(b"question") == len(b"question")
            data, client = server.recvfrom(100)
            assert data == b"question" and client == sock.getsockname()
            server.sendto(b"answer one", client)
            server.sendto(b"answer two", client)
            assert sock.recv(100) == b"answer one"
            buffer = bytearray(64)
            assert sock.recv_into(buffer) == len(b"answer two")
            assert bytes(buffer[:10]) == b"answer two"
            with pytest.raises(TimeoutError):  # no reply: times out, never hangs
                sock.recv(100)
            server.sendto(b"more", client)
            n, addr = sock.recvfrom_into(memoryview(buffer), 2)
            assert (n, bytes(buffer[:2]), addr) == (2, b"mo", server.getsockname())
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE) == socket.SOCK_DGRAM
    server.close()


def test_asyncio_datagram_endpoint_through_netem() -> None:
    import asyncio

    from netem.aio import create_faulty_datagram_endpoint

    class Collect(asyncio.DatagramProtocol):
        def __init__(self) -> None:
            self.got: list[bytes] = []
            self.transport: asyncio.BaseTransport | None = None

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = transport

        def datagram_received(self, data: bytes, addr: object) -> None:
            self.got.append(data)

    async def main() -> tuple[list[bytes], list[bytes], int, int]:
        loop = asyncio.get_running_loop()
        server_t, server = await loop.create_datagram_endpoint(Collect, local_addr=("127.0.0.1", 0))
        target = server_t.get_extra_info("sockname")
        transport, client = await create_faulty_datagram_endpoint(
            Collect, "delay 20ms", incoming="loss 100%", seed=1, local_addr=("127.0.0.1", 0)
        )
        assert client.transport is transport  # the protocol got the faulty transport
        transport.sendto(b"late", target)
        await asyncio.sleep(0.005)
        early = list(server.got)  # still held by the delay
        with transport.faults("loss 100%", direction="up"):
            transport.sendto(b"lost", target)
        server_t.sendto(b"reply", transport.get_extra_info("sockname"))  # type: ignore[attr-defined]
        await asyncio.sleep(0.1)
        transport.close()
        server_t.close()
        return (
            early,
            server.got + client.got,
            transport.counters.dropped,
            (transport.incoming_counters.dropped),
        )

    early, got, dropped_out, dropped_in = asyncio.run(main())
    assert early == [] and got == [b"late"]
    assert dropped_out == 1 and dropped_in == 1
