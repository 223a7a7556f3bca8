"""RPC stubs as a type checker sees them: ``mypy --strict`` over a user's Protocol stub."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.test_typing import _mypy

pytestmark = pytest.mark.static

STUB_USER = """
from typing import Protocol

from reliable import Node
from reliable.aio import AsyncNode
from reliable.rpc import AsyncClient, Client


class CalculatorAPI(Protocol):
    def add(self, a: int, b: int) -> int: ...


class AsyncCalculatorAPI(Protocol):
    async def add(self, a: int, b: int) -> int: ...


class Calculator:
    def add(self, a: int, b: int) -> int:
        return a + b


def total(node: Node) -> int:
    with Client(node) as client:
        calc = client.stub(CalculatorAPI, "127.0.0.1:7000/calc")
        concrete = client.stub(Calculator, "127.0.0.1:7000/calc")
        return calc.add(1, 2) + concrete.add(3, 4)


async def total_async(node: AsyncNode) -> int:
    async with AsyncClient(node) as client:
        calc = client.stub(AsyncCalculatorAPI, "127.0.0.1:7000/calc")
        return await calc.add(1, 2)
"""


def test_a_stub_from_a_protocol_type_checks(tmp_path: Path) -> None:
    done = _mypy(tmp_path, STUB_USER)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_stub_carries_the_interface_types(tmp_path: Path) -> None:
    done = _mypy(
        tmp_path,
        STUB_USER + "\n\ndef wrong(node: Node) -> str:\n"
        "    with Client(node) as client:\n"
        '        return client.stub(CalculatorAPI, "127.0.0.1:7000").add(1, 2)\n',
    )
    assert done.returncode == 1 and 'Incompatible return value type (got "int"' in done.stdout
