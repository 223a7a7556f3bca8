"""The ``rmsg`` command line: thin wrappers that build a config, call the library and
turn its errors into one-line messages and exit codes."""

from __future__ import annotations

import base64
import contextlib
import json
import pathlib
import re
import signal
import socket
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, BinaryIO, ClassVar, TypeVar

import click

import reliable
from netem.models import Impairment
from reliable import Node, ReceiveTimeout, ReliableError, UsageError
from reliable._driver import open_socket
from reliable.addressing import parse_address

from .demo import DemoProgress, run_demo
from .statstable import format_stats

if TYPE_CHECKING:
    from netem.proxy import ProxyStats

__all__ = ["main"]

_CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def _fail(message: str) -> click.ClickException:
    return click.ClickException(message)


def _wildcard_for(dest: str) -> str:
    """Bind address matching the destination's family (IPv6 destinations need an IPv6 socket)."""
    try:
        host, _ = parse_address(dest)
    except UsageError:
        return "0.0.0.0:0"
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_DGRAM)
    except (socket.gaierror, UnicodeError):
        return "0.0.0.0:0"
    return "[::]:0" if infos and infos[0][0] == socket.AF_INET6 else "0.0.0.0:0"


def _probability(text: str) -> float:
    """``20%`` or ``0.2`` -> 0.2."""
    text = text.strip()
    value = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    if not 0 <= value <= 1:
        raise ValueError
    return value


if TYPE_CHECKING:
    _FloatParam = click.ParamType[float]
else:  # click < 8.2 has no generic ParamType at run time
    _FloatParam = click.ParamType


class Probability(_FloatParam):
    name = "PROBABILITY"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> float:
        if isinstance(value, float):
            return value
        try:
            return _probability(str(value))
        except ValueError:
            self.fail(f"{value!r} is not a probability: write 20% or 0.2", param, ctx)


class Duration(_FloatParam):
    """``5``, ``5s``, ``250ms``, ``10us`` -> seconds."""

    name = "DURATION"
    _UNITS: ClassVar[dict[str, float]] = {"": 1.0, "s": 1.0, "ms": 1e-3, "us": 1e-6}

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> float:
        if isinstance(value, float):
            return value
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(s|ms|us)?\s*", str(value))
        if not match:
            self.fail(f"{value!r} is not a duration: write 5s, 250ms or 0.25", param, ctx)
        return float(match.group(1)) * self._UNITS[match.group(2) or ""]


PROBABILITY = Probability()
DURATION = Duration()

F = TypeVar("F", bound=Callable[..., Any])


def security_options(command: F) -> F:
    """--security and --keyfile; the key itself never goes on the command line."""
    command = click.option(
        "--keyfile",
        type=click.Path(dir_okay=False),
        default=None,
        help="Pre-shared key file (write one with 'rmsg keygen'); default: $RMSG_KEY (hex).",
    )(command)
    return click.option(
        "--security",
        type=click.Choice(reliable.security.MODES),
        default="integrity",
        show_default=True,
        envvar="RMSG_SECURITY",
        help="CRC only, a MAC on every datagram, or encryption (needs rmsg[crypto]). "
        "Both ends must agree. Also $RMSG_SECURITY.",
    )(command)


def _security(mode: str, keyfile: str | None) -> reliable.security.Security:
    try:
        return reliable.security.make_security(mode, keyfile=keyfile)
    except UsageError as exc:
        raise click.BadParameter(str(exc), param_hint="--security/--keyfile") from None


@click.group(context_settings=_CONTEXT)
@click.version_option(reliable.__version__, prog_name="rmsg")
def main() -> None:
    """Reliable message passing over UDP.

    Messages arrive exactly once, intact and in order, or the sender is told
    they did not — over a network that drops, corrupts, duplicates and
    reorders datagrams.

    \b
    Try it:
      rmsg demo                                  # lossy loopback link, live counts
      rmsg recv --bind 127.0.0.1:7000            # terminal 1
      rmsg send 127.0.0.1:7000 "hello"           # terminal 2
      rmsg stats 127.0.0.1:7000                  # its mailboxes and peers
    """


# ------------------------------------------------------------------------ send


