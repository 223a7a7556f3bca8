"""The ``rmsg`` command line: thin wrappers that build a config, call the library and
turn its errors into one-line messages and exit codes."""

from __future__ import annotations

import base64
import contextlib
import json
import logging
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
from reliable.addressing import parse_address
from reliable.driver import open_socket

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


class _StderrHandler(logging.Handler):
    """Log lines to whatever stderr is when they are written (click's, in tests)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            click.echo(self.format(record), err=True)
        except Exception:  # a logging handler never raises into the library
            self.handleError(record)


_LOGGERS = ("reliable", "netem")


def _configure_logging(verbose: int) -> Callable[[], None]:
    """-v: INFO from the library and netem (sessions, refusals, evictions); -vv: DEBUG too.

    Returns what undoes it, so a command run in-process leaves no handler behind.
    """
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("rmsg: %(levelname)s %(name)s: %(message)s"))
    level = logging.INFO if verbose == 1 else logging.DEBUG
    saved = []
    for name in _LOGGERS:
        logger = logging.getLogger(name)
        saved.append((logger, logger.level))
        logger.setLevel(level)
        logger.addHandler(handler)

    def undo() -> None:
        for logger, old in saved:
            logger.removeHandler(handler)
            logger.setLevel(old)

    return undo


@click.group(context_settings=_CONTEXT)
@click.version_option(
    reliable.__version__,
    prog_name="rmsg",
    message="%(prog)s, version %(version)s"
    + (" (compiled core)" if reliable.__compiled__ else " (pure core)"),
)
@click.option(
    "-v",
    "--verbose",
    count=True,
    help="Log to stderr what the library does: -v sessions established, dropped and "
    "restarted, unreachable peers, refusals, evictions; -vv also debug detail.",
)
@click.pass_context
def main(ctx: click.Context, verbose: int) -> None:
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
      rmsg -v recv --bind 127.0.0.1:7000         # and log sessions and refusals
    """
    if verbose:
        ctx.call_on_close(_configure_logging(verbose))


# ------------------------------------------------------------------------ send


