"""``rmsg call`` exit codes and output, against an in-process demo server; the RPC bench."""

from __future__ import annotations

import json
from typing import Any

import pytest
from click.testing import CliRunner

from reliable import Node
from reliable.rpc import Server
from rmsg.cli import main
from rmsg.cli.rpc import DemoService

pytestmark = pytest.mark.loopback


@pytest.fixture
def dest() -> Any:
    with Node() as node, Server(node, DemoService(), service="demo"):
        yield f"127.0.0.1:{node.address[1]}/demo"


def test_call_prints_the_result_and_exits_with_the_status(dest: str) -> None:
    runner = CliRunner()
    ok = runner.invoke(main, ["call", dest, "add", "2", "3"])
    assert (ok.exit_code, ok.output.strip()) == (0, "5")
    named = runner.invoke(main, ["call", dest, "add", "--kw", "a=1", "--kw", "b=2.5", "--json"])
    outcome = json.loads(named.output)
    assert named.exit_code == 0 and outcome["result"] == 3.5 and outcome["executed"] is True
    late = runner.invoke(main, ["call", dest, "sleep", "5", "--timeout", "0.3", "--json"])
    assert late.exit_code == 4 and json.loads(late.output)["status"] == "DEADLINE_EXCEEDED"
    failed = runner.invoke(main, ["call", dest, "fail", '"boom"', "--json"])
    assert failed.exit_code == 13
    assert json.loads(failed.output) == {
        "status": "INTERNAL",
        "code": 13,
        "executed": True,
        "details": "boom",
        "type": "ValueError",
    }
    assert runner.invoke(main, ["call", dest, "nope"]).exit_code == 12
    assert runner.invoke(main, ["call", dest.replace("/demo", "/x"), "noop"]).exit_code == 5
    bad = runner.invoke(main, ["call", dest, "echo", "not json"])
    assert bad.exit_code == 2 and "not JSON" in bad.output


def test_rpc_bench_measures_rmsg_beside_xmlrpc() -> None:
    from rmsg.bench_rpc import format_rpc_report, run_rpc_bench

    figures = run_rpc_bench(duration=0.1, rounds=1)
    names = [f.transport for f in figures]
    assert names[:3] == [
        "rmsg rpc (blocking)",
        "rmsg rpc (asyncio client)",
        "xmlrpc (stdlib, HTTP)",
    ]
    assert all(f.calls > 0 and f.p99_us >= f.p50_us > 0 for f in figures)
    # Every row says what each side cost; the echo row is rmsg without the RPC layer.
    assert all(f.client_cpu_us > 0 and f.server_cpu_us >= 0 for f in figures)
    assert "rmsg echo, no RPC" in names
    report = format_rpc_report(figures)
    assert "calls/s" in report and "CPU µs/call" in report and "rmsg core:" in report