@main.command(context_settings=_CONTEXT)
@click.argument("dest")
@click.argument("message", required=False)
@click.option(
    "-f",
    "--file",
    "path",
    type=click.Path(dir_okay=False, allow_dash=True),
    help="Send the contents of this file ('-' for stdin).",
)
@click.option(
    "--type",
    "msg_type",
    type=int,
    default=0,
    show_default=True,
    help="Message type (signed 32-bit, System V style).",
)
@click.option(
    "--priority",
    type=click.IntRange(0, 65535),
    default=0,
    show_default=True,
    help="Message priority, higher is more urgent.",
)
@click.option(
    "--mailbox",
    default=None,
    help="Destination mailbox on the receiving node (or write DEST as HOST:PORT/NAME).",
)
@click.option(
    "--timeout",
    type=DURATION,
    default=10.0,
    show_default=True,
    help="Give up if not in the mailbox within this long (e.g. 10s, 500ms); "
    "a message waiting for room is then withdrawn.",
)
@click.option(
    "--bind",
    default=None,
    metavar="HOST:PORT",
    help="Local address to send from [default: any, same family as DEST].",
)
@click.option("-q", "--quiet", is_flag=True, help="Print nothing on success.")
@click.option(
    "--wait-members",
    type=click.IntRange(min=1),
    default=None,
    metavar="N",
    help="Group DEST: first wait (within --timeout) until N members have announced themselves.",
)
@click.option(
    "--discover",
    "discover_on",
    multiple=True,
    metavar="GROUP",
    help="anycast DEST: learn the service's members from announcements on this "
    "multicast:// or broadcast:// group (repeatable).",
)
@click.option(
    "--member",
    "members",
    multiple=True,
    metavar="HOST:PORT",
    help="anycast DEST: a member of the service known without announcements (repeatable).",
)
@click.option(
    "--policy",
    type=click.Choice(["round-robin", "lowest-rtt"]),
    default="round-robin",
    show_default=True,
    help="anycast DEST: how the member is chosen.",
)
@click.option(
    "--netem",
    "impair",
    default=None,
    metavar="SPEC",
    help="Impair this process's outgoing datagrams with a tc-netem SPEC "
    "(e.g. 'loss 10%'): test a link's faults without root.",
)
@security_options
def send(
    security: str,
    keyfile: str | None,
    dest: str,
    message: str | None,
    path: str | None,
    msg_type: int,
    priority: int,
    mailbox: str | None,
    timeout: float,
    bind: str | None,
    quiet: bool,
    wait_members: int | None,
    discover_on: tuple[str, ...],
    members: tuple[str, ...],
    policy: str,
    impair: str | None,
) -> None:
    """Send one message to DEST and wait until it is in its mailbox.

    DEST is HOST:PORT (the node's default mailbox) or HOST:PORT/MAILBOX.
    The message is MESSAGE, or the contents of --file, or standard input.
    A full mailbox makes the send wait for room; a rendezvous mailbox
    (capacity 0), until a receiver takes it. Exits 0 only then, printing the
    receipt; prints a one-line error and exits 1 if the node is unreachable,
    has no such mailbox, or refuses the message.

    DEST may also be a group (docs/groups.md): multicast://GROUP:PORT/MAILBOX
    or broadcast://:PORT/MAILBOX sends to every member that joined it
    ('rmsg recv --join') and prints who acknowledged and who did not; it
    exits 0 only if every member has it. anycast://SERVICE/MAILBOX sends to
    one member of a service ('rmsg recv --serve'), failing over to another
    if that one fails, and prints which member took it. Group sends bind to
    127.0.0.1 unless --bind names the interface address to use.

    \b
    Examples:
      rmsg send 127.0.0.1:7000 "hello"
      rmsg send 127.0.0.1:7000/jobs "build #42" --type 3 --priority 9
      rmsg send [::1]:7000 --file report.pdf --timeout 30s
      echo '{"job": 42}' | rmsg send 127.0.0.1:7000/jobs --type 3
      rmsg send multicast://239.1.2.3:7400/news "hello all" --wait-members 3
      rmsg send broadcast://:7401 "anyone there?"
      rmsg send anycast://printer/jobs "page 1" --discover multicast://239.1.2.4:7402
      rmsg send anycast://printer "page 2" --member 127.0.0.1:7001 --member 127.0.0.1:7002
    """
    if message is not None and path is not None:
        raise click.UsageError("give either MESSAGE or --file, not both")
    if timeout <= 0:
        raise click.BadParameter("must be more than 0", param_hint="--timeout")
    grouped = reliable.addressing.is_group_url(dest)
    anycast = dest.startswith("anycast://")
    if (discover_on or members) and not anycast:
        raise click.UsageError("--discover and --member describe an anycast:// DEST")
    if wait_members is not None and (anycast or not grouped):
        raise click.UsageError("--wait-members applies to a multicast:// or broadcast:// DEST")
    if anycast and not (discover_on or members):
        raise click.UsageError(
            "an anycast DEST needs its members: --discover GROUP (where they announce "
            "themselves) or --member HOST:PORT"
        )
    data = _read_message(message, path)
    local = bind or ("127.0.0.1:0" if grouped else _wildcard_for(dest.split("/", 1)[0]))
    deadline = time.monotonic() + timeout
    try:
        with _node(local, security, keyfile, impair) as node:
            if wait_members is not None:
                found = node.wait_for_members(_group_of(dest), wait_members, timeout)
                if len(found) < wait_members:
                    raise _fail(
                        f"only {len(found)} of {wait_members} members of {_group_of(dest)} "
                        f"announced themselves within {timeout:g}s"
                    )
            for group in discover_on:
                node.discover(group)
            if members:
                node.add_service_members(dest[len("anycast://") :].split("/", 1)[0], list(members))
            if discover_on:
                service = dest[len("anycast://") :].split("/", 1)[0]
                _await(lambda: bool(node.service_members(service)), deadline)
            waited = wait_members is not None or bool(discover_on)
            remaining = max(0.001, deadline - time.monotonic()) if waited else timeout
            receipt = node.send(
                dest,
                data,
                msg_type=msg_type,
                priority=priority,
                mailbox=mailbox,
                timeout=remaining,
                policy=policy,
            )
    except UsageError as exc:
        raise click.UsageError(str(exc)) from None
    except ReliableError as exc:
        raise _fail(str(exc)) from None
    if isinstance(receipt, reliable.GroupReceipt):
        _report_group(receipt, quiet)
        return
    if not quiet:
        where = reliable.format_address(receipt.peer)
        if receipt.mailbox:
            where += f"/{receipt.mailbox}"
        notes = [f"{receipt.fragments} fragment(s)", f"{receipt.retransmissions} retransmission(s)"]
        if anycast:
            where = f"{dest.split('/', 3)[2]} member {where}"
            tried = ", ".join(
                f"{reliable.format_address(m)} ({why})" for m, why in receipt.failovers
            )
            if tried:
                notes.append(f"failed over from {tried}")
        if receipt.deferred:
            notes.append("waited for room")
        if receipt.receiver is not None:
            notes.append(f"taken by {receipt.receiver!r}")
        click.echo(
            f"delivered {receipt.size} bytes to {where} in {receipt.elapsed * 1000:.1f} ms "
            f"({', '.join(notes)})",
            err=True,
        )


