"""The proxy benchmark runs and prints its figures (a smoke run, not a timed assertion)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.loopback, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent


def test_bench_proxy_quick_prints_a_ratio() -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "bench_proxy.py"), "--quick"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "ratio" in done.stdout and "datagrams/s" in done.stdout
    assert "proxy CPU" in done.stdout
