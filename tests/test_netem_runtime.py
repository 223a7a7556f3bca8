"""Faults that change while a test runs: Link, proxy (Python and HTTP), socket, simulator, CLI."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from collections.abc import Iterator

import pytest
from click.testing import CliRunner

from netem import SimNetwork
from netem.models import FaultModel, Impairment
from netem.proxy import UdpProxy, parse_client
from netem.scenario import Link
from netem.seeds import stream_seed
from netem.socket import FaultySocket
from rmsg.cli import main

# ------------------------------------------------------------------- Link


def test_link_set_partition_heal_and_faults_restore() -> None:
    link = Link("delay 10ms", seed=1)
    assert link.apply(b"x", 0.0) == [(0.01, b"x")]
    link.set("loss 100%")
    assert link.apply(b"x", 1.0) == []
    link.resume()  # the timeline again
    assert link.apply(b"x", 2.0) == [(2.01, b"x")]
    link.partition()
    assert link.apply(b"x", 3.0) == [] and not link.is_clean
    link.heal()
    with link.faults("delay 1s"):
        assert link.apply(b"x", 4.0) == [(5.0, b"x")]
    assert link.apply(b"x", 6.0) == [(6.01, b"x")]  # restored
    link.clear()
    assert link.is_clean and link.apply(b"x", 7.0) == [(7.0, b"x")]
    assert link.counters.seen == 7 and link.counters.dropped_partition == 1


def test_the_same_changes_at_the_same_points_give_the_same_decisions() -> None:
    def run() -> list[int]:
        link = Link("loss 20%", seed=5)
        kept = []
        for i in range(300):
            if i == 100:
                link.set("loss 60%")
            if i == 200:
                link.resume()
            if link.apply(b"%d" % i, i * 0.001):
                kept.append(i)
        return kept

    first = run()
    assert first == run()
    # the middle third really ran under 60% loss: 100 draws, sd ~4.9, so 40 +- 20 is > 4 sd
    assert 20 <= sum(100 <= i < 200 for i in first) <= 60


# ----------------------------------------------------------------- proxy


class Sink:
    """A UDP server that records every datagram it gets, and echoes it."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.got: list[bytes] = []
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
            self.got.append(data)
            self.sock.sendto(data, addr)

    def wait_for(self, count: int, timeout: float = 3.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.got) < count and time.monotonic() < deadline:
            time.sleep(0.01)


@pytest.fixture
def sink() -> Iterator[Sink]:
    server = Sink()
    yield server
    server.sock.close()


def client_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(0.3)
    return sock


def replies(sock: socket.socket) -> list[bytes]:
    got = []
    try:
        while True:
            got.append(sock.recv(65535))
    except TimeoutError:
        return got


@pytest.mark.loopback
def test_proxy_partition_one_direction_then_heal(sink: Sink) -> None:
    with UdpProxy("127.0.0.1:0", sink.address) as proxy:
        client = client_socket()
        client.sendto(b"before", proxy.address)
        assert replies(client) == [b"before"]
        proxy.partition("down")  # requests arrive, replies vanish
        client.sendto(b"one way", proxy.address)
        sink.wait_for(2)
        assert sink.got[-1] == b"one way" and replies(client) == []
        proxy.heal()
        client.sendto(b"after", proxy.address)
        assert replies(client) == [b"after"]
        stats = proxy.snapshot()
        client.close()
    assert stats.down.dropped_partition == 1 and stats.up.dropped == 0


@pytest.mark.loopback
def test_proxy_set_clear_and_a_block_of_faults(sink: Sink) -> None:
    with UdpProxy("127.0.0.1:0", sink.address, up="delay 1ms") as proxy:
        client = client_socket()
        proxy.set("loss 100%", direction="up")
        client.sendto(b"lost", proxy.address)
        assert replies(client) == []
        proxy.clear()
        assert proxy.faults_in_force()["up"] == {
            "spec": "",
            "scenario": False,
            "partitioned": False,
        }
        with proxy.faults(partition=True):
            client.sendto(b"cut", proxy.address)
            assert replies(client) == []
        client.sendto(b"through", proxy.address)
        assert replies(client) == [b"through"]
        client.close()
    assert sink.got == [b"through"]