def _group_of(dest: str) -> str:
    """``multicast://239.1.2.3:7000/inbox`` -> ``multicast://239.1.2.3:7000``."""
    scheme, _, rest = dest.partition("://")
    return f"{scheme}://{rest.split('/', 1)[0]}"


def _await(condition: Callable[[], bool], deadline: float) -> None:
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.02)


def _node(bind: str, security: str, keyfile: str | None, impair: str | None) -> Node:
    """A node on ``bind``; with ``impair``, its outgoing datagrams go through netem."""
    sec = _security(security, keyfile)
    if impair is None:
        return Node(bind, security=sec)
    from netem.socket import FaultySocket
    from netem.spec import SpecError, parse_spec

    try:
        impairment = parse_spec(impair)
    except SpecError as exc:
        raise click.BadParameter(str(exc), param_hint="--netem") from None
    # open_socket raises AddressError (a UsageError) naming what failed, as Node(bind) would
    return Node(sock=FaultySocket(open_socket(bind), impairment, seed=None), security=sec)


def _report_group(receipt: reliable.GroupReceipt, quiet: bool) -> None:
    """Print who has a group message; exit 1 unless every member it was meant for does."""
    if not receipt.acked and not receipt.missing:
        raise _fail(f"{receipt.group}: no members were known, so nobody received it")
    if not quiet or receipt.missing:
        click.echo(
            f"{receipt.size} bytes in {receipt.elapsed * 1000:.1f} ms, "
            f"{receipt.transmissions} datagram(s): {receipt}",
            err=True,
        )
    if receipt.missing:
        raise click.exceptions.Exit(1)


def _read_message(message: str | None, path: str | None) -> bytes:
    if message is not None:
        return message.encode("utf-8")
    if path is None or path == "-":
        if path is None and sys.stdin.isatty():
            raise click.UsageError("give MESSAGE, --file PATH, or pipe the message on stdin")
        return sys.stdin.buffer.read()
    try:
        return pathlib.Path(path).read_bytes()
    except OSError as exc:
        raise click.BadParameter(
            f"cannot read {path}: {exc.strerror}", param_hint="--file"
        ) from None


# ------------------------------------------------------------------------ recv


