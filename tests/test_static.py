"""Project-wide checks: the library's import footprint, mypy --strict and ruff."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_reliable_imports_only_the_standard_library() -> None:
    probe = (
        "import json, sys, sysconfig\n"
        "before = set(sys.modules)\n"
        "import reliable\n"
        "from reliable import Node, Endpoint, Config\n"
        "print(json.dumps(sorted(set(sys.modules) - before)))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    new = json.loads(out.stdout)
    top = {name.split(".")[0] for name in new}
    # a compiled build's modules share one mypyc runtime library, named <hash>__mypyc
    third_party = {
        name
        for name in top - set(sys.stdlib_module_names) - {"reliable"}
        if not name.endswith("__mypyc")
    }
    assert third_party == set(), f"reliable imported non-stdlib modules: {third_party}"
    assert "asyncio" not in top, "asyncio is imported only when AsyncNode is used"


def _tool(name: str) -> str:
    exe = Path(sys.executable).parent / name
    found = str(exe) if exe.exists() else shutil.which(name)
    if found is None:
        pytest.skip(f"{name} is not installed")
    return found


@pytest.mark.static
def test_mypy_strict() -> None:
    done = subprocess.run(
        [_tool("mypy"), "--strict", "reliable", "netem"], cwd=ROOT, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.static
def test_ruff() -> None:
    done = subprocess.run([_tool("ruff"), "check", "."], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
