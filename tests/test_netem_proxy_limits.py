"""The netem proxy under pressure: out of descriptors, idle clients, a failing relay.

It must refuse what it cannot hold (counted, by reason), keep relaying for the
clients it has, forget idle clients, and never stop relaying quietly.
"""

from __future__ import annotations

import functools
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

import netem.proxy
from netem.proxy import ProxyFailed, UdpProxy
from rmsg.cli import main

from .conftest import free_port
from .test_netem_proxy import EchoServer

pytestmark = pytest.mark.loopback

# Runs rmsg with a lower soft RLIMIT_NOFILE: argv is SOFT EXE ARGS... (the limit is
# set in the child, never in the pytest process).
_WITH_FD_LIMIT = (
    "import os, resource, sys\n"
    "_, hard = resource.getrlimit(resource.RLIMIT_NOFILE)\n"
    "resource.setrlimit(resource.RLIMIT_NOFILE, (int(sys.argv[1]), hard))\n"
    "os.execv(sys.argv[2], sys.argv[2:])\n"
)


@pytest.fixture
def echo() -> Iterator[EchoServer]:
    server = EchoServer()
    yield server
    server.close()


def _udp_client() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(3.0)
    return sock


def _echoed(client: socket.socket, target: tuple[str, int], payload: bytes) -> bool:
    """Send ``payload`` once through the proxy; did the echo come back?"""
    client.sendto(payload, target)
    try:
        return client.recvfrom(65535)[0] == payload
    except TimeoutError:
        return False


def _start_netem(
    rmsg_exe: str, args: list[str], stderr: Path, fd_limit: int | None = None
) -> subprocess.Popen[str]:
    """``rmsg netem ARGS``, returned once it has said where it listens (its socket is bound)."""
    prefix = [sys.executable, "-c", _WITH_FD_LIMIT, str(fd_limit)] if fd_limit else []
    with stderr.open("w") as err:
        proc = subprocess.Popen(
            [*prefix, rmsg_exe, "netem", *args], stdout=subprocess.PIPE, stderr=err, text=True
        )
    deadline = time.monotonic() + 20
    while " -> 127.0.0.1:" not in stderr.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"rmsg netem did not start: {stderr.read_text()}")
        time.sleep(0.02)
    return proc


@pytest.mark.parametrize(
    ("extra", "reason"),
    [([], "max_clients"), (["--max-clients", "100"], "EMFILE")],
    ids=["default-cap", "cap-above-fd-limit"],
)
def test_out_of_descriptors_refuses_new_clients_and_keeps_relaying(
    echo: EchoServer, rmsg_exe: str, tmp_path: Path, extra: list[str], reason: str
) -> None:
    """ulimit -n 40 and 60 one-shot clients: the first client is still relayed, the
    excess is refused and counted — by the cap derived from the limit, or as EMFILE
    when an explicit cap is above it — and a normal stop still exits 0."""
    listen = free_port()
    target = ("127.0.0.1", listen)
    proc = _start_netem(
        rmsg_exe,
        [
            "--listen",
            f"127.0.0.1:{listen}",
            "--forward",
            f"127.0.0.1:{echo.address[1]}",
            "--json",
            *extra,
        ],
        tmp_path / "stderr",
        fd_limit=40,
    )
    keeper = _udp_client()
    one_shots: list[socket.socket] = []
    try:
        assert _echoed(keeper, target, b"before")
        for i in range(60):  # all open at once: 60 distinct source ports
            one_shots.append(_udp_client())
            one_shots[-1].sendto(b"one-shot %d" % i, target)
        # sent after the burst on the same listen socket: answered only if the proxy
        # got through the burst and still relays for the clients it has
        assert _echoed(keeper, target, b"after")
    finally:
        for sock in [keeper, *one_shots]:
            sock.close()
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=20)
    stderr = (tmp_path / "stderr").read_text()
    assert proc.returncode == 0, stderr
    assert "Traceback" not in stderr
    stats = json.loads(out)
    assert set(stats["refused"]) == {reason}
    assert stats["clients_refused"] == stats["refused"][reason] > 0
    assert stats["clients"] + stats["clients_refused"] == 61  # each new client: one or the other
    assert stats["up_received"] == 62
    assert stats["up_sent"] == 62 - stats["clients_refused"]
    if reason == "EMFILE":
        assert "warning: max_clients 100 is above the" in stderr