@main.command(context_settings=_CONTEXT)
@click.option("--bind", required=True, metavar="HOST:PORT", help="Address to receive on.")
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="One JSON object per line: source, size, type, priority, mailbox, data.",
)
@click.option(
    "-n", "--count", type=click.IntRange(min=1), default=None, help="Exit after this many messages."
)
@click.option(
    "--output-dir",
    type=click.Path(file_okay=False),
    default=None,
    help="Save each message as a file in this directory instead of printing it.",
)
@click.option(
    "--timeout",
    type=DURATION,
    default=None,
    help="Exit with status 1 if no message arrives for this long.",
)
@click.option(
    "--no-newline",
    is_flag=True,
    help="Raw mode: write messages back to back, without a newline after each.",
)
@click.option(
    "--mailbox",
    default=None,
    metavar="NAME",
    help="Create mailbox NAME on this node and receive from it (senders address "
    "HOST:PORT/NAME) [default: the node's default mailbox].",
)
@click.option(
    "--capacity",
    type=click.IntRange(min=0),
    default=None,
    help="Most messages the mailbox holds; a full one makes senders wait. "
    "0 is a rendezvous: a send completes when this receiver takes it. [default: unbounded]",
)
@click.option(
    "--max-bytes", type=click.IntRange(min=1), default=None, help="Most bytes the mailbox holds."
)
@click.option(
    "--port",
    "as_port",
    is_flag=True,
    help="Make the mailbox a port: this process is its only receiver.",
)
@click.option(
    "--type",
    "msg_type",
    type=int,
    default=0,
    show_default=True,
    help="Receive only this type (>0), or the lowest type <= |T| first (<0), as msgrcv.",
)
@click.option("--except-type", is_flag=True, help="With --type T > 0: receive every type except T.")
@click.option(
    "--join",
    "groups",
    multiple=True,
    metavar="GROUP",
    help="Become a member of multicast://GROUP:PORT or broadcast://:PORT and receive "
    "what is sent to it (repeatable). --bind must name this host's address on the "
    "interface to use, e.g. 127.0.0.1:7000.",
)
@click.option(
    "--serve",
    "services",
    multiple=True,
    metavar="SERVICE",
    help="Serve anycast://SERVICE: senders pick one member per message (repeatable).",
)
@click.option(
    "--announce",
    "announce_on",
    multiple=True,
    metavar="GROUP",
    help="Announce the --serve services on this multicast:// or broadcast:// group, "
    "where senders discover them (repeatable).",
)
@click.option(
    "--netem",
    "impair",
    default=None,
    metavar="SPEC",
    help="Impair this process's outgoing datagrams (acks, NAKs) with a tc-netem SPEC.",
)
@security_options
def recv(
    security: str,
    keyfile: str | None,
    bind: str,
    as_json: bool,
    count: int | None,
    output_dir: str | None,
    timeout: float | None,
    no_newline: bool,
    mailbox: str | None,
    capacity: int | None,
    max_bytes: int | None,
    as_port: bool,
    msg_type: int,
    except_type: bool,
    groups: tuple[str, ...],
    services: tuple[str, ...],
    announce_on: tuple[str, ...],
    impair: str | None,
) -> None:
    """Receive messages on --bind and print each exactly once.

    By default each message is written raw to stdout followed by a newline.
    Messages come highest priority first, oldest first within a priority.
    Stop with Ctrl-C, --count or --timeout.

    \b
    Examples:
      rmsg recv --bind 127.0.0.1:7000
      rmsg recv --bind 127.0.0.1:7000 --mailbox jobs --capacity 10 --type 3
      rmsg recv --bind 127.0.0.1:7000 --mailbox meet --capacity 0   # rendezvous
      rmsg recv --bind [::1]:7000 --json --count 10
      rmsg recv --bind 0.0.0.0:7000 --output-dir inbox/
      rmsg recv --bind 127.0.0.1:7001 --join multicast://239.1.2.3:7400 --mailbox news
      rmsg recv --bind 127.0.0.1:7002 --join broadcast://:7401
      rmsg recv --bind 127.0.0.1:7003 --serve printer --announce multicast://239.1.2.4:7402
    """
    if mailbox is None and (capacity is not None or max_bytes is not None or as_port):
        raise click.UsageError("--capacity, --max-bytes and --port describe a --mailbox NAME")
    if services and not announce_on:
        click.echo(
            "note: --serve without --announce: senders must list this node with --member",
            err=True,
        )
    out_dir = None
    if output_dir is not None:
        out_dir = pathlib.Path(output_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
    stdout: BinaryIO = sys.stdout.buffer
    received = 0
    try:
        selector = reliable.Selector(msg_type=msg_type, except_type=except_type)
    except UsageError as exc:
        raise click.UsageError(str(exc)) from None
    try:
        node = _node(bind, security, keyfile, impair)
    except UsageError as exc:
        raise click.BadParameter(str(exc), param_hint="--bind") from None
    try:
        for group in groups:
            node.join(group)
        for service in services:
            node.serve(service, announce=list(announce_on))
    except UsageError as exc:
        node.close(timeout=0)
        raise click.UsageError(str(exc)) from None
    try:
        box = (
            node.mailbox("")
            if mailbox is None
            else node.create_mailbox(mailbox, capacity, max_bytes=max_bytes, port=as_port)
        )
    except UsageError as exc:
        node.close(timeout=0)
        raise click.BadParameter(str(exc), param_hint="--mailbox") from None
    where = reliable.format_address(node.address) + (f"/{mailbox}" if mailbox else "")
    extra = [f"member of {g}" for g in groups] + [f"serving anycast://{s}" for s in services]
    click.echo(f"listening on {where}" + "".join(f", {e}" for e in extra), err=True)
    try:
        while count is None or received < count:
            try:
                msg = box.receive(
                    timeout, msg_type=selector.msg_type, except_type=selector.except_type
                )
            except ReceiveTimeout:
                raise _fail(f"no message for {timeout:g}s") from None
            received += 1
            if out_dir is not None:
                name = f"{received:06d}-{msg.sender.replace(':', '_').strip('[]')}.bin"
                (out_dir / name).write_bytes(msg.data)
                if as_json:
                    _write_json(stdout, msg, saved_as=str(out_dir / name))
            elif as_json:
                _write_json(stdout, msg)
            else:
                stdout.write(msg.data if no_newline else msg.data + b"\n")
            stdout.flush()
    except KeyboardInterrupt:
        pass
    finally:
        node.close(timeout=1.0)


def _write_json(stream: BinaryIO, msg: reliable.Message, saved_as: str | None = None) -> None:
    record: dict[str, Any] = {
        "source": msg.sender,
        "size": len(msg.data),
        "type": msg.msg_type,
        "priority": msg.priority,
        "mailbox": msg.mailbox,
    }
    if msg.group is not None:
        record["group"] = msg.group
    if saved_as is not None:
        record["file"] = saved_as
    else:
        try:
            record["data"] = msg.data.decode("utf-8")
        except UnicodeDecodeError:
            record["data"] = base64.b64encode(msg.data).decode("ascii")
            record["encoding"] = "base64"
    stream.write(json.dumps(record).encode("utf-8") + b"\n")


# ----------------------------------------------------------------------- stats


@main.command(context_settings=_CONTEXT)
@click.argument("node_address", metavar="HOST:PORT")
@click.option("--json", "as_json", is_flag=True, help="Print the raw statistics as JSON.")
@click.option(
    "--timeout",
    type=DURATION,
    default=3.0,
    show_default=True,
    help="Give up if the node does not answer within this long.",
)
@security_options
def stats(
    security: str, keyfile: str | None, node_address: str, as_json: bool, timeout: float
) -> None:
    """Ask the rmsg node at HOST:PORT for its statistics and print them.

    Like ipcs: one row per mailbox (messages and bytes queued, capacity,
    parked senders, high-water mark, totals in and out, last sender and
    receiver), one per peer (SRTT, RTTVAR, RTO, in-flight, retransmissions,
    duplicates and corrupt datagrams dropped), then node-wide totals.
    The node must be running with Config.serve_stats (the default).

    \b
    Examples:
      rmsg stats 127.0.0.1:7000
      rmsg stats 127.0.0.1:7000 --json | jq '.mailboxes[] | {name, messages}'
    """
    if timeout <= 0:
        raise click.BadParameter("must be more than 0", param_hint="--timeout")
    try:
        with Node(_wildcard_for(node_address), security=_security(security, keyfile)) as node:
            snapshot = node.query_stats(node_address, timeout=timeout)
    except UsageError as exc:
        raise click.UsageError(str(exc)) from None
    except ReliableError as exc:
        raise _fail(str(exc)) from None
    if as_json:
        click.echo(json.dumps(snapshot.as_dict(), default=str, indent=2))
    else:
        click.echo(format_stats(snapshot, node_address))


# ----------------------------------------------------------------------- bench


@main.command(context_settings=_CONTEXT)
@click.option("--quick", is_flag=True, help="A smoke run: small matrix, short windows.")
@click.option(
    "--rounds",
    type=click.IntRange(1, 20),
    default=None,
    help="Interleaved rounds; the report gives medians. [default: 3, quick: 1]",
)
@click.option(
    "--duration",
    type=DURATION,
    default=None,
    help="Sending window per throughput measurement. [default: 1.5s, quick: 0.3s]",
)
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON.")
@click.option(
    "--plot",
    type=click.Path(dir_okay=False),
    default=None,
    help="Also draw messages/s per transport to this PNG (needs rmsg[plot]).",
)
@click.option(
    "--scale/--no-scale",
    default=True,
    show_default=True,
    help="Also measure 1 vs 1,000 peers, a simulated 10%-loss exchange and a slow "
    "receiver (1 GiB; quick: smaller).",
)
@click.option(
    "--rpc",
    is_flag=True,
    help="Instead: no-op RPC calls/s and p50/p99, rmsg beside stdlib xmlrpc (and grpcio).",
)
def bench(
    quick: bool,
    rounds: int | None,
    duration: float | None,
    as_json: bool,
    plot: str | None,
    scale: bool,
    rpc: bool = False,
) -> None:
    """Measure rmsg against raw UDP and length-framed TCP, on loopback, in one run.

    Sender and receiver are separate processes; rounds are interleaved so
    machine drift hits every transport alike. Reports messages/s, MB/s,
    CPU per message, peak RSS and (rmsg) retransmission ratio for 64 B,
    1 KiB and 64 KiB messages and one 16 MiB message, rmsg at 0/1/5/10%
    loss each way; and request/reply RTT p50/p99, pinned to one CPU and
    unpinned. Each rmsg figure is also given as a ratio to raw UDP and TCP
    measured in the same run. With --scale (the default): one node fed by
    1 and by 1,000 peers, memory per idle peer, CPU for a simulated
    10,000-message exchange at 10% loss, and the sender's memory while
    1 GiB passes through a bounded mailbox. A full run takes several minutes.

    \b
    Examples:
      rmsg bench --quick
      rmsg bench --rounds 5 --json > figures.json
      rmsg bench --plot bench.png
    """
    from .bench import format_report, plot_report, run_bench

    if duration is not None and duration <= 0:
        raise click.BadParameter("must be more than 0", param_hint="--duration")
    if rpc:
        from .bench_rpc import format_rpc_report, run_rpc_bench

        figures = run_rpc_bench(
            duration=duration or (0.3 if quick else 1.0),
            rounds=rounds or (1 if quick else 3),
            progress=lambda text: click.echo(f"  {text}", err=True),
        )
        click.echo(format_rpc_report(figures, as_json))
        return

    def progress(text: str) -> None:
        click.echo(f"  {text}", err=True)

    report = run_bench(
        quick=quick, rounds=rounds, duration=duration, progress=progress, scale=scale
    )
    if as_json:
        click.echo(json.dumps(report.as_dict(), indent=2))
    else:
        click.echo(format_report(report))
    if plot is not None:
        try:
            plot_report(report, plot)
        except RuntimeError as exc:
            raise _fail(str(exc)) from None
        click.echo(f"plot written to {plot}", err=True)


# ---------------------------------------------------------------------- keygen


@main.command(context_settings=_CONTEXT)
@click.argument("path", type=click.Path(dir_okay=False))
def keygen(path: str) -> None:
    """Write a new random 32-byte pre-shared key to PATH, readable by you only.

    Give the same file to every node of a group (--keyfile PATH), or export
    it as RMSG_KEY. Keys never go on the command line, where ps shows them
    to every user. PATH must not exist yet.

    \b
    Examples:
      rmsg keygen ~/.config/rmsg/key
      rmsg recv --bind 127.0.0.1:7000 --security authenticated --keyfile ~/.config/rmsg/key
      RMSG_KEY=$(cat ~/.config/rmsg/key) rmsg send 127.0.0.1:7000 hi --security encrypted
    """
    try:
        reliable.security.write_keyfile(path)
    except UsageError as exc:
        raise click.BadParameter(str(exc), param_hint="PATH") from None
    except OSError as exc:
        raise _fail(f"cannot write {path}: {exc.strerror}") from None
    click.echo(f"wrote a new key to {path} (mode 600)", err=True)


# ------------------------------------------------------------------------ demo


@main.command(context_settings=_CONTEXT)
@click.option(
    "-n",
    "--messages",
    type=click.IntRange(1, 1_000_000),
    default=3000,
    show_default=True,
    help="How many messages to send.",
)
@click.option(
    "--size",
    type=click.IntRange(12, 16 * 1024 * 1024),
    default=1024,
    show_default=True,
    help="Bytes per message.",
)
@click.option(
    "--loss",
    type=PROBABILITY,
    default="20%",
    show_default=True,
    help="Datagrams dropped, each direction.",
)
@click.option(
    "--duplicate",
    type=PROBABILITY,
    default="5%",
    show_default=True,
    help="Datagrams delivered twice.",
)
@click.option(
    "--reorder",
    type=PROBABILITY,
    default="10%",
    show_default=True,
    help="Datagrams that overtake the ones before them.",
)
@click.option(
    "--corrupt",
    type=PROBABILITY,
    default="2%",
    show_default=True,
    help="Datagrams with a bit flipped.",
)
@click.option(
    "--delay",
    type=DURATION,
    default="1ms",
    show_default=True,
    help="One-way delay (reordering needs some).",
)
@click.option(
    "--jitter",
    type=DURATION,
    default="0.5ms",
    show_default=True,
    help="Random variation of the delay (+/-).",
)
@click.option(
    "--seed",
    type=int,
    default=1,
    show_default=True,
    help="Seed for the link's decisions and the payloads.",
)
@click.option(
    "--timeout",
    type=DURATION,
    default="120s",
    show_default=True,
    help="Stop and report failure after this long.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def demo(
    messages: int,
    size: int,
    loss: float,
    duplicate: float,
    reorder: float,
    corrupt: float,
    delay: float,
    jitter: float,
    seed: int,
    timeout: float,
    as_json: bool,
) -> None:
    """Show rmsg at work over a bad link, on this machine only.

    Two nodes on 127.0.0.1 exchange messages through an in-process fault
    injector (netem) that drops, duplicates, reorders and corrupts datagrams
    in both directions. The receiver checks every message is delivered
    exactly once, intact and in order; exits 1 if any is not.

    \b
    Examples:
      rmsg demo                          # 20% loss, duplicates, reordering, corruption
      rmsg demo --loss 0 --duplicate 0 --reorder 0 --corrupt 0    # a clean link
      rmsg demo --messages 200 --size 200000 --loss 5%            # multi-fragment messages
    """
    impairment = Impairment(
        loss=loss,
        duplicate=duplicate,
        reorder=reorder,
        corrupt=corrupt,
        delay=delay,
        jitter=jitter,
    )
    live = sys.stderr.isatty() and not as_json

    def show(p: DemoProgress) -> None:
        line = (
            f"  {p.elapsed:6.1f}s  sent {p.sent:>7}  acked {p.acknowledged:>7}  "
            f"received {p.received:>7}  retransmitted {p.retransmissions:>6}"
        )
        if live:
            click.echo("\r" + line, nl=False, err=True)
        else:
            click.echo(line, err=True)

    if not as_json:
        click.echo(
            f"rmsg demo: {messages} x {size} B over loopback with {loss:.0%} loss, "
            f"{duplicate:.0%} duplication, {reorder:.0%} reordering, {corrupt:.0%} corruption, "
            f"{delay * 1000:g}±{jitter * 1000:g} ms delay (seed {seed})",
            err=True,
        )
    result = run_demo(
        messages=messages,
        size=size,
        impairment=impairment,
        seed=seed,
        timeout=timeout,
        progress=show if not as_json else None,
        progress_interval=0.25 if live else 1.0,
    )
    if live:
        click.echo(err=True)
    if as_json:
        click.echo(json.dumps(result.as_dict(), indent=2))
    else:
        r = result
        verdict = "OK" if r.ok else "FAILED"
        click.echo(
            "\n".join(
                [
                    f"  sent                       {r.messages} messages "
                    f"({r.messages * r.size:,} bytes)",
                    f"  acknowledged               {r.acknowledged}  (failed: {r.failed})",
                    f"  delivered intact, in order {r.intact}  (duplicates delivered: "
                    f"{r.duplicates_delivered}, in order: {'yes' if r.in_order else 'NO'})",
                    f"  retransmissions            {r.retransmissions}",
                    f"  duplicates dropped         {r.duplicate_datagrams_dropped}",
                    f"  corrupt dropped            {r.corrupt_datagrams_dropped}",
                    f"  link did                   dropped {r.link_dropped}, duplicated "
                    f"{r.link_duplicated}, corrupted {r.link_corrupted}, reordered "
                    f"{r.link_reordered}",
                    f"  throughput                 {r.messages_per_second:,.0f} msg/s, "
                    f"{r.megabytes_per_second:.2f} MB/s over {r.elapsed:.2f}s",
                    f"  verdict                    {verdict}"
                    + (" (timed out)" if r.timed_out else ""),
                ]
            )
        )
    if not result.ok:
        sys.exit(1)


# ------------------------------------------------------------------------ netem


@main.command(context_settings=_CONTEXT)
@click.option("--listen", required=True, metavar="HOST:PORT", help="Where clients send.")
@click.option("--forward", required=True, metavar="HOST:PORT", help="The server to relay to.")
@click.option("--spec", default=None, help="tc-netem impairment for both directions.")
@click.option("--up", default=None, help="Impairment client -> server (overrides --spec).")
@click.option("--down", default=None, help="Impairment server -> client (overrides --spec).")
@click.option(
    "--scenario",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="A TOML timeline of phases, partitions and flaps (see docs/netem.md).",
)
@click.option(
    "--seed",
    type=int,
    default=0,
    show_default=True,
    help="Seed for every decision: the same seed replays the same faults.",
)
@click.option(
    "--pcap-in",
    type=click.Path(dir_okay=False),
    default=None,
    help="Capture what arrives, before impairment.",
)
@click.option(
    "--pcap-out",
    type=click.Path(dir_okay=False),
    default=None,
    help="Capture what is sent on, after impairment.",
)
@click.option(
    "--rebind-every",
    type=DURATION,
    default=None,
    help="NAT rebinding: give each client a new upstream port this often.",
)
@click.option(
    "--client-idle-timeout",
    type=DURATION,
    default=120.0,
    show_default=True,
    help="Forget a client (and close its upstream port) after this long without a datagram.",
)
@click.option(
    "--max-clients",
    type=click.IntRange(min=1),
    default=None,
    help="Clients held at once; more are refused and counted. "
    "[default: 4096, or what the descriptor limit (ulimit -n) leaves]",
)
@click.option(
    "--duration", type=DURATION, default=None, help="Stop after this long (default: until Ctrl-C)."
)
@click.option("--json", "as_json", is_flag=True, help="Print the exit counters as JSON.")
def netem(
    listen: str,
    forward: str,
    spec: str | None,
    up: str | None,
    down: str | None,
    scenario: str | None,
    seed: int,
    pcap_in: str | None,
    pcap_out: str | None,
    rebind_every: float | None,
    client_idle_timeout: float,
    max_clients: int | None,
    duration: float | None,
    as_json: bool,
) -> None:
    """Relay UDP between clients and a server through a faulty link.

    Any UDP application works, not only rmsg. Clients send to --listen; each
    gets its own upstream socket towards --forward (like a NAT). Impairments
    use tc-netem syntax; the same --seed replays the same decisions. Counters
    are printed when it stops (Ctrl-C, SIGTERM or --duration). New clients
    beyond --max-clients or the descriptor limit are refused and counted, the
    others keep being relayed. Exit status: 0 after a normal stop, 1 if the
    relay failed (the error is named), 2 for bad options.

    \b
    Examples:
      rmsg netem --listen 127.0.0.1:9000 --forward 127.0.0.1:7000 --spec "loss 10%"
      rmsg netem --listen 127.0.0.1:9000 --forward 127.0.0.1:7000 \\
          --up "delay 20ms 5ms loss 2%" --down "delay 20ms duplicate 1%" --pcap-out out.pcap
      rmsg netem --listen 127.0.0.1:9000 --forward 127.0.0.1:7000 --scenario flaky.toml
    """
    from netem.proxy import ProxyFailed, UdpProxy
    from netem.scenario import Scenario, ScenarioError
    from netem.spec import SpecError, format_spec, parse_spec

    if scenario is not None and (spec or up or down):
        raise click.UsageError("give either --scenario or --spec/--up/--down, not both")
    try:
        timeline = Scenario.from_toml(pathlib.Path(scenario)) if scenario else None
        up_imp = parse_spec(up if up is not None else spec or "")
        down_imp = parse_spec(down if down is not None else spec or "")
    except (SpecError, ScenarioError) as exc:
        raise click.UsageError(str(exc)) from None
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", RuntimeWarning)
            proxy = UdpProxy(
                listen,
                forward,
                up=None if timeline else up_imp,
                down=None if timeline else down_imp,
                scenario=timeline,
                seed=seed,
                pcap_in=pcap_in,
                pcap_out=pcap_out,
                rebind_every=rebind_every,
                idle_timeout=client_idle_timeout,
                max_clients=max_clients,
            )
    except (ValueError, OSError) as exc:
        raise click.UsageError(str(exc)) from None
    for warning in caught:
        click.echo(f"netem: warning: {warning.message}", err=True)
    described = (
        f"scenario {scenario}"
        if timeline
        else f"up: {format_spec(up_imp) or 'clean'}; down: {format_spec(down_imp) or 'clean'}"
    )
    click.echo(
        f"netem: {reliable.format_address(proxy.address)} -> "
        f"{reliable.format_address(proxy.forward)} ({described}, seed {seed})",
        err=True,
    )
    started = time.monotonic()
    failure: ProxyFailed | None = None
    with _terminate_as_interrupt():
        proxy.start()
        try:
            # wait() raises as soon as the relay thread fails, so a dead relay ends the run
            while duration is None or time.monotonic() - started < duration:
                proxy.wait(0.05 if duration is None else min(0.05, duration))
        except KeyboardInterrupt:
            pass
        except ProxyFailed:
            pass  # stop() raises it again, after closing everything
        finally:
            try:
                proxy.stop()
            except ProxyFailed as exc:
                failure = exc
    stats = proxy.snapshot()
    if as_json:
        click.echo(json.dumps(stats.as_dict(), indent=2))
    else:
        click.echo(_netem_summary(stats, time.monotonic() - started))
    if failure is not None:
        raise _fail(str(failure))


def _netem_summary(stats: ProxyStats, elapsed: float) -> str:
    rows = [("up", stats.up, stats.up_sent), ("down", stats.down, stats.down_sent)]
    lines = [f"netem summary after {elapsed:.1f}s"]
    lines.append(
        f"  {'dir':<5}{'seen':>9}{'sent':>9}{'dropped':>9}{'dup':>7}{'corrupt':>9}"
        f"{'reorder':>9}{'delay mean/max ms':>20}"
    )
    for name, c, sent in rows:
        lines.append(
            f"  {name:<5}{c.seen:>9}{sent:>9}{c.dropped:>9}{c.duplicated:>7}{c.corrupted:>9}"
            f"{c.reordered:>9}{c.delay_mean * 1000:>11.2f}/{c.delay_max * 1000:<8.2f}"
        )
    reasons = ", ".join(f"{name} {count}" for name, count in sorted(stats.refused.items()))
    lines.append(
        f"  clients {stats.clients} (expired {stats.clients_expired}, refused "
        f"{stats.clients_refused}{f': {reasons}' if reasons else ''}), rebinds {stats.rebinds}"
        f"{f' ({stats.rebind_errors} failed)' if stats.rebind_errors else ''}, "
        f"send errors {stats.send_errors}"
    )
    return "\n".join(lines)


@contextlib.contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """Treat SIGTERM like Ctrl-C while running, so counters still print when killed."""
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        yield
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


# ---------------------------------------------------------------------- dissect


@main.command(context_settings=_CONTEXT)
@click.argument("capture", type=click.Path(exists=True, dir_okay=False))
def dissect(capture: str) -> None:
    """Print a readable timeline of the rmsg packets in a pcap CAPTURE.

    One line per datagram: time, direction, kind, sequence number, base,
    fragment, ack, window, SACK ranges, reject notices — RETX marks a
    retransmission, MALFORMED a datagram the link corrupted. Needs scapy.

    \b
    Examples:
      rmsg netem --listen 127.0.0.1:9000 --forward 127.0.0.1:7000 --spec "loss 5%" \\
          --pcap-out run.pcap
      rmsg dissect run.pcap | grep RETX
    """
    from .dissect import dissect_file

    try:
        for entry in dissect_file(capture):
            click.echo(entry.format())
    except RuntimeError as exc:
        raise _fail(str(exc)) from None
    except Exception as exc:  # scapy's own errors for unreadable files
        raise _fail(f"cannot read {capture}: {exc}") from None


# ------------------------------------------------------------------------- rpc

from .rpc_cmd import call, serve_demo  # noqa: E402  (commands of their own module)

main.add_command(call)
main.add_command(serve_demo)


if __name__ == "__main__":  # pragma: no cover
    main()
