"""The operating system's word that a peer cannot be reached fails its sends at once.

Core (virtual time): ``Endpoint.handle_unreachable`` and the rule that decides
when a report is believed. Driver: the error-queue parser on crafted bytes and
``send_datagram`` on a scripted socket. Loopback: a closed port fails a send in
milliseconds, with both adapters, and ``Config.os_errors="ignore"`` restores the
wait. No route: inside a private network namespace (``unshare -n``), where no
datagram can leave the host.
"""

from __future__ import annotations

import asyncio
import errno
import select
import shutil
import socket
import struct
import subprocess
import sys
import time
from typing import Any

import pytest

from netem.socket import FaultySocket
from reliable import AsyncNode, Config, Node, PeerUnreachable, UsageError, errors, events
from reliable.driver import (
    Unreachable,
    drain_socket,
    open_socket,
    parse_extended_error,
    read_error_queue,
    refused_send,
    send_datagram,
)

from .conftest import free_port, ipv6_loopback_works
from .harness import B, Pair

REFUSED = "connection refused (the OS reported ICMP port unreachable)"

# ------------------------------------------------------------------ the core


def _failures(p: Pair) -> list[errors.DeliveryFailed]:
    return [e.error for e in p.a.of(events.MessageFailed)]


def test_a_refused_first_contact_fails_at_once_naming_the_reason() -> None:
    p = Pair(config_a=Config(peer_timeout=5.0))
    t1 = p.a.endpoint.send(B, b"one", now=p.now)
    t2 = p.a.endpoint.send(B, b"two" * 2000, now=p.now)
    p.outgoing(p.a)  # into the void
    p.now += 0.001
    assert p.a.endpoint.handle_unreachable(B, REFUSED, p.now, errno=errno.ECONNREFUSED)
    failed = p.a.of(events.MessageFailed)
    assert {f.ticket for f in failed} == {t1, t2}
    for f in failed:
        assert isinstance(f.error, errors.PeerUnreachable)
        assert str(f.error).startswith(f"10.0.0.2:2000: peer unreachable: {REFUSED}; ")
        assert f.error.cause == REFUSED and f.error.errno == errno.ECONNREFUSED
    (down,) = p.a.of(events.PeerUnreachable)
    assert down.cause == REFUSED and down.errno == errno.ECONNREFUSED
    (peer,) = p.a.endpoint.stats().peers
    assert peer.unreachable and peer.os_errors == 1
    p.outgoing(p.a)
    assert p.a.endpoint.quiet()  # no more probing, as after a timeout (only the idle expiry)
    # A new send clears the verdict and goes out.
    p.a.endpoint.send(B, b"again", now=p.now)
    p.settle()
    assert p.b.received() == [b"again"]


def test_a_soft_report_fails_a_peer_never_heard_from() -> None:
    p = Pair()
    p.a.endpoint.send(B, b"x", now=p.now)
    p.outgoing(p.a)
    reason = "network is unreachable (the OS refused the send)"
    assert p.a.endpoint.handle_unreachable(B, reason, p.now, errno=101, soft=True)
    (error,) = _failures(p)
    assert isinstance(error, errors.PeerUnreachable) and error.cause == reason


def test_ignore_rides_reports_out_until_the_peer_timeout() -> None:
    p = Pair(config_a=Config(os_errors="ignore", peer_timeout=2.0))
    p.a.endpoint.send(B, b"x", now=p.now)
    while not p.a.of(events.PeerUnreachable):
        p.outgoing(p.a)
        assert not p.a.endpoint.handle_unreachable(B, REFUSED, p.now, errno=111)
        p.now = p.a.endpoint.get_timer() or p.now + 1
        p.a.endpoint.handle_timer(p.now)
        assert p.now < 3.0
    assert p.now >= 2.0
    (error,) = _failures(p)
    assert isinstance(error, errors.PeerUnreachable)
    assert error.cause is None and "no answer for 2.0s" in str(error)
    assert p.a.endpoint.stats().peers[0].os_errors > 1  # counted all the same


