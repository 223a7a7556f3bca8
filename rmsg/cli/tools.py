"""``rmsg keygen``, ``demo``, ``dissect`` and ``wireshark``: the tools around the protocol."""

from __future__ import annotations

import pathlib
import sys

import click

import reliable
from netem.models import Impairment
from reliable import UsageError

from ..demo import DemoProgress, run_demo
from . import render
from .app import CONTEXT, command, group
from .options import DURATION, PROBABILITY, fail, require_plotting

# ---------------------------------------------------------------------- keygen


@command()
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
        raise fail(f"cannot write {path}: {exc.strerror}") from None
    if as_json:
        written = pathlib.Path(path).resolve()
        info = written.stat()
        record = {"status": "written", "path": str(written), "mode": f"{info.st_mode & 0o777:o}"}
        render.echo_json(record)
        return
    click.echo(f"wrote a new key to {path} (mode 600)", err=True)


# ------------------------------------------------------------------------ demo


@command()
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
        render.echo_json(result.as_dict(), indent=2)
    else:
        click.echo(render.demo_summary(result))
    if not result.ok:
        sys.exit(1)


# ---------------------------------------------------------------------- dissect


@command()
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
    from ..dissect import dissect_file

    if plot is not None:
        require_plotting(plot, "--plot")
    entries = []
    try:
        for entry in dissect_file(capture):
            if plot is not None:
                entries.append(entry)
            if as_json:
                render.echo_json(entry.as_dict())
            else:
                click.echo(entry.format())
    except RuntimeError as exc:
        raise fail(str(exc)) from None
    except Exception as exc:  # scapy's own errors for unreadable files
        raise fail(f"cannot read {capture}: {exc}") from None
    if plot is not None:
        from ..plots import plot_timeline

        plot_timeline(entries, plot, title=pathlib.Path(capture).name)
        click.echo(f"plot written to {plot}", err=True)


# -------------------------------------------------------------------- wireshark


@group()
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


@wireshark.command("install", context_settings=CONTEXT)
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
    from ..wireshark_plugin import install, lua_source

    if print_only and as_json:
        raise click.UsageError("--print writes the Lua source; --json describes an install")
    if print_only:
        click.echo(lua_source(), nl=False)
        return
    try:
        target = install(pathlib.Path(folder) if folder is not None else None)
    except OSError as exc:
        raise fail(f"cannot install the dissector: {exc}") from None
    if as_json:
        import shutil

        record = {
            "status": "installed",
            "path": str(target.resolve()),
            "bytes": target.stat().st_size,
            "tshark": shutil.which("tshark"),
        }
        render.echo_json(record)
        return
    click.echo(str(target))
