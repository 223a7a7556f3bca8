"""Output and exit codes a script can rely on: results on stdout, diagnostics on
stderr, --json, Ctrl-C (130, saying what is known), OS errors as runtime errors,
optional extras checked before any work."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
from click.testing import CliRunner

from reliable import Node
from rmsg.cli import main

pytestmark = pytest.mark.loopback


def test_send_prints_its_receipt_on_stdout_and_as_json() -> None:
    with Node("127.0.0.1:0") as server:
        dest = f"127.0.0.1:{server.address[1]}"
        result = CliRunner().invoke(main, ["send", dest, "hello"])
        assert result.exit_code == 0, result.output
        assert result.stdout.startswith("delivered 5 bytes to 127.0.0.1:")
        assert "0 retransmission(s)" in result.stdout  # first contact is not a retransmission
        assert result.stderr == ""
        result = CliRunner().invoke(main, ["send", dest, "hello again", "--json"])
        assert result.exit_code == 0, result.output
        receipt = json.loads(result.stdout)
        assert receipt["status"] == "delivered" and receipt["size"] == 11
        assert receipt["peer"] == dest and receipt["retransmissions"] == 0
        assert server.receive(timeout=2).data == b"hello"


def test_send_failure_goes_to_stderr_only() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as hole:  # bound, never answers
        hole.bind(("127.0.0.1", 0))
        dest = f"127.0.0.1:{hole.getsockname()[1]}"
        result = CliRunner().invoke(main, ["send", dest, "x", "--timeout", "300ms"])
    assert result.exit_code == 1
    assert result.stdout == "" and "Error:" in result.stderr


def test_recv_does_not_add_blank_lines_to_lines(tmp_path: object) -> None:
    """``echo hi | rmsg send`` sends "hi\\n": recv prints it as one line, not two."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]

    def send_later() -> None:
        time.sleep(0.3)
        with Node("127.0.0.1:0") as client:
            client.send(f"127.0.0.1:{port}", b"first\n")
            client.send(f"127.0.0.1:{port}", b"second")

    sender = threading.Thread(target=send_later)
    sender.start()
    result = CliRunner().invoke(
        main, ["recv", "--bind", f"127.0.0.1:{port}", "--count", "2", "--timeout", "10s"]
    )
    sender.join()
    assert result.exit_code == 0, result.output
    assert result.stdout == "first\nsecond\n"
    assert "listening on" in result.stderr


def test_address_in_use_is_a_runtime_error_not_a_usage_banner() -> None:
    with Node("127.0.0.1:0") as taken:
        bind = f"127.0.0.1:{taken.address[1]}"
        result = CliRunner().invoke(main, ["recv", "--bind", bind, "--count", "1"])
        assert result.exit_code == 1, result.output
        assert "cannot bind" in result.stderr and "in use" in result.stderr
        assert "Usage:" not in result.output
        result = CliRunner().invoke(main, ["send", "127.0.0.1:9", "x", "--bind", bind])
        assert result.exit_code == 1 and "Usage:" not in result.output


def test_bench_plot_without_matplotlib_fails_before_any_work(
    monkeypatch: pytest.MonkeyPatch, tmp_path: object
) -> None:
    import rmsg.bench

    def no_work(**_: object) -> None:
        raise AssertionError("measured before checking the plot could be drawn")

    monkeypatch.setattr(rmsg.bench, "run_bench", no_work)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    started = time.monotonic()
    result = CliRunner().invoke(main, ["bench", "--quick", "--plot", "out.png"])
    assert result.exit_code == 1, result.output
    assert "needs matplotlib" in result.stderr and "rmsg[plot]" in result.stderr
    assert time.monotonic() - started < 5


def test_ctrl_c_mid_send_exits_130_and_says_what_is_known() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as hole:  # swallows everything
        hole.bind(("127.0.0.1", 0))
        dest = f"127.0.0.1:{hole.getsockname()[1]}"
        proc = subprocess.Popen(
            [sys.executable, "-m", "rmsg", "send", dest, "x" * 3000, "--timeout", "60s"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            deadline = time.monotonic() + 20
            hole.settimeout(20)
            hole.recvfrom(65536)  # the send is under way
            assert time.monotonic() < deadline
            interrupted = time.monotonic()
            proc.send_signal(signal.SIGINT)
            out, err = proc.communicate(timeout=20)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert proc.returncode == 130, err
    assert time.monotonic() - interrupted < 1.5  # no close flush after Ctrl-C
    assert "interrupted:" in err and "may or may not have reached its mailbox" in err
    assert "Aborted" not in err and out == ""


def test_a_group_send_from_loopback_says_it_reaches_this_host_only() -> None:
    with Node("127.0.0.1:0") as member:
        group = "multicast://239.1.2.9:7419"
        member.join(group)
        result = CliRunner().invoke(main, ["send", group, "hi", "--timeout", "3s"])
    assert "only members on this host" in result.stderr
    assert "only members on this host" not in result.stdout
