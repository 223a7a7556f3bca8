"""``rmsg send`` and ``rmsg recv``: messages, lines and files to and from mailboxes and groups."""

from __future__ import annotations

import pathlib
import sys
import time
from collections.abc import Callable, Iterator
from typing import BinaryIO

import click

import reliable
from netem.models import Impairment
from reliable import Node, ReceiveTimeout, ReliableError, UsageError
from reliable.security import Security

from . import render
from .app import command
from .options import (
    DESTINATION,
    DURATION,
    LOOPBACK_GROUP_NOTE,
    NETEM_SPEC,
    POSITIVE_DURATION,
    Destination,
    fail,
    on_loopback,
    open_node,
    security_options,
    wildcard_for,
)

# ------------------------------------------------------------------------ send


@command()
@click.argument("dest", type=DESTINATION)
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
    type=POSITIVE_DURATION,
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
    type=NETEM_SPEC,
    default=None,
    metavar="SPEC",
    help="Impair this process's outgoing datagrams with a tc-netem SPEC "
    "(e.g. 'loss 10%'): test a link's faults without root.",
)
@security_options
def send(
    security: Security,
    dest: Destination,
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
    impair: Impairment | None,
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
    if resume and (path is None or path == "-" or dest.node is None):
        raise click.UsageError("--resume goes with --file PATH to one node (HOST:PORT[/MAILBOX])")
    if (discover_on or members) and dest.service is None:
        raise click.UsageError("--discover and --member describe an anycast:// DEST")
    if wait_members is not None and dest.group is None:
        raise click.UsageError("--wait-members applies to a multicast:// or broadcast:// DEST")
    if dest.service is not None and not (discover_on or members):
        raise click.UsageError(
            "an anycast DEST needs its members: --discover GROUP (where they announce "
            "themselves) or --member HOST:PORT"
        )
    if lines and dest.node is None:
        raise click.UsageError("--lines sends to one node: HOST:PORT[/MAILBOX]")
    local = bind or ("127.0.0.1:0" if dest.node is None else wildcard_for(dest.node))
    if lines:
        source = _input_lines(message, path)
        with open_node(local, security, impair) as node:
            _send_lines(node, dest.text, source, msg_type, priority, mailbox, timeout, quiet)
        return
    if path is not None and path != "-" and dest.node is not None:
        given = click.get_current_context().get_parameter_source("timeout")
        _send_file(
            dest,
            pathlib.Path(path),
            open_node=lambda: open_node(local, security, impair),
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
    if dest.group is not None and on_loopback(local) and not quiet:
        click.echo(LOOPBACK_GROUP_NOTE, err=True)
    deadline = time.monotonic() + timeout
    with open_node(local, security, impair) as node:
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
    if isinstance(receipt, reliable.GroupReceipt):
        _report_group(receipt, quiet, as_json)
    elif as_json:
        render.echo_json(render.receipt_record(receipt))
    elif not quiet:
        service = dest.service.service if dest.service is not None else None
        click.echo(render.receipt_line(receipt, service))


def _send_file(
    dest: Destination,
    path: pathlib.Path,
    *,
    open_node: Callable[[], Node],
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
    progress = None if quiet or as_json else Progress(sys.stderr, size, f"send {path.name}")
    try:
        with open_node() as node:
            try:
                outcome = send_file(
                    node,
                    dest.text,
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
    except UsageError:
        raise  # a usage error, as every command's (app.library_errors)
    except ReliableError as exc:  # the part is kept: say how to carry on
        raise fail(
            f"{path.name}: {exc}; a receiver with --output-dir keeps the part it has "
            "(send again with --resume to carry on)"
        ) from None
    except OSError as exc:
        raise fail(f"cannot read {path}: {exc.strerror}") from None
    if as_json:
        render.echo_json(outcome.as_dict(str(dest.node)))
    elif not quiet:
        click.echo(render.file_sent_line(outcome, dest.text))


def _send_one(
    node: Node,
    dest: Destination,
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
    if wait_members is not None and dest.group is not None:
        found = node.wait_for_members(dest.group.url, wait_members, timeout)
        if len(found) < wait_members:
            raise fail(
                f"only {len(found)} of {wait_members} members of {dest.group.url} "
                f"announced themselves within {timeout:g}s"
            )
    for group in discover_on:
        node.discover(group)
    if dest.service is not None:
        service = dest.service.service
        if members:
            node.add_service_members(service, list(members))
        if discover_on:
            _await(lambda: bool(node.service_members(service)), deadline)
    waited = wait_members is not None or bool(discover_on)
    remaining = max(0.001, deadline - time.monotonic()) if waited else timeout
    if dest.group is not None:
        return node.send_group(
            dest.text,
            data,
            msg_type=msg_type,
            priority=priority,
            mailbox=mailbox,
            timeout=remaining,
        )
    return node.send(
        dest.text,
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
    if as_json:
        render.echo_json(render.interrupted_record(sent))
    click.echo(render.interrupted_line(sent, size), err=True)
    raise click.exceptions.Exit(EXIT_INTERRUPTED)


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
        click.echo(render.lines_line(count, size, dest, time.monotonic() - started), err=True)


def _await(condition: Callable[[], bool], deadline: float) -> None:
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.02)


def _report_group(receipt: reliable.GroupReceipt, quiet: bool, as_json: bool = False) -> None:
    """Print who has a group message; exit 1 unless every member it was meant for does."""
    if not receipt.acked and not receipt.missing:
        raise fail(f"{receipt.group}: no members were known, so nobody received it")
    if as_json:
        render.echo_json(render.group_receipt_record(receipt))
    elif not quiet or receipt.missing:
        click.echo(render.group_receipt_line(receipt))
    if receipt.missing:
        raise click.exceptions.Exit(1)


def _read_message(message: str | None, path: str | None) -> bytes:
    """The message: MESSAGE, the whole of --file, or all of stdin."""
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


@command()
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
    type=NETEM_SPEC,
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
    security: Security,
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
    impair: Impairment | None,
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
    selector = reliable.Selector(msg_type=msg_type, except_type=except_type)
    node = _open_receiver(bind, security, impair, groups, services, announce_on)
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

    transfers = FileReceiver(
        out_dir,
        sink=None if out_dir is not None or as_json else stdout,
        progress_stream=sys.stderr if sys.stderr.isatty() and not as_json else None,
        reply=lambda source, box_name, answer: node.send_nowait(f"{source}/{box_name}", answer),
    )
    kept = box.stats().messages if durable is not None else None
    click.echo(
        render.listening_line(node.address, mailbox, durable, kept, groups, services), err=True
    )
    if groups and on_loopback(bind):
        click.echo(LOOPBACK_GROUP_NOTE.replace("hear it", "send to it"), err=True)
    received = failed_transfers = 0
    try:
        while count is None or received < count:
            msg = _receive_one(box, timeout, selector, max_size, truncate)
            taken = transfers.offer(msg.sender, msg.data)
            if taken is True:
                continue  # a manifest or chunk: the transfer goes on
            received += 1
            if isinstance(taken, TransferDone):
                failed_transfers += not taken.verified
                render.report_transfer(taken, stdout, as_json, out_dir is None)
            else:
                _write_message(stdout, msg, received, out_dir, as_json, no_newline)
        left = render.left_behind_line(box.stats(), durable) if count is not None else None
        if left is not None:
            click.echo(left, err=True)
    except KeyboardInterrupt:
        pass
    finally:
        node.close(timeout=1.0)
        for source, manifest, got in transfers.unfinished():
            click.echo(render.incomplete_transfer_line(source, manifest, got), err=True)
        transfers.close()
    if failed_transfers:
        raise fail(f"{failed_transfers} file transfer(s) failed their check")


def _open_receiver(
    bind: str,
    security: Security,
    impair: Impairment | None,
    groups: tuple[str, ...],
    services: tuple[str, ...],
    announce_on: tuple[str, ...],
) -> Node:
    """``recv``'s node on --bind, a member of its --join groups, serving its --serve services."""
    try:  # a BindError (in use, not ours) is no usage error: it fails as any other
        node = open_node(bind, security, impair)
    except UsageError as exc:
        raise click.BadParameter(str(exc), param_hint="--bind") from None
    try:
        for group in groups:
            node.join(group)
        for service in services:
            node.serve(service, announce=list(announce_on))
    except UsageError:
        node.close(timeout=0)
        raise
    return node


def _receive_one(
    box: reliable.Mailbox,
    timeout: float | None,
    selector: reliable.Selector,
    max_size: int | None,
    truncate: bool,
) -> reliable.Message:
    """The next message --type selects; a timeout or a message over --max-size ends recv."""
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
        click.echo(render.truncated_line(msg), err=True)
    return msg


def _write_message(
    stdout: BinaryIO,
    msg: reliable.Message,
    number: int,
    out_dir: pathlib.Path | None,
    as_json: bool,
    no_newline: bool,
) -> None:
    """Message ``number``: saved in --output-dir, as a JSON line, or raw on stdout."""
    if out_dir is not None:
        name = f"{number:06d}-{msg.sender.replace(':', '_').strip('[]')}.bin"
        (out_dir / name).write_bytes(msg.data)
        if as_json:
            render.write_json_line(stdout, render.message_record(msg, str(out_dir / name)))
    elif as_json:
        render.write_json_line(stdout, render.message_record(msg))
    elif no_newline or msg.data.endswith(b"\n"):
        stdout.write(msg.data)  # a line (echo, piped stdin) already ends itself
    else:
        stdout.write(msg.data + b"\n")
    stdout.flush()
