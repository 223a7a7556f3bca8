"""Pictures of captures: a time-sequence graph (needs matplotlib: ``rmsg[plot]``).

In the style of tcptrace's and Wireshark's Stevens graphs: for each direction
that carries data, every DATA fragment is a point at (time, sequence number),
retransmissions in red; the reverse direction's cumulative ack is a step line
and its SACKed ranges vertical bars, so a gap and its repair read at a glance.
Sequence numbers are unwrapped (RFC 1982) and shown relative to the first one
seen in that direction. Datagrams that failed to decode (a corrupted CRC, say)
and DROPPED packets are marked as vertical lines.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import Any

from reliable import wire
from reliable.errors import format_address

from .dissect import TimelineEntry

__all__ = ["plot_timeline"]


def _pyplot() -> Any:
    try:
        matplotlib = importlib.import_module("matplotlib")
    except ImportError:
        raise RuntimeError("plotting needs matplotlib: pip install 'rmsg[plot]'") from None
    matplotlib.use("Agg")
    return importlib.import_module("matplotlib.pyplot")


def plot_timeline(entries: Sequence[TimelineEntry], path: str, *, title: str = "") -> None:
    """Draw the time-sequence graph of ``entries`` to the PNG ``path`` (1200x700 px)."""
    plt = _pyplot()
    flows: dict[tuple[Any, Any], list[TimelineEntry]] = {}
    for e in entries:
        if e.packet is not None and e.packet.fragment is not None:
            flows.setdefault((e.source, e.destination), []).append(e)
    directions = list(flows) or [None]
    fig, axes = plt.subplots(
        len(directions), 1, figsize=(12, 7), dpi=100, squeeze=False, sharex=True
    )
    for ax, flow in zip(axes[:, 0], directions, strict=True):
        if flow is None:
            ax.text(0.5, 0.5, "no DATA in this capture", ha="center", transform=ax.transAxes)
            continue
        _draw_flow(ax, flow, flows[flow], entries)
    axes[-1, 0].set_xlabel("time since the first packet (s)")
    fig.suptitle(title or "rmsg time-sequence graph")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _draw_flow(
    ax: Any, flow: tuple[Any, Any], data: list[TimelineEntry], entries: Sequence[TimelineEntry]
) -> None:
    src, dst = flow
    first = data[0].packet.fragments[0].seq  # type: ignore[union-attr]
    ref = first

    def rel(value: int) -> int:
        nonlocal ref
        full = wire.unwrap(value, ref)
        ref = full
        return full - first

    sent: tuple[list[float], list[int]] = ([], [])
    again: tuple[list[float], list[int]] = ([], [])
    for e in data:
        assert e.packet is not None
        where = again if e.retransmission else sent
        for f in e.packet.fragments:
            where[0].append(e.time)
            where[1].append(rel(f.seq))
    acks: tuple[list[float], list[int]] = ([], [])
    sack_bars: list[tuple[float, int, int]] = []
    trouble: list[tuple[float, str]] = []
    for e in entries:
        p = e.packet
        if e.source == dst and e.destination == src and p is not None:
            if p.kind == wire.Kind.DROPPED:
                trouble.append((e.time, "DROPPED"))
            elif p.flags & wire.Flag.ACK:
                acks[0].append(e.time)
                acks[1].append(rel(p.ack))
                for start, end in p.sacks:
                    sack_bars.append((e.time, rel(start), rel(end)))
        elif p is None and e.error and {e.source, e.destination} == {src, dst}:
            trouble.append((e.time, e.error))
    ax.plot(*sent, "o", ms=2.5, color="tab:blue", label=f"DATA fragment ({len(sent[0])})")
    ax.plot(*again, "x", ms=5, color="tab:red", zorder=3, label=f"retransmission ({len(again[0])})")
    if acks[0]:
        ax.step(*acks, where="post", color="tab:green", lw=1.2, label="cumulative ack")
    for i, (t, lo, hi) in enumerate(sack_bars):
        ax.vlines(t, lo, hi, color="tab:orange", lw=2, label="SACKed range" if i == 0 else None)
    for i, (t, _why) in enumerate(trouble):
        ax.axvline(
            t,
            color="black",
            ls=":",
            lw=1,
            label=f"malformed / DROPPED ({len(trouble)})" if i == 0 else None,
        )
    ax.set_title(f"{format_address(src)} → {format_address(dst)}", fontsize=10)
    ax.set_ylabel("sequence number\n(relative to first)")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
