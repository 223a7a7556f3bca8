"""Pictures (need matplotlib: ``rmsg[plot]``): a capture's time-sequence graph, and
``rmsg bench``'s figures.

The bench figure (:func:`plot_bench`) reads the figures as ``rmsg bench
--json`` writes them, so a saved run can be drawn again (``rmsg bench --from
FILE --plot PNG``). One panel per message size: messages/s received, grouped
by the loss applied each way, one colour per transport; raw UDP's messages
that were sent but never arrived are drawn hatched on top of its bar and
counted above it, rmsg's retransmission ratio is written above its bars. The
16 MiB single message, where throughput is what counts, gets a panel in
MB/s. The title names the machine and the command that measured it.

The time-sequence graph (:func:`plot_timeline`):

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
import os
import platform
from collections.abc import Mapping, Sequence
from typing import Any

from reliable import wire
from reliable.errors import format_address

from .dissect import TimelineEntry

__all__ = ["describe_machine", "plot_bench", "plot_timeline"]


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
    directions: list[tuple[Any, Any] | None] = list(flows) or [None]
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


# ------------------------------------------------------------------- bench

#: One colour per transport, the same in every panel (matplotlib's tab10).
TRANSPORT_COLOURS = {
    "udp": "tab:gray",
    "tcp": "tab:blue",
    "rmsg": "tab:orange",
    "rmsg-async": "tab:green",
}
_TRANSPORT_LABELS = {
    "udp": "raw UDP (no recovery)",
    "tcp": "TCP (length-framed)",
    "rmsg": "rmsg, blocking Node",
    "rmsg-async": "rmsg, AsyncNode",
}
_BIG = 16 * 1024 * 1024
BENCH_SIZE = (1400, 800)  #: pixels of the bench figure


def describe_machine() -> str:
    """This machine in a few words: OS, CPU model and count, Python version."""
    model = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    cpu = model or platform.processor() or platform.machine()
    return (
        f"{platform.system()} {platform.machine()}, {os.cpu_count() or 1} CPUs ({cpu}), "
        f"Python {platform.python_version()}"
    )


def _size_text(n: int) -> str:
    if n >= 1024 * 1024:
        return f"{n // (1024 * 1024)} MiB"
    return f"{n // 1024} KiB" if n >= 1024 else f"{n} B"


def bench_title(figures: Mapping[str, Any]) -> str:
    """The bench figure's title: what, on which machine, measured by which command."""
    machine = figures.get("machine") or f"{figures.get('cpus', '?')} CPUs"
    command = figures.get("command") or "rmsg bench"
    return (
        "rmsg bench: messages/s received on loopback, by message size and loss\n"
        f"{machine}; median of {figures.get('rounds', '?')} round(s); $ {command}"
    )


def plot_bench(figures: Mapping[str, Any], path: str) -> None:
    """Draw ``rmsg bench --json``'s ``figures`` to the PNG ``path`` (1400x800 px)."""
    plt = _pyplot()
    rows = list(figures.get("throughput", []))
    sizes = sorted({r["size"] for r in rows if r["size"] != _BIG})
    big = [r for r in rows if r["size"] == _BIG]
    panels = len(sizes) + (1 if big else 0)
    if not panels:
        raise ValueError("no throughput figures to draw")
    width, height = BENCH_SIZE
    fig, axes = plt.subplots(
        1,
        panels,
        figsize=(width / 100, height / 100),
        dpi=100,
        squeeze=False,
        gridspec_kw={"width_ratios": [3] * len(sizes) + ([1.9] if big else [])},
    )
    for ax, size in zip(axes[0], sizes, strict=False):
        _bench_panel(ax, [r for r in rows if r["size"] == size], size)
    if big:
        _big_panel(axes[0][-1], big)
    handles = [
        plt.Rectangle((0, 0), 1, 1, color=colour, label=_TRANSPORT_LABELS[name])
        for name, colour in TRANSPORT_COLOURS.items()
        if any(r["transport"] == name for r in rows)
    ]
    if any(r.get("lost") for r in rows):
        handles.append(
            plt.Rectangle(
                (0, 0),
                1,
                1,
                facecolor="white",
                edgecolor="tab:gray",
                hatch="///",
                label="UDP: sent but lost (per second of the run)",
            )
        )
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=9, frameon=False)
    fig.suptitle(bench_title(figures), fontsize=11)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path)
    plt.close(fig)


