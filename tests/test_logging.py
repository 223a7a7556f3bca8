"""Logging: named loggers (``reliable.*``, ``netem.*``) say what an operator acts on —
sessions established, dropped and restarted, unreachable peers, refusals,
evictions — never one line per datagram, and print nothing unless configured.

The core's records are checked on the simulated pair (virtual time); the proxy's
and ``rmsg -v`` on loopback.
"""

from __future__ import annotations

import logging
import random
import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator

import pytest
from click.testing import CliRunner

from netem import SimNetwork
from netem.proxy import UdpProxy
from reliable import Config, Endpoint, events
from reliable.security import Authenticated
from rmsg.cli import main

from .conftest import free_port
from .harness import A, B, Pair
from .test_netem_proxy import EchoServer

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))


def _lines(caplog: pytest.LogCaptureFixture, logger: str, level: int) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == logger and r.levelno == level]


def test_without_configuration_nothing_is_printed_even_for_warnings() -> None:
    """Python prints an unhandled WARNING to stderr ("last resort") unless the library
    installs a NullHandler: a peer going unreachable must not write to a user's terminal."""
    script = textwrap.dedent(
        """
        import random
        from reliable import Endpoint, events
        ep = Endpoint(rng=random.Random(1))
        ep.send(("10.0.0.2", 2000), b"into the void", now=0.0)
        now = 0.0
        for _ in range(10_000):
            ep.datagrams_to_send(now)
            now = ep.get_timer() or now + 0.1
            ep.handle_timer(now)
            if any(isinstance(e, events.PeerUnreachable) for e in iter(ep.next_event, None)):
                print("unreachable")
                break
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "unreachable"
    assert done.stderr == ""


def test_a_session_established_and_closed_is_logged_once_not_per_datagram(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="reliable")
    p = Pair()
    for i in range(50):
        p.a.endpoint.send(B, b"x" * 3000, now=p.now)
        if i % 10 == 0:
            p.settle()
    p.settle()
    assert len(p.b.received()) == 50
    established = _lines(caplog, "reliable.endpoint", logging.INFO)
    assert established == [
        f"session with 10.0.0.1:1000 established (its incarnation {p.a.endpoint.incarnation:016x})",
        f"session with 10.0.0.2:2000 established (its incarnation {p.b.endpoint.incarnation:016x})",
    ]
    # 50 messages, well over a hundred datagrams: the only DEBUG lines are B's address
    # challenges to A's first flight.
    debug = _lines(caplog, "reliable.endpoint", logging.DEBUG)
    assert 1 <= len(debug) <= 4
    assert set(debug) == {"challenged 10.0.0.1:1000 to prove its address"}
    p.a.endpoint.close(p.now)
    p.settle()
    assert "peer 10.0.0.1:1000 closed its session" in _lines(
        caplog, "reliable.endpoint", logging.INFO
    )


def test_a_restart_is_logged_with_what_failed(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="reliable")
    p = Pair()
    p.a.endpoint.send(B, b"before", now=p.now)
    p.settle()
    old = p.b.endpoint.incarnation
    p.a.endpoint.send(B, b"in flight", now=p.now)
    p.outgoing(p.a)  # transmitted, then B crashes before it arrives
    p.restart_b()
    p.b.endpoint.send(A, b"hello from the new B", now=p.now)
    p.transfer(p.b)
    p.settle()
    assert p.a.of(events.PeerRestarted)
    new = p.b.endpoint.incarnation
    assert _lines(caplog, "reliable.peer", logging.INFO) == [
        f"peer 10.0.0.2:2000 restarted (incarnation {old:016x} -> {new:016x}); "
        "messages it may have seen failed (PeerRestarted): 1"
    ]


def test_an_unreachable_peer_is_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="reliable")
    config = Config(peer_timeout=3.0)
    p = Pair(config, config)
    p.a.endpoint.send(B, b"one", now=p.now)
    p.a.endpoint.send(B, b"two", now=p.now)
    for _ in range(10_000):  # B never hears anything
        p.outgoing(p.a)
        if p.a.of(events.PeerUnreachable):
            break
        p.now = p.a.endpoint.get_timer() or p.now + 0.1
        p.a.endpoint.handle_timer(p.now)
    (line,) = _lines(caplog, "reliable.peer", logging.WARNING)
    assert line == "peer 10.0.0.2:2000 unreachable (silent for 3.0 s); messages to it failed: 2"


def test_a_refused_message_is_logged_with_its_source_and_the_reason(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="reliable")
    p = Pair()
    p.b.create_mailbox("small", max_bytes=10)
    p.a.endpoint.send(B, b"hello", mailbox="nowhere", now=p.now)
    p.a.endpoint.send(B, b"far too large", mailbox="small", now=p.now)
    p.settle()
    refusals = [x for x in _lines(caplog, "reliable.endpoint", logging.INFO) if "refused" in x]
    assert refusals == [
        "refused a 5-byte message from 10.0.0.1:1000 for mailbox 'nowhere': no such mailbox",
        "refused a 13-byte message from 10.0.0.1:1000 for mailbox 'small': "
        "larger than the mailbox accepts",
    ]


def test_a_security_refusal_is_logged_on_both_sides(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="reliable")
    p = Pair(security_a=Authenticated(KEY), security_b=Authenticated(OTHER_KEY))
    p.a.endpoint.send(B, b"hello?", now=p.now)
    p.transfer(p.a)
    p.transfer(p.b)
    assert p.a.of(events.PeerRejectedUs)
    assert _lines(caplog, "reliable.endpoint", logging.INFO) == [
        "refused a datagram from 10.0.0.1:1000 (its tag does not verify: our keys differ); "
        "told it with AUTH_FAILED"
    ]
    (warning,) = _lines(caplog, "reliable.endpoint", logging.WARNING)
    assert warning.startswith("10.0.0.2:2000") and "keys differ" in warning


def test_an_eviction_is_a_warning_and_an_idle_drop_is_info(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="reliable")
    hub = Endpoint(Config(max_peers=2, idle_timeout=30.0), rng=random.Random(1))
    net = SimNetwork(seed=1)
    net.add_host(B, hub)
    spokes = {
        addr: Endpoint(rng=random.Random(20 + i))
        for i, addr in enumerate([A, ("10.0.0.3", 3000), ("10.0.0.4", 4000)])
    }
    for addr, spoke in spokes.items():
        net.add_host(addr, spoke)
    for addr, spoke in spokes.items():  # one after another, each then silent
        spoke.send(B, b"hello", now=net.now)
        net.flush(addr)
        net.run(until=net.now + 1.0)
    assert hub.stats().sessions_dropped == {"evicted": 1}
    assert _lines(caplog, "reliable.endpoint", logging.WARNING) == [
        "dropped the session with 10.0.0.1:1000 (evicted: Config.max_peers=2 reached); "
        "released 0 bytes"
    ]
    net.run(until=net.now + 60.0)
    dropped = [
        x for x in _lines(caplog, "reliable.endpoint", logging.INFO) if x.startswith("dropped")
    ]
    assert "dropped the session with 10.0.0.3:3000 (idle); released 0 bytes" in dropped


# ------------------------------------------------------------------ netem proxy


@pytest.fixture
def echo() -> Iterator[EchoServer]:
    server = EchoServer()
    yield server
    server.close()


@pytest.mark.loopback
def test_the_proxy_logs_its_life_clients_fault_changes_and_refusals(
    caplog: pytest.LogCaptureFixture, echo: EchoServer
) -> None:
    caplog.set_level(logging.DEBUG, logger="netem")
    clients = []
    for _ in range(3):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("127.0.0.1", 0))
        sock.settimeout(3.0)
        clients.append(sock)
    try:
        with UdpProxy("127.0.0.1:0", echo.address, up="loss 1%", max_clients=1) as proxy:
            target = proxy.address
            clients[0].sendto(b"hi", target)
            assert clients[0].recvfrom(100)[0] == b"hi"
            for sock in clients[1:]:  # over the cap: refused, each
                sock.sendto(b"let me in", target)
            proxy.set("delay 10ms", direction="down")
            proxy.partition("up")
            proxy.heal()
            proxy.clear()
        first = clients[0].getsockname()[1]
        second, third = (s.getsockname()[1] for s in clients[1:])
        relay = f"127.0.0.1:{target[1]}"
        info = _lines(caplog, "netem.proxy", logging.INFO)
        assert (
            info[0] == f"relaying {relay} -> 127.0.0.1:{echo.address[1]} (up: loss 1%; down: clean)"
        )
        assert info[1] == f"new client 127.0.0.1:{first} (client #1)"
        assert info[2:6] == [
            "down: now delay 10ms",
            "partitioned up",
            "healed up/down",
            "faults cleared",
        ]
        assert info[6].startswith("stopped after 1 clients; up: 1 datagrams seen")
        assert _lines(caplog, "netem.proxy", logging.WARNING) == [
            f"refused client 127.0.0.1:{second}: max_clients "
            "(further refusals for this reason are logged at DEBUG)"
        ]
        assert f"refused client 127.0.0.1:{third}: max_clients" in _lines(
            caplog, "netem.proxy", logging.DEBUG
        )
    finally:
        for sock in clients:
            sock.close()


# ------------------------------------------------------------------------ CLI


@pytest.mark.loopback
def test_rmsg_v_logs_to_stderr_and_leaves_no_handler_behind() -> None:
    dest = f"127.0.0.1:{free_port()}"  # nobody listens: the OS refuses at once
    quiet = CliRunner().invoke(main, ["send", dest, "hi", "--timeout", "5"])
    assert quiet.exit_code == 1
    assert "reliable.peer" not in quiet.stderr
    loud = CliRunner().invoke(main, ["-v", "send", dest, "hi", "--timeout", "5"])
    assert loud.exit_code == 1
    assert f"rmsg: WARNING reliable.peer: peer {dest} unreachable (connection refused" in (
        loud.stderr
    )
    assert "DEBUG" not in loud.stderr
    debug = CliRunner().invoke(main, ["-vv", "send", dest, "hi", "--timeout", "5"])
    assert "rmsg: DEBUG reliable.endpoint: closed" in debug.stderr
    for name in ("reliable", "netem"):
        logger = logging.getLogger(name)
        assert logger.level == logging.NOTSET
        assert [type(h) for h in logger.handlers] == [logging.NullHandler]