@main.command(context_settings=_CONTEXT)
@click.argument("dest")
@click.argument("message", required=False)
@click.option(
    "-f",
    "--file",
    "path",
    type=click.Path(dir_okay=False, allow_dash=True),
    help="Send this file, of any size, as a transfer that 'rmsg recv' reassembles and "
    "checks: a manifest, then 1 MiB chunks, verified by SHA-256 (a progress line on a "
    "terminal). To a group or anycast DEST, and for '-' (stdin), it goes as one message.",
)
@click.option(
    "--resume",
    is_flag=True,
    help="With --file: carry on from where an interrupted send of the same file to the "
    "same 'rmsg recv --output-dir' stopped (the receiver kept the part); the whole file "
    "is still verified by SHA-256. Without a part there, the file is sent whole.",
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
    "a message waiting for room is then withdrawn. With --file: the whole transfer's "
    "limit, by default 10s plus 10s per MiB.",
)
@click.option(
    "--bind",
    default=None,
    metavar="HOST:PORT",
    help="Local address to send from [default: any, same family as DEST].",
)
@click.option("-q", "--quiet", is_flag=True, help="Print nothing on success.")
@click.option(
    "--json", "as_json", is_flag=True, help="Print the receipt (or the failure) as one JSON line."
)
@click.option(
    "--lines",
    is_flag=True,
    help="Send each line of the input (MESSAGE, --file or stdin) as its own message, "
    "in order and in batches, without its line end; exits 1 if any failed, naming the lines.",
)
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
    resume: bool,
    msg_type: int,
    priority: int,
    mailbox: str | None,
    timeout: float,
    bind: str | None,
    quiet: bool,
    as_json: bool,
    lines: bool,
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
      rmsg send 127.0.0.1:7000 --file disk.img --resume   # after an interrupted send
      echo '{"job": 42}' | rmsg send 127.0.0.1:7000/jobs --type 3
      journalctl -f | rmsg send 127.0.0.1:7000/logs --lines
      rmsg send multicast://239.1.2.3:7400/news "hello all" --wait-members 3
      rmsg send broadcast://:7401 "anyone there?"
      rmsg send anycast://printer/jobs "page 1" --discover multicast://239.1.2.4:7402
      rmsg send anycast://printer "page 2" --member 127.0.0.1:7001 --member 127.0.0.1:7002
    """
    if message is not None and path is not None:
        raise click.UsageError("give either MESSAGE or --file, not both")
    if resume and (path is None or path == "-" or reliable.addressing.is_group_url(dest)):
        raise click.UsageError("--resume goes with --file PATH to one node (HOST:PORT[/MAILBOX])")
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
    if lines:
        if grouped:
            raise click.UsageError("--lines sends to one node: HOST:PORT[/MAILBOX]")
        local = bind or _wildcard_for(dest.split("/", 1)[0])
        try:
            with _node(local, security, keyfile, impair) as node:
                _send_lines(
                    node,
                    dest,
                    _input_lines(message, path),
                    msg_type,
                    priority,
                    mailbox,
                    timeout,
                    quiet,
                )
        except UsageError as exc:
            raise click.UsageError(str(exc)) from None
        except ReliableError as exc:
            raise _fail(str(exc)) from None
        return
    if path is not None and path != "-" and not grouped:
        given = click.get_current_context().get_parameter_source("timeout")
        _send_file(
            dest,
            pathlib.Path(path),
            node_args=(bind or _wildcard_for(dest.split("/", 1)[0]), security, keyfile, impair),
            timeout=None if given == click.core.ParameterSource.DEFAULT else timeout,
            msg_type=msg_type,
            priority=priority,
            mailbox=mailbox,
            quiet=quiet,
            as_json=as_json,
            resume=resume,
        )
        return
    data = _read_message(message, path)
    local = bind or ("127.0.0.1:0" if grouped else _wildcard_for(dest.split("/", 1)[0]))
    if grouped and not anycast and _on_loopback(local) and not quiet:
        click.echo(_LOOPBACK_GROUP_NOTE, err=True)
    deadline = time.monotonic() + timeout
    try:
        with _node(local, security, keyfile, impair) as node:
            try:
                receipt = _send_one(
                    node,
                    dest,
                    data,
                    msg_type,
                    priority,
                    mailbox,
                    timeout,
                    deadline,
                    wait_members,
                    discover_on,
                    members,
                    policy,
                )
            except KeyboardInterrupt:
                _interrupted(node, len(data), as_json)
    except UsageError as exc:
        raise click.UsageError(str(exc)) from None
    except ReliableError as exc:
        raise _fail(str(exc)) from None
    if isinstance(receipt, reliable.GroupReceipt):
        _report_group(receipt, quiet, as_json)
        return
    if as_json:
        click.echo(json.dumps(_receipt_dict(receipt)))
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
            f"({', '.join(notes)})"
        )


def _send_file(
    dest: str,
    path: pathlib.Path,
    *,
    node_args: tuple[str, str, str | None, str | None],
    timeout: float | None,
    msg_type: int,
    priority: int,
    mailbox: str | None,
    quiet: bool,
    as_json: bool,
    resume: bool = False,
) -> None:
    """``send --file``: the file as a transfer (rmsg/transfer.py), with a progress line."""
    from .transfer import Progress, send_file

    try:
        size = path.stat().st_size
    except OSError as exc:
        raise click.BadParameter(
            f"cannot read {path}: {exc.strerror}", param_hint="--file"
        ) from None
    stderr = sys.stderr
    progress = None if quiet or as_json else Progress(stderr, size, f"send {path.name}")
    try:
        with _node(*node_args) as node:
            try:
                outcome = send_file(
                    node,
                    dest,
                    path,
                    timeout=timeout,
                    msg_type=msg_type,
                    priority=priority,
                    mailbox=mailbox,
                    progress=progress,
                    resume=resume,
                )
            except KeyboardInterrupt:
                _interrupted(node, size, as_json)
    except UsageError as exc:
        raise click.UsageError(str(exc)) from None
    except ReliableError as exc:
        raise _fail(
            f"{path.name}: {exc}; a receiver with --output-dir keeps the part it has "
            "(send again with --resume to carry on)"
        ) from None
    except OSError as exc:
        raise _fail(f"cannot read {path}: {exc.strerror}") from None
    peer = dest.split("/", 1)[0]
    if as_json:
        click.echo(json.dumps(outcome.as_dict(peer)))
    elif not quiet:
        m = outcome.manifest
        resumed = f", resumed after {outcome.resumed:,} bytes" if outcome.resumed else ""
        click.echo(
            f"delivered {m.name} ({m.size:,} bytes, SHA-256 {m.sha256[:16]}...) to {dest} "
            f"in {outcome.elapsed:.1f} s ({m.chunks} chunk(s), "
            f"{outcome.retransmissions} retransmission(s){resumed})"
        )


def _send_one(
    node: Node,
    dest: str,
    data: bytes,
    msg_type: int,
    priority: int,
    mailbox: str | None,
    timeout: float,
    deadline: float,
    wait_members: int | None,
    discover_on: tuple[str, ...],
    members: tuple[str, ...],
    policy: str,
) -> reliable.Receipt | reliable.GroupReceipt:
    """Wait for the members or service DEST needs, then send and wait for the receipt."""
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
    if dest.startswith(("multicast://", "broadcast://")):
        return node.send_group(
            dest,
            data,
            msg_type=msg_type,
            priority=priority,
            mailbox=mailbox,
            timeout=remaining,
        )
    return node.send(
        dest,
        data,
        msg_type=msg_type,
        priority=priority,
        mailbox=mailbox,
        timeout=remaining,
        policy=policy,
    )


#: Exit status after Ctrl-C, as shells report a command killed by SIGINT (128 + 2).
EXIT_INTERRUPTED = 130


def _interrupted(node: Node, size: int, as_json: bool) -> None:
    """Ctrl-C during a send: say what is known about the message, exit 130 at once."""
    sent = node.stats().datagrams_sent
    node.close(timeout=0)  # no close flush: the user asked to stop now
    if sent == 0:
        known = "nothing was sent: the message was not delivered"
        delivered: bool | None = False
    else:
        known = (
            f"{sent} datagram(s) sent, no receipt yet: the message of {size} bytes may or "
            "may not have reached its mailbox"
        )
        delivered = None
    if as_json:
        click.echo(
            json.dumps({"status": "interrupted", "delivered": delivered, "datagrams_sent": sent})
        )
    click.echo(f"interrupted: {known}", err=True)
    raise click.exceptions.Exit(EXIT_INTERRUPTED)


def _receipt_dict(receipt: reliable.Receipt) -> dict[str, Any]:
    return {
        "status": "delivered",
        "peer": reliable.format_address(receipt.peer),
        "mailbox": receipt.mailbox,
        "size": receipt.size,
        "fragments": receipt.fragments,
        "transmissions": receipt.transmissions,
        "retransmissions": receipt.retransmissions,
        "elapsed": receipt.elapsed,
        "incarnation": receipt.incarnation,
        "deferred": receipt.deferred,
        "receiver": receipt.receiver,
        "failovers": [[reliable.format_address(m), why] for m, why in receipt.failovers],
    }


_LOOPBACK_GROUP_NOTE = (
    "note: the group socket is on loopback, so only members on this host can hear it "
    "(and exit status 0 means every member that announced itself here has the message); "
    "--bind this host's address on the network's interface to reach other hosts"
)


def _on_loopback(bind: str) -> bool:
    """Whether ``bind`` (HOST:PORT) is a loopback address."""
    import ipaddress

    try:
        host, _ = parse_address(bind, allow_zero_port=True)
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except (UsageError, ValueError):
        return False


_LINE_BATCH = 1024  # lines per send_many: one handle, one lock round, datagrams packed


def _input_lines(message: str | None, path: str | None) -> Iterator[bytes]:
    """The lines of MESSAGE, --file or stdin, without their line ends, read as they come."""
    if message is not None:
        yield from message.encode("utf-8").splitlines()
        return
    if path is None or path == "-":
        if path is None and sys.stdin.isatty():
            raise click.UsageError("give MESSAGE, --file PATH, or pipe the lines on stdin")
        for line in sys.stdin.buffer:
            yield line.rstrip(b"\r\n")
        return
    try:
        with open(path, "rb") as stream:
            for line in stream:
                yield line.rstrip(b"\r\n")
    except OSError as exc:
        raise click.BadParameter(
            f"cannot read {path}: {exc.strerror}", param_hint="--file"
        ) from None


def _send_lines(
    node: Node,
    dest: str,
    source: Iterator[bytes],
    msg_type: int,
    priority: int,
    mailbox: str | None,
    timeout: float,
    quiet: bool,
) -> None:
    """``rmsg send --lines``: a batch per ``_LINE_BATCH`` lines; report what failed."""
    started = time.monotonic()
    batches: list[tuple[int, reliable.BatchHandle]] = []  # (first line number, handle)
    count = size = 0
    chunk: list[bytes] = []

    def flush() -> None:
        if chunk:
            batches.append(
                (
                    count - len(chunk) + 1,
                    node.send_many(
                        dest,
                        chunk,
                        msg_type=msg_type,
                        priority=priority,
                        mailbox=mailbox,
                        timeout=timeout,
                    ),
                )
            )
            chunk.clear()

    for line in source:
        chunk.append(line)
        count += 1
        size += len(line)
        if len(chunk) >= _LINE_BATCH:
            flush()
    flush()
    failed: list[tuple[int, ReliableError]] = []
    for first, batch in batches:
        for index, error in sorted(batch.failures(timeout + 5).items()):
            failed.append((first + index, error))
    for number, error in failed[:10]:
        click.echo(f"line {number}: {error}", err=True)
    if failed:
        more = " (first 10 above)" if len(failed) > 10 else ""
        raise _fail(f"{len(failed)} of {count} lines were not delivered{more}")
    if not quiet:
        elapsed = (time.monotonic() - started) * 1000
        click.echo(
            f"delivered {count} messages ({size} bytes) to {dest} in {elapsed:.1f} ms", err=True
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


def _report_group(receipt: reliable.GroupReceipt, quiet: bool, as_json: bool = False) -> None:
    """Print who has a group message; exit 1 unless every member it was meant for does."""
    if not receipt.acked and not receipt.missing:
        raise _fail(f"{receipt.group}: no members were known, so nobody received it")
    if as_json:
        record = {
            "status": "missing" if receipt.missing else "delivered",
            "group": receipt.group,
            "size": receipt.size,
            "fragments": receipt.fragments,
            "transmissions": receipt.transmissions,
            "elapsed": receipt.elapsed,
            "acked": [reliable.format_address(m) for m in receipt.acked],
            "missing": {reliable.format_address(m): why for m, why in receipt.missing.items()},
        }
        click.echo(json.dumps(record))
    elif not quiet or receipt.missing:
        click.echo(
            f"{receipt.size} bytes in {receipt.elapsed * 1000:.1f} ms, "
            f"{receipt.transmissions} datagram(s): {receipt}"
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
    help="Save each message as a file in this directory instead of printing it; a file "
    "sent with 'rmsg send --file' is saved under its own name once its SHA-256 checks.",
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
@click.option(
    "--durable",
    metavar="PATH",
    default=None,
    help="Keep the --mailbox's messages in the SQLite file PATH: senders get their "
    "receipt only once a message is committed, and what is not received survives a "
    "crash or restart (start again with the same PATH).",
)
@click.option(
    "--sync",
    type=click.Choice(["grouped", "message", "os"]),
    default="grouped",
    show_default=True,
    help="With --durable: fsync once per batch, once per message, or leave it to the OS "
    "(safe against a crash of the process, not of the machine).",
)
@click.option(
    "--max-size",
    type=click.IntRange(0),
    default=None,
    metavar="BYTES",
    help="Receive messages of at most BYTES (msgrcv's msgsz): a longer one stays queued "
    "and recv fails, unless --truncate.",
)
@click.option(
    "--truncate",
    is_flag=True,
    help="With --max-size: print a longer message cut to BYTES (MSG_NOERROR) and note "
    "it on stderr.",
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
    durable: str | None,
    sync: str,
    max_size: int | None = None,
    truncate: bool = False,
) -> None:
    """Receive messages on --bind and print each exactly once.

    By default each message is written raw to stdout, followed by a newline
    unless it ends in one.
    Messages come highest priority first, oldest first within a priority.
    Stop with Ctrl-C, --count or --timeout.

    \b
    Examples:
      rmsg recv --bind 127.0.0.1:7000
      rmsg recv --bind 127.0.0.1:7000 --mailbox jobs --capacity 10 --type 3
      rmsg recv --bind 127.0.0.1:7000 --mailbox meet --capacity 0   # rendezvous
      rmsg recv --bind [::1]:7000 --json --count 10
      rmsg recv --bind 127.0.0.1:7000 --mailbox jobs --durable jobs.db
      rmsg recv --bind 127.0.0.1:7000 --max-size 512 --truncate
      rmsg recv --bind 0.0.0.0:7000 --output-dir inbox/
      rmsg recv --bind 127.0.0.1:7001 --join multicast://239.1.2.3:7400 --mailbox news
      rmsg recv --bind 127.0.0.1:7002 --join broadcast://:7401
      rmsg recv --bind 127.0.0.1:7003 --serve printer --announce multicast://239.1.2.4:7402
    """
    if mailbox is None and (capacity is not None or max_bytes is not None or as_port):
        raise click.UsageError("--capacity, --max-bytes and --port describe a --mailbox NAME")
    if mailbox is None and durable is not None:
        raise click.UsageError("--durable keeps a named mailbox: give --mailbox NAME too")
    if durable is None and sync != "grouped":
        raise click.UsageError("--sync applies to --durable mailboxes")
    if truncate and max_size is None:
        raise click.UsageError("--truncate cuts messages to --max-size: give --max-size too")
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
    except ReliableError as exc:  # BindError: the OS refused (in use, not ours): not usage
        raise _fail(str(exc)) from None
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
            else node.create_mailbox(
                mailbox, capacity, max_bytes=max_bytes, port=as_port, durable=durable, sync=sync
            )
        )
    except UsageError as exc:
        node.close(timeout=0)
        raise click.BadParameter(str(exc), param_hint="--mailbox") from None
    from .transfer import FileReceiver, TransferDone

    stderr = sys.stderr
    transfers = FileReceiver(
        out_dir,
        sink=None if out_dir is not None or as_json else stdout,
        progress_stream=stderr if stderr.isatty() and not as_json else None,
        reply=lambda source, box_name, answer: node.send_nowait(f"{source}/{box_name}", answer),
    )
    failed_transfers = 0
    where = reliable.format_address(node.address) + (f"/{mailbox}" if mailbox else "")
    if durable is not None:
        kept = box.stats().messages
        where += f" (durable: {durable}, {kept} message{'s' if kept != 1 else ''} kept)"
    extra = [f"member of {g}" for g in groups] + [f"serving anycast://{s}" for s in services]
    click.echo(f"listening on {where}" + "".join(f", {e}" for e in extra), err=True)
    if groups and _on_loopback(bind):
        click.echo(_LOOPBACK_GROUP_NOTE.replace("hear it", "send to it"), err=True)
    try:
        while count is None or received < count:
            try:
                msg = box.receive(
                    timeout,
                    msg_type=selector.msg_type,
                    except_type=selector.except_type,
                    max_size=max_size,
                    truncate=truncate,
                )
            except ReceiveTimeout:
                raise _fail(f"no message for {timeout:g}s") from None
            except reliable.MessageTooBig as exc:
                raise _fail(
                    f"the next message is {exc.size} bytes, over --max-size {exc.max_size}; "
                    "it stays queued (receive it with a larger --max-size, or --truncate)"
                ) from None
            if msg.truncated:
                click.echo(
                    f"note: a {len(msg.data) + msg.truncated}-byte message from {msg.sender} "
                    f"was cut to --max-size {len(msg.data)}",
                    err=True,
                )
            taken = transfers.offer(msg.sender, msg.data)
            if taken is True:
                continue  # a manifest or chunk: the transfer goes on
            if isinstance(taken, TransferDone):
                received += 1
                failed_transfers += not taken.verified
                _report_transfer(taken, stdout, as_json, out_dir is None)
                continue
            received += 1
            if out_dir is not None:
                name = f"{received:06d}-{msg.sender.replace(':', '_').strip('[]')}.bin"
                (out_dir / name).write_bytes(msg.data)
                if as_json:
                    _write_json(stdout, msg, saved_as=str(out_dir / name))
            elif as_json:
                _write_json(stdout, msg)
            elif no_newline or msg.data.endswith(b"\n"):
                stdout.write(msg.data)  # a line (echo, piped stdin) already ends itself
            else:
                stdout.write(msg.data + b"\n")
            stdout.flush()
        if count is not None:
            _warn_left_behind(box.stats(), durable)
    except KeyboardInterrupt:
        pass
    finally:
        node.close(timeout=1.0)
        for source, manifest, got in transfers.unfinished():
            click.echo(
                f"incomplete: {manifest.name} from {source}, {got:,} of {manifest.size:,} "
                "bytes (not saved under its name)",
                err=True,
            )
        transfers.close()
    if failed_transfers:
        raise _fail(f"{failed_transfers} file transfer(s) failed their check")


def _report_transfer(done: Any, stdout: BinaryIO, as_json: bool, to_stdout: bool) -> None:
    """One finished ``send --file`` transfer: a JSON line, or a note on stderr."""
    if as_json:
        record = done.as_dict()
        if to_stdout:
            record["warning"] = "file data is kept only with --output-dir"
        stdout.write(json.dumps(record).encode("utf-8") + b"\n")
        stdout.flush()
    m = done.manifest
    if done.verified:
        where = f"saved as {done.saved_as}" if done.saved_as is not None else "written to stdout"
        note = f"received {m.name} ({m.size:,} bytes) from {done.source}: SHA-256 verified, {where}"
        if done.resumed:
            note += f" (resumed: {done.resumed:,} bytes kept from an earlier attempt)"
    else:
        kept = f"; the part is in {done.saved_as}" if done.saved_as is not None else ""
        note = f"error: {m.name} from {done.source}: {done.error}{kept}"
    if not as_json or not done.verified:
        click.echo(note, err=True)


def _warn_left_behind(stats: reliable.MailboxStats, durable: str | None) -> None:
    """--count is reached: say what the mailbox still holds, which closing would lose."""
    left = stats.messages + stats.parked
    if not left:
        return
    fate = f"kept in {durable}" if durable else "discarded when this node closes"
    click.echo(
        f"warning: stopped after --count; {left} message{'s' if left != 1 else ''} "
        f"left in the mailbox ({fate})",
        err=True,
    )


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
    if msg.truncated:
        record["truncated"] = msg.truncated  # bytes cut off by --max-size --truncate
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
    help="Also draw the figures to this PNG: messages/s by size and loss, one colour per "
    "transport, UDP's losses and rmsg's retransmissions marked (needs rmsg[plot]).",
)
@click.option(
    "--from",
    "from_json",
    type=click.Path(dir_okay=False, exists=True),
    default=None,
    help="Measure nothing: draw --plot from figures saved with --json.",
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
@click.option(
    "--rr",
    is_flag=True,
    help="Instead: request/reply only (64 B, pinned and unpinned), with CPU and datagrams "
    "per round trip, the core on a bare loop (no adapter) and the core's own CPU.",
)
@click.option(
    "--veth",
    is_flag=True,
    help="Instead: 1 KiB and 16 MiB rows against TCP between two network namespaces "
    "over veth (MTU 1500, 198.18.0.0/15, removed afterwards); needs root and iproute2.",
)
@click.option(
    "--durable",
    is_flag=True,
    help="Instead: 1 KiB msgs/s into a durable mailbox, beside sqlite3's grouped inserts "
    "on the same disk and a volatile mailbox.",
)
@click.option(
    "--sync",
    type=click.Choice(["grouped", "message", "os"]),
    default="grouped",
    show_default=True,
    help="With --durable: the mailbox's sync policy (and the matching sqlite3 settings).",
)
@click.option(
    "--rows",
    type=click.IntRange(1, 100_000),
    default=100,
    show_default=True,
    help="With --durable: rows per sqlite3 transaction in the comparison.",
)
@click.option(
    "--dir",
    "directory",
    type=click.Path(file_okay=False, exists=True),
    default=None,
    help="With --durable: where the files go (the disk measured). [default: .]",
)
def bench(
    quick: bool,
    rounds: int | None,
    duration: float | None,
    as_json: bool,
    plot: str | None,
    from_json: str | None,
    scale: bool,
    rpc: bool = False,
    rr: bool = False,
    veth: bool = False,
    durable: bool = False,
    sync: str = "grouped",
    rows: int = 100,
    directory: str | None = None,
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
      rmsg bench --from figures.json --plot bench.png     # draw a saved run again
      rmsg bench --rr --rounds 5                          # request/reply only
      rmsg bench --veth --rounds 3                        # as root: namespaces, real MTU
      rmsg bench --durable --sync grouped --rows 100      # durable mailbox vs sqlite3
    """
    from .bench import format_report, run_bench

    if duration is not None and duration <= 0:
        raise click.BadParameter("must be more than 0", param_hint="--duration")
    if plot is not None:
        _require_plotting(plot, "--plot")  # before minutes of measuring, not after
    if from_json is not None:
        if plot is None:
            raise click.UsageError("--from draws saved figures: give --plot FILE.png too")
        try:
            saved = json.loads(pathlib.Path(from_json).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise click.BadParameter(f"cannot read figures: {exc}", param_hint="--from") from None
        _plot_bench(saved, plot)
        return
    if durable:
        from .bench_durable import format_durable_report, run_durable_bench

        figures_d = run_durable_bench(
            sync=sync,
            rows=rows,
            duration=duration or (0.5 if quick else 2.0),
            rounds=rounds or (1 if quick else 3),
            directory=directory,
            progress=lambda text: click.echo(f"  {text}", err=True),
        )
        if as_json:
            click.echo(json.dumps(figures_d.as_dict(), indent=2))
        else:
            click.echo(format_durable_report(figures_d))
        return
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

    if rr:
        from .bench import run_rr_bench

        rr_report = run_rr_bench(
            rounds=rounds or (1 if quick else 3),
            count=300 if quick else 3000,
            progress=progress,
        )
        if as_json:
            click.echo(json.dumps(rr_report.as_dict(), indent=2))
        else:
            click.echo(format_report(rr_report))
        return
    if veth:
        from .bench import run_veth_bench, veth_unavailable

        reason = veth_unavailable()
        if reason is not None:
            raise click.ClickException(f"--veth: {reason}")
        veth_report = run_veth_bench(
            rounds=rounds or (1 if quick else 3),
            duration=duration or (0.3 if quick else 1.5),
            progress=progress,
        )
        if as_json:
            click.echo(json.dumps(veth_report.as_dict(), indent=2))
        else:
            click.echo(format_report(veth_report))
        return

    report = run_bench(
        quick=quick, rounds=rounds, duration=duration, progress=progress, scale=scale
    )
    from .plots import describe_machine

    figures = report.as_dict()
    figures["machine"] = describe_machine()
    figures["command"] = " ".join(
        ["rmsg bench"]
        + (["--quick"] if quick else [])
        + ([f"--rounds {rounds}"] if rounds is not None else [])
        + ([f"--duration {duration:g}s"] if duration is not None else [])
        + ([] if scale else ["--no-scale"])
    )
    if as_json:
        click.echo(json.dumps(figures, indent=2))
    else:
        click.echo(format_report(report))
    if plot is not None:
        _plot_bench(figures, plot)


def _plot_bench(figures: dict[str, Any], plot: str) -> None:
    from .plots import plot_bench

    try:
        plot_bench(figures, plot)
    except (RuntimeError, ValueError, KeyError, TypeError) as exc:
        raise _fail(f"cannot draw {plot}: {exc}") from None
    click.echo(f"plot written to {plot}", err=True)


def _require_plotting(path: str, option: str) -> None:
    """Fail at once, before any work, if a plot could not be drawn or saved."""
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        raise _fail(f"{option} needs matplotlib: pip install 'rmsg[plot]'")
    folder = pathlib.Path(path).resolve().parent
    if not folder.is_dir():
        raise click.BadParameter(f"folder {folder} does not exist", param_hint=option)


# ---------------------------------------------------------------------- keygen


@main.command(context_settings=_CONTEXT)
@click.argument("path", type=click.Path(dir_okay=False))
@click.option(
    "--json", "as_json", is_flag=True, help="Print where the key went as JSON (never the key)."
)
def keygen(path: str, as_json: bool) -> None:
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
    if as_json:
        written = pathlib.Path(path).resolve()
        info = written.stat()
        record = {"status": "written", "path": str(written), "mode": f"{info.st_mode & 0o777:o}"}
        click.echo(json.dumps(record))
        return
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
            f"rmsg demo: {messages} x {size} B over loopback with {loss:.0%} datagram loss, "
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
                    f"  fragments retransmitted    {r.retransmissions}  (a datagram bundles "
                    "several fragments, so one lost datagram may cost many)",
                    f"  datagrams dropped          {r.duplicate_datagrams_dropped} duplicates, "
                    f"{r.corrupt_datagrams_dropped} corrupt  (by the receiving nodes)",
                    f"  link carried               {r.link_datagrams} datagrams: dropped "
                    f"{r.link_dropped} ({_share(r.link_dropped, r.link_datagrams)}), duplicated "
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


def _share(part: int, whole: int) -> str:
    return f"{part / whole:.1%}" if whole else "-"


# ------------------------------------------------------------------------ netem


@main.group(context_settings=_CONTEXT, invoke_without_command=True)
@click.option("--listen", default=None, metavar="HOST:PORT", help="Where clients send. [required]")
@click.option(
    "--forward", default=None, metavar="HOST:PORT", help="The server to relay to. [required]"
)
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
    "--capture",
    type=click.Path(dir_okay=False),
    default=None,
    help="Capture both legs to one pcapng (client leg, server leg), "
    "each datagram's fault decision as a packet comment.",
)
@click.option(
    "--replies",
    type=click.Choice(["learn", "relay", "strict"]),
    default="learn",
    show_default=True,
    help="Replies from another port of the server's host: relay them and send the "
    "client's next datagrams there (learn), only relay them (relay), or drop them (strict).",
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
@click.option(
    "--control",
    default=None,
    metavar="HOST:PORT",
    help="Serve the control API (rmsg netem ctl) here; loopback only, no authentication.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the exit counters as JSON.")
@click.pass_context
def netem(
    ctx: click.Context,
    listen: str | None,
    forward: str | None,
    spec: str | None,
    up: str | None,
    down: str | None,
    scenario: str | None,
    seed: int,
    pcap_in: str | None,
    pcap_out: str | None,
    capture: str | None,
    replies: str,
    rebind_every: float | None,
    client_idle_timeout: float,
    max_clients: int | None,
    duration: float | None,
    control: str | None,
    as_json: bool,
) -> None:
    """Relay UDP between clients and a server through a faulty link.

    Any UDP application works, not only rmsg. Clients send to --listen; each
    gets its own upstream socket towards --forward (like a NAT). Impairments
    use tc-netem syntax; the same --seed replays the same decisions. Counters
    are printed when it stops (Ctrl-C, SIGTERM or --duration). New clients
    beyond --max-clients or the descriptor limit are refused and counted, the
    others keep being relayed. Exit status: 0 after a normal stop, 1 if the
    relay could not start or failed (the OS's error is named: an address in
    use, a capture that cannot be written), 2 for bad options.

    \b
    Examples:
      rmsg netem --listen 127.0.0.1:9000 --forward 127.0.0.1:7000 --spec "loss 10%"
      rmsg netem --listen 127.0.0.1:9000 --forward 127.0.0.1:7000 \\
          --up "delay 20ms 5ms loss 2%" --down "delay 20ms duplicate 1%" --pcap-out out.pcap
      rmsg netem --listen 127.0.0.1:9000 --forward 127.0.0.1:7000 --scenario flaky.toml
      rmsg netem --listen 127.0.0.1:9000 --forward 127.0.0.1:7000 --control 127.0.0.1:9001
      rmsg netem ctl --control 127.0.0.1:9001 set "loss 30%" --direction up
    """
    if ctx.invoked_subcommand is not None:
        given = [
            name
            for name in ("listen", "forward", "spec", "up", "down", "scenario")
            if ctx.params.get(name) is not None
        ]
        if given:
            raise click.UsageError(f"--{given[0]} belongs to the proxy, not to 'rmsg netem ctl'")
        return
    if listen is None or forward is None:
        missing = "--listen" if listen is None else "--forward"
        raise click.UsageError(f"Missing option '{missing}' (or a subcommand: ctl)")
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
                capture=capture,
                replies=replies,
                rebind_every=rebind_every,
                idle_timeout=client_idle_timeout,
                max_clients=max_clients,
                control=control,
            )
    except socket.gaierror as exc:  # a name that does not resolve: fix the option
        raise click.UsageError(f"cannot resolve the address: {exc.strerror}") from None
    except OSError as exc:  # in use, not ours, an unwritable capture: the OS said no
        raise _fail(f"cannot start the proxy: {exc}") from None
    except ValueError as exc:
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
    if proxy.control_address is not None:
        click.echo(
            f"netem: control API on http://{reliable.format_address(proxy.control_address)} "
            "(no authentication: keep it on loopback)",
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


@netem.group(context_settings=_CONTEXT)
@click.option(
    "--control",
    required=True,
    envvar="RMSG_NETEM_CONTROL",
    metavar="HOST:PORT",
    help="The proxy's control address (its --control). [env: RMSG_NETEM_CONTROL]",
)
@click.option(
    "--timeout", type=DURATION, default=5.0, show_default=True, help="Give up after this."
)
@click.pass_context
def ctl(ctx: click.Context, control: str, timeout: float) -> None:
    """Change the faults of a running proxy (started with --control).

    \b
    Examples:
      rmsg netem ctl --control 127.0.0.1:9001 get
      rmsg netem ctl --control 127.0.0.1:9001 set "delay 50ms loss 5%"
      rmsg netem ctl --control 127.0.0.1:9001 set "loss 100%" --client 127.0.0.1:5353
      rmsg netem ctl --control 127.0.0.1:9001 partition --direction up
      rmsg netem ctl --control 127.0.0.1:9001 heal
      rmsg netem ctl --control 127.0.0.1:9001 clear
    """
    ctx.obj = (control, timeout)


def _ctl_request(ctx: click.Context, method: str, path: str, body: dict[str, Any] | None) -> None:
    import http.client

    from netem.control import is_loopback
    from netem.proxy import parse_hostport

    control, timeout = ctx.obj
    try:
        host, port = parse_hostport(control)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--control") from None
    if not is_loopback(host):
        raise click.BadParameter(
            "the control API only listens on loopback (127.0.0.1, ::1)", param_hint="--control"
        )
    # http.client, not urllib: no proxy from the environment may see this request
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"} if data is not None else {}
        conn.request(method, path, body=data, headers=headers)
        response = conn.getresponse()
        payload = json.loads(response.read() or b"{}")
    except (OSError, ValueError, http.client.HTTPException) as exc:
        raise _fail(f"cannot reach the netem control API at {control}: {exc}") from None
    finally:
        conn.close()
    if response.status != 200:
        raise _fail(str(payload.get("error", f"HTTP {response.status}")))
    click.echo(json.dumps(payload, indent=2))


_DIRECTION = click.option(
    "--direction",
    type=click.Choice(["up", "down", "both"]),
    default="both",
    show_default=True,
    help="up: client -> server; down: server -> client.",
)
_CLIENT = click.option(
    "--client",
    default=None,
    metavar="HOST[:PORT]",
    help="Only this client (a host means all its ports); the others are spared.",
)


@ctl.command("get", context_settings=_CONTEXT)
@click.pass_context
def ctl_get(ctx: click.Context) -> None:
    """Print the faults in force (JSON)."""
    _ctl_request(ctx, "GET", "/faults", None)


@ctl.command("stats", context_settings=_CONTEXT)
@click.pass_context
def ctl_stats(ctx: click.Context) -> None:
    """Print the proxy's counters so far, each client's too (JSON)."""
    _ctl_request(ctx, "GET", "/stats", None)


@ctl.command("set", context_settings=_CONTEXT)
@click.argument("spec", required=False)
@click.option("--up", default=None, help="Spec for client -> server only.")
@click.option("--down", default=None, help="Spec for server -> client only.")
@_DIRECTION
@_CLIENT
@click.pass_context
def ctl_set(
    ctx: click.Context,
    spec: str | None,
    up: str | None,
    down: str | None,
    direction: str,
    client: str | None,
) -> None:
    """Put a tc-netem SPEC in force from now on (replacing the start-up one)."""
    if spec is None and up is None and down is None:
        raise click.UsageError('give a SPEC (or --up/--down), e.g. set "loss 10%"')
    body = {"spec": spec, "up": up, "down": down, "direction": direction, "client": client}
    _ctl_request(ctx, "POST", "/set", body)


@ctl.command("clear", context_settings=_CONTEXT)
@_CLIENT
@click.pass_context
def ctl_clear(ctx: click.Context, client: str | None) -> None:
    """Remove every fault (or, with --client, that client's own rules)."""
    _ctl_request(ctx, "POST", "/clear", {"client": client})


@ctl.command("partition", context_settings=_CONTEXT)
@_DIRECTION
@_CLIENT
@click.pass_context
def ctl_partition(ctx: click.Context, direction: str, client: str | None) -> None:
    """Cut the link (one direction or both) until healed."""
    _ctl_request(ctx, "POST", "/partition", {"direction": direction, "client": client})


@ctl.command("heal", context_settings=_CONTEXT)
@_DIRECTION
@_CLIENT
@click.pass_context
def ctl_heal(ctx: click.Context, direction: str, client: str | None) -> None:
    """End partitions."""
    _ctl_request(ctx, "POST", "/heal", {"direction": direction, "client": client})


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
    if stats.strays or stats.other_port_replies:
        lines.append(
            f"  replies from other server ports {stats.other_port_replies}, "
            f"strays dropped {stats.strays}"
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
@click.option("--json", "as_json", is_flag=True, help="One JSON object per datagram.")
@click.option(
    "--plot",
    type=click.Path(dir_okay=False),
    default=None,
    help="Also draw a time-sequence graph of the capture to this PNG (needs rmsg[plot]).",
)
def dissect(capture: str, as_json: bool, plot: str | None) -> None:
    """Print a readable timeline of the rmsg packets in a pcap CAPTURE.

    One line per datagram: time, direction, kind, sequence number, base,
    fragment (numbered from 1), ack, window, SACK ranges, reject notices —
    RETX marks a retransmission, MALFORMED a datagram the link corrupted.
    --plot draws sequence numbers over time per direction, in the style of
    tcptrace's and Wireshark's Stevens graphs, with retransmissions, SACKed
    ranges and corrupt datagrams marked. Needs scapy.

    \b
    Examples:
      rmsg netem --listen 127.0.0.1:9000 --forward 127.0.0.1:7000 --spec "loss 5%" \\
          --pcap-out run.pcap
      rmsg dissect run.pcap | grep RETX
      rmsg dissect run.pcap --json | jq 'select(.retransmission)'
      rmsg dissect run.pcap --plot run.png
    """
    from .dissect import dissect_file

    if plot is not None:
        _require_plotting(plot, "--plot")
    entries = []
    try:
        for entry in dissect_file(capture):
            if plot is not None:
                entries.append(entry)
            click.echo(json.dumps(entry.as_dict()) if as_json else entry.format())
    except RuntimeError as exc:
        raise _fail(str(exc)) from None
    except Exception as exc:  # scapy's own errors for unreadable files
        raise _fail(f"cannot read {capture}: {exc}") from None
    if plot is not None:
        from .plots import plot_timeline

        plot_timeline(entries, plot, title=pathlib.Path(capture).name)
        click.echo(f"plot written to {plot}", err=True)


# -------------------------------------------------------------------- wireshark


@main.group(context_settings=_CONTEXT)
def wireshark() -> None:
    """Wireshark and tshark support: a Lua dissector for rmsg's wire format.

    The dissector decodes every packet kind, bundled fragments, SACK ranges,
    verdict notices, group names and sealed datagrams, checks the CRC-32 and
    marks retransmissions; it finds rmsg on any UDP port by its header.

    \b
    Examples:
      rmsg wireshark install                 # then restart Wireshark
      tshark -r run.pcap -Y 'rmsg.retransmission'
      rmsg wireshark install --print > rmsg.lua
      tshark -X lua_script:rmsg.lua -r run.pcap
    """


@wireshark.command("install", context_settings=_CONTEXT)
@click.option(
    "--path",
    "folder",
    type=click.Path(file_okay=False),
    default=None,
    help="Install into this folder [default: your personal Lua plugins folder, "
    "as 'tshark -G folders' names it].",
)
@click.option(
    "--print", "print_only", is_flag=True, help="Write the Lua source to stdout; install nothing."
)
@click.option(
    "--json", "as_json", is_flag=True, help="Print the file written (and tshark's path) as JSON."
)
def wireshark_install(folder: str | None, print_only: bool, as_json: bool) -> None:
    """Install the rmsg dissector (rmsg.lua) into Wireshark's plugin folder.

    Wireshark and tshark load it at their next start. Prints the path of the
    file written.

    \b
    Examples:
      rmsg wireshark install
      rmsg wireshark install --path ~/.local/lib/wireshark/plugins
      rmsg wireshark install --print | less
    """
    from .wireshark_plugin import install, lua_source

    if print_only and as_json:
        raise click.UsageError("--print writes the Lua source; --json describes an install")
    if print_only:
        click.echo(lua_source(), nl=False)
        return
    try:
        target = install(pathlib.Path(folder) if folder is not None else None)
    except OSError as exc:
        raise _fail(f"cannot install the dissector: {exc}") from None
    if as_json:
        import shutil

        record = {
            "status": "installed",
            "path": str(target.resolve()),
            "bytes": target.stat().st_size,
            "tshark": shutil.which("tshark"),
        }
        click.echo(json.dumps(record))
        return
    click.echo(str(target))


# ------------------------------------------------------------------------- rpc

from .rpc_cmd import call, serve_demo  # noqa: E402  (commands of their own module)

main.add_command(call)
main.add_command(serve_demo)

from .ctl_cmd import ctl  # noqa: E402  (mailbox management, rmsg ctl)

main.add_command(ctl)


if __name__ == "__main__":  # pragma: no cover
    main()