def test_a_rebind_without_a_free_descriptor_keeps_the_old_port(
    echo: EchoServer, rmsg_exe: str, tmp_path: Path
) -> None:
    """At the descriptor limit a NAT rebind cannot open its new socket: the client
    stays on its old port (counted) instead of being left with none."""
    listen = free_port()
    target = ("127.0.0.1", listen)
    proc = _start_netem(
        rmsg_exe,
        [
            "--listen",
            f"127.0.0.1:{listen}",
            "--forward",
            f"127.0.0.1:{echo.address[1]}",
            "--max-clients",
            "100",
            "--rebind-every",
            "50ms",
            "--json",
        ],
        tmp_path / "stderr",
        fd_limit=40,
    )
    keeper = _udp_client()
    one_shots: list[socket.socket] = []
    try:
        assert _echoed(keeper, target, b"before")
        for i in range(60):  # take every descriptor the proxy has left
            one_shots.append(_udp_client())
            one_shots[-1].sendto(b"one-shot %d" % i, target)
        time.sleep(0.1)  # past --rebind-every: the next datagram asks for a new port
        assert _echoed(keeper, target, b"after")
    finally:
        for sock in [keeper, *one_shots]:
            sock.close()
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=20)
    assert proc.returncode == 0, (tmp_path / "stderr").read_text()
    stats = json.loads(out)
    assert stats["refused"]["EMFILE"] > 0 and stats["rebind_errors"] >= 1
    assert len(set(echo.sources)) == stats["clients"]  # the keeper never moved


def test_idle_clients_expire_and_make_room_for_new_ones(echo: EchoServer) -> None:
    """A full proxy refuses a new client; once the others go idle it takes it, and a
    returning client gets a fresh upstream port (its old one was closed)."""
    a, b, c = _udp_client(), _udp_client(), _udp_client()
    with UdpProxy("127.0.0.1:0", echo.address, idle_timeout=0.2, max_clients=2) as proxy:
        target = proxy.address
        assert _echoed(a, target, b"a1") and _echoed(b, target, b"b1")
        c.sendto(b"c1", target)
        deadline = time.monotonic() + 5
        while proxy.snapshot().clients_refused < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        while proxy.snapshot().clients_expired < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        stats = proxy.snapshot()
        assert stats.refused == {"max_clients": 1}
        assert stats.clients_expired == 2 and stats.clients_active == 0
        assert _echoed(c, target, b"c2")
        assert _echoed(a, target, b"a2")
        assert proxy.snapshot().clients == 4 and proxy.snapshot().clients_active == 2
    for sock in (a, b, c):
        sock.close()
    assert len(set(echo.sources)) == 4  # a, b, c and a again from a new port


def test_rmsg_netem_client_idle_timeout(echo: EchoServer, rmsg_exe: str, tmp_path: Path) -> None:
    listen = free_port()
    proc = _start_netem(
        rmsg_exe,
        [
            "--listen",
            f"127.0.0.1:{listen}",
            "--forward",
            f"127.0.0.1:{echo.address[1]}",
            "--client-idle-timeout",
            "100ms",
            "--json",
        ],
        tmp_path / "stderr",
    )
    client = _udp_client()
    try:
        assert _echoed(client, ("127.0.0.1", listen), b"hello")
        time.sleep(0.6)  # several idle timeouts and sweeps
    finally:
        client.close()
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=20)
    assert proc.returncode == 0, (tmp_path / "stderr").read_text()
    stats = json.loads(out)
    assert stats["clients"] == 1 and stats["clients_expired"] == 1


def _clock_failing_in_the_relay_thread() -> float:
    """A clock that works for the caller and breaks inside the relay thread."""
    if threading.current_thread().name == "netem-proxy":
        raise RuntimeError("injected clock failure")
    return time.monotonic()


def test_a_relay_failure_is_kept_and_raised(echo: EchoServer) -> None:
    proxy = UdpProxy("127.0.0.1:0", echo.address, clock=_clock_failing_in_the_relay_thread)
    assert proxy.error is None
    proxy.start()
    with pytest.raises(ProxyFailed, match="RuntimeError: injected clock failure") as failed:
        proxy.wait(10)
    assert isinstance(proxy.error, RuntimeError) and failed.value.error is proxy.error
    with pytest.raises(ProxyFailed, match="injected clock failure"):
        proxy.stop()


def test_a_stopped_proxy_waits_cleanly(echo: EchoServer) -> None:
    proxy = UdpProxy("127.0.0.1:0", echo.address)
    assert proxy.wait(0) is False  # never started
    proxy.start()
    assert proxy.wait(0.05) is False  # still relaying
    proxy.stop()
    assert proxy.wait(0) is True and proxy.error is None


def test_rmsg_netem_exits_1_naming_a_relay_failure(
    echo: EchoServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(
        netem.proxy,
        "UdpProxy",
        functools.partial(UdpProxy, clock=_clock_failing_in_the_relay_thread),
    )
    started = time.monotonic()
    result = CliRunner().invoke(
        main,
        [
            "netem",
            "--listen",
            "127.0.0.1:0",
            "--forward",
            f"127.0.0.1:{echo.address[1]}",
            "--duration",
            "20",
        ],
    )
    assert result.exit_code == 1, result.output
    assert time.monotonic() - started < 20  # it noticed, rather than running out the clock
    last = result.output.strip().splitlines()[-1]
    assert last == "Error: netem proxy stopped relaying: RuntimeError: injected clock failure"
    assert "netem summary" in result.output  # the counters still print
