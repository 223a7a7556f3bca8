"""The CLI package's own pieces: the one error translation, the shared option types, render.

The commands' behaviour is pinned by tests/test_cli*.py; these check the
parts every command leans on, without a network.
"""

from __future__ import annotations

import json

import click
import pytest
from click.testing import CliRunner

import reliable
from reliable import ReliableError, UsageError
from reliable.addressing import GroupAddress, ServiceAddress
from reliable.driver import split_destination
from rmsg.cli import main, render
from rmsg.cli.app import Command, Group, command, group
from rmsg.cli.options import DESTINATION, NETEM_SPEC, POSITIVE_DURATION, security_options


def _cli_raising(error: Exception) -> click.Group:
    @group()
    def top() -> None:
        """A group like rmsg's."""

    @top.command("boom")
    def boom() -> None:
        """Raise the library error."""
        raise error

    @top.group("sub")
    def sub() -> None:
        """A nested group: its commands are translated too."""

    @sub.command("deep")
    def deep() -> None:
        """Raise the library error one level down."""
        raise error

    return top


@pytest.mark.parametrize("path", [["boom"], ["sub", "deep"]])
def test_a_usage_error_exits_2_with_the_commands_usage(path: list[str]) -> None:
    result = CliRunner().invoke(_cli_raising(UsageError("name it HOST:PORT")), path)
    assert result.exit_code == 2
    assert f"Usage: top {' '.join(path)} [OPTIONS]" in result.output
    assert "Error: name it HOST:PORT" in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


@pytest.mark.parametrize("path", [["boom"], ["sub", "deep"]])
def test_another_library_error_is_one_line_exit_1(path: list[str]) -> None:
    result = CliRunner().invoke(_cli_raising(ReliableError("peer unreachable")), path)
    assert result.exit_code == 1
    assert result.output == "Error: peer unreachable\n"


def test_a_netem_spec_error_is_a_usage_error() -> None:
    from netem.spec import parse_spec

    @command()
    def parse() -> None:
        """Parse a bad spec and let the error rise."""
        parse_spec("loss lots")

    result = CliRunner().invoke(parse, [])
    assert result.exit_code == 2
    assert "Usage: parse [OPTIONS]" in result.output
    assert "netem spec" in result.output


def test_a_bug_is_not_dressed_as_a_cli_error() -> None:
    result = CliRunner().invoke(_cli_raising(KeyError("bug")), ["boom"])
    assert result.exit_code == 1
    assert isinstance(result.exception, KeyError)


def test_every_rmsg_command_translates_library_errors() -> None:
    def walk(cmd: click.Command) -> list[click.Command]:
        found = [cmd]
        if isinstance(cmd, click.Group):
            for sub in cmd.commands.values():
                found += walk(sub)
        return found

    commands = walk(main)
    assert len(commands) > 15
    plain = [c.name for c in commands if not isinstance(c, (Command, Group))]
    assert plain == []


def test_destination_is_parsed_by_the_librarys_parsers() -> None:
    node = DESTINATION.convert("127.0.0.1:7000/jobs", None, None)
    assert (node.node, node.group, node.service) == ("127.0.0.1:7000", None, None)
    grp = DESTINATION.convert("multicast://239.1.2.3:7400/news", None, None)
    assert grp.group == GroupAddress("multicast", "239.1.2.3", 7400, "news")
    assert grp.group is not None and grp.group.url == "multicast://239.1.2.3:7400"
    svc = DESTINATION.convert("anycast://printer/jobs", None, None)
    assert svc.service == ServiceAddress("printer", "jobs")
    assert str(svc) == "anycast://printer/jobs"  # what the library is handed, as written


@pytest.mark.parametrize(
    "text", ["multicast://1.2.3.4:7000", "anycast://", "broadcast://:0", "127.0.0.1:7000/a/b"]
)
def test_a_bad_destination_is_a_usage_error_in_the_librarys_words(text: str) -> None:
    with pytest.raises(click.UsageError) as caught:
        DESTINATION.convert(text, None, None)
    with pytest.raises(UsageError) as library:
        if text.startswith("anycast://"):
            reliable.parse_service(text)
        elif "://" in text:
            reliable.parse_group(text)
        else:
            split_destination(text, None)
    assert caught.value.message == str(library.value)


def test_positive_duration_names_the_option() -> None:
    option = click.Option(["--timeout"], type=POSITIVE_DURATION)
    assert POSITIVE_DURATION.convert("250ms", option, None) == pytest.approx(0.25)
    with pytest.raises(click.BadParameter) as caught:
        POSITIVE_DURATION.convert("0s", option, None)
    assert caught.value.format_message() == "Invalid value for --timeout: must be more than 0"


def test_netem_spec_option_parses_once() -> None:
    impairment = NETEM_SPEC.convert("loss 10%", None, None)
    assert impairment.loss == pytest.approx(0.1)
    with pytest.raises(click.BadParameter) as caught:
        NETEM_SPEC.convert("bogus 3", None, None)
    assert caught.value.format_message().startswith("Invalid value for --netem: netem spec")


def test_security_options_hand_the_command_a_security() -> None:
    seen = []

    @command()
    @security_options
    def probe(security: reliable.security.Security) -> None:
        """Record what the options made."""
        seen.append(security)

    assert CliRunner().invoke(probe, ["--security", "integrity"]).exit_code == 0
    assert type(seen[0]) is type(reliable.security.make_security("integrity"))  # made, not a str
    result = CliRunner().invoke(probe, ["--security", "authenticated"], env={"RMSG_KEY": ""})
    assert result.exit_code == 2
    assert "--security/--keyfile" in result.output


def test_render_makes_the_receipt_line_and_record() -> None:
    receipt = reliable.Receipt(
        peer=("127.0.0.1", 7001),
        size=11,
        fragments=1,
        transmissions=2,
        elapsed=0.0042,
        incarnation=3,
        mailbox="jobs",
        failovers=((("127.0.0.1", 7000), "unreachable"),),
    )
    assert render.receipt_line(receipt, "printer") == (
        "delivered 11 bytes to printer member 127.0.0.1:7001/jobs in 4.2 ms (1 fragment(s), "
        "1 retransmission(s), failed over from 127.0.0.1:7000 (unreachable))"
    )
    record = render.receipt_record(receipt)
    assert record["failovers"] == [["127.0.0.1:7000", "unreachable"]]
    assert json.loads(json.dumps(record))["retransmissions"] == 1


def test_render_message_record_falls_back_to_base64() -> None:
    text = reliable.Message(source=("127.0.0.1", 1), data=b"hi", mailbox="m")
    binary = reliable.Message(source=("127.0.0.1", 1), data=b"\xff\x00")
    assert render.message_record(text)["data"] == "hi"
    record = render.message_record(binary)
    assert (record["data"], record["encoding"]) == ("/wA=", "base64")
    assert render.message_record(text, saved_as="f.bin")["file"] == "f.bin"
