"""``rmsg stats`` and ``rmsg ctl``: look into and manage a running node, like ipcs/ipcrm.

Thin commands: they parse, call :meth:`reliable.Node.query_stats` or
:meth:`reliable.Node.manage`, render. The node serves management only to
callers on its own host (and, in the sealed security modes, only to key
holders: give the same ``--security``/``--keyfile``).
"""

from __future__ import annotations

import click

from reliable import Node, UsageError
from reliable.driver import split_destination
from reliable.security import Security

from ..statstable import format_stats
from . import render
from .app import command
from .options import POSITIVE_DURATION, fail, security_options, wildcard_for

# ----------------------------------------------------------------------- stats


@command()
@click.argument("node_address", metavar="HOST:PORT")
@click.option("--json", "as_json", is_flag=True, help="Print the raw statistics as JSON.")
@click.option(
    "--timeout",
    type=POSITIVE_DURATION,
    default=3.0,
    show_default=True,
    help="Give up if the node does not answer within this long.",
)
@security_options
def stats(security: Security, node_address: str, as_json: bool, timeout: float) -> None:
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
    with Node(wildcard_for(node_address), security=security) as node:
        snapshot = node.query_stats(node_address, timeout=timeout)
    if as_json:
        render.echo_json(snapshot.as_dict(), default=str, indent=2)
    else:
        click.echo(format_stats(snapshot, node_address))


# ------------------------------------------------------------------------- ctl

_ACTIONS = ("inspect", "set", "delete", "grant", "revoke", "transfer")


def _limit(text: str | None) -> int | None:
    if text is None or text.lower() in ("none", "unbounded"):
        return None
    try:
        value = int(text)
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a whole number or 'none'") from None
    if value < 0:
        raise click.BadParameter("must be 0 or more (or 'none')")
    return value


@command()
@click.argument("action", type=click.Choice(_ACTIONS))
@click.argument("target", metavar="HOST:PORT/MAILBOX")
@click.option("--capacity", help="set: most messages held ('none': unbounded).")
@click.option("--max-bytes", help="set: most bytes held ('none': unbounded).")
@click.option(
    "--node", "node_address", metavar="HOST:PORT", help="grant/revoke/transfer: the other node."
)
@click.option("--json", "as_json", is_flag=True, help="Print the answer as JSON.")
@click.option("--timeout", type=float, default=3.0, show_default=True, help="Seconds to wait.")
@security_options(
    security_help="The node's security mode; in the sealed modes only key holders are answered.",
    keyfile_help="Pre-shared key file; default: $RMSG_KEY (hex).",
)
def ctl(
    action: str,
    target: str,
    capacity: str | None,
    max_bytes: str | None,
    node_address: str | None,
    as_json: bool,
    timeout: float,
    security: Security,
) -> None:
    """Inspect or manage mailbox MAILBOX on the running node at HOST:PORT.

    ACTION is one of: inspect (counts, limits, receivers, owner), set (change
    --capacity and/or --max-bytes at run time, as IPC_SET), delete (as ipcrm:
    queued messages are discarded, senders get MailboxNotFound), grant and
    revoke (--node HOST:PORT may, or may no longer, receive from it), and
    transfer (move it, queue and grants, to --node HOST:PORT, which must have
    created an empty mailbox of that name).
    The node answers only callers on its own host, and only with
    Config.serve_stats (the default).

    \b
    Examples:
      rmsg ctl inspect 127.0.0.1:7000/jobs
      rmsg ctl set 127.0.0.1:7000/jobs --capacity 100 --max-bytes none
      rmsg ctl grant 127.0.0.1:7000/jobs --node 127.0.0.1:7001
      rmsg ctl transfer 127.0.0.1:7000/jobs --node 127.0.0.1:7002
      rmsg ctl delete 127.0.0.1:7000/jobs --json
    """
    if "/" not in target:
        raise click.BadParameter("name the mailbox: HOST:PORT/MAILBOX", param_hint="TARGET")
    try:
        where, mailbox = split_destination(target, None)
    except UsageError as exc:  # ctl reports every refusal, its own and the node's, as exit 1
        raise fail(str(exc)) from None
    if not mailbox:
        raise click.BadParameter("name the mailbox: HOST:PORT/MAILBOX", param_hint="TARGET")
    if timeout <= 0:
        raise click.BadParameter("must be more than 0", param_hint="--timeout")
    dest = str(where)
    if action == "set" and capacity is None and max_bytes is None:
        raise click.UsageError("set needs --capacity and/or --max-bytes")
    if action in ("grant", "revoke", "transfer") and not node_address:
        raise click.UsageError(f"{action} needs --node HOST:PORT")
    try:
        with Node(wildcard_for(dest), security=security) as node:
            if action == "set":
                # What is left out keeps its value: read it first.
                now = node.manage(dest, "inspect", mailbox, timeout=timeout)
                info = node.manage(
                    dest,
                    "set_limits",
                    mailbox,
                    capacity=now["capacity"] if capacity is None else _limit(capacity),
                    max_bytes=now["max_bytes"] if max_bytes is None else _limit(max_bytes),
                    timeout=timeout,
                )
            else:
                info = node.manage(dest, action, mailbox, node=node_address or "", timeout=timeout)
    except UsageError as exc:  # as above: exit 1 (other library errors: app.library_errors)
        raise fail(str(exc)) from None
    if as_json:
        render.echo_json(info, default=str, indent=2)
    elif info.get("deleted"):
        click.echo(f"deleted {target}")
    elif action == "transfer":
        click.echo(f"moved {target} to {info['owner']} ({info['moved']} messages)")
    else:
        click.echo(render.mailbox_table(info))
