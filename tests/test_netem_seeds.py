"""One seed, one story: the same seed gives the same decisions on every carrier."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest

from netem import SimNetwork
from netem.aio import create_faulty_datagram_endpoint
from netem.proxy import UdpProxy
from netem.pytest_plugin import replay_text
from netem.scenario import Link
from netem.seeds import stream_seed
from netem.socket import FaultySocket

SEED = 20240611
SPEC = "loss 30% duplicate 10% corrupt 10%"  # no delay: arrival order is send order
PAYLOADS = [b"datagram %03d" % i for i in range(120)]


def predicted(direction: str, client: int = 0) -> list[bytes]:
    """What the pure model lets through, in order, for stream ``(direction, client)``."""
    link = Link(SPEC, seed=stream_seed(SEED, direction, client))
    return [data for p in PAYLOADS for _, data in link.apply(p, 0.0)]


def collect(sock: socket.socket, until: int, timeout: float = 3.0) -> list[bytes]:
    sock.settimeout(0.2)
    got: list[bytes] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            got.append(sock.recv(65535))
        except TimeoutError:
            if len(got) >= until:
                break
    return got


def udp() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    return sock


def test_the_streams_differ_by_direction_client_and_seed() -> None:
    seeds = {stream_seed(SEED, d, c) for d in ("up", "down") for c in range(3)}
    assert len(seeds) == 6 and stream_seed(SEED + 1, "up") not in seeds
    assert stream_seed(None, "up") is None
    assert predicted("up") != predicted("down")


@pytest.mark.loopback
def test_socket_wrapper_follows_the_streams() -> None:
    sink = udp()
    sock = FaultySocket(udp(), SPEC, incoming=SPEC, seed=SEED)
    for p in PAYLOADS:
        sock.sendto(p, sink.getsockname())
        time.sleep(0.0002)
    assert collect(sink, len(predicted("up"))) == predicted("up")
    for p in PAYLOADS:
        sink.sendto(p, sock.getsockname())
        time.sleep(0.0002)
    assert collect(sock, len(predicted("down"))) == predicted("down")  # type: ignore[arg-type]
    sock.close()
    sink.close()


@pytest.mark.loopback
def test_proxy_follows_the_streams() -> None:
    server, client = udp(), udp()
    with UdpProxy("127.0.0.1:0", server.getsockname(), up=SPEC, down=SPEC, seed=SEED) as proxy:
        for p in PAYLOADS:
            client.sendto(p, proxy.address)
            time.sleep(0.0002)
        assert collect(server, len(predicted("up"))) == predicted("up")
        upstream = proxy.client_counters()
        assert len(upstream) == 1
        # the server answers the proxy's upstream port for this client
        client.sendto(b"where are you", proxy.address)
        source = None
        server.settimeout(2)
        deadline = time.monotonic() + 3
        while source is None and time.monotonic() < deadline:
            data, addr = server.recvfrom(100)
            source = addr if data.startswith(b"where") else None
        assert source is not None, "the probe was lost: pick a payload the stream keeps"
        for p in PAYLOADS:
            server.sendto(p, source)
            time.sleep(0.0002)
        assert collect(client, len(predicted("down"))) == predicted("down")
    server.close()
    client.close()


@pytest.mark.loopback
def test_asyncio_wrapper_follows_the_up_stream() -> None:
    sink = udp()

    async def main() -> None:
        transport, _ = await create_faulty_datagram_endpoint(
            asyncio.DatagramProtocol, SPEC, seed=SEED, local_addr=("127.0.0.1", 0)
        )
        for p in PAYLOADS:
            transport.sendto(p, sink.getsockname())
            await asyncio.sleep(0.0002)
        transport.close()

    asyncio.run(main())
    assert collect(sink, len(predicted("up"))) == predicted("up")
    sink.close()


class Host:
    """A sans-I/O host that sends what it is told and keeps what it receives."""

    def __init__(self) -> None:
        self.outbox: list[tuple[bytes, str]] = []
        self.got: list[bytes] = []

    def receive_datagram(self, data: bytes, addr: object, now: float) -> None:
        self.got.append(data)

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, str]]:
        out, self.outbox = self.outbox, []
        return out

    def get_timer(self) -> float | None:
        return None

    def handle_timer(self, now: float) -> None:
        pass


def test_simulator_follows_the_streams() -> None:
    """Pair k is the k-th pair of hosts to exchange a datagram; *up* is its first sender's way."""
    net = SimNetwork(seed=SEED, default=SPEC)
    server, first, second = Host(), Host(), Host()
    for name, host in (("server", server), ("first", first), ("second", second)):
        net.add_host(name, host)
    for i, p in enumerate(PAYLOADS):  # one datagram per millisecond: arrival order is send order
        net.call_at(i * 0.001, lambda p=p: first.outbox.append((p, "server")), host="first")
    net.run(until=1.0)
    assert server.got == predicted("up", 0)
    for i, p in enumerate(PAYLOADS):  # the second client, then the server answering both
        net.call_at(1 + i * 0.001, lambda p=p: second.outbox.append((p, "server")), host="second")
        net.call_at(2 + i * 0.001, lambda p=p: server.outbox.append((p, "first")), host="server")
        net.call_at(3 + i * 0.001, lambda p=p: server.outbox.append((p, "second")), host="server")
    server.got = []
    net.run(until=4.0)
    assert server.got == predicted("up", 1)
    assert first.got == predicted("down", 0)
    assert second.got == predicted("down", 1)


def test_the_failure_report_says_how_to_replay_on_each_carrier() -> None:
    text = replay_text(77, "tests/test_x.py::test_y")
    for needle in (
        "--netem-seed 77",
        "rmsg netem --seed 77",
        "UdpProxy(..., seed=77)",
        "FaultySocket(sock, spec, seed=77, client=k)",
        "create_faulty_datagram_endpoint(factory, spec, seed=77)",
        "SimNetwork(seed=77)",
    ):
        assert needle in text