@pytest.mark.loopback
def test_a_rule_for_one_client_spares_the_others(sink: Sink) -> None:
    with UdpProxy("127.0.0.1:0", sink.address) as proxy:
        noisy, quiet = client_socket(), client_socket()
        host, port = noisy.getsockname()
        proxy.set("loss 100%", client=f"{host}:{port}")
        for i in range(5):
            noisy.sendto(b"noisy %d" % i, proxy.address)
            quiet.sendto(b"quiet %d" % i, proxy.address)
        assert len(replies(quiet)) == 5 and replies(noisy) == []
        per_client = proxy.client_counters()
        assert per_client[f"{host}:{port}"]["up"].dropped == 5
        proxy.clear(client=(host, port))
        noisy.sendto(b"spared now", proxy.address)
        assert replies(noisy) == [b"spared now"]
        noisy.close()
        quiet.close()


def _kept_by_second_client(sink: Sink, first_client_sends: int) -> list[bytes]:
    """Which of the second client's 40 datagrams pass ``loss 50%`` after the first sent N."""
    sink.got.clear()
    with UdpProxy("127.0.0.1:0", sink.address, up="loss 50%", seed=11) as proxy:
        first, second = client_socket(), client_socket()
        for i in range(first_client_sends):
            first.sendto(b"first %d" % i, proxy.address)
            time.sleep(0.0005)
        # first must be client 0 even when all of its datagrams are lost
        deadline = time.monotonic() + 2
        while proxy.snapshot().clients < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        for i in range(40):
            second.sendto(b"second %d" % i, proxy.address)
            time.sleep(0.0005)
        time.sleep(0.3)
        first.close()
        second.close()
    return sorted(d for d in sink.got if d.startswith(b"second"))


@pytest.mark.loopback
def test_a_noisy_client_does_not_change_another_clients_faults(sink: Sink) -> None:
    quiet = _kept_by_second_client(sink, 1)
    noisy = _kept_by_second_client(sink, 300)
    assert quiet == noisy
    # and it is exactly client 1's own stream
    model = FaultModel(Impairment(loss=0.5), seed=stream_seed(11, "up", 1) * 1_000_003)
    expected = sorted(b"second %d" % i for i in range(40) if model.apply(b"", 0.0))
    assert quiet == expected


def test_client_selectors() -> None:
    assert parse_client("127.0.0.1:5000") == ("127.0.0.1", 5000)
    assert parse_client("127.0.0.1") == ("127.0.0.1",)
    assert parse_client("::1") == ("::1",)
    assert parse_client("[0::1]:53") == ("::1", 53)
    with pytest.raises(ValueError, match="IP address"):
        parse_client("localhost:53")


# ------------------------------------------------------- control endpoint


def _http(
    address: tuple[str, int],
    method: str,
    path: str,
    body: object = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, object]]:
    conn = http.client.HTTPConnection(*address, timeout=5)
    data = None if body is None else json.dumps(body).encode()
    conn.request(method, path, body=data, headers=headers or {"Content-Type": "application/json"})
    response = conn.getresponse()
    result = response.status, json.loads(response.read())
    conn.close()
    return result


def test_the_control_endpoint_is_off_by_default_and_loopback_only(sink: Sink) -> None:
    with UdpProxy("127.0.0.1:0", sink.address) as proxy:
        assert proxy.control_address is None
    with pytest.raises(ValueError, match="no authentication"):
        UdpProxy("127.0.0.1:0", sink.address, control="0.0.0.0:0")


@pytest.mark.loopback
def test_control_endpoint_changes_a_running_proxy(sink: Sink) -> None:
    with UdpProxy("127.0.0.1:0", sink.address, control="127.0.0.1:0") as proxy:
        ctl = proxy.control_address
        assert ctl is not None
        client = client_socket()
        status, faults = _http(ctl, "POST", "/set", {"spec": "loss 100%", "direction": "up"})
        assert status == 200 and faults["up"]["spec"] == "loss 100%"  # type: ignore[index]
        client.sendto(b"dropped", proxy.address)
        assert replies(client) == []
        assert _http(ctl, "POST", "/clear", {})[0] == 200
        assert _http(ctl, "POST", "/partition", {"direction": "down"})[0] == 200
        client.sendto(b"one way", proxy.address)
        assert replies(client) == []
        assert _http(ctl, "POST", "/heal", {})[0] == 200
        client.sendto(b"both ways", proxy.address)
        assert replies(client) == [b"both ways"]
        status, stats = _http(ctl, "GET", "/stats")
        assert status == 200 and stats["up_sent"] == 2 and len(stats["per_client"]) == 1  # type: ignore[arg-type]
        # what a browser page could send is refused; so are bad requests
        assert _http(ctl, "POST", "/clear", {}, {"Content-Type": "text/plain"})[0] == 403
        assert _http(ctl, "GET", "/faults", None, {"Host": "evil.example"})[0] == 403
        status, error = _http(ctl, "POST", "/set", {"spec": "loss lots"})
        assert status == 400 and "lots" in str(error["error"])
        assert _http(ctl, "POST", "/reboot", {})[0] == 400
        client.close()


