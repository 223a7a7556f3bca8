"""rmsg ctl: inspect, set limits, grant and delete a mailbox on a running node."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from reliable import Node
from rmsg.cli import main

pytestmark = pytest.mark.loopback


def test_ctl_inspects_sets_grants_and_deletes() -> None:
    runner = CliRunner()
    with Node() as owner:
        owner.create_mailbox("jobs", capacity=5)
        target = f"127.0.0.1:{owner.address[1]}/jobs"
        result = runner.invoke(main, ["ctl", "inspect", target])
        assert result.exit_code == 0, result.output
        assert "capacity" in result.output and "5" in result.output
        result = runner.invoke(main, ["ctl", "set", target, "--capacity", "20", "--json"])
        assert result.exit_code == 0, result.output
        info = json.loads(result.output)
        assert (info["capacity"], info["max_bytes"]) == (20, None)
        assert owner.stats().mailbox("jobs").capacity == 20
        result = runner.invoke(main, ["ctl", "grant", target, "--node", "127.0.0.1:9", "--json"])
        assert json.loads(result.output)["granted"] == ["127.0.0.1:9"]
        result = runner.invoke(main, ["ctl", "delete", target])
        assert result.exit_code == 0 and "deleted" in result.output
        result = runner.invoke(main, ["ctl", "inspect", target])
        assert result.exit_code != 0 and "no mailbox 'jobs'" in result.output


def test_ctl_errors_say_what_to_change() -> None:
    runner = CliRunner()
    result = runner.invoke(main, ["ctl", "inspect", "127.0.0.1:7000"])
    assert result.exit_code == 2 and "HOST:PORT/MAILBOX" in result.output
    result = runner.invoke(main, ["ctl", "set", "127.0.0.1:7000/jobs"])
    assert result.exit_code == 2 and "--capacity" in result.output
    result = runner.invoke(main, ["ctl", "--help"])
    assert result.exit_code == 0 and "Examples:" in result.output


def test_ctl_transfer_moves_a_mailbox_between_nodes() -> None:
    runner = CliRunner()
    with Node() as old, Node() as new:
        old.create_mailbox("jobs")
        new.create_mailbox("jobs")
        target = f"127.0.0.1:{old.address[1]}/jobs"
        result = runner.invoke(
            main, ["ctl", "transfer", target, "--node", f"127.0.0.1:{new.address[1]}"]
        )
        assert result.exit_code == 0, result.output
        assert "moved" in result.output and "0 messages" in result.output
        assert "jobs" not in [m.name for m in old.stats().mailboxes]
