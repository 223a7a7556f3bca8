"""The proxy serves real servers: replies from another port, and a capture per leg.

A TFTP server (RFC 1350) answers every transfer from a fresh port — the case
the proxy used to drop as strays. curl is the third-party client; a capture
of an IPv6 client relayed to an IPv4 server is read back with scapy.
"""

from __future__ import annotations

import shutil
import socket
import struct
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from scapy.layers.inet import IP, UDP
from scapy.layers.inet6 import IPv6
from scapy.utils import rdpcap

from netem.proxy import UdpProxy

from .conftest import ipv6_loopback_works

pytestmark = pytest.mark.loopback

RRQ, DATA, ACK = 1, 3, 4
BLOCK = 512


class TftpServer:
    """Read-only TFTP: each RRQ is answered from a new socket (its transfer id)."""

    def __init__(self, files: dict[str, bytes]) -> None:
        self.files = files
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.main_port_got: list[bytes] = []  #: datagrams other than RRQ on the main port
        self.acks: list[int] = []  #: block numbers acknowledged to transfer sockets
        self.transfer_ports: list[int] = []
        self.clients: list[tuple[str, int]] = []  #: where RRQs came from (the proxy's side)
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._serve, daemon=True)]
        self._threads[0].start()

    @property
    def address(self) -> tuple[str, int]:
        return self.sock.getsockname()  # type: ignore[no-any-return]

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                data, client = self.sock.recvfrom(1500)
            except TimeoutError:
                continue
            except OSError:
                return
            if struct.unpack("!H", data[:2])[0] != RRQ:
                self.main_port_got.append(data)
                continue
            name = data[2:].split(b"\0")[0].decode()
            self.clients.append(client)
            thread = threading.Thread(
                target=self._transfer, args=(self.files[name], client), daemon=True
            )
            self._threads.append(thread)
            thread.start()

    def _transfer(self, content: bytes, client: Any) -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as tid:
            tid.bind(("127.0.0.1", 0))
            tid.settimeout(0.5)
            self.transfer_ports.append(tid.getsockname()[1])
            block = 1
            while not self._stop.is_set():
                chunk = content[(block - 1) * BLOCK : block * BLOCK]
                for _ in range(6):  # bounded retransmissions
                    tid.sendto(struct.pack("!HH", DATA, block) + chunk, client)
                    try:
                        reply, _ = tid.recvfrom(1500)
                    except TimeoutError:
                        continue
                    op, number = struct.unpack("!HH", reply[:4])
                    if op == ACK and number == block:
                        self.acks.append(block)
                        break
                else:
                    return  # the client is gone
                if len(chunk) < BLOCK:
                    return
                block += 1

    def close(self) -> None:
        self._stop.set()
        self.sock.close()
        for thread in self._threads:
            thread.join(5)


CONTENT = bytes(range(256)) * 6  # 1536 bytes: three full blocks and an empty last one


@pytest.fixture
def tftp() -> Iterator[TftpServer]:
    server = TftpServer({"boot.img": CONTENT})
    yield server
    server.close()


def _wait_for(condition: Any, timeout: float = 2.0) -> None:
    for _ in range(int(timeout / 0.02)):
        if condition():
            return
        threading.Event().wait(0.02)


def _rrq(name: str) -> bytes:
    return struct.pack("!H", RRQ) + name.encode() + b"\0octet\0"


@pytest.mark.parametrize("spec", [None, "delay 1ms"])  # the batch fast path and the model path
def test_replies_from_a_new_port_reach_the_client_and_its_acks_follow(
    tftp: TftpServer, spec: str | None
) -> None:
    with (
        UdpProxy("127.0.0.1:0", tftp.address, up=spec, down=spec) as proxy,
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client,
    ):
        client.settimeout(2.0)
        client.sendto(_rrq("boot.img"), proxy.address)
        received = b""
        for _ in range(10):
            data, source = client.recvfrom(1500)
            assert source == proxy.address  # the client only ever sees the proxy
            op, block = struct.unpack("!HH", data[:4])
            assert op == DATA
            received += data[4:]
            client.sendto(struct.pack("!HH", ACK, block), source)
            if len(data) - 4 < BLOCK:
                break
        assert received == CONTENT
        _wait_for(lambda: len(tftp.acks) == 4)  # the last ack is on its way
        stats = proxy.snapshot()
    assert tftp.acks == [1, 2, 3, 4]  # the acks reached the transfer port, learned
    assert tftp.main_port_got == []
    assert stats.strays == 0 and stats.other_port_replies == 4


def test_relay_mode_relays_replies_but_keeps_writing_to_forward(tftp: TftpServer) -> None:
    with (
        UdpProxy("127.0.0.1:0", tftp.address, replies="relay") as proxy,
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client,
    ):
        client.settimeout(2.0)
        client.sendto(_rrq("boot.img"), proxy.address)
        data, _ = client.recvfrom(1500)
        assert data[:4] == struct.pack("!HH", DATA, 1)
        client.sendto(struct.pack("!HH", ACK, 1), proxy.address)
        _wait_for(lambda: tftp.main_port_got)
    assert tftp.main_port_got == [struct.pack("!HH", ACK, 1)]
    assert tftp.acks == []


def test_strict_mode_drops_replies_from_another_port_as_strays(tftp: TftpServer) -> None:
    with (
        UdpProxy("127.0.0.1:0", tftp.address, replies="strict") as proxy,
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client,
    ):
        client.settimeout(0.6)
        client.sendto(_rrq("boot.img"), proxy.address)
        with pytest.raises(TimeoutError):
            client.recvfrom(1500)
        stats = proxy.snapshot()
    assert stats.strays >= 1 and stats.other_port_replies == 0