def _bench_panel(ax: Any, rows: list[dict[str, Any]], size: int) -> None:
    losses = sorted({r["loss"] for r in rows})
    order = [t for t in TRANSPORT_COLOURS if any(r["transport"] == t for r in rows)]
    slot = 0.8 / max(1, len(order))
    peak = max((r["messages_per_s"] + _lost_rate(r) for r in rows), default=1.0) or 1.0
    floor = min((r["messages_per_s"] for r in rows if r["messages_per_s"] > 0), default=1.0)
    for group, loss in enumerate(losses):
        here = [t for t in order if any(r["transport"] == t and r["loss"] == loss for r in rows)]
        for i, transport in enumerate(here):
            r = next(x for x in rows if x["transport"] == transport and x["loss"] == loss)
            x = group - 0.4 + slot * (i + 0.5) + slot * (len(order) - len(here)) / 2
            colour = TRANSPORT_COLOURS[transport]
            rate = r["messages_per_s"]
            ax.bar(x, rate, slot * 0.9, color=colour)
            top = rate
            note = ""
            lost = r.get("lost") or 0
            if lost:
                extra = _lost_rate(r)
                ax.bar(
                    x,
                    extra,
                    slot * 0.9,
                    bottom=rate,
                    facecolor="white",
                    edgecolor=colour,
                    hatch="///",
                )
                top += extra
                sent = lost + r.get("messages", 0)
                note = f"lost {lost:,}" + (f" ({lost / sent:.0%})" if sent else "")
            elif r.get("retransmission_ratio") is not None:
                note = f"retx {r['retransmission_ratio']:.0%}"
            if note:
                ax.text(x, top * 1.1, note, ha="center", va="bottom", rotation=90, fontsize=7)
    ax.set_xticks(range(len(losses)), [f"{loss:.0%}" for loss in losses])
    ax.set_xlabel("loss each way (netem)")
    ax.set_ylabel("messages/s received (log scale)")
    # Log: rmsg under loss runs an order of magnitude below raw UDP and TCP; on a linear
    # axis its bars, the ones a reader came for, would be slivers.
    ax.set_yscale("log")
    ax.set_ylim(floor / 3, peak * 12)
    ax.set_title(f"{_size_text(size)} messages", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ticker = importlib.import_module("matplotlib.ticker")
    ax.yaxis.set_major_formatter(ticker.StrMethodFormatter("{x:,.0f}"))


def _lost_rate(r: Mapping[str, Any]) -> float:
    lost = r.get("lost") or 0
    seconds = r.get("seconds") or 0.0
    return float(lost / seconds) if lost and seconds > 0 else 0.0


def _big_panel(ax: Any, rows: list[dict[str, Any]]) -> None:
    order = [t for t in TRANSPORT_COLOURS if any(r["transport"] == t for r in rows)]
    for i, transport in enumerate(order):
        r = next(x for x in rows if x["transport"] == transport)
        ax.bar(i, r["mb_per_s"], 0.7, color=TRANSPORT_COLOURS[transport])
        if r.get("retransmission_ratio") is not None:
            ax.text(
                i,
                r["mb_per_s"],
                f"retx {r['retransmission_ratio']:.0%}",
                ha="center",
                va="bottom",
                fontsize=7,
            )
    ax.set_xticks(range(len(order)), order, fontsize=8, rotation=20)
    ax.set_xlabel("transport, no loss")
    ax.set_ylabel("MB/s (send to confirmation)")
    peak = max((r["mb_per_s"] for r in rows), default=1.0) or 1.0
    ax.set_ylim(0, peak * 1.25)
    ax.set_title("one 16 MiB message", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
