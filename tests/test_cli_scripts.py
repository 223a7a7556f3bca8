"""Output a script can rely on, for the commands the first pass left out: --json on
keygen and wireshark install, drop counters that say what they mean, and the netem
proxy's OS errors reported as runtime errors (exit 1), not as a usage banner."""

from __future__ import annotations

import json
import re
import socket
from pathlib import Path

import pytest
from click.testing import CliRunner

import reliable
from reliable import Config
from rmsg.cli import main
from rmsg.statstable import explain_drop, format_stats

from .conftest import free_port
from .harness import B, Pair

ROOT = Path(__file__).resolve().parent.parent


def test_keygen_json_says_where_the_key_went_and_never_the_key(tmp_path: Path) -> None:
    path = tmp_path / "key"
    result = CliRunner().invoke(main, ["keygen", str(path), "--json"])
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert record == {"status": "written", "path": str(path), "mode": "600"}
    assert path.read_bytes().hex() not in result.output and result.stderr == ""
    again = CliRunner().invoke(main, ["keygen", str(path), "--json"])
    assert again.exit_code == 2 and again.stdout == ""  # it exists: an error, on stderr


def test_wireshark_install_json(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["wireshark", "install", "--path", str(tmp_path), "--json"])
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert record["status"] == "installed" and record["path"] == str(tmp_path / "rmsg.lua")
    assert record["bytes"] == (tmp_path / "rmsg.lua").stat().st_size > 1000
    assert "tshark" in record
    both = CliRunner().invoke(main, ["wireshark", "install", "--print", "--json"])
    assert both.exit_code == 2


def test_every_drop_reason_the_core_counts_is_explained() -> None:
    """`dropped: dead_incarnation=3, unvalidated=4` looked like trouble and said nothing."""
    reasons = set()
    # the sources of the reliable under test (a compiled install ships them beside its modules)
    for source in Path(reliable.__file__).parent.glob("*.py"):
        text = source.read_text()
        reasons |= set(re.findall(r'drop\("([a-z_.]+)"', text))
        reasons |= set(re.findall(r'SecurityError\("([a-z_.]+)"', text))
        reasons |= {f"malformed.{r}" for r in re.findall(r'MalformedPacket\("([a-z_]+)"', text)}
        reasons |= set(re.findall(r'counts\["([a-z_.]+)"\]', text))
    assert {"unvalidated", "dead_incarnation", "refused.no_mailbox", "forged_ack"} <= reasons
    unexplained = sorted(r for r in reasons if not explain_drop(r))
    assert unexplained == []


def test_stats_explain_the_drops_of_a_first_contact() -> None:
    p = Pair(Config(), Config())
    p.a.endpoint.send(B, b"hello", now=p.now)
    p.settle()  # B challenged A's first flight; A resent it with the cookie
    assert p.b.received() == [b"hello"]
    stats = p.b.endpoint.stats(p.now)
    assert stats.dropped.get("unvalidated", 0) >= 1
    text = format_stats(stats, "10.0.0.2:2000")
    (line,) = [x for x in text.splitlines() if x.strip().startswith("unvalidated ")]
    assert "proves its address" in line and "nothing lost" in line


@pytest.mark.loopback
def test_netem_reports_an_address_in_use_as_a_runtime_error() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        result = CliRunner().invoke(
            main,
            [
                "netem",
                "--listen",
                f"127.0.0.1:{port}",
                "--forward",
                f"127.0.0.1:{free_port()}",
                "--duration",
                "0.1",
            ],
        )
    assert result.exit_code == 1, result.output
    assert "cannot start the proxy" in result.stderr and "in use" in result.stderr
    assert "Usage:" not in result.output


@pytest.mark.loopback
def test_netem_reports_an_unwritable_capture_as_a_runtime_error(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        main,
        [
            "netem",
            "--listen",
            "127.0.0.1:0",
            "--forward",
            f"127.0.0.1:{free_port()}",
            "--pcap-out",
            str(tmp_path / "no" / "such" / "folder" / "out.pcap"),
            "--duration",
            "0.1",
        ],
    )
    assert result.exit_code == 1, result.output
    assert "cannot start the proxy" in result.stderr and "Usage:" not in result.output