def _established(p: Pair) -> None:
    """A and B know each other, and A has a message in flight that B has not seen."""
    p.connect()
    p.a.endpoint.send(B, b"first", now=p.now)
    p.settle()
    assert p.b.received() == [b"first"]
    p.a.endpoint.send(B, b"second", now=p.now)
    p.outgoing(p.a)  # lost: B is gone, say


def test_a_live_peer_survives_a_report_that_arrives_while_it_is_heard() -> None:
    p = Pair()
    _established(p)
    rto = p.a.endpoint._peers[B].rtt.rto
    # Heard from a moment ago: a port unreachable now contradicts the evidence (forged?).
    assert not p.a.endpoint.handle_unreachable(B, REFUSED, p.now, errno=111)
    assert _failures(p) == []
    # Silent for a retransmission timeout: now it is believed.
    p.now += rto + 0.001
    assert p.a.endpoint.handle_unreachable(B, REFUSED, p.now, errno=111)
    (error,) = _failures(p)
    assert isinstance(error, errors.PeerUnreachable) and error.cause == REFUSED
    assert p.a.endpoint.stats().peers[0].os_errors == 2


def test_an_idle_peer_sent_to_anew_survives_a_report_until_it_owes_an_answer() -> None:
    p = Pair()
    p.connect()
    p.a.endpoint.send(B, b"first", now=p.now)
    p.settle()
    p.now += 60.0  # idle for a minute: silence, but nobody was waiting on it
    p.a.endpoint.send(B, b"second", now=p.now)
    p.outgoing(p.a)
    rto = p.a.endpoint._peers[B].rtt.rto
    assert not p.a.endpoint.handle_unreachable(B, REFUSED, p.now, errno=111)
    p.now += rto + 0.001
    assert p.a.endpoint.handle_unreachable(B, REFUSED, p.now, errno=111)


def test_a_live_peer_rides_out_soft_reports() -> None:
    p = Pair(config_a=Config(peer_timeout=2.0))
    _established(p)
    p.now += 1.0  # long silent, but routes recover: network unreachable is not its host's word
    reason = "network is unreachable (the OS reported ICMP network unreachable from 10.9.9.9)"
    assert not p.a.endpoint.handle_unreachable(B, reason, p.now, errno=101, soft=True)
    assert _failures(p) == []
    p.settle()  # the route came back: the retransmission gets through
    assert p.b.received() == [b"first", b"second"]


def test_a_report_with_nothing_waiting_changes_nothing() -> None:
    p = Pair()
    p.connect()
    p.a.endpoint.send(B, b"done", now=p.now)
    p.settle()
    p.now += 1.0
    assert not p.a.endpoint.handle_unreachable(B, REFUSED, p.now, errno=111)
    assert p.a.of(events.PeerUnreachable) == []
    assert not p.a.endpoint.stats().peers[0].unreachable
    assert not p.a.endpoint.handle_unreachable(("10.9.9.9", 9), REFUSED, p.now)  # no session


def test_a_report_while_closing_lets_the_close_finish() -> None:
    p = Pair()
    p.a.endpoint.send(B, b"x", now=p.now)
    p.outgoing(p.a)
    p.a.endpoint.close(p.now, timeout=10.0)
    assert p.a.endpoint.handle_unreachable(B, REFUSED, p.now, errno=111)
    assert p.a.of(events.Closed)  # nothing left to flush: no need to wait 10 s


def test_os_errors_is_validated() -> None:
    with pytest.raises(UsageError, match="os_errors"):
        Config(os_errors="retry")


def test_peer_unreachable_keeps_its_signature() -> None:
    error = errors.PeerUnreachable(("127.0.0.1", 1), 5.0)
    assert str(error).startswith("127.0.0.1:1: peer unreachable: no answer for 5.0s; ")
    assert error.after == 5.0 and error.cause is None and error.errno is None


# -------------------------------------------------------- the error queue


def _sockaddr_in(host: str, port: int = 0) -> bytes:
    return (
        struct.pack("=H", socket.AF_INET)
        + struct.pack("!H", port)
        + (socket.inet_pton(socket.AF_INET, host) + bytes(8))
    )