def test_a_datagram_from_another_host_is_a_stray_in_every_mode(tftp: TftpServer) -> None:
    with (
        UdpProxy("127.0.0.1:0", tftp.address, up="delay 1ms") as proxy,
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client,
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as intruder,
    ):
        client.settimeout(2.0)
        client.sendto(_rrq("boot.img"), proxy.address)
        client.recvfrom(1500)  # the first block: the upstream port exists now
        (upstream,) = tftp.clients  # the proxy's upstream socket for this client
        intruder.bind(("127.0.0.2", 0))
        intruder.sendto(b"spoofed", upstream)
        client.settimeout(0.3)
        for _ in range(20):  # the server resends block 1 (no ack); never "spoofed"
            try:
                data, _ = client.recvfrom(1500)
            except TimeoutError:
                break
            assert data != b"spoofed"
        stats = proxy.snapshot()
    assert stats.strays == 1


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")
@pytest.mark.parametrize(("replies", "works"), [("learn", True), ("strict", False)])
def test_curl_fetches_over_tftp_through_the_proxy(
    tftp: TftpServer, tmp_path: Path, replies: str, works: bool
) -> None:
    out = tmp_path / "boot.img"
    with UdpProxy("127.0.0.1:0", tftp.address, replies=replies, up="delay 2ms") as proxy:
        host, port = proxy.address
        result = subprocess.run(
            ["curl", "-sS", "--max-time", "3", "-o", str(out), f"tftp://{host}:{port}/boot.img"],
            capture_output=True,
            timeout=20,
        )
    if works:
        assert result.returncode == 0, result.stderr
        assert out.read_bytes() == CONTENT
    else:
        assert result.returncode != 0
        assert not out.exists() or out.read_bytes() != CONTENT


# ------------------------------------------------------------------ captures


class Echo:
    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data, addr = self.sock.recvfrom(65535)
            except TimeoutError:
                continue
            except OSError:
                return
            self.sock.sendto(data, addr)

    def close(self) -> None:
        self._stop.set()
        self.thread.join(5)
        self.sock.close()


def _comment(packet: Any) -> str:
    comment = packet.comment
    return comment.decode() if isinstance(comment, bytes) else str(comment or "")


@pytest.mark.skipif(not ipv6_loopback_works(), reason="needs ::1")
def test_capture_shows_each_leg_as_one_followable_conversation_with_decisions(
    tmp_path: Path,
) -> None:
    capture, pcap_out = tmp_path / "legs.pcapng", tmp_path / "out.pcap"
    echo = Echo()
    sent = 40
    try:
        with (
            UdpProxy(
                "[::1]:0",
                echo.sock.getsockname(),
                up="loss 30%",
                down="duplicate 40% delay 2ms",
                seed=11,
                capture=capture,
                pcap_out=pcap_out,
            ) as proxy,
            socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as client,
        ):
            client.bind(("::1", 0))
            client.settimeout(0.3)
            for i in range(sent):
                client.sendto(b"datagram %d" % i, proxy.address)
            got = 0
            while True:
                try:
                    client.recvfrom(100)
                    got += 1
                except TimeoutError:
                    break
            stats = proxy.snapshot()
    finally:
        echo.close()
    packets = rdpcap(str(capture))
    legs: dict[str, list[Any]] = {"client leg": [], "server leg": []}
    for packet in packets:
        legs[packet.sniffed_on].append(packet)
    client_leg, server_leg = legs["client leg"], legs["server leg"]
    # the client leg is IPv6 end to end, the server leg IPv4 with a real source address
    assert all(IPv6 in p and p[IPv6].src == "::1" and p[IPv6].dst == "::1" for p in client_leg)
    assert all(IP in p and p[IP].src == "127.0.0.1" for p in server_leg)
    for leg in (client_leg, server_leg):  # one conversation each: Wireshark can follow it
        ends = {frozenset({(p.src, p[UDP].sport), (p.dst, p[UDP].dport)}) for p in leg}
        assert len(ends) == 1
    # every datagram the client sent is on the client leg once, with its decision...
    ups = [p for p in client_leg if _comment(p).startswith("up ")]
    assert [bytes(p[UDP].payload) for p in ups] == [b"datagram %d" % i for i in range(sent)]
    dropped = [bytes(p[UDP].payload) for p in ups if "dropped (loss)" in _comment(p)]
    assert len(dropped) == stats.up.dropped > 0
    # ...and on the server leg once iff it was not dropped
    relayed = [bytes(p[UDP].payload) for p in server_leg if _comment(p).startswith("up ")]
    assert sorted(relayed + dropped) == sorted(bytes(p[UDP].payload) for p in ups)
    # every reply is on the server leg once; its copies on the client leg
    downs = [p for p in server_leg if _comment(p).startswith("down ")]
    copies = sum(2 if _comment(p).split(": ")[1].startswith("2 copies") else 1 for p in downs)
    back = [p for p in client_leg if _comment(p).startswith("down ")]
    assert len(downs) == sent - len(dropped) and len(back) == copies == got
    assert stats.down.duplicated == copies - len(downs) > 0
    # the classic pcap of what was sent no longer shows a wildcard source
    for packet in rdpcap(str(pcap_out)):
        layer = packet[IPv6] if IPv6 in packet else packet[IP]
        assert layer.src not in ("0.0.0.0", "::", "::ffff:0.0.0.0")
