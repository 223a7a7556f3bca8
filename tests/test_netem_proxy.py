"""The netem proxy end to end: any UDP app, NAT behaviour, captures, rmsg through it."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from scapy.layers.inet import UDP
from scapy.utils import rdpcap

from netem.proxy import UdpProxy
from reliable import Config, Node

from .conftest import free_port

pytestmark = pytest.mark.loopback


class EchoServer:
    """A plain UDP echo server (not rmsg) that remembers who wrote to it."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sources: list[tuple[str, int]] = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    @property
    def address(self) -> tuple[str, int]:
        return self.sock.getsockname()  # type: ignore[no-any-return]

    def _run(self) -> None:
        while True:
            try:
                data, addr = self.sock.recvfrom(65535)
            except OSError:
                return
            self.sources.append(addr)
            self.sock.sendto(data, addr)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def echo() -> Iterator[EchoServer]:
    server = EchoServer()
    yield server
    server.close()


def ping(target: tuple[str, int], count: int, *, wait: float = 1.0) -> list[bytes]:
    """Send ``count`` datagrams to ``target`` and collect the echoes (read concurrently)."""
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client.bind(("127.0.0.1", 0))
    client.settimeout(0.1)
    got: list[bytes] = []
    done = threading.Event()

    def read() -> None:
        deadline = None
        while deadline is None or time.monotonic() < deadline:
            if done.is_set() and deadline is None:
                deadline = time.monotonic() + wait
            try:
                got.append(client.recvfrom(65535)[0])
            except TimeoutError:
                if done.is_set() and len(got) >= count:
                    return

    reader = threading.Thread(target=read)
    reader.start()
    for i in range(count):
        client.sendto(b"ping %d" % i, target)
        time.sleep(0.0002)
    done.set()
    reader.join()
    client.close()
    return got


def test_clean_proxy_relays_a_plain_udp_echo(echo: EchoServer) -> None:
    with UdpProxy("127.0.0.1:0", echo.address) as proxy:
        got = ping(proxy.address, 200)
        stats = proxy.snapshot()
    assert sorted(got) == sorted(b"ping %d" % i for i in range(200))
    assert stats.up_received == stats.up_sent == 200 and stats.down_sent == 200


def test_impaired_proxy_drops_both_ways_at_about_the_rate_asked(echo: EchoServer) -> None:
    with UdpProxy("127.0.0.1:0", echo.address, up="loss 20%", down="loss 20%", seed=9) as proxy:
        got = ping(proxy.address, 500)
        stats = proxy.snapshot()
    assert stats.up.seen == 500 and stats.down.seen == stats.up_sent
    assert len(got) == stats.down_sent
    assert 0.5 < len(got) / 500 < 0.76  # 0.8 * 0.8 = 0.64 expected


def test_each_client_gets_its_own_upstream_port(echo: EchoServer) -> None:
    with UdpProxy("127.0.0.1:0", echo.address) as proxy:
        ping(proxy.address, 3)
        ping(proxy.address, 3)
        assert proxy.snapshot().clients == 2
    assert len(set(echo.sources)) == 2


def test_nat_rebinding_moves_a_client_to_a_new_port(echo: EchoServer) -> None:
    with UdpProxy("127.0.0.1:0", echo.address, rebind_every=0.2) as proxy:
        client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        client.settimeout(0.3)
        answered = 0
        for _ in range(8):
            client.sendto(b"hello", proxy.address)
            try:  # a reply in flight to the old port is lost, as behind a real NAT
                answered += client.recvfrom(100)[0] == b"hello"
            except TimeoutError:
                pass
            time.sleep(0.15)
        client.close()
        assert proxy.snapshot().rebinds >= 2
    assert answered >= 4
    assert len(set(echo.sources)) >= 3  # the server saw one client from several ports


def test_captures_before_and_after_impairment_read_back_in_scapy(
    echo: EchoServer, tmp_path: Path
) -> None:
    before, after = tmp_path / "in.pcap", tmp_path / "out.pcap"
    with UdpProxy(
        "127.0.0.1:0", echo.address, up="loss 50%", seed=4, pcap_in=before, pcap_out=after
    ) as proxy:
        ping(proxy.address, 100)
        stats = proxy.snapshot()
    captured_in, captured_out = rdpcap(str(before)), rdpcap(str(after))
    assert len(captured_in) == stats.up_received + stats.down_received
    assert len(captured_out) == stats.up_sent + stats.down_sent
    assert stats.up_sent < stats.up_received  # the loss happened between the two captures
    payloads = {bytes(p[UDP].payload) for p in captured_in}
    assert b"ping 0" in payloads and b"ping 99" in payloads