def _sockaddr_in6(host: str) -> bytes:
    return (
        struct.pack("=HHI", socket.AF_INET6, 0, 0)
        + socket.inet_pton(socket.AF_INET6, host)
        + bytes(4)
    )


def _extended(err: int, origin: int, icmp_type: int, code: int, offender: bytes) -> bytes:
    return struct.pack("=IBBBBII", err, origin, icmp_type, code, 0, 0, 0) + offender


def test_parser_reads_a_port_unreachable() -> None:
    payload = _extended(errno.ECONNREFUSED, 2, 3, 3, _sockaddr_in("127.0.0.1"))
    report = parse_extended_error(socket.IPPROTO_IP, 11, payload, ("127.0.0.1", 4000))
    assert report == Unreachable(("127.0.0.1", 4000), REFUSED, errno.ECONNREFUSED, False)


def test_parser_reads_an_icmpv6_port_unreachable() -> None:
    payload = _extended(errno.ECONNREFUSED, 3, 1, 4, _sockaddr_in6("::1"))
    report = parse_extended_error(socket.IPPROTO_IPV6, 25, payload, ("::1", 4000, 0, 0))
    assert report == Unreachable(("::1", 4000), REFUSED, errno.ECONNREFUSED, False)


def test_parser_names_a_router_that_reported() -> None:
    payload = _extended(errno.ENETUNREACH, 2, 3, 0, _sockaddr_in("10.9.9.9"))
    report = parse_extended_error(socket.IPPROTO_IP, 11, payload, ("10.1.1.1", 9))
    assert report is not None and report.soft
    assert report.reason == (
        "network is unreachable (the OS reported ICMP network unreachable from 10.9.9.9)"
    )
    payload = _extended(errno.EHOSTUNREACH, 2, 11, 0, _sockaddr_in("10.9.9.9"))
    report = parse_extended_error(socket.IPPROTO_IP, 11, payload, ("10.1.1.1", 9))
    assert report is not None and report.soft
    assert report.reason == "no route to host (the OS reported ICMP time exceeded from 10.9.9.9)"


@pytest.mark.parametrize(
    ("level", "kind", "payload"),
    [
        # a path-MTU report says nothing about reachability
        (socket.IPPROTO_IP, 11, _extended(errno.EMSGSIZE, 2, 3, 4, _sockaddr_in("10.9.9.9"))),
        # a local error (origin 1), not an ICMP
        (socket.IPPROTO_IP, 11, _extended(errno.ECONNREFUSED, 1, 0, 0, bytes(16))),
        # some other node message
        (socket.IPPROTO_IP, 8, _extended(errno.ECONNREFUSED, 2, 3, 3, bytes(16))),
        # too short to be a sock_extended_err
        (socket.IPPROTO_IP, 11, b"\x6f\x00\x00"),
    ],
)
def test_parser_passes_over_what_is_not_unreachability(
    level: int, kind: int, payload: bytes
) -> None:
    assert parse_extended_error(level, kind, payload, ("127.0.0.1", 4000)) is None


def test_refused_sends_map_to_reports() -> None:
    addr = ("10.1.1.1", 9)
    report = refused_send(OSError(errno.ENETUNREACH, "Network is unreachable"), addr)
    assert report == Unreachable(
        addr, "network is unreachable (the OS refused the send)", errno.ENETUNREACH, True
    )
    assert refused_send(OSError(errno.EHOSTUNREACH, "x"), addr) is not None
    # Only ever an earlier datagram's ICMP, pending; and not about reachability at all:
    assert refused_send(OSError(errno.ECONNREFUSED, "x"), addr) is None
    assert refused_send(OSError(errno.ENOBUFS, "x"), addr) is None


class _ScriptedSocket:
    """``sendto`` raises from a script; ``recvmsg`` serves a scripted error queue."""

    family = socket.AF_INET

    def __init__(self, failures: list[int | None], queue: list[Any]) -> None:
        self.failures = failures
        self.queue = queue
        self.sent: list[tuple[bytes, Any]] = []

    def sendto(self, data: bytes, addr: Any, /) -> int:
        err = self.failures.pop(0) if self.failures else None
        if err is not None:
            raise OSError(err, "scripted")
        self.sent.append((data, addr))
        return len(data)

    def recvmsg(self, bufsize: int, ancbufsize: int, flags: int) -> Any:
        if not self.queue:
            raise BlockingIOError(errno.EAGAIN, "empty")
        return self.queue.pop(0)


