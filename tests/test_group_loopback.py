"""Group addressing over real loopback UDP, through netem faults.

Multicast stays on ``lo`` (``IP_MULTICAST_IF`` 127.0.0.1, TTL 1) and
broadcast goes only to 127.255.255.255, so these tests are safe on any
machine; CI also runs them inside ``unshare -n``. Each node impairs what it
sends with :class:`netem.socket.FaultySocket`, so data, repairs, acks and
NAKs all cross a lossy, duplicating, reordering link.
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner

from netem.socket import FaultySocket
from reliable import AsyncNode, Config, GroupReceipt, Node, Receipt, errors
from rmsg.cli import main

from .conftest import free_port

pytestmark = pytest.mark.timeout(120)

FAULTS = "loss 15% duplicate 5% reorder 20% delay 1ms 1ms corrupt 1%"
CONFIG = Config(announce_interval=0.3, peer_timeout=2.0, max_probe_interval=0.25)


def faulty_node(spec: str = FAULTS, seed: int = 1, config: Config = CONFIG) -> Node:
    raw = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    raw.bind(("127.0.0.1", 0))
    return Node(sock=FaultySocket(raw, spec, seed=seed), config=config)


def group_url(scheme: str) -> str:
    port = free_port()
    return (
        f"multicast://239.77.1.{port % 250 + 1}:{port}"
        if scheme == "multicast"
        else (f"broadcast://:{port}")
    )


@pytest.mark.parametrize("scheme", ["multicast", "broadcast"])
def test_every_member_gets_every_message_once_in_order_through_faults(scheme: str) -> None:
    group = group_url(scheme)
    members = [faulty_node(seed=i + 2) for i in range(3)]
    sender = faulty_node(seed=1)
    try:
        for m in members:
            m.join(group)
        found = sender.wait_for_members(group, 3, timeout=10)
        assert len(found) == 3
        count = 150
        handles = [
            sender.send_group_nowait(group, b"m%04d" % i + bytes(i * 37 % 3000), timeout=30)
            for i in range(count)
        ]
        receipts = [h.result(60) for h in handles]
        for receipt in receipts:
            assert isinstance(receipt, GroupReceipt)
            assert receipt.complete and len(receipt.acked) == 3, receipt
        addresses = {m.address for m in members}
        assert {a for r in receipts for a in r.acked} == addresses
        for m in members:
            got = [m.receive(timeout=10) for _ in range(count)]
            assert [g.data[:5] for g in got] == [b"m%04d" % i for i in range(count)]
            assert all(g.group is not None and g.source == sender.address for g in got)
            with pytest.raises(errors.ReceiveTimeout):
                m.receive(timeout=0.3)  # nothing twice
        sent = sender.stats().groups[0]
        assert sent["repairs"] > 0, "the link dropped nothing? then this test tests nothing"
    finally:
        for node in (*members, sender):
            node.close(timeout=0.5)


def test_a_member_that_leaves_is_not_waited_on() -> None:
    group = group_url("multicast")
    members = [Node(config=CONFIG) for _ in range(2)]
    sender = Node(config=CONFIG)
    try:
        for m in members:
            m.join(group)
        assert len(sender.wait_for_members(group, 2, timeout=5)) == 2
        members[1].leave(group)
        deadline = time.monotonic() + 5
        while len(sender.members(group)) > 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        receipt = sender.send_group(group, b"after the leave", timeout=5)
        assert isinstance(receipt, GroupReceipt)
        assert receipt.acked == (members[0].address,) and receipt.complete
    finally:
        for node in (*members, sender):
            node.close(timeout=0.5)


def test_a_crashed_member_is_reported_missing(tmp_path: object) -> None:
    group = group_url("multicast")
    port = free_port()
    crasher = subprocess.Popen(
        [sys.executable, "-m", "rmsg", "recv", "--bind", f"127.0.0.1:{port}", "--join", group],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    survivor = Node(config=CONFIG)
    sender = Node(config=CONFIG)
    try:
        survivor.join(group)
        assert len(sender.wait_for_members(group, 2, timeout=10)) == 2
        crasher.send_signal(signal.SIGKILL)
        crasher.wait(10)
        receipt = sender.send_group(group, b"are you there?", timeout=10)
        assert isinstance(receipt, GroupReceipt)
        assert receipt.acked == (survivor.address,)
        assert receipt.missing == {("127.0.0.1", port): "unreachable"}
        assert receipt.elapsed < CONFIG.peer_timeout + 1.5  # not the 10 s timeout
    finally:
        crasher.kill()
        survivor.close(timeout=0.5)
        sender.close(timeout=0.5)


def test_anycast_fails_over_when_a_member_dies_mid_stream() -> None:
    discovery = group_url("multicast")
    port = free_port()
    victim = subprocess.Popen(
        [
            *(sys.executable, "-m", "rmsg", "recv", "--bind", f"127.0.0.1:{port}"),
            *("--serve", "printer", "--announce", discovery, "--json"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    others = [faulty_node(seed=i + 5) for i in range(2)]
    client = faulty_node(seed=9)
    try:
        for node in others:
            node.serve("printer", announce=discovery)
        client.discover(discovery)
        deadline = time.monotonic() + 10
        while len(client.service_members("printer")) < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(client.service_members("printer")) == 3
        handles = []
        for i in range(60):
            handles.append(client.send_nowait("anycast://printer", b"job %03d" % i))
            if i == 20:
                victim.send_signal(signal.SIGKILL)
            time.sleep(0.005)
        receipts = [h.result(30) for h in handles]
        victim.wait(10)
        dead = ("127.0.0.1", port)
        victim_got = [json.loads(line)["data"] for line in victim.stdout or []]
        got = {node.address: [] for node in others}  # type: dict[object, list[str]]
        for node in others:
            while True:
                try:
                    got[node.address].append(node.receive(timeout=0.3).data.decode())
                except errors.ReceiveTimeout:
                    break
        for i, receipt in enumerate(receipts):
            assert isinstance(receipt, Receipt)
            job = f"job {i:03d}"
            tried = [m for m, _ in receipt.failovers]
            assert set(tried) <= {dead}
            if receipt.peer != dead:
                assert job in got[receipt.peer]
            holders = [a for a, jobs in got.items() if job in jobs]
            assert len(holders) <= 1 + (job in victim_got)
            assert all(jobs.count(job) <= 1 for jobs in got.values())
            if job in victim_got and receipt.peer != dead:
                assert dead in tried, "a second copy only after the first member failed it"
        assert any(r.failovers for r in receipts)  # type: ignore[union-attr]
    finally:
        victim.kill()
        for node in (*others, client):
            node.close(timeout=0.5)


def test_asyncio_node_joins_sends_and_serves() -> None:
    async def run() -> None:
        group = group_url("multicast")
        async with AsyncNode(config=CONFIG) as a, AsyncNode(config=CONFIG) as b:
            b.join(group)
            b.serve("echo", announce=group)
            assert len(await a.wait_for_members(group, 1, timeout=5)) == 1
            receipt = await a.send_group(group + "/", b"to the group", timeout=5)
            assert isinstance(receipt, GroupReceipt) and receipt.acked == (b.address,)
            assert (await b.receive(timeout=5)).data == b"to the group"
            a.discover(group)
            for _ in range(100):
                if a.service_members("echo"):
                    break
                await asyncio.sleep(0.02)
            one = await a.send("anycast://echo", b"to one member", timeout=5)
            assert isinstance(one, Receipt) and one.peer == b.address
            assert (await b.receive(timeout=5)).data == b"to one member"

    asyncio.run(run())


def test_cli_send_prints_the_group_receipt() -> None:
    group = group_url("multicast")
    member = Node(config=CONFIG)
    try:
        member.join(group)
        result = CliRunner().invoke(main, ["send", group, "hi", "--wait-members", "1"])
        assert result.exit_code == 0, result.output
        assert "1 acked" in result.output and f"127.0.0.1:{member.address[1]}" in result.output
        assert member.receive(timeout=5).data == b"hi"
        missing = CliRunner().invoke(main, ["send", group + "/nosuch", "hi", "--wait-members", "1"])
        assert missing.exit_code == 1 and "no_mailbox" in missing.output
        table = CliRunner().invoke(main, ["stats", f"127.0.0.1:{member.address[1]}"])
        assert table.exit_code == 0 and "------ Groups and services ------" in table.output
        row = next(line for line in table.output.splitlines() if line.startswith(group))
        assert row.split()[1:3] == ["member", "0"]  # it knows no other member
    finally:
        member.close(timeout=0.5)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["multicast://10.1.2.3:7000", "x"], "not a multicast address"),
        (["multicast://239.1.2.3", "x"], "needs a port"),
        (["broadcast://10.255.255.255:7000", "x"], "broadcasts only to 127.255.255.255"),
        (["anycast://printer", "x"], "needs its members"),
        (["anycast://", "x", "--member", "127.0.0.1:1"], "service name"),
        (["127.0.0.1:7000", "x", "--wait-members", "2"], "--wait-members applies"),
        (["multicast://239.1.2.3:7000", "x", "--bind", "0.0.0.0:0"], "specific IPv4"),
    ],
)
def test_cli_refuses_bad_group_arguments_before_sending(args: list[str], expected: str) -> None:
    result = CliRunner().invoke(main, ["send", *args])
    assert result.exit_code == 2, result.output
    assert expected in result.output


def test_the_node_refuses_what_would_leave_the_machine() -> None:
    ttl = pytest.raises(errors.UsageError, match="multicast_ttl must be 1 on loopback")
    with Node(config=Config(multicast_ttl=4)) as node, ttl:
        node.join("multicast://239.1.2.3:7000")
    with Node("0.0.0.0:0") as node, pytest.raises(errors.UsageError, match="specific IPv4"):
        node.members("broadcast://:7000")


@pytest.mark.parametrize("adapter", ["node", "asyncio"])
def test_a_first_send_waits_for_a_member_that_answers_late(adapter: str) -> None:
    """A loaded host answers the SOLICIT after DISCOVERY_WAIT: the first send_group waits
    for it (up to DISCOVERY_MAX) rather than go to no known member and be acked by nobody."""
    group = group_url("multicast")
    member = faulty_node("delay 500ms", config=Config(announce_interval=30.0))
    try:
        member.join(group)
        if adapter == "node":
            with Node(config=CONFIG) as sender:
                receipt = sender.send_group(group, b"late", timeout=10)
        else:

            async def main() -> GroupReceipt:
                async with AsyncNode(config=CONFIG) as sender:
                    return await sender.send_group(group, b"late", timeout=10)

            receipt = asyncio.run(main())
        assert receipt.acked == (member.address,) and receipt.complete, receipt
        assert member.receive(timeout=5).data == b"late"
    finally:
        member.close(timeout=0.5)
