"""What the ``rmsg`` commands print: receipts, tables and JSON records.

Every shape the commands show a user or a script is made here, from the
library's values, and nowhere else: a receipt as a sentence or a JSON line,
a group receipt, a received message as a JSON record, a finished file
transfer, the netem relay's counters, the demo's summary, a mailbox's
management answer, an RPC outcome. The node's statistics table is
:func:`rmsg.statstable.format_stats`. Functions named ``*_line``, ``*_table``
or ``*_record`` return text or a dict; the others write.
"""

from __future__ import annotations

import base64
import json
from typing import TYPE_CHECKING, Any, BinaryIO

import click

import reliable

if TYPE_CHECKING:
    from netem.proxy import ProxyStats, UdpProxy
    from reliable.rpc import RpcError

    from ..demo import DemoResult
    from ..transfer import Manifest, SendOutcome, TransferDone


def echo_json(record: Any, *, indent: int | None = None, default: Any = None) -> None:
    """One JSON document on stdout (a line without ``indent``)."""
    click.echo(json.dumps(record, indent=indent, default=default))


# ---------------------------------------------------------------- send receipts


def receipt_record(receipt: reliable.Receipt) -> dict[str, Any]:
    """``rmsg send --json``: the receipt of a message delivered to one node."""
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


def receipt_line(receipt: reliable.Receipt, service: str | None = None) -> str:
    """``rmsg send``: where the message went, how long it took, what it cost.

    ``service``: the anycast service the receipt's peer is a member of.
    """
    where = reliable.format_address(receipt.peer)
    if receipt.mailbox:
        where += f"/{receipt.mailbox}"
    notes = [f"{receipt.fragments} fragment(s)", f"{receipt.retransmissions} retransmission(s)"]
    if service is not None:
        where = f"{service} member {where}"
        tried = ", ".join(f"{reliable.format_address(m)} ({why})" for m, why in receipt.failovers)
        if tried:
            notes.append(f"failed over from {tried}")
    if receipt.deferred:
        notes.append("waited for room")
    if receipt.receiver is not None:
        notes.append(f"taken by {receipt.receiver!r}")
    return (
        f"delivered {receipt.size} bytes to {where} in {receipt.elapsed * 1000:.1f} ms "
        f"({', '.join(notes)})"
    )


def group_receipt_record(receipt: reliable.GroupReceipt) -> dict[str, Any]:
    """``rmsg send --json`` to a group: who has it, and who does not and why."""
    return {
        "status": "missing" if receipt.missing else "delivered",
        "group": receipt.group,
        "size": receipt.size,
        "fragments": receipt.fragments,
        "transmissions": receipt.transmissions,
        "elapsed": receipt.elapsed,
        "acked": [reliable.format_address(m) for m in receipt.acked],
        "missing": {reliable.format_address(m): why for m, why in receipt.missing.items()},
    }


def group_receipt_line(receipt: reliable.GroupReceipt) -> str:
    """``rmsg send`` to a group: size, time, datagrams, then who acked and who is missing."""
    return (
        f"{receipt.size} bytes in {receipt.elapsed * 1000:.1f} ms, "
        f"{receipt.transmissions} datagram(s): {receipt}"
    )


def interrupted_record(sent: int) -> dict[str, Any]:
    """``rmsg send --json`` stopped by Ctrl-C: whether the message can have arrived."""
    delivered: bool | None = False if sent == 0 else None
    return {"status": "interrupted", "delivered": delivered, "datagrams_sent": sent}


def interrupted_line(sent: int, size: int) -> str:
    """What is known of a message whose send was interrupted after ``sent`` datagrams."""
    if sent == 0:
        return "interrupted: nothing was sent: the message was not delivered"
    return (
        f"interrupted: {sent} datagram(s) sent, no receipt yet: the message of {size} bytes "
        "may or may not have reached its mailbox"
    )


def lines_line(count: int, size: int, dest: str, elapsed: float) -> str:
    """``rmsg send --lines``: how many lines went where, how fast."""
    return f"delivered {count} messages ({size} bytes) to {dest} in {elapsed * 1000:.1f} ms"


def file_sent_line(outcome: SendOutcome, dest: str) -> str:
    """``rmsg send --file``: the file, its checksum, the time and the retransmissions."""
    m = outcome.manifest
    resumed = f", resumed after {outcome.resumed:,} bytes" if outcome.resumed else ""
    return (
        f"delivered {m.name} ({m.size:,} bytes, SHA-256 {m.sha256[:16]}...) to {dest} "
        f"in {outcome.elapsed:.1f} s ({m.chunks} chunk(s), "
        f"{outcome.retransmissions} retransmission(s){resumed})"
    )


# ------------------------------------------------------------------ recv output


def listening_line(
    address: Any,
    mailbox: str | None,
    durable: str | None,
    kept: int | None,
    groups: tuple[str, ...],
    services: tuple[str, ...],
) -> str:
    """``rmsg recv`` starting: where it listens, what a durable mailbox kept, what it joined."""
    where = reliable.format_address(address) + (f"/{mailbox}" if mailbox else "")
    if durable is not None:
        where += f" (durable: {durable}, {kept} message{'s' if kept != 1 else ''} kept)"
    extra = [f"member of {g}" for g in groups] + [f"serving anycast://{s}" for s in services]
    return f"listening on {where}" + "".join(f", {e}" for e in extra)


