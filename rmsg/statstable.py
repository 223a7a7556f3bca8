"""``rmsg stats``: a node's statistics as ``ipcs``-style tables."""

from __future__ import annotations

from collections.abc import Sequence

from reliable import NodeStats, format_address

__all__ = ["DROP_REASONS", "explain_drop", "format_stats"]

#: What each ``NodeStats.dropped`` reason means, and whether anything was lost. Most are
#: protocol at work, not trouble: a new peer's first flight waits for its address to be
#: proven (``unvalidated``), and datagrams of a peer's ended life arrive late.
DROP_REASONS = {
    "unvalidated": "a new peer's first datagrams, held back until it proves its address "
    "(answered with a CHALLENGE; the peer resends them with the cookie): once per new "
    "session, nothing lost",
    "dead_incarnation": "late datagrams from a peer's earlier life, which closed or "
    "restarted: nothing lost (that life's messages already had their outcome)",
    "stale_incarnation": "datagrams addressed to an earlier life of this node (answered "
    "with RESET, so the peer learns of the restart)",
    "unknown_peer": "acks or control from an address with no session (it was dropped or "
    "closed): harmless",
    "stale_reset": "a RESET that was not addressed to this node's current life: ignored",
    "peer_limit": "a new peer turned away: Config.max_peers sessions, none idle",
    "forged_ack": "acknowledgements of data never sent (forged, or a confused peer): ignored",
    "replay": "a sealed datagram whose packet number was already seen (a duplicate or a replay)",
    "auth_failed": "a peer refused our datagrams (keys or security modes differ)",
    "stray_auth_failed": "an AUTH_FAILED that did not echo our incarnation: ignored, "
    "anyone can forge one",
    "stray_challenge": "a CHALLENGE that did not echo our incarnation, or for no session: ignored",
    "amplification_limited": "a reply to an unproven address left unsent: it would have "
    "been over 3x the datagram",
    "challenge_limited": "an address challenge left unsent: over "
    "Config.max_challenges_per_second (a flood of new addresses)",
    "shed.stats": "a stats query answered later: the asker asks faster than it reads",
    "stats_refused": "a stats query refused: this node does not share its statistics",
    "remote": "an acknowledgement from a receiving node for a message this node no longer "
    "holds for it (the mailbox was deleted or the hand-over already requeued): nothing lost",
    "malformed": "did not decode: corrupted in transit (checksum) or not rmsg",
    "security": "failed the security check (wrong key or mode, or forged): answered with "
    "AUTH_FAILED, rate-limited",
    "refused": "messages refused by a mailbox verdict (no such mailbox, closed, too large, "
    "out of mailbox memory): the sender was told",
    "group": "group traffic for a group this node has not opened or joined, or stray acks and NAKs",
    "anycast": "anycast traffic for a service this node does not serve, or that it cannot confirm",
    "store": "messages for a durable mailbox whose commit failed (disk full, I/O error): "
    "refused, and their senders told; nothing acknowledged was lost",
    "duplicate": "a durable outbox's re-send of a message this node already delivered (its "
    "sender restarted): acknowledged, not delivered twice",
}


def explain_drop(reason: str) -> str:
    """What a ``NodeStats.dropped`` reason means (``malformed.checksum`` by its family)."""
    return DROP_REASONS.get(reason) or DROP_REASONS.get(reason.split(".", 1)[0], "")


def _table(title: str, headers: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)
    ]
    line = "  ".join(f"{{:<{w}}}" for w in widths)
    out = [f"------ {title} ------", line.format(*headers).rstrip()]
    out += [line.format(*row).rstrip() for row in rows]
    return out


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.2f}"


def _ago(seconds: float | None) -> str:
    return "never" if seconds is None else f"{seconds:.1f}s ago"


def _limit(value: int | None) -> str:
    return "unbounded" if value is None else str(value)