def test_a_pending_error_is_blamed_on_its_own_destination_and_the_send_retried() -> None:
    other = ("127.0.0.1", 5555)
    payload = _extended(errno.ECONNREFUSED, 2, 3, 3, _sockaddr_in("127.0.0.1"))
    queued = (b"", [(socket.IPPROTO_IP, 11, payload)], 0x2000, other)
    sock = _ScriptedSocket([errno.ECONNREFUSED], [queued])
    reports: list[Unreachable] = []
    send_datagram(sock, b"x", ("127.0.0.1", 6666), reports)  # type: ignore[arg-type]
    assert reports == [Unreachable(other, REFUSED, errno.ECONNREFUSED, False)]
    assert sock.sent == [(b"x", ("127.0.0.1", 6666))]  # went out on the second try


def test_a_send_refused_twice_is_blamed_on_its_destination() -> None:
    sock = _ScriptedSocket([errno.ENETUNREACH, errno.ENETUNREACH], [])
    reports: list[Unreachable] = []
    send_datagram(sock, b"x", ("10.1.1.1", 9), reports)  # type: ignore[arg-type]
    assert [(r.addr, r.errno, r.soft) for r in reports] == [
        (("10.1.1.1", 9), errno.ENETUNREACH, True)
    ]
    with pytest.raises(BlockingIOError):  # the caller keeps the datagram for later
        send_datagram(
            _ScriptedSocket([errno.EAGAIN], []),
            b"x",
            ("10.1.1.1", 9),
            [],  # type: ignore[arg-type]
        )


def test_a_wrapper_without_an_error_queue_degrades_to_the_timeout() -> None:
    raw = open_socket("127.0.0.1:0")
    wrapped = FaultySocket(raw, "")
    try:
        assert read_error_queue(wrapped) == []
        reports: list[Unreachable] = []
        wrapped.setblocking(False)
        assert drain_socket(wrapped, reports=reports) == [] and reports == []
    finally:
        wrapped.close()


# ------------------------------------------------------------ real sockets


@pytest.mark.loopback
def test_the_error_queue_is_read_and_leaves_the_socket_quiet() -> None:
    dead = free_port()
    sock = open_socket("127.0.0.1:0", error_queue=True)
    try:
        sock.sendto(b"x", ("127.0.0.1", dead))
        assert select.select([sock], [], [], 2.0)[0]  # the ICMP makes it ready (POLLERR)...
        reports: list[Unreachable] = []
        assert drain_socket(sock, reports=reports) == []
        assert reports == [Unreachable(("127.0.0.1", dead), REFUSED, errno.ECONNREFUSED, False)]
        assert select.select([sock], [], [], 0)[0] == []  # ...until the queue is read
    finally:
        sock.close()


def _dead_send(config: Config) -> tuple[float, PeerUnreachable]:
    with Node(config=config) as a:
        start = time.monotonic()
        with pytest.raises(PeerUnreachable) as caught:
            a.send(f"127.0.0.1:{free_port()}", b"anyone?")
        return time.monotonic() - start, caught.value


async def _dead_send_async(config: Config) -> tuple[float, PeerUnreachable]:
    async with AsyncNode(config=config) as a:
        start = time.monotonic()
        with pytest.raises(PeerUnreachable) as caught:
            await a.send(f"127.0.0.1:{free_port()}", b"anyone?")
        return time.monotonic() - start, caught.value


@pytest.mark.loopback
@pytest.mark.parametrize("adapter", ["Node", "AsyncNode"])
def test_a_send_to_a_closed_port_fails_at_once(adapter: str) -> None:
    config = Config(peer_timeout=10.0)
    if adapter == "Node":
        took, error = _dead_send(config)
    else:
        took, error = asyncio.run(_dead_send_async(config))
    assert took < 2.5  # milliseconds in practice; the timeout is 10 s
    assert "connection refused" in str(error) and error.errno == errno.ECONNREFUSED


