"""pytest plugin: fixtures that put faults between a test and its UDP application.

Installed with netem (entry point ``pytest11``), so any project that installs
rmsg gets:

* ``netem_proxy`` — a factory: ``netem_proxy(forward=("127.0.0.1", port),
  spec="loss 10% delay 5ms")`` starts a :class:`~netem.proxy.UdpProxy` on a free
  loopback port and returns it (``proxy.address`` is where the client should
  send); every proxy is stopped after the test.
* ``faulty_socket`` — a factory: ``faulty_socket("loss 5%", incoming="delay 5ms")``
  returns a :class:`~netem.socket.FaultySocket` bound to a free loopback port.
* ``sim_network`` — a :class:`~netem.sim.SimNetwork` for sans-I/O code.
* All three can change faults mid-test: ``set``, ``clear``, ``partition``,
  ``heal`` and the ``faults`` context manager (see docs/netem.md).
* ``netem_seed`` — the seed all of them use: ``--netem-seed N`` on the command
  line, else one derived from the test's name (stable from run to run). A
  failing test's report shows it, so the same faults can be replayed.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Generator, Iterator
from typing import Any

import pytest

from .models import Impairment
from .proxy import ProxyFailed, UdpProxy
from .scenario import Link, Scenario
from .sim import SimNetwork
from .socket import FaultySocket

__all__ = ["faulty_socket", "netem_proxy", "netem_seed", "sim_network"]

_SEED_KEY = pytest.StashKey[int]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("netem", "netem fault injection")
    group.addoption(
        "--netem-seed",
        type=int,
        default=None,
        help="seed for the netem fixtures (default: derived from each test's name)",
    )


@pytest.fixture
def netem_seed(request: pytest.FixtureRequest) -> int:
    """The seed every netem fixture of this test uses."""
    given = request.config.getoption("--netem-seed")
    seed = int(given) if given is not None else zlib.crc32(request.node.nodeid.encode())
    request.node.stash[_SEED_KEY] = seed
    return seed


@pytest.fixture
def netem_proxy(netem_seed: int) -> Iterator[Callable[..., UdpProxy]]:
    """Factory for started fault-injecting proxies on 127.0.0.1; all stopped afterwards."""
    proxies: list[UdpProxy] = []

    def start(
        forward: str | tuple[str, int],
        spec: Impairment | str | None = None,
        *,
        up: Impairment | str | Link | None = None,
        down: Impairment | str | Link | None = None,
        scenario: Scenario | None = None,
        listen: str | tuple[str, int] = ("127.0.0.1", 0),
        **options: Any,
    ) -> UdpProxy:
        if spec is not None:
            up = spec if up is None else up
            down = spec if down is None else down
        proxy = UdpProxy(
            listen, forward, up=up, down=down, scenario=scenario, seed=netem_seed, **options
        )
        proxies.append(proxy)
        return proxy.start()

    yield start
    failures: list[ProxyFailed] = []
    for proxy in proxies:  # stop them all, then report a relay that failed (as a test error)
        try:
            proxy.stop()
        except ProxyFailed as exc:
            failures.append(exc)
    if failures:
        raise failures[0]


@pytest.fixture
def faulty_socket(netem_seed: int) -> Iterator[Callable[..., FaultySocket]]:
    """Factory for UDP sockets on 127.0.0.1 whose sends are impaired; all closed afterwards."""
    sockets: list[FaultySocket] = []

    def make(
        impairment: Impairment | str | Link,
        *,
        incoming: Impairment | str | Link | None = None,
        host: str = "127.0.0.1",
    ) -> FaultySocket:
        wrapped = FaultySocket.bind(
            (host, 0), impairment, incoming=incoming, seed=netem_seed, client=len(sockets)
        )
        sockets.append(wrapped)
        return wrapped

    yield make
    for s in sockets:
        s.close()


@pytest.fixture
def sim_network(netem_seed: int) -> SimNetwork:
    """A simulated network on a virtual clock, seeded with ``netem_seed``."""
    return SimNetwork(seed=netem_seed)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    seed = item.stash.get(_SEED_KEY, None)
    if seed is not None and report.failed:
        report.sections.append(("netem", replay_text(seed, item.nodeid)))
    return report


def replay_text(seed: int, nodeid: str) -> str:
    """How to replay a failed test's faults, on each carrier (the failure report's section)."""
    return "\n".join(
        [
            f"netem seed: {seed} (replay with --netem-seed {seed})",
            f"  this test:      pytest --netem-seed {seed} '{nodeid}'",
            "  the same decisions on any carrier (same seed, same datagrams in the same order):",
            f"    proxy:        rmsg netem --seed {seed} ...   or   UdpProxy(..., seed={seed})"
            "   (client k: k-th client admitted)",
            f"    socket:       FaultySocket(sock, spec, seed={seed}, client=k)"
            "   (faulty_socket: k-th socket made)",
            f"    asyncio:      create_faulty_datagram_endpoint(factory, spec, seed={seed})",
            f"    simulator:    SimNetwork(seed={seed})   "
            "(pair k: k-th pair of hosts to exchange a datagram; up: its first sender's way)",
        ]
    )
