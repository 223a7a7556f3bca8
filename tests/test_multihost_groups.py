"""Group addressing across separate hosts (network namespaces on one bridge), with faults.

Multicast to three hosts, broadcast across the segment, and anycast with one
member killed mid-stream; every node impairs what it sends with netem
(``--netem`` / ``FaultySocket``), so data, repairs, acks and NAKs all cross
a lossy link. Nothing here can reach the machine's real interfaces: the
hosts' only interface is on the test bridge (198.18.0.0/24).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time

import pytest

pytestmark = [pytest.mark.multihost, pytest.mark.timeout(150)]

MEMBER_FAULTS = "loss 10% duplicate 3% reorder 10% delay 1ms 1ms"

GROUP_SENDER = textwrap.dedent(
    """
    import json, socket, sys
    from netem.socket import FaultySocket
    from reliable import Config, Node
    me, group, count, faults = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    raw = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    raw.bind((me, 7000))
    config = Config(announce_interval=0.3, peer_timeout=3.0)
    with Node(sock=FaultySocket(raw, faults, seed=None), config=config) as node:
        members = node.wait_for_members(group, 3, timeout=20)
        handles = [
            node.send_group_nowait(group, b"g%04d" % i * 40, timeout=40) for i in range(count)
        ]
        receipts = [h.result(60) for h in handles]
        stats = node.stats().groups[0]
    print(json.dumps({
        "members": sorted(a[0] for a in members),
        "complete": sum(r.complete for r in receipts),
        "acked": sorted({a[0] for r in receipts for a in r.acked}),
        "repairs": stats["repairs"],
        "naks": stats["naks_received"],
    }))
    """
)


def _members(net, group: str, count: int, rmsg_exe: str) -> list[subprocess.Popen]:  # type: ignore[no-untyped-def]
    procs = []
    for host in net.hosts[1:]:
        procs.append(
            host.popen(
                [
                    *(rmsg_exe, "recv", "--bind", f"{host.address}:7000", "--join", group),
                    *("--json", "--count", str(count), "--timeout", "60s"),
                    *("--netem", MEMBER_FAULTS),
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
        )
    return procs


@pytest.mark.parametrize("group", ["multicast://239.1.2.3:7400", "broadcast://:7401"])
def test_a_group_send_reaches_three_hosts_through_faults(
    testnet4,
    rmsg_exe: str,
    group: str,  # type: ignore[no-untyped-def]
) -> None:
    sender, *members = testnet4.hosts
    count = 80
    procs = _members(testnet4, group, count, rmsg_exe)
    sent = sender.run(
        [sys.executable, "-c", GROUP_SENDER, sender.address, group, str(count),
         "loss 15% duplicate 5% reorder 10% delay 1ms 1ms corrupt 1%"],
        timeout=120,
    )  # fmt: skip
    assert sent.returncode == 0, sent.stderr
    result = json.loads(sent.stdout)
    addresses = sorted(h.address for h in members)
    assert result["members"] == addresses
    assert result["complete"] == count and result["acked"] == addresses
    assert result["repairs"] > 0, "the faulty link lost nothing: the test proved nothing"
    for host, proc in zip(members, procs, strict=True):
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err.decode()
        lines = [json.loads(line) for line in out.decode().splitlines()]
        assert [line["data"] for line in lines] == [f"g{i:04d}" * 40 for i in range(count)], host
        assert {line["source"] for line in lines} == {f"{sender.address}:7000"}
        assert {line["group"] for line in lines} == {group.replace("://:", "://198.18.0.255:")}


ANYCAST_SENDER = textwrap.dedent(
    """
    import json, socket, sys, time
    from netem.socket import FaultySocket
    from reliable import Config, Node
    me, count = sys.argv[1], int(sys.argv[2])
    raw = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    raw.bind((me, 7000))
    config = Config(peer_timeout=2.0, max_probe_interval=0.25)
    with Node(sock=FaultySocket(raw, "loss 10% reorder 10% delay 1ms", seed=None),
              config=config) as node:
        node.discover("multicast://239.1.2.4:7402")
        deadline = time.monotonic() + 20
        while len(node.service_members("printer")) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        print(json.dumps({"ready": len(node.service_members("printer"))}), flush=True)
        sys.stdin.readline()  # the test says go
        handles = []
        for i in range(count):
            handles.append(node.send_nowait("anycast://printer", b"job %03d" % i))
            time.sleep(0.02)
        out = []
        for i, h in enumerate(handles):
            r = h.result(60)
            out.append([i, r.peer[0], [m[0] for m, _ in r.failovers]])
    print(json.dumps(out))
    """
)


def test_anycast_fails_over_when_a_member_host_dies_mid_stream(testnet4, rmsg_exe: str) -> None:  # type: ignore[no-untyped-def]
    sender, *members = testnet4.hosts
    procs = [
        host.popen(
            [
                *(rmsg_exe, "recv", "--bind", f"{host.address}:7000", "--json"),
                *("--serve", "printer", "--announce", "multicast://239.1.2.4:7402"),
                *("--netem", "loss 5% delay 1ms reorder 5%"),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for host in members
    ]
    client = sender.popen(
        [sys.executable, "-c", ANYCAST_SENDER, sender.address, "60"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert client.stdin is not None and client.stdout is not None
    assert json.loads(client.stdout.readline()) == {"ready": 3}
    client.stdin.write("go\n")
    client.stdin.flush()
    time.sleep(0.5)  # about 25 jobs in
    victim_host, victim = members[0], procs[0]
    victim.kill()  # SIGKILL: no CLOSE, no WITHDRAW; only silence tells
    out, err = client.communicate(timeout=90)
    assert client.returncode == 0, err
    results = json.loads(out.splitlines()[-1])
    dead = victim_host.address
    got = {}
    victim_out, _ = victim.communicate(timeout=10)
    got[dead] = [json.loads(line)["data"] for line in victim_out.decode().splitlines()]
    for host, proc in zip(members[1:], procs[1:], strict=True):
        proc.terminate()
        stdout, _ = proc.communicate(timeout=10)
        got[host.address] = [json.loads(line)["data"] for line in stdout.decode().splitlines()]
    assert len(results) == 60
    assert any(tried for _, _, tried in results), "no failover happened: the kill came too late"
    for i, peer, tried in results:
        job = f"job {i:03d}"
        assert set(tried) <= {dead} and peer not in tried
        if peer != dead:
            assert job in got[peer], (job, peer)
        holders = [h for h, jobs in got.items() if job in jobs]
        for jobs in got.values():
            assert jobs.count(job) <= 1, "never twice to one member"
        # A second copy exists only where the first member failed the message.
        assert len(holders) == 1 or (dead in tried and set(holders) == {dead, peer}), holders
