"""``rmsg call`` and ``rmsg serve-demo``: remote procedure calls from the shell.

``call`` parses its arguments as JSON, calls the library, prints the result
(or ``--json``: the whole outcome) and exits with the call's status code
(gRPC's numbers: 0 OK, 1 CANCELLED, 3 INVALID_ARGUMENT, 4 DEADLINE_EXCEEDED,
5 NOT_FOUND, 8 RESOURCE_EXHAUSTED, 12 UNIMPLEMENTED, 13 INTERNAL,
14 UNAVAILABLE; 2 is click's own, for a bad command line).
"""

from __future__ import annotations

import json
import signal
import sys
import threading
import time
from typing import Any

import click

from reliable import Node
from reliable.addressing import parse_service
from reliable.rpc import Client, RpcError, Server, Status, current_call

from . import render
from .app import command

__all__ = ["DemoService", "call", "serve_demo"]


class DemoService:
    """What ``rmsg serve-demo`` serves: small methods to try every outcome with."""

    def __init__(self) -> None:
        self.calls = 0

    def noop(self) -> None:
        """Do nothing (the benchmark's call)."""

    def echo(self, value: Any) -> Any:
        """Return ``value`` unchanged."""
        return value

    def add(self, a: float, b: float) -> float:
        """Return ``a + b``."""
        return a + b

    def count(self) -> int:
        """How many times count() ran here (shows at-most-once execution)."""
        self.calls += 1
        return self.calls

    def sleep(self, seconds: float) -> str:
        """Sleep up to ``seconds``; stops early if the call is cancelled or its deadline passes."""
        call = current_call()
        if call.wait_cancelled(seconds):
            left = call.time_remaining()
            if left is not None and left <= 0:  # the deadline passed: as gRPC, not CANCELLED
                raise RpcError(Status.DEADLINE_EXCEEDED, "stopped: the caller's deadline passed")
            raise RpcError(Status.CANCELLED, "stopped: the caller cancelled")
        return f"slept {seconds:g}s"

    def time_left(self) -> float | None:
        """Seconds left before the caller's deadline (None: it set none)."""
        return current_call().time_remaining()

    def fail(self, message: str = "failed on purpose") -> None:
        """Raise ``ValueError(message)`` (arrives as INTERNAL, type and message)."""
        raise ValueError(message)


