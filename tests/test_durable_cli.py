"""`rmsg recv --durable PATH` and the --count warning, through the CLI."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from reliable import Node
from rmsg.cli import main

from .conftest import free_port

pytestmark = pytest.mark.loopback


def _send_later(dest: str, messages: list[tuple[bytes, int]]) -> threading.Thread:
    def run() -> None:
        time.sleep(0.3)
        with Node() as a:
            for data, t in messages:
                a.send(dest, data, msg_type=t)  # returns once the receiver committed it

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_recv_durable_keeps_what_count_left_behind_for_the_next_run(tmp_path: Path) -> None:
    store = str(tmp_path / "jobs.db")
    port = free_port()
    bind = ["--bind", f"127.0.0.1:{port}", "--mailbox", "jobs", "--durable", store]
    later = [(b"a", 1), (b"b", 1), (b"c", 1), (b"wanted", 3)]
    sender = _send_later(f"127.0.0.1:{port}/jobs", later)
    first = CliRunner().invoke(main, ["recv", *bind, "--type", "3", "-n", "1"])
    sender.join()
    assert first.exit_code == 0, first.output
    assert first.stdout.splitlines()[-1] == "wanted"
    assert "3 messages left in the mailbox (kept in " in first.output

    second = CliRunner().invoke(main, ["recv", *bind, "--json", "-n", "3", "--timeout", "5"])
    assert second.exit_code == 0, second.output
    lines = [json.loads(x) for x in second.stdout.splitlines() if x.startswith("{")]
    assert [x["data"] for x in lines] == ["a", "b", "c"]
    assert "3 messages kept" in second.output
    assert "left in the mailbox" not in second.output


def test_recv_count_warns_that_a_volatile_mailbox_loses_what_is_left() -> None:
    port = free_port()
    sender = _send_later(f"127.0.0.1:{port}/jobs", [(b"a", 1), (b"wanted", 3)])
    result = CliRunner().invoke(
        main, ["recv", "--bind", f"127.0.0.1:{port}", "--mailbox", "jobs", "--type", "3", "-n", "1"]
    )
    sender.join()
    assert result.exit_code == 0, result.output
    assert "1 message left in the mailbox (discarded when this node closes)" in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--durable", "x.db"], "give --mailbox NAME"),
        (["--mailbox", "j", "--sync", "os"], "--sync applies"),
        (["--mailbox", "j", "--durable", "x.db", "--capacity", "0"], "rendezvous"),
    ],
)
def test_recv_rejects_bad_durable_options(args: list[str], message: str, tmp_path: Path) -> None:
    args = [str(tmp_path / a) if a.endswith(".db") else a for a in args]
    result = CliRunner().invoke(main, ["recv", "--bind", f"127.0.0.1:{free_port()}", *args])
    assert result.exit_code == 2 and message in result.output
