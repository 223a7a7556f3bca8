"""The core benchmark's workloads move what they claim (its figures live in docs, not here)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

TOOL = Path(__file__).resolve().parent.parent / "tools" / "core_bench.py"


def test_each_workload_delivers_every_message_it_counts() -> None:
    sys.path.insert(0, str(TOOL.parent))
    try:
        from core_bench import run_workload
    finally:
        sys.path.remove(str(TOOL.parent))
    assert run_workload("stream", 200) == 200
    assert run_workload("rr", 20) == 20


def test_the_tool_prints_a_cpu_figure_per_workload() -> None:
    done = subprocess.run(
        [sys.executable, str(TOOL), "--cpu", "--n", "50", "--json"],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    assert '"workload": "stream"' in done.stdout and '"workload": "rr"' in done.stdout
    assert '"cpu_us"' in done.stdout
