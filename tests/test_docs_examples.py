"""The Python examples in the guides run, and do what their asserts say."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parent.parent / "docs"
_BLOCK = re.compile(r"```python\n(.*?)```", re.S)


def _examples(name: str) -> list[str]:
    return _BLOCK.findall((DOCS / name).read_text())


@pytest.mark.loopback
@pytest.mark.parametrize("code", _examples("mailboxes.md"))
def test_mailbox_guide_examples_run(code: str) -> None:
    exec(compile(code, "docs/mailboxes.md", "exec"), {})  # our own docs, run as written


@pytest.mark.loopback
@pytest.mark.parametrize("code", _examples("groups.md"))
def test_groups_guide_examples_run(code: str) -> None:
    exec(compile(code, "docs/groups.md", "exec"), {})


def _section(name: str, heading: str) -> str:
    text = (DOCS / name).read_text()
    start = text.index(f"\n## {heading}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else len(text)]


@pytest.mark.loopback
@pytest.mark.parametrize("code", _BLOCK.findall(_section("usage.md", "Cancellation")))
def test_usage_cancellation_examples_run(code: str) -> None:
    exec(compile(code, "docs/usage.md", "exec"), {})  # our own docs, run as written
