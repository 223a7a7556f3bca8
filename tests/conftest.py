"""Shared fixtures. Real-socket tests use 127.0.0.1 only (see the README's network-safety notes)."""

from __future__ import annotations

import os
import shutil
import socket
import sys
from pathlib import Path

import pytest


def pytest_sessionstart(session: pytest.Session) -> None:
    """With ``RMSG_EXPECT_CORE=compiled`` (or ``pure``), refuse to run on the other core.

    CI runs the suite twice, once per build; a compiled run that silently imported the
    source tree (or fell back to pure at import) would test nothing new.
    """
    want = os.environ.get("RMSG_EXPECT_CORE")
    if not want:
        return
    import reliable

    core = "compiled" if reliable.__compiled__ else "pure"
    if core != want:
        raise pytest.UsageError(
            f"RMSG_EXPECT_CORE={want} but the {core} core runs, from {reliable.__file__}"
        )


def free_port() -> int:
    """A UDP port on 127.0.0.1 that nobody is bound to right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def port() -> int:
    return free_port()


@pytest.fixture(scope="session")
def rmsg_exe() -> str:
    """The installed ``rmsg`` console script (the one a user would run)."""
    exe = Path(sys.executable).parent / "rmsg"
    found = str(exe) if exe.exists() else shutil.which("rmsg")
    if found is None:
        pytest.fail("the rmsg console script is not installed: pip install -e '.[test]'")
    return found


@pytest.fixture
def testnet():  # type: ignore[no-untyped-def]
    """Three test hosts in network namespaces on one bridge (198.18.0.1-3), torn down after.

    Skips where namespaces cannot be made (not root, no iproute2); CI runs as root.
    """
    from tools.testnet import TestNetwork, available

    reason = available()
    if reason is not None:
        pytest.skip(reason)
    with TestNetwork(hosts=3) as net:
        yield net


@pytest.fixture
def testnet4():  # type: ignore[no-untyped-def]
    """Four test hosts (198.18.0.1-4): a sender and three group members."""
    from tools.testnet import TestNetwork, available

    reason = available()
    if reason is not None:
        pytest.skip(reason)
    with TestNetwork(hosts=4) as net:
        yield net


def ipv6_loopback_works() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False
