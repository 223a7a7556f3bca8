"""Test hosts in network namespaces: N hosts on one bridge, addresses from 198.18.0.0/24.

Why: group addressing, address validation and failover need real separate
hosts — distinct IP addresses, real broadcast and multicast on an Ethernet
segment — and none of that may touch the machine's real interfaces. Each
host is a network namespace with one veth interface (``eth0``) whose peer
sits on a bridge in a namespace of its own (the "switch"), so even the
bridge is invisible to the machine's own network stack. Addresses come from
198.18.0.0/15, the range reserved for benchmarking (RFC 2544).

Every run gets unique names (``rt<pid hex><random>-h1`` ...), so parallel
runs never collide, and everything is deleted on exit — by the context
manager, by ``atexit`` if the process is interrupted, and by :func:`sweep`
for namespaces left by runs that were killed. Needs root (or CAP_SYS_ADMIN
and CAP_NET_ADMIN) and iproute2.

Usage::

    with TestNetwork(hosts=3) as net:
        h1, h2, h3 = net.hosts
        server = h1.popen([sys.executable, "-m", "rmsg", "recv", "--bind", f"{h1.address}:7000"])
        h2.run([sys.executable, "-m", "rmsg", "send", f"{h1.address}:7000", "hello"])

    python tools/testnet.py --hosts 3 -- ping -c1 198.18.0.2   # run in host 1, then tear down
"""

from __future__ import annotations

import argparse
import atexit
import ipaddress
import os
import secrets
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Host", "TestNetwork", "TestNetworkError", "available", "sweep"]

SUBNET = ipaddress.IPv4Network("198.18.0.0/24")
_PREFIX = "rt"  # every namespace this module makes starts with it (and a pid, for sweep)


class TestNetworkError(RuntimeError):
    """The network could not be built (not root, no iproute2, a command failed)."""

    __test__ = False  # not a pytest test class, despite its name


def available() -> str | None:
    """None if test networks can be built here, else the reason they cannot."""
    if shutil.which("ip") is None:
        return "iproute2's 'ip' command is not installed"
    if os.geteuid() != 0:
        return "building network namespaces needs root"
    return None


def _ip(*args: str) -> None:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        raise TestNetworkError(f"ip {' '.join(args)}: {result.stderr.strip()}")


@dataclass
class Host:
    """One test host: a network namespace with ``eth0`` at ``address``."""

    __test__ = False

    name: str  #: the network namespace
    address: str  #: its IPv4 address on the test segment
    index: int
    _processes: list[subprocess.Popen[Any]] = field(default_factory=list, repr=False)

    def command(self, argv: Sequence[str]) -> list[str]:
        """``argv`` wrapped to run inside this host."""
        return ["ip", "netns", "exec", self.name, *argv]

    def run(
        self, argv: Sequence[str], *, timeout: float = 60, **kwargs: Any
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` in this host to completion (text output captured by default)."""
        kwargs.setdefault("capture_output", True)
        kwargs.setdefault("text", True)
        return subprocess.run(self.command(argv), timeout=timeout, check=False, **kwargs)

    def popen(self, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start ``argv`` in this host; it is killed (by pid) when the network is torn down."""
        process = subprocess.Popen(self.command(argv), **kwargs)
        self._processes.append(process)
        return process

    def stop_processes(self) -> None:
        for process in self._processes:
            if process.poll() is None:
                process.kill()
                try:
                    process.wait(5)
                except subprocess.TimeoutExpired:  # pragma: no cover - a kernel hang
                    pass
        self._processes.clear()


class TestNetwork:
    """``hosts`` namespaces on one bridge; a context manager that always cleans up."""

    __test__ = False

    def __init__(self, hosts: int = 3) -> None:
        if not 1 <= hosts <= 200:
            raise ValueError(f"hosts must be between 1 and 200, got {hosts}")
        self.tag = f"{_PREFIX}{os.getpid():x}{secrets.token_hex(2)}"
        self.switch = f"{self.tag}-sw"
        self.hosts = [
            Host(f"{self.tag}-h{i}", str(SUBNET.network_address + i), i)
            for i in range(1, hosts + 1)
        ]
        self.broadcast = str(SUBNET.broadcast_address)
        self._made: list[str] = []
        self._closed = False

    def __enter__(self) -> TestNetwork:
        reason = available()
        if reason is not None:
            raise TestNetworkError(reason)
        atexit.register(self.close)
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _build(self) -> None:
        _ip("netns", "add", self.switch)
        self._made.append(self.switch)
        # No IGMP snooping: with no querier on the segment, the bridge would forget
        # multicast listeners after its timers ran out; flooding is what a hub would do.
        _ip("-n", self.switch, "link", "add", "br0", "type", "bridge", "mcast_snooping", "0")
        _ip("-n", self.switch, "link", "set", "br0", "up")
        for host in self.hosts:
            _ip("netns", "add", host.name)
            self._made.append(host.name)
            port = f"p{host.index}"
            _ip("link", "add", "name", "eth0", "netns", host.name, "type", "veth",
                "peer", "name", port, "netns", self.switch)  # fmt: skip
            _ip("-n", self.switch, "link", "set", port, "master", "br0")
            _ip("-n", self.switch, "link", "set", port, "up")
            _ip("-n", host.name, "link", "set", "lo", "up")
            _ip("-n", host.name, "addr", "add", f"{host.address}/{SUBNET.prefixlen}",
                "brd", self.broadcast, "dev", "eth0")  # fmt: skip
            _ip("-n", host.name, "link", "set", "eth0", "up")
            # multicast leaves through the test segment, never anywhere else
            _ip("-n", host.name, "route", "add", "224.0.0.0/4", "dev", "eth0")

    def set_link(self, host: Host, up: bool) -> None:
        """Unplug (or replug) ``host``'s cable at the switch."""
        _ip("-n", self.switch, "link", "set", f"p{host.index}", "up" if up else "down")

    def close(self) -> None:
        """Kill the processes started in the hosts and delete every namespace made."""
        if self._closed:
            return
        self._closed = True
        for host in self.hosts:
            host.stop_processes()
        for name in reversed(self._made):
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)
        self._made.clear()
        atexit.unregister(self.close)


def sweep() -> list[str]:
    """Delete namespaces left behind by test networks whose process is gone."""
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=30)
    removed = []
    for line in listed.stdout.splitlines():
        name = line.split()[0] if line.strip() else ""
        if not name.startswith(_PREFIX) or "-" not in name:
            continue
        tag = name.split("-")[0][len(_PREFIX) :]
        try:
            pid = int(tag[:-4], 16)
        except ValueError:
            continue
        if pid and not os.path.exists(f"/proc/{pid}"):
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)
            removed.append(name)
    return removed


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hosts", type=int, default=3, help="how many hosts (default 3)")
    parser.add_argument("--sweep", action="store_true", help="remove namespaces of dead runs")
    parser.add_argument("command", nargs="*", help="run this in host 1, then tear down")
    args = parser.parse_args(argv)
    if args.sweep:
        print("\n".join(sweep()) or "nothing to sweep")
        return 0
    with TestNetwork(args.hosts) as net:
        for host in net.hosts:
            print(f"{host.name}: {host.address}")
        if args.command:
            return net.hosts[0].run(args.command, capture_output=False).returncode
    return 0


if __name__ == "__main__":
    sys.exit(main())
