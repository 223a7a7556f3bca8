"""The core benchmark's workloads move what they claim (its figures live in docs, not here)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

TOOL = Path(__file__).resolve().parent.parent / "tools" / "core_bench.py"


def test_each_workload_delivers_every_message_it_counts() -> None:
    sys.path.insert(0, str(TOOL.parent))
    try:
        from core_bench import MIB, NET_DATAGRAM, run_bulk, run_workload
    finally:
        sys.path.remove(str(TOOL.parent))
    assert run_workload("stream", 200) == 200
    assert run_workload("rr", 20) == 20
    # rr models two Nodes' blocking receives: the reply carries the request's ack and
    # the next request the reply's, so a round trip is two datagrams (not four)
    short: list[int] = []
    long: list[int] = []
    assert run_workload("rr", 20, short) == 20 and run_workload("rr", 40, long) == 40
    assert sum(long) - sum(short) == 2 * 20
    received, sent = run_bulk("bulk", 1)
    assert received == 1
    # cut for the Ethernet path: one MiB takes more datagrams than it has 1472-byte slices
    assert sent > MIB // NET_DATAGRAM
    received, sent = run_bulk("bulk64k", 1)
    assert received == 1 and sent < 2 * MIB // 60_000  # 64 KiB datagrams, a few acks


def test_the_tool_prints_a_cpu_figure_per_workload() -> None:
    done = subprocess.run(
        [sys.executable, str(TOOL), "--cpu", "--n", "50", "--mib", "1", "--json"],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    assert '"workload": "stream"' in done.stdout and '"workload": "rr"' in done.stdout
    assert '"workload": "bulk"' in done.stdout and '"workload": "bulk64k"' in done.stdout
    assert '"per_mib_ms"' in done.stdout
    assert '"cpu_us"' in done.stdout