def _json_arg(text: str, what: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        raise click.BadParameter(
            f"{text!r} is not JSON (quote strings: '\"text\"')", param_hint=what
        ) from None


@command()
@click.argument("dest")
@click.argument("method")
@click.argument("args", nargs=-1)
@click.option(
    "--kw", "kwargs", multiple=True, metavar="NAME=JSON", help="A keyword argument (repeatable)."
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=30.0,
    show_default=True,
    help="The call's deadline, in seconds; the server sees it.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the outcome as one JSON object.")
@click.option("--codec", type=click.Choice(["json", "msgpack"]), default="json", show_default=True)
@click.option("--bind", default="127.0.0.1:0", show_default=True, metavar="HOST:PORT")
@click.option(
    "--member",
    "members",
    multiple=True,
    metavar="HOST:PORT",
    help="With anycast://SERVICE: a member of the service (repeatable).",
)
@click.option(
    "--discover",
    metavar="GROUP",
    default=None,
    help="With anycast://SERVICE: learn the members announced on this group.",
)
def call(
    dest: str,
    method: str,
    args: tuple[str, ...],
    kwargs: tuple[str, ...],
    timeout: float,
    as_json: bool,
    codec: str,
    bind: str,
    members: tuple[str, ...],
    discover: str | None,
) -> None:
    """Call METHOD at DEST with JSON ARGS; print the result, exit with the status code.

    DEST is HOST:PORT (the default service), HOST:PORT/SERVICE, or
    anycast://SERVICE with --member or --discover. Exit codes are gRPC's
    status numbers: 0 OK, 1 CANCELLED, 3 INVALID_ARGUMENT, 4
    DEADLINE_EXCEEDED, 5 NOT_FOUND, 8 RESOURCE_EXHAUSTED, 12 UNIMPLEMENTED,
    13 INTERNAL, 14 UNAVAILABLE (2: a bad command line). A failure says
    whether the call ran: it did, it did not (safe to call again), or unknown.

    \b
    Examples:
      rmsg serve-demo --bind 127.0.0.1:7000 &
      rmsg call 127.0.0.1:7000 add 2 3                      # 5
      rmsg call 127.0.0.1:7000 echo '{"a": [1, "x"]}' --json
      rmsg call 127.0.0.1:7000 sleep 5 --timeout 1          # exit 4
      rmsg call anycast://demo count --member 127.0.0.1:7000 --member 127.0.0.1:7001
    """
    values = [_json_arg(a, "ARGS") for a in args]
    named: dict[str, Any] = {}
    for item in kwargs:
        name, sep, text = item.partition("=")
        if not sep or not name:
            raise click.BadParameter(f"{item!r} is not NAME=JSON", param_hint="--kw")
        named[name] = _json_arg(text, "--kw")
    service = None
    if dest.startswith("anycast://"):
        target = parse_service(dest)
        if target.mailbox:  # the RPC client would look for a service named "SERVICE/NAME"
            raise click.BadParameter(
                f"{dest!r}: an RPC service is named anycast://SERVICE, without /MAILBOX",
                param_hint="DEST",
            )
        service = target.service
    with Node(bind) as node:
        if service is not None:
            if members:
                node.add_service_members(service, list(members))
            if discover is not None:
                node.discover(discover)
                deadline = time.monotonic() + min(timeout, 2.0)
                while not node.service_members(service) and time.monotonic() < deadline:
                    time.sleep(0.01)
        with Client(node, codec=codec, timeout=timeout) as client:
            started = time.monotonic()
            try:
                result = client.call(dest, method, *values, **named)
            except RpcError as exc:
                if as_json:
                    render.echo_json(render.rpc_error_record(exc))
                else:
                    click.echo(f"Error: {exc}", err=True)
                sys.exit(int(exc.status))
            elapsed = time.monotonic() - started
    if as_json:
        render.echo_json(render.rpc_result_record(result, elapsed))
    else:
        render.echo_json(render.plain(result))


@command("serve-demo")
@click.option("--bind", default="127.0.0.1:7000", show_default=True, metavar="HOST:PORT")
@click.option("--service", default="", help="Serve as HOST:PORT/SERVICE instead of HOST:PORT.")
@click.option(
    "--announce",
    metavar="GROUP",
    default=None,
    help="Also announce the node as a member of anycast://SERVICE on this group (needs --service).",
)
@click.option("--workers", type=click.IntRange(1, 256), default=8, show_default=True)
@click.option(
    "--queue",
    type=click.IntRange(0, 10_000),
    default=16,
    show_default=True,
    help="Calls that may wait for a worker; more are refused with RESOURCE_EXHAUSTED.",
)
def serve_demo(bind: str, service: str, announce: str | None, workers: int, queue: int) -> None:
    """Serve a small demo service until interrupted: noop, echo, add, count, sleep,
    time_left and fail (each method's docstring says what it does).

    \b
    Examples:
      rmsg serve-demo --bind 127.0.0.1:7000
      rmsg serve-demo --bind 127.0.0.1:7001 --service demo --announce multicast://239.1.2.4:7402
    """
    if announce is not None and not service:
        raise click.BadParameter("--announce needs --service", param_hint="--announce")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with Node(bind) as node:
        if announce is not None:
            node.serve(service, announce=announce)
        with Server(
            node, DemoService(), service=service, max_concurrency=workers, max_queued=queue
        ):
            where = f"{bind}/{service}" if service else bind
            click.echo(f"serving the demo service at {where} (Ctrl-C to stop)", err=True)
            try:
                while not stop.wait(0.2):
                    pass
            except KeyboardInterrupt:
                pass
