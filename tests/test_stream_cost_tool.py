"""tools/stream_cost.py, briefly: both adapters' streams run to the end and are counted."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("flags", [[], ["--async"]])
def test_a_short_stream_is_split_by_side(flags: list[str]) -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "stream_cost.py"), "--count", "300", *flags],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert re.search(r"Node, 1024 B, 300 messages", out), out
    assert re.search(r"sender +CPU +[0-9.]+ us/msg", out), out
    assert re.search(r"receiver +CPU +[0-9.]+ us/msg", out), out
    records = float(re.search(r"records out per message ([0-9.]+)", out).group(1))  # type: ignore[union-attr]
    assert records >= 1.0, "every message is at least one DATA record"
