"""The netem pytest plugin's fixtures, as a user's test suite would use them."""

from __future__ import annotations

import random
import socket

import pytest

from netem import SimNetwork
from netem.proxy import UdpProxy
from reliable import Endpoint, events

pytest_plugins = ["pytester"]


@pytest.mark.loopback
def test_netem_proxy_fixture_in_front_of_a_udp_server(netem_proxy) -> None:  # type: ignore[no-untyped-def]
    server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    server.bind(("127.0.0.1", 0))
    server.settimeout(2)
    proxy: UdpProxy = netem_proxy(server.getsockname(), "delay 1ms")
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client.sendto(b"through netem", proxy.address)
    assert server.recvfrom(100)[0] == b"through netem"
    client.close()
    server.close()


@pytest.mark.loopback
def test_faulty_socket_fixture(faulty_socket) -> None:  # type: ignore[no-untyped-def]
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sink.bind(("127.0.0.1", 0))
    sock = faulty_socket("loss 100%")
    for _ in range(10):
        sock.sendto(b"lost", sink.getsockname())
    assert sock.counters.dropped == 10
    sink.close()


def test_sim_network_fixture_runs_sans_io_hosts(sim_network: SimNetwork, netem_seed: int) -> None:
    a, b = (
        Endpoint(rng=random.Random(netem_seed), arrival_events=True),
        Endpoint(rng=random.Random(netem_seed + 1), arrival_events=True),
    )
    sim_network.add_host("a", a)
    sim_network.add_host("b", b)
    sim_network.set_link("a", "b", "loss 30%")
    sim_network.call_at(0.0, lambda: a.send("b", b"hi", now=sim_network.now), host="a")
    sim_network.run(until=30.0)
    assert [e.data for e in iter(b.next_event, None) if isinstance(e, events.MessageReceived)] == [
        b"hi"
    ]


def test_a_failing_test_reports_its_seed(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        def test_flaky(sim_network, netem_seed):
            assert False
        """
    )
    result = pytester.runpytest("--netem-seed", "1234", "-p", "no:cacheprovider")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*netem seed: 1234 (replay with --netem-seed 1234)*"])


@pytest.mark.loopback
def test_a_failed_proxy_errors_the_test_and_the_others_still_stop(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(
        """
        import threading, time

        started = []

        def broken_clock():
            if threading.current_thread().name == "netem-proxy":
                raise RuntimeError("injected")
            return time.monotonic()

        def test_uses_two_proxies(netem_proxy):
            started.append(netem_proxy(("127.0.0.1", 9), clock=broken_clock))
            started.append(netem_proxy(("127.0.0.1", 9)))

        def test_the_healthy_one_was_stopped():
            assert started[1].wait(0) is True and started[1].error is None
        """
    )
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=2, errors=1)
    result.stdout.fnmatch_lines(["*ProxyFailed: netem proxy stopped relaying: RuntimeError*"])


def test_seed_defaults_to_the_test_name(netem_seed: int, request: pytest.FixtureRequest) -> None:
    import zlib

    assert netem_seed == zlib.crc32(request.node.nodeid.encode())


def _signature(function: object) -> str:
    """``(a, b=None, *, c=1)``: a signature as the docs write it, without annotations."""
    import inspect

    sig = inspect.signature(function)  # type: ignore[arg-type]
    bare = [p.replace(annotation=inspect.Parameter.empty) for p in sig.parameters.values()]
    return str(sig.replace(parameters=bare, return_annotation=inspect.Signature.empty))


def test_the_docs_give_the_fixture_factories_real_signatures(
    netem_proxy,
    faulty_socket,  # type: ignore[no-untyped-def]
) -> None:
    from pathlib import Path

    docs = (Path(__file__).resolve().parent.parent / "docs" / "netem.md").read_text()
    assert f"`netem_proxy{_signature(netem_proxy)}`" in docs
    assert f"`faulty_socket{_signature(faulty_socket)}`" in docs
