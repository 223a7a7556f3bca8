"""rmsg between separate hosts: network namespaces on a bridge, 198.18.0.0/24.

The hosts come from tools/testnet.py (the ``testnet`` fixture); every
process runs inside one of them, so nothing reaches the machine's real
interfaces. The link faults come from ``rmsg netem`` running on a third host.
"""

from __future__ import annotations

import json
import select
import subprocess
import sys
import textwrap
import time

import pytest

pytestmark = [pytest.mark.multihost, pytest.mark.timeout(120)]

SENDER = textwrap.dedent(
    """
    import json, sys
    from reliable import Config, Node
    dest, count = sys.argv[1], int(sys.argv[2])
    with Node("0.0.0.0:0", config=Config(peer_timeout=20.0)) as node:
        receipts = [node.send(dest, b"msg %04d" % i * 50, timeout=30) for i in range(count)]
        stats = node.stats()
    print(json.dumps({"delivered": len(receipts),
                      "retransmissions": stats.retransmissions}))
    """
)


def _first_stderr_line(proc: subprocess.Popen[bytes], timeout: float) -> str:
    """The first line ``proc`` writes to stderr, or "" if none comes within ``timeout``."""
    assert proc.stderr is not None
    ready, _, _ = select.select([proc.stderr], [], [], timeout)
    return proc.stderr.readline().decode() if ready else ""


def test_messages_cross_hosts_through_a_faulty_link(testnet, rmsg_exe: str) -> None:  # type: ignore[no-untyped-def]
    receiver, sender, relay = testnet.hosts
    count = 100
    server = receiver.popen(
        [rmsg_exe, "recv", "--bind", f"{receiver.address}:7000", "--count", str(count), "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    proxy = relay.popen(
        [
            *(rmsg_exe, "netem", "--listen", f"{relay.address}:9000", "--seed", "5", "--json"),
            *("--forward", f"{receiver.address}:7000"),
            *("--spec", "loss 15% duplicate 5% reorder 10% delay 1ms 1ms corrupt 2%"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    # Both print their first line once bound; sending earlier meets a closed port, and a
    # refused first contact now fails at once.
    for proc, word in ((server, "listening"), (proxy, "netem:")):
        line = _first_stderr_line(proc, timeout=30)
        assert word in line, line
    sent = sender.run(
        [sys.executable, "-c", SENDER, f"{relay.address}:9000", str(count)], timeout=90
    )
    assert sent.returncode == 0, sent.stderr
    result = json.loads(sent.stdout)
    out, _ = server.communicate(timeout=30)
    lines = [json.loads(line) for line in out.decode().splitlines()]
    assert [line["data"] for line in lines] == [f"msg {i:04d}" * 50 for i in range(count)]
    assert all(line["source"].startswith(f"{relay.address}:") for line in lines)  # via the relay
    assert result["delivered"] == count and result["retransmissions"] > 0  # the link was bad
    proxy.terminate()
    counters = json.loads(proxy.communicate(timeout=10)[0])
    assert counters["up"]["dropped"] > 0 and counters["down"]["dropped"] > 0


def test_hosts_are_isolated_and_addressed_from_the_benchmark_range(testnet) -> None:  # type: ignore[no-untyped-def]
    h1, h2, _ = testnet.hosts
    assert [h.address for h in testnet.hosts] == ["198.18.0.1", "198.18.0.2", "198.18.0.3"]
    shown = h1.run(["ip", "-o", "-4", "addr", "show", "dev", "eth0"]).stdout
    assert "198.18.0.1/24" in shown and "brd 198.18.0.255" in shown
    routes = h1.run(["ip", "route"]).stdout
    assert "default" not in routes, "a test host must have no way off the segment"
    probe = textwrap.dedent(
        """
        import socket, sys
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.settimeout(5)
        s.bind(("0.0.0.0", 7100))
        data, addr = s.recvfrom(100)
        print(addr[0], data.decode())
        """
    )
    listener = h2.popen([sys.executable, "-c", probe], stdout=subprocess.PIPE)
    time.sleep(0.3)
    h1.run([sys.executable, "-c",
            "import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
            "s.sendto(b'hi', ('198.18.0.2', 7100))"])  # fmt: skip
    out, _ = listener.communicate(timeout=10)
    assert out.decode().split() == ["198.18.0.1", "hi"]


def test_a_test_network_leaves_nothing_behind() -> None:
    from tools.testnet import TestNetwork, available

    if available() is not None:
        pytest.skip(str(available()))
    with TestNetwork(hosts=2) as net:
        names = [net.switch, *(h.name for h in net.hosts)]
        listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        assert all(name in listed for name in names)
        with pytest.raises(RuntimeError), TestNetwork(hosts=1) as inner:  # even on failure
            inner_name = inner.hosts[0].name
            raise RuntimeError("boom")
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not any(name in listed for name in [*names, inner_name])
