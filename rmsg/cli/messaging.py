"""``rmsg send`` and ``rmsg recv``: messages, lines and files to and from mailboxes and groups."""

from __future__ import annotations

import base64
import json
import pathlib
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any, BinaryIO

import click

import reliable
from reliable import Node, ReceiveTimeout, ReliableError, UsageError

from .options import (
    CONTEXT,
    DURATION,
    LOOPBACK_GROUP_NOTE,
    fail,
    on_loopback,
    open_node,
    security_options,
    wildcard_for,
)

# ------------------------------------------------------------------------ send


@click.command(context_settings=CONTEXT)
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
        local = bind or wildcard_for(dest.split("/", 1)[0])
        try:
            with open_node(local, security, keyfile, impair) as node:
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
            raise fail(str(exc)) from None
        return
    if path is not None and path != "-" and not grouped:
        given = click.get_current_context().get_parameter_source("timeout")
        _send_file(
            dest,
            pathlib.Path(path),
            node_args=(bind or wildcard_for(dest.split("/", 1)[0]), security, keyfile, impair),
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
    local = bind or ("127.0.0.1:0" if grouped else wildcard_for(dest.split("/", 1)[0]))
    if grouped and not anycast and on_loopback(local) and not quiet:
        click.echo(LOOPBACK_GROUP_NOTE, err=True)
    deadline = time.monotonic() + timeout
    try:
        with open_node(local, security, keyfile, impair) as node:
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
        raise fail(str(exc)) from None
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
    from ..transfer import Progress, send_file

    try:
        size = path.stat().st_size
    except OSError as exc:
        raise click.BadParameter(
            f"cannot read {path}: {exc.strerror}", param_hint="--file"
        ) from None
    stderr = sys.stderr
    progress = None if quiet or as_json else Progress(stderr, size, f"send {path.name}")
    try:
        with open_node(*node_args) as node:
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
        raise fail(
            f"{path.name}: {exc}; a receiver with --output-dir keeps the part it has "
            "(send again with --resume to carry on)"
        ) from None
    except OSError as exc:
        raise fail(f"cannot read {path}: {exc.strerror}") from None
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
            raise fail(
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
        raise fail(f"{len(failed)} of {count} lines were not delivered{more}")
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


def _report_group(receipt: reliable.GroupReceipt, quiet: bool, as_json: bool = False) -> None:
    """Print who has a group message; exit 1 unless every member it was meant for does."""
    if not receipt.acked and not receipt.missing:
        raise fail(f"{receipt.group}: no members were known, so nobody received it")
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


@click.command(context_settings=CONTEXT)
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
        node = open_node(bind, security, keyfile, impair)
    except UsageError as exc:
        raise click.BadParameter(str(exc), param_hint="--bind") from None
    except ReliableError as exc:  # BindError: the OS refused (in use, not ours): not usage
        raise fail(str(exc)) from None
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
    from ..transfer import FileReceiver, TransferDone

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
    if groups and on_loopback(bind):
        click.echo(LOOPBACK_GROUP_NOTE.replace("hear it", "send to it"), err=True)
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
                raise fail(f"no message for {timeout:g}s") from None
            except reliable.MessageTooBig as exc:
                raise fail(
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
        raise fail(f"{failed_transfers} file transfer(s) failed their check")


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