def message_record(msg: reliable.Message, saved_as: str | None = None) -> dict[str, Any]:
    """``rmsg recv --json``: one received message; data as text, else base64."""
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
    return record


def write_json_line(stream: BinaryIO, record: dict[str, Any]) -> None:
    """One JSON line on a binary stream (recv writes messages to stdout's buffer)."""
    stream.write(json.dumps(record).encode("utf-8") + b"\n")


def report_transfer(done: TransferDone, stdout: BinaryIO, as_json: bool, to_stdout: bool) -> None:
    """One finished ``send --file`` transfer: a JSON line, or a note on stderr."""
    if as_json:
        record = done.as_dict()
        if to_stdout:
            record["warning"] = "file data is kept only with --output-dir"
        write_json_line(stdout, record)
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


def truncated_line(msg: reliable.Message) -> str:
    """A message ``recv --max-size --truncate`` cut: how long it was, what is left."""
    return (
        f"note: a {len(msg.data) + msg.truncated}-byte message from {msg.sender} "
        f"was cut to --max-size {len(msg.data)}"
    )


def incomplete_transfer_line(source: str, manifest: Manifest, got: int) -> str:
    """A file transfer still unfinished when ``recv`` stops: how much of it came."""
    return (
        f"incomplete: {manifest.name} from {source}, {got:,} of {manifest.size:,} "
        "bytes (not saved under its name)"
    )


def left_behind_line(stats: reliable.MailboxStats, durable: str | None) -> str | None:
    """--count is reached: what the mailbox still holds, which closing would lose."""
    left = stats.messages + stats.parked
    if not left:
        return None
    fate = f"kept in {durable}" if durable else "discarded when this node closes"
    return (
        f"warning: stopped after --count; {left} message{'s' if left != 1 else ''} "
        f"left in the mailbox ({fate})"
    )


# ------------------------------------------------------------------------ netem


def proxy_started(proxy: UdpProxy, described: str, seed: int) -> str:
    """``rmsg netem`` started: where it listens and relays to, the faults, the control API."""
    text = (
        f"netem: {reliable.format_address(proxy.address)} -> "
        f"{reliable.format_address(proxy.forward)} ({described}, seed {seed})"
    )
    if proxy.control_address is not None:
        text += (
            f"\nnetem: control API on http://{reliable.format_address(proxy.control_address)} "
            "(no authentication: keep it on loopback)"
        )
    return text


def netem_summary(stats: ProxyStats, elapsed: float) -> str:
    """The relay's counters when it stops: per direction, then clients and errors."""
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


# ------------------------------------------------------------------------- demo


def _share(part: int, whole: int) -> str:
    return f"{part / whole:.1%}" if whole else "-"


def demo_summary(r: DemoResult) -> str:
    """``rmsg demo``: what was sent, delivered, retransmitted and dropped, and the verdict."""
    verdict = "OK" if r.ok else "FAILED"
    return "\n".join(
        [
            f"  sent                       {r.messages} messages ({r.messages * r.size:,} bytes)",
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
            f"  verdict                    {verdict}" + (" (timed out)" if r.timed_out else ""),
        ]
    )


# -------------------------------------------------------------------------- ctl

_MAILBOX_KEYS = (
    "name",
    "owner",
    "kind",
    "state",
    "messages",
    "bytes",
    "capacity",
    "max_bytes",
    "parked",
    "locked",
    "waiting_receivers",
    "remote_receivers",
    "granted",
    "total_in",
    "total_out",
    "durable",
)


def mailbox_table(info: dict[str, Any]) -> str:
    """``rmsg ctl``: a mailbox's management answer as ``key  value`` lines."""
    width = max(len(k) for k in _MAILBOX_KEYS)
    lines = []
    for key in _MAILBOX_KEYS:
        if key in info:
            value = info[key]
            if isinstance(value, list):
                value = ", ".join(str(v) for v in value) or "-"
            elif isinstance(value, dict):
                value = ", ".join(f"{k} {v}" for k, v in value.items())
            lines.append(f"{key:<{width}}  {'-' if value is None else value}")
    return "\n".join(lines)


# -------------------------------------------------------------------------- rpc


def plain(value: Any) -> Any:
    """JSON for output: bytes as {"$b": base64}."""
    if isinstance(value, (bytes, bytearray)):
        return {"$b": base64.b64encode(value).decode()}
    if isinstance(value, list):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return value


def rpc_result_record(result: Any, elapsed: float) -> dict[str, Any]:
    """``rmsg call --json``: a call that returned."""
    return {
        "status": "OK",
        "code": 0,
        "executed": True,
        "result": plain(result),
        "elapsed": round(elapsed, 6),
    }


def rpc_error_record(exc: RpcError) -> dict[str, Any]:
    """``rmsg call --json``: a call that failed, its status and whether it ran."""
    from reliable.rpc import RemoteError

    outcome: dict[str, Any] = {
        "status": exc.status.name,
        "code": int(exc.status),
        "executed": exc.executed,
        "details": exc.details,
    }
    if isinstance(exc, RemoteError):
        outcome["type"] = exc.type_name
    return outcome