@pytest.mark.loopback
@pytest.mark.parametrize("adapter", ["Node", "AsyncNode"])
def test_with_ignore_a_closed_port_waits_out_the_peer_timeout(adapter: str) -> None:
    config = Config(peer_timeout=0.5, initial_rto=0.05, os_errors="ignore")
    if adapter == "Node":
        took, error = _dead_send(config)
    else:
        took, error = asyncio.run(_dead_send_async(config))
    assert took >= 0.5
    assert error.cause is None and "no answer" in str(error)


@pytest.mark.loopback
def test_a_receive_from_a_closed_port_ends_at_once() -> None:
    with Node(config=Config(peer_timeout=10.0)) as a:
        start = time.monotonic()
        with pytest.raises(PeerUnreachable, match="connection refused"):
            a.receive(source=f"127.0.0.1:{free_port()}", timeout=20)
        assert time.monotonic() - start < 2.5
        assert a.stats().peers[0].os_errors >= 1


@pytest.mark.loopback
@pytest.mark.skipif(not ipv6_loopback_works(), reason="no IPv6 loopback")
def test_a_send_to_a_closed_ipv6_port_fails_at_once() -> None:
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
        s.bind(("::1", 0))
        dead = s.getsockname()[1]
    with Node("[::1]:0", config=Config(peer_timeout=10.0)) as a:
        start = time.monotonic()
        with pytest.raises(PeerUnreachable, match="connection refused"):
            a.send(f"[::1]:{dead}", b"anyone?")
        assert time.monotonic() - start < 2.5


@pytest.mark.loopback
def test_a_crashed_peer_fails_the_message_sent_after_the_crash(port: int) -> None:
    from .test_restart_loopback import start_receiver

    dest = f"127.0.0.1:{port}"
    receiver = start_receiver(port)
    try:
        with Node(config=Config(peer_timeout=10.0)) as a:
            a.send(dest, b"before the crash")
            receiver.kill()  # SIGKILL: no CLOSE, no goodbye
            receiver.wait()
            start = time.monotonic()
            with pytest.raises(PeerUnreachable, match="connection refused"):
                a.send(dest, b"sent into the void")
            assert time.monotonic() - start < 2.5  # a retransmission timeout or two
    finally:
        receiver.kill()
        receiver.wait()


_NO_ROUTE = """
import asyncio, time
from reliable import AsyncNode, Node, PeerUnreachable

DEST = "198.18.0.1:9"  # inside a fresh network namespace: no route, nothing leaves

def blocking():
    with Node("0.0.0.0:0") as a:
        start = time.monotonic()
        try:
            a.send(DEST, b"x")
        except PeerUnreachable as exc:
            print("Node", time.monotonic() - start, exc.errno, exc)

async def main():
    async with AsyncNode("0.0.0.0:0") as a:
        start = time.monotonic()
        try:
            await a.send(DEST, b"x")
        except PeerUnreachable as exc:
            print("AsyncNode", time.monotonic() - start, exc.errno, exc)

blocking()
asyncio.run(main())
"""


def _private_namespace() -> str | None:
    """Why a private network namespace cannot be made here, or None if it can."""
    if not sys.platform.startswith("linux") or shutil.which("unshare") is None:
        return "needs Linux and unshare(1)"
    done = subprocess.run(["unshare", "-n", "true"], capture_output=True, timeout=10)
    return None if done.returncode == 0 else "unshare -n is not permitted here"


def test_no_route_fails_at_once_inside_a_private_namespace() -> None:
    reason = _private_namespace()
    if reason is not None:
        pytest.skip(reason)
    done = subprocess.run(
        ["unshare", "-n", sys.executable, "-c", _NO_ROUTE],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert [line.split()[0] for line in lines] == ["Node", "AsyncNode"]
    for line in lines:
        _, took, err, message = line.split(" ", 3)
        assert float(took) < 2.5
        assert int(err) == errno.ENETUNREACH
        assert message.startswith(
            "198.18.0.1:9: peer unreachable: network is unreachable (the OS refused the send); "
        )
