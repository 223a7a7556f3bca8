"""Typing as a user meets it: ``mypy --strict`` over a user-style snippet, outside the repo.

mypy cannot follow the import hook of setuptools' default editable install, so where
``reliable`` is installed that way the test points mypy at the source tree
(``MYPYPATH``), as README.md's one-line fix does for a user
(``--config-settings editable_mode=strict``)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.static

USER_CODE = """
import random

from reliable import (
    Config, DeliveryFailed, Endpoint, GroupReceipt, Message, Node, PeerUnreachable,
    Receipt, SendHandle, events,
)


def talk(node: Node) -> int:
    handle: SendHandle = node.send_nowait("127.0.0.1:7000/jobs", b"build", msg_type=3)
    result = handle.result(timeout=5.0)
    if isinstance(result, GroupReceipt):
        return len(result.acked)
    retransmissions: int = result.retransmissions
    msg: Message = node.receive(timeout=1.0)
    data: bytes = msg.data
    return retransmissions + len(data) + msg.msg_type


def safe_to_resend(exc: DeliveryFailed) -> bool:
    if isinstance(exc, PeerUnreachable):
        return exc.delivered is False
    return exc.delivered is False


def simulate() -> list[int]:
    ep = Endpoint(Config(peer_timeout=2.0), rng=random.Random(1))
    ticket: int = ep.send(("10.0.0.2", 7000), b"hi", now=0.0)
    out: list[tuple[bytes, object]] = ep.datagrams_to_send(now=0.0)
    deadline: float | None = ep.get_timer()
    done = [ticket, len(out)]
    while (event := ep.next_event()) is not None:
        if isinstance(event, events.MessageDelivered):
            done.append(event.ticket)
        elif isinstance(event, events.PeerUnreachable):
            done.append(int(event.silent_for))
    return done if deadline is not None else []


def receipt_fields(r: Receipt) -> float:
    return r.elapsed + r.size
"""

UNICAST_SEND = """
from reliable import Address, AsyncNode, GroupReceipt, Node, format_address


def peer_of(node: Node) -> str:
    receipt = node.send("127.0.0.1:7000", b"hi")  # a unicast destination
    where: Address = receipt.peer  # a Receipt: GroupReceipt has no .peer
    later = node.send_nowait("anycast://printer", b"page").result(timeout=5)
    member: Address = later.peer
    return format_address(where) + str(member[1])


def members_of(node: Node) -> int:
    receipt = node.send_group("multicast://239.1.2.3:7000/news", b"all")
    pending = node.send_group_nowait("broadcast://:7001", b"anyone?")
    assert isinstance(pending.result(timeout=5), GroupReceipt)
    return len(receipt.acked) + len(receipt.missing)


async def talk(node: AsyncNode) -> int:
    receipt = await node.send("127.0.0.1:7000", b"hi")
    group = await node.send_group("multicast://239.1.2.3:7000", b"all")
    handle = node.send_nowait("127.0.0.1:7000", b"hi")
    first: Address = receipt.peer
    second: Address = (await handle).peer
    return first[1] + second[1] + len(group.acked)
"""

#: What the type checker must refuse: a group's outcome read as a unicast receipt.
GROUP_AS_RECEIPT = """
from reliable import Node


def wrong(node: Node) -> str:
    return str(node.send_group("multicast://239.1.2.3:7000", b"x").peer)
"""


def _mypy(tmp_path: Path, code: str) -> subprocess.CompletedProcess[str]:
    mypy = Path(sys.executable).parent / "mypy"
    if not mypy.exists() and shutil.which("mypy") is None:
        pytest.skip("mypy is not installed (it is in the test extra)")
    user = tmp_path / "user_project"
    user.mkdir(exist_ok=True)
    (user / "app.py").write_text(textwrap.dedent(code))
    env = {k: v for k, v in os.environ.items() if k != "MYPYPATH"}
    argv = [str(mypy) if mypy.exists() else "mypy", "--strict", "--no-incremental", "app.py"]
    done = subprocess.run(argv, cwd=user, capture_output=True, text=True, env=env, timeout=300)
    if 'module named "reliable"' in done.stdout:  # the editable install's import hook
        env["MYPYPATH"] = str(ROOT)
        done = subprocess.run(argv, cwd=user, capture_output=True, text=True, env=env, timeout=300)
    return done


def test_user_code_type_checks_strictly(tmp_path: Path) -> None:
    done = _mypy(tmp_path, USER_CODE)
    assert done.returncode == 0, done.stdout + done.stderr


def test_a_unicast_send_returns_a_receipt_to_the_type_checker(tmp_path: Path) -> None:
    done = _mypy(tmp_path, UNICAST_SEND)
    assert done.returncode == 0, done.stdout


def test_a_group_receipt_is_not_a_receipt_to_the_type_checker(tmp_path: Path) -> None:
    done = _mypy(tmp_path, GROUP_AS_RECEIPT)
    assert done.returncode == 1
    assert '"GroupReceipt" has no attribute "peer"' in done.stdout, done.stdout


def test_the_readme_says_how_to_make_an_editable_install_type_checkable() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "--config-settings editable_mode=strict" in readme
