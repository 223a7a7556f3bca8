"""A real path: two network namespaces over veth (MTU 1500), 198.18.0.0/24.

On loopback rmsg sends 64 KiB datagrams; here the path decides. The sender
discovers 1472-byte datagrams (reliable/pmtud.py) and, where the kernel has
it, sends the fragments of a big message with UDP GSO (reliable/udpio.py);
the receiver reads them with GRO. Every process runs inside a test host
(tools/testnet.py), so nothing reaches the machine's real interfaces.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

pytestmark = [pytest.mark.multihost, pytest.mark.timeout(120)]

RECEIVER = textwrap.dedent(
    """
    import hashlib, json, sys
    from reliable import Config, Node, udpio
    with Node(sys.argv[1], config=Config(peer_timeout=20.0)) as node:
        print("listening", file=sys.stderr, flush=True)
        digests = [hashlib.sha256(node.receive(timeout=60).data).hexdigest() for _ in range(2)]
        offload = udpio.offload_of(node._sock)
        print(json.dumps({"digests": digests,
                          "gro_reads": offload.gro_reads if offload else None}))
    """
)

SENDER = textwrap.dedent(
    """
    import hashlib, json, sys
    from reliable import Config, Node, udpio
    dest = sys.argv[1]
    data = bytes(range(256)) * 4096 * 4  # 4 MiB
    with Node("0.0.0.0:0", config=Config(peer_timeout=20.0)) as node:
        node.send(dest, data, timeout=60)  # at 1200 bytes: discovery runs meanwhile
        node.send(dest, data[::-1], timeout=60)  # cut for the size it found
        session = next(iter(node._endpoint._peers.values()))
        offload = udpio.offload_of(node._sock)
        print(json.dumps({
            "digests": [hashlib.sha256(d).hexdigest() for d in (data, data[::-1])],
            "datagram_size": session.datagram_size,
            "probes_acked": session.pmtu.probes_acked,
            "gso": bool(offload and offload.gso),
            "gso_sends": offload.gso_sends if offload else None,
        }))
    """
)


def test_a_veth_path_is_discovered_and_crossed_with_segmentation_offload(testnet) -> None:  # type: ignore[no-untyped-def]
    receiver, sender, _ = testnet.hosts
    server = receiver.popen(
        [sys.executable, "-c", RECEIVER, f"{receiver.address}:7000"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert server.stderr is not None
    assert "listening" in server.stderr.readline().decode()
    sent = sender.run([sys.executable, "-c", SENDER, f"{receiver.address}:7000"], timeout=90)
    assert sent.returncode == 0, sent.stderr
    result = json.loads(sent.stdout)
    out, _ = server.communicate(timeout=60)
    got = json.loads(out.decode())
    assert got["digests"] == result["digests"]  # both messages, intact, in order
    assert result["datagram_size"] == 1472 and result["probes_acked"] >= 1
    if result["gso"]:  # (a kernel without UDP GSO takes the one-by-one path)
        assert result["gso_sends"] > 0


def test_rmsg_bench_veth_reports_its_rows_and_leaves_no_namespace(rmsg_exe: str) -> None:
    """A smoke run of `rmsg bench --veth`: it works and cleans up; figures are not judged."""
    from tools.testnet import available

    reason = available()
    if reason is not None:
        pytest.skip(reason)
    bench = subprocess.Popen(
        [rmsg_exe, "bench", "--veth", "--quick", "--duration", "0.2", "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        out, err = bench.communicate(timeout=110)
    finally:
        if bench.poll() is None:
            bench.kill()
            bench.wait(10)
    if bench.returncode != 0 and "needs tools/testnet.py" in err:
        pytest.skip("this rmsg is installed outside a source checkout (the compiled-core run)")
    assert bench.returncode == 0, err
    figures = json.loads(out)
    assert figures["path"] == "veth"
    rows = {(t["transport"], t["size"]) for t in figures["throughput"]}
    big = 16 << 20
    assert rows == {("udp", 1024), ("tcp", 1024), ("rmsg", 1024), ("tcp", big), ("rmsg", big)}
    assert all(t["messages"] > 0 for t in figures["throughput"])
    # tools/testnet.py names a run's namespaces after its pid: the bench's are all gone
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not [n for n in listed.split() if n.startswith(f"rt{bench.pid:x}")]