@pytest.mark.loopback
def test_rmsg_netem_ctl_commands(sink: Sink) -> None:
    with UdpProxy("127.0.0.1:0", sink.address, control="127.0.0.1:0") as proxy:
        assert proxy.control_address is not None
        control = f"127.0.0.1:{proxy.control_address[1]}"
        runner = CliRunner()

        def ctl(*args: str) -> dict[str, object]:
            result = runner.invoke(main, ["netem", "ctl", "--control", control, *args])
            assert result.exit_code == 0, result.output
            return json.loads(result.output)  # type: ignore[no-any-return]

        assert ctl("set", "delay 5ms", "--direction", "down")["down"]["spec"] == "delay 5ms"  # type: ignore[index]
        got = ctl("set", "loss 100%", "--client", "127.0.0.1:4000")
        assert got["clients"] == {
            "127.0.0.1:4000": {
                "up": {"spec": "loss 100%", "partitioned": None},
                "down": {"spec": "loss 100%", "partitioned": None},
            }
        }
        assert ctl("partition", "--direction", "up")["up"]["partitioned"] is True  # type: ignore[index]
        assert ctl("heal")["up"]["partitioned"] is False  # type: ignore[index]
        assert ctl("clear")["clients"] == {}
        assert "up_received" in ctl("stats")
        bad = runner.invoke(main, ["netem", "ctl", "--control", control, "set", "loss lots"])
        assert bad.exit_code == 1 and "lots" in bad.output
    gone = runner.invoke(main, ["netem", "ctl", "--control", control, "get"])
    assert gone.exit_code == 1 and "cannot reach" in gone.output
    away = runner.invoke(main, ["netem", "ctl", "--control", "192.0.2.1:80", "get"])
    assert away.exit_code == 2 and "loopback" in away.output


def test_rmsg_netem_still_needs_listen_and_forward() -> None:
    result = CliRunner().invoke(main, ["netem", "--forward", "127.0.0.1:9"])
    assert result.exit_code == 2 and "--listen" in result.output


# ------------------------------------------------------ socket and simulator


@pytest.mark.loopback
def test_faulty_socket_changes_at_run_time() -> None:
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sink.bind(("127.0.0.1", 0))
    sink.settimeout(0.3)
    sock = FaultySocket.bind(("127.0.0.1", 0), "")
    sock.partition()
    sock.sendto(b"cut", sink.getsockname())
    sock.heal()
    with sock.faults("loss 100%"):
        sock.sendto(b"lost", sink.getsockname())
    sock.sendto(b"through", sink.getsockname())
    assert sink.recv(100) == b"through"
    assert sock.counters.dropped_partition == 1 and sock.counters.dropped_loss == 1
    with pytest.raises(ValueError, match="incoming="):
        sock.set("loss 1%", direction="down")
    sock.close()
    sink.close()


class Echo:
    """A tiny sans-I/O host: echoes what it gets, remembers it."""

    def __init__(self) -> None:
        self.got: list[bytes] = []
        self.out: list[tuple[bytes, object]] = []

    def receive_datagram(self, data: bytes, addr: object, now: float) -> None:
        self.got.append(data)

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, object]]:
        out, self.out = self.out, []
        return out

    def get_timer(self) -> float | None:
        return None

    def handle_timer(self, now: float) -> None:
        pass


def test_sim_partition_until_healed_and_faults_block() -> None:
    net = SimNetwork(seed=1)
    a, b = Echo(), Echo()
    net.add_host("a", a)
    net.add_host("b", b)

    def send(data: bytes) -> None:
        a.out.append((data, "b"))
        net.flush("a")
        net.run()

    net.partition("a", "b", direction="up")
    send(b"cut")
    net.heal("a", "b")
    with net.faults("a", "b", "loss 100%"):
        send(b"lost")
    net.set("a", "b", "delay 1s")
    send(b"late")
    assert b.got == [b"late"] and net.now >= 1.0
    net.clear("a", "b")
    counters = net.link("a", "b").counters
    assert counters.dropped_partition == 1 and counters.dropped_loss == 1
