"""The rmsg CLI: in-process with CliRunner, and as the installed console script."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from reliable import Node
from rmsg.cli import main

from .conftest import free_port

pytestmark = pytest.mark.loopback


def test_send_exits_zero_once_acknowledged() -> None:
    with Node() as b:
        result = CliRunner().invoke(main, ["send", f"127.0.0.1:{b.address[1]}", "hello there"])
        assert result.exit_code == 0, result.output
        assert "delivered 11 bytes" in result.output
        assert b.receive(timeout=2).data == b"hello there"


def test_send_reads_stdin_and_file_and_sets_type(tmp_path: Path) -> None:
    payload = tmp_path / "blob.bin"
    payload.write_bytes(bytes(range(256)) * 100)
    with Node() as b:
        dest = f"127.0.0.1:{b.address[1]}"
        runner = CliRunner()
        r1 = runner.invoke(
            main, ["send", dest, "--type", "-4", "--priority", "9"], input="from stdin"
        )
        r2 = runner.invoke(main, ["send", dest, "--file", str(payload), "-q", "--type", "5"])
        assert r1.exit_code == r2.exit_code == 0, r1.output + r2.output
        m1 = b.receive(timeout=2)
        assert (m1.data, m1.msg_type, m1.priority) == (b"from stdin", -4, 9)
        # --file is a transfer (tests/test_file_transfer.py): a manifest, then the chunk
        manifest, chunk = b.receive(timeout=2), b.receive(timeout=2)
        assert manifest.data.startswith(b"RMSGFILE") and manifest.msg_type == chunk.msg_type == 5
        assert chunk.data.endswith(payload.read_bytes())
        assert r2.output == ""


def test_send_lines_sends_each_line_as_a_message_in_batches() -> None:
    lines = [f"line {i}" for i in range(2500)]  # more than one batch
    with Node() as b:
        dest = f"127.0.0.1:{b.address[1]}"
        result = CliRunner().invoke(main, ["send", dest, "--lines"], input="\n".join(lines))
        assert result.exit_code == 0, result.output
        assert "delivered 2500 messages" in result.output
        got = []
        while len(got) < 2500:
            got.extend(m.data.decode() for m in b.receive_many(1000, timeout=2))
        assert got == lines


def test_send_lines_names_the_lines_that_failed() -> None:
    with Node() as b:
        b.create_mailbox("two", 2)
        dest = f"127.0.0.1:{b.address[1]}/two"
        result = CliRunner().invoke(
            main, ["send", dest, "--lines", "--timeout", "500ms"], input="a\nb\nc\nd\n"
        )
        assert result.exit_code == 1, result.output
        assert "line 3: " in result.output and "line 4: " in result.output
        assert "line 1: " not in result.output
        assert "2 of 4 lines were not delivered" in result.output


@pytest.mark.parametrize(
    ("args", "code", "text"),
    [
        (["send", "127.0.0.1", "x"], 2, "HOST:PORT"),
        (["send", "nohost.invalid:70", "x"], 2, "cannot resolve"),
        (["send", "127.0.0.1:7", "x", "--timeout", "-1"], 2, "timeout"),
        (["send", "127.0.0.1:7", "x", "--timeout", "soon"], 2, "not a duration"),
        (["demo", "--loss", "150%"], 2, "probability"),
    ],
)
def test_bad_arguments_fail_before_sending(args: list[str], code: int, text: str) -> None:
    result = CliRunner().invoke(main, args)
    assert result.exit_code == code
    assert text in result.output


def test_send_to_nobody_fails_with_one_line() -> None:
    result = CliRunner().invoke(
        main, ["send", f"127.0.0.1:{free_port()}", "x", "--timeout", "300ms"]
    )
    assert result.exit_code == 1
    assert result.output.strip().count("\n") == 0
    # Linux reports the closed port at once (IP_RECVERR); elsewhere the send times out.
    expected = "connection refused" if sys.platform == "linux" else "not acknowledged within 0.3s"
    assert expected in result.output


def _send_later(
    dest: str, messages: list[bytes], types: list[int] | None = None
) -> threading.Thread:
    def run() -> None:
        time.sleep(0.3)
        with Node() as a:
            for m, t in zip(messages, types or [0] * len(messages), strict=True):
                a.send(dest, m, msg_type=t)

    t = threading.Thread(target=run)
    t.start()
    return t


def test_recv_json_count() -> None:
    port = free_port()
    sender = _send_later(f"127.0.0.1:{port}", [b"one", b"\xff\xfe binary"])
    result = CliRunner().invoke(main, ["recv", "--bind", f"127.0.0.1:{port}", "--json", "-n", "2"])
    sender.join()
    assert result.exit_code == 0, result.output
    lines = [json.loads(x) for x in result.stdout.splitlines() if x.startswith("{")]
    assert lines[0]["data"] == "one" and lines[0]["size"] == 3
    assert lines[1]["encoding"] == "base64"


def test_recv_output_dir(tmp_path: Path) -> None:
    port = free_port()
    sender = _send_later(f"127.0.0.1:{port}", [b"first", b"second"])
    out = tmp_path / "inbox"
    result = CliRunner().invoke(
        main, ["recv", "--bind", f"127.0.0.1:{port}", "--output-dir", str(out), "--count", "2"]
    )
    sender.join()
    assert result.exit_code == 0, result.output
    files = sorted(out.iterdir())
    assert [f.read_bytes() for f in files] == [b"first", b"second"]


def test_recv_timeout_exits_one() -> None:
    result = CliRunner().invoke(
        main, ["recv", "--bind", f"127.0.0.1:{free_port()}", "--timeout", "0.2"]
    )
    assert result.exit_code == 1 and "no message" in result.output


def test_every_command_teaches_by_example() -> None:
    commands = ["send", "recv", "demo", "stats", "netem", "dissect"]
    for command in (["--help"], *([c, "--help"] for c in commands)):
        result = CliRunner().invoke(main, command)
        assert result.exit_code == 0
        assert "Example" in result.output or "Try it" in result.output


def test_demo_runs_and_verifies() -> None:
    result = CliRunner().invoke(main, ["demo", "--messages", "300", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["ok"] and summary["intact"] == 300 and summary["link_dropped"] > 0


def test_installed_rmsg_send_and_recv_as_processes(rmsg_exe: str) -> None:
    port = free_port()
    recv = subprocess.Popen(
        [rmsg_exe, "recv", "--bind", f"127.0.0.1:{port}", "--count", "3"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert recv.stderr is not None
        assert recv.stderr.readline().startswith(b"listening on")  # bound: sends may start
        for text in ["alpha", "beta", "gamma"]:
            sent = subprocess.run(
                [rmsg_exe, "send", f"127.0.0.1:{port}", text], capture_output=True, timeout=30
            )
            assert sent.returncode == 0, sent.stderr
        out, _ = recv.communicate(timeout=30)
        assert out == b"alpha\nbeta\ngamma\n"
        assert recv.returncode == 0
    finally:
        if recv.poll() is None:
            recv.kill()
            recv.wait()


def test_installed_rmsg_send_to_nobody_exits_nonzero(rmsg_exe: str) -> None:
    done = subprocess.run(
        [rmsg_exe, "send", f"127.0.0.1:{free_port()}", "x", "--timeout", "0.3"],
        capture_output=True,
        timeout=30,
    )
    assert done.returncode == 1
    assert done.stderr.decode().startswith("Error: ")


def test_installed_rmsg_demo(rmsg_exe: str) -> None:
    done = subprocess.run(
        [rmsg_exe, "demo", "--messages", "200"], capture_output=True, timeout=120, text=True
    )
    assert done.returncode == 0, done.stderr
    assert "verdict                    OK" in done.stdout


def test_recv_from_a_named_bounded_mailbox_by_type() -> None:
    port = free_port()
    dest = f"127.0.0.1:{port}/jobs"
    # one sender, in this order, so every send completes before recv has its two and exits
    senders = [_send_later(dest, [b"skip me", b"wanted", b"wanted too"], [1, 3, 3])]
    mailbox = ["--mailbox", "jobs", "--capacity", "5", "--type", "3"]
    result = CliRunner().invoke(
        main, ["recv", "--bind", f"127.0.0.1:{port}", *mailbox, "--json", "-n", "2"]
    )
    for t in senders:
        t.join()
    assert result.exit_code == 0, result.output
    lines = [json.loads(x) for x in result.stdout.splitlines() if x.startswith("{")]
    assert [(x["data"], x["type"], x["mailbox"]) for x in lines] == [
        ("wanted", 3, "jobs"),
        ("wanted too", 3, "jobs"),
    ]
    assert f"listening on 127.0.0.1:{port}/jobs" in result.output


def test_send_to_a_missing_mailbox_fails_with_its_name() -> None:
    with Node() as b:
        result = CliRunner().invoke(main, ["send", f"127.0.0.1:{b.address[1]}/nope", "x"])
    assert result.exit_code == 1 and "no mailbox 'nope'" in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--capacity", "3"], "describe a --mailbox"),
        (["--mailbox", "a/b"], "'/'"),
        (["--type", "0", "--except-type"], "except_type"),
    ],
)
def test_recv_rejects_bad_mailbox_options(args: list[str], message: str) -> None:
    result = CliRunner().invoke(main, ["recv", "--bind", f"127.0.0.1:{free_port()}", *args])
    assert result.exit_code == 2 and message in result.output


def test_stats_prints_mailboxes_and_peers_of_a_remote_node() -> None:
    with Node() as b, Node() as a:
        box = b.create_mailbox("jobs", 4)
        a.send(b.address, b"x", mailbox="jobs")
        dest = f"127.0.0.1:{b.address[1]}"
        table = CliRunner().invoke(main, ["stats", dest])
        raw = CliRunner().invoke(main, ["stats", dest, "--json"])
        box.receive(timeout=1)
        a_port = a.address[1]
    assert table.exit_code == 0, table.output
    assert "------ Mailboxes ------" in table.output and "'jobs'" in table.output
    assert f"127.0.0.1:{a_port}" in table.output  # a peer row
    data = json.loads(raw.stdout)
    (jobs,) = [m for m in data["mailboxes"] if m["name"] == "jobs"]
    assert (jobs["messages"], jobs["capacity"]) == (1, 4)


def test_stats_of_nothing_times_out_with_a_hint() -> None:
    result = CliRunner().invoke(main, ["stats", f"127.0.0.1:{free_port()}", "--timeout", "0.3"])
    assert result.exit_code == 1 and "serve_stats" in result.output


def test_recv_max_size_fails_on_a_longer_message_or_truncates_it() -> None:
    port = free_port()
    sender = _send_later(f"127.0.0.1:{port}", [b"short", b"a longer message"])
    bind = ["recv", "--bind", f"127.0.0.1:{port}", "--timeout", "5"]
    result = CliRunner().invoke(main, [*bind, "--json", "-n", "2", "--max-size", "5"])
    sender.join()
    assert result.exit_code == 1
    assert "over --max-size 5; it stays queued" in result.output
    records = [json.loads(x) for x in result.stdout.splitlines() if x.startswith("{")]
    assert [r["data"] for r in records] == ["short"]

    port = free_port()
    sender = _send_later(f"127.0.0.1:{port}", [b"a longer message"])
    bind = ["recv", "--bind", f"127.0.0.1:{port}", "--timeout", "5"]
    result = CliRunner().invoke(main, [*bind, "--json", "-n", "1", "--max-size", "8", "--truncate"])
    sender.join()
    assert result.exit_code == 0, result.output
    (line,) = [json.loads(x) for x in result.stdout.splitlines() if x.startswith("{")]
    assert (line["data"], line["truncated"]) == ("a longer", 8)
    assert "cut to --max-size 8" in result.output


def test_recv_truncate_needs_max_size() -> None:
    result = CliRunner().invoke(main, ["recv", "--bind", f"127.0.0.1:{free_port()}", "--truncate"])
    assert result.exit_code == 2 and "--max-size" in result.output