def format_stats(stats: NodeStats, where: str) -> str:
    """Mailboxes (as ``ipcs -q``), peers and node totals, one table each."""
    boxes = [
        [
            repr(m.name) if m.name else "(default)",
            m.kind,
            m.state,
            "rendezvous" if m.capacity == 0 else _limit(m.capacity),
            _limit(m.max_bytes),
            str(m.messages),
            str(m.bytes),
            str(m.parked),
            str(m.high_water),
            str(m.total_in),
            str(m.total_out),
            str(m.waiting_receivers),
            f"{_ago(m.last_send_age)} from {format_address(m.last_sender)}"
            if m.last_sender is not None
            else "never",
            f"{_ago(m.last_receive_age)} by {m.last_receiver!r}"
            if m.last_receive_age is not None
            else "never",
        ]
        for m in stats.mailboxes
    ]
    peers = [
        [
            format_address(p.address),
            _ms(p.srtt),
            _ms(p.rttvar if p.srtt is not None else None),
            _ms(p.rto),
            str(p.in_flight),
            str(p.cwnd),
            str(p.retransmissions),
            str(p.duplicates),
            str(p.corrupt),
            str(p.messages_sent),
            str(p.messages_received),
            str(p.messages_failed),
            "unreachable" if p.unreachable else "ok",
        ]
        for p in stats.peers
    ]
    dropped = ", ".join(f"{k}={v}" for k, v in sorted(stats.dropped.items())) or "none"
    sessions = ", ".join(f"{k}={v}" for k, v in sorted(stats.sessions_dropped.items())) or "none"
    lines = [f"rmsg node {where}  incarnation {stats.incarnation:#018x}", ""]
    lines += _table(
        "Mailboxes",
        [
            "name",
            "kind",
            "state",
            "capacity",
            "max-bytes",
            "messages",
            "bytes",
            "parked",
            "high-water",
            "in",
            "out",
            "waiting",
            "last send",
            "last receive",
        ],
        boxes,
    )
    lines.append("")
    lines += _table(
        "Peers",
        [
            "address",
            "srtt-ms",
            "rttvar-ms",
            "rto-ms",
            "in-flight",
            "cwnd",
            "retrans",
            "dups",
            "corrupt",
            "sent",
            "received",
            "failed",
            "state",
        ],
        peers,
    )
    if stats.groups:
        lines.append("")
        lines += _table(
            "Groups and services",
            [
                "group",
                "role",
                "members",
                "unresolved",
                "sent",
                "repairs",
                "naks-in",
                "naks-out",
                "suppressed",
            ],
            [
                [
                    str(g.get("group", "?")),
                    "member" if g.get("member") else "watcher",
                    str(g.get("members", 0)),
                    *(str(g.get(k, "-")) for k in ("unresolved", "transmissions", "repairs")),
                    *(str(g.get(k, "-")) for k in ("naks_received", "naks_sent")),
                    str(g.get("naks_suppressed", "-")),
                ]
                for g in stats.groups
            ],
        )
    lines += [
        "",
        "------ Node ------",
        f"datagrams received {stats.datagrams_received}, sent {stats.datagrams_sent}",
        f"retransmissions {stats.retransmissions}, duplicates {stats.duplicates}, "
        f"corrupt {stats.corrupt}",
        f"mailbox memory {stats.mailbox_bytes} of {stats.mailbox_memory} bytes, "
        f"receive memory {stats.receive_bytes} of {stats.receive_memory} bytes, "
        f"send buffer {stats.send_buffer_bytes} bytes",
        f"address challenges sent {stats.challenges_sent}, "
        f"fragments shed {sum(p.shed for p in stats.peers)}, "
        f"peers reported unreachable by the OS {sum(p.os_errors for p in stats.peers)} times",
        f"sessions dropped: {sessions}",
        f"dropped: {dropped}",
    ]
    if stats.dropped:
        width = max(len(k) for k in stats.dropped)
        lines += [
            f"  {reason:<{width}}  {explain_drop(reason) or 'see docs/protocol.md'}"
            for reason in sorted(stats.dropped)
        ]
    return "\n".join(lines)