def test_rmsg_nodes_talk_exactly_once_through_a_lossy_proxy() -> None:
    """Replies go to the datagram's source, so rmsg works behind a NAT-like relay."""
    config = Config(peer_timeout=20.0, initial_rto=0.2)
    with (
        Node(config=config) as server,
        Node(config=config) as client,
        UdpProxy(
            "127.0.0.1:0",
            server.address,
            up="loss 15% delay 1ms 1ms duplicate 5%",
            down="loss 15% delay 1ms 1ms duplicate 5%",
            seed=2,
        ) as proxy,
    ):
        messages = [b"m%04d" % i * 40 for i in range(300)]
        handles = [client.send_nowait(proxy.address, m) for m in messages]
        got = [server.receive(timeout=30).data for _ in messages]
        assert all(h.result(30) for h in handles)
        reply = server.receive_nowait()
        assert reply is None
        # the server replies to the proxy's upstream port: the proxy relays it back
        source = server.stats().peers[0].address
        server.send(source, b"reply via the NAT", timeout=10)
        assert client.receive(timeout=10).data == b"reply via the NAT"
    assert got == messages


def test_rmsg_netem_cli_relays_and_prints_counters(echo: EchoServer, rmsg_exe: str) -> None:
    listen = free_port()
    proc = subprocess.Popen(
        [
            rmsg_exe,
            "netem",
            "--listen",
            f"127.0.0.1:{listen}",
            "--forward",
            f"127.0.0.1:{echo.address[1]}",
            "--spec",
            "delay 2ms",
            "--json",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        first = proc.stderr.readline()  # printed once the proxy's socket is bound
        assert first.startswith(f"netem: 127.0.0.1:{listen} -> "), first
        got = ping(("127.0.0.1", listen), 50)
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=10)
    err = first + err
    assert len(got) == 50
    assert "up: delay 2ms" in err
    stats = json.loads(out)
    assert stats["up_sent"] == 50 and stats["up"]["delay_mean"] == pytest.approx(0.002, rel=0.2)


def test_rmsg_netem_cli_rejects_a_bad_spec(rmsg_exe: str) -> None:
    done = subprocess.run(
        [
            rmsg_exe,
            "netem",
            "--listen",
            "127.0.0.1:0",
            "--forward",
            "127.0.0.1:9",
            "--spec",
            "loss lots",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2 and "'lots'" in done.stderr


def _dissect(rmsg_exe: str, capture: Path) -> list[str]:
    done = subprocess.run(
        [rmsg_exe, "dissect", str(capture)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


def test_dissect_marks_retransmissions_and_corruption(tmp_path: Path, rmsg_exe: str) -> None:
    before, after = tmp_path / "in.pcap", tmp_path / "out.pcap"
    config = Config(initial_rto=0.05)
    with (
        Node(config=config) as server,
        Node(config=config) as client,
        UdpProxy(
            "127.0.0.1:0",
            server.address,
            up="loss 30% corrupt 10%",
            seed=6,
            pcap_in=before,
            pcap_out=after,
        ) as proxy,
    ):
        for i in range(30):
            client.send(proxy.address, b"x%d" % i * 100, timeout=20)
    arrived = _dissect(rmsg_exe, before)  # what the sender put on the wire
    assert any(" DATA seq=" in line for line in arrived)
    assert any(" ACK ack=" in line for line in arrived)
    assert any("RETX" in line for line in arrived)  # resent after the proxy dropped it
    assert not any("MALFORMED" in line for line in arrived)
    assert any("MALFORMED (checksum)" in line for line in _dissect(rmsg_exe, after))


@pytest.mark.skipif(shutil.which("tshark") is None, reason="tshark is not installed")
def test_tshark_reads_the_captures(echo: EchoServer, tmp_path: Path) -> None:
    capture = tmp_path / "out.pcap"
    with UdpProxy("127.0.0.1:0", echo.address, pcap_out=capture) as proxy:
        ping(proxy.address, 10)
    done = subprocess.run(
        ["tshark", "-r", str(capture), "-Y", "udp"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert len([line for line in done.stdout.splitlines() if "UDP" in line]) == 20
