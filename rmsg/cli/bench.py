"""``rmsg bench``: rmsg measured beside raw UDP, TCP, xmlrpc and sqlite3."""

from __future__ import annotations

import json
import pathlib
from typing import Any

import click

from . import render
from .app import command
from .options import POSITIVE_DURATION, fail, require_plotting

# ----------------------------------------------------------------------- bench


@command()
@click.option("--quick", is_flag=True, help="A smoke run: small matrix, short windows.")
@click.option(
    "--rounds",
    type=click.IntRange(1, 20),
    default=None,
    help="Interleaved rounds; the report gives medians. [default: 3, quick: 1]",
)
@click.option(
    "--duration",
    type=POSITIVE_DURATION,
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
    from ..bench import format_report, run_bench

    if plot is not None:
        require_plotting(plot, "--plot")  # before minutes of measuring, not after
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
        from ..bench_durable import format_durable_report, run_durable_bench

        figures_d = run_durable_bench(
            sync=sync,
            rows=rows,
            duration=duration or (0.5 if quick else 2.0),
            rounds=rounds or (1 if quick else 3),
            directory=directory,
            progress=_progress,
        )
        if as_json:
            render.echo_json(figures_d.as_dict(), indent=2)
        else:
            click.echo(format_durable_report(figures_d))
        return
    if rpc:
        from ..bench_rpc import format_rpc_report, run_rpc_bench

        rpc_figures = run_rpc_bench(
            duration=duration or (0.3 if quick else 1.0),
            rounds=rounds or (1 if quick else 3),
            progress=_progress,
        )
        click.echo(format_rpc_report(rpc_figures, as_json))
        return
    if rr:
        from ..bench import run_rr_bench

        rr_report = run_rr_bench(
            rounds=rounds or (1 if quick else 3),
            count=300 if quick else 3000,
            progress=_progress,
        )
        if as_json:
            render.echo_json(rr_report.as_dict(), indent=2)
        else:
            click.echo(format_report(rr_report))
        return
    if veth:
        from ..bench import run_veth_bench, veth_unavailable

        reason = veth_unavailable()
        if reason is not None:
            raise click.ClickException(f"--veth: {reason}")
        veth_report = run_veth_bench(
            rounds=rounds or (1 if quick else 3),
            duration=duration or (0.3 if quick else 1.5),
            progress=_progress,
        )
        if as_json:
            render.echo_json(veth_report.as_dict(), indent=2)
        else:
            click.echo(format_report(veth_report))
        return

    report = run_bench(
        quick=quick, rounds=rounds, duration=duration, progress=_progress, scale=scale
    )
    from ..plots import describe_machine

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
        render.echo_json(figures, indent=2)
    else:
        click.echo(format_report(report))
    if plot is not None:
        _plot_bench(figures, plot)


def _progress(text: str) -> None:
    """A measurement under way, on stderr (stdout keeps the report or JSON)."""
    click.echo(f"  {text}", err=True)


def _plot_bench(figures: dict[str, Any], plot: str) -> None:
    from ..plots import plot_bench

    try:
        plot_bench(figures, plot)
    except (RuntimeError, ValueError, KeyError, TypeError) as exc:
        raise fail(f"cannot draw {plot}: {exc}") from None
    click.echo(f"plot written to {plot}", err=True)
