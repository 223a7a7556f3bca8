"""Pictures: ``rmsg dissect --plot`` draws a time-sequence graph a reader can open.

Each PNG is opened again: it exists, has the promised size, and is not blank
(many distinct colours, the retransmission red among them)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from netem.pcap import PcapWriter
from rmsg.cli import main

from .test_wireshark import _exchange

np = pytest.importorskip("numpy", reason="plots need matplotlib (pip install 'rmsg[plot]')")
image = pytest.importorskip(
    "matplotlib.image", reason="plots need matplotlib (pip install 'rmsg[plot]')"
)


def _check_png(path: Path, width: int, height: int) -> None:
    assert path.exists() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pixels = image.imread(str(path))
    assert pixels.shape[:2] == (height, width)
    rgb = (pixels[:, :, :3] * 255).astype(int).reshape(-1, 3)
    colours = {tuple(c) for c in rgb[:: max(1, len(rgb) // 50_000)]}
    assert len(colours) > 20, "the picture is blank"
    white = (rgb == 255).all(axis=1).mean()
    assert 0.5 < white < 0.995, f"{white:.1%} white: nothing drawn, or nothing but ink"


def test_dissect_plot_draws_a_time_sequence_graph(tmp_path: Path) -> None:
    capture = tmp_path / "lossy.pcap"
    with PcapWriter(capture) as pcap:
        for record in _exchange():
            pcap.write(*record)
    out = tmp_path / "seq.png"
    result = CliRunner().invoke(main, ["dissect", str(capture), "--plot", str(out)])
    assert result.exit_code == 0, result.output
    assert "RETX" in result.stdout and "plot written" in result.stderr
    _check_png(out, 1200, 700)
    pixels = (image.imread(str(out))[:, :, :3] * 255).astype(int)
    red = (abs(pixels[:, :, 0] - 214) < 10) & (abs(pixels[:, :, 1] - 39) < 10)
    assert red.sum() > 20, "retransmissions are marked in red"


def test_dissect_json_numbers_fragments_from_one(tmp_path: Path) -> None:
    import json

    capture = tmp_path / "lossy.pcap"
    with PcapWriter(capture) as pcap:
        for record in _exchange():
            pcap.write(*record)
    result = CliRunner().invoke(main, ["dissect", str(capture), "--json"])
    records = [json.loads(line) for line in result.stdout.splitlines()]
    numbers = [f["number"] for r in records for f in r.get("fragments", [])]
    assert min(numbers) == 1 and any(r["retransmission"] for r in records)


# ------------------------------------------------------------------- bench


def _row(transport: str, size: int, loss: float, rate: float, **extra: object) -> dict[str, object]:
    seconds = 1.0
    return {
        "transport": transport,
        "size": size,
        "loss": loss,
        "messages": int(rate * seconds),
        "seconds": seconds,
        "messages_per_s": rate,
        "mb_per_s": rate * size / 1e6,
        "cpu_us_per_message": 10.0,
        "peak_rss_kib": 30_000,
        "retransmission_ratio": None,
        "lost": 0,
        **extra,
    }


FIGURES = {  # a tiny made-up run, the shape `rmsg bench --json` writes: no bench is run
    "rounds": 1,
    "cpus": 2,
    "machine": "Linux x86_64, 2 CPUs (test), Python 3",
    "command": "rmsg bench --quick",
    "throughput": [
        _row("udp", 64, 0.0, 160_000, lost=2_919),
        _row("tcp", 64, 0.0, 220_000),
        _row("rmsg", 64, 0.0, 24_000, retransmission_ratio=0.0),
        _row("rmsg", 64, 0.05, 18_000, retransmission_ratio=0.12),
        _row("rmsg-async", 64, 0.0, 29_000, retransmission_ratio=0.006),
        _row("rmsg-async", 64, 0.05, 22_000, retransmission_ratio=0.135),
        _row("udp", 1024, 0.0, 150_000, lost=40_000),
        _row("tcp", 1024, 0.0, 230_000),
        _row("rmsg", 1024, 0.0, 21_000, retransmission_ratio=0.008),
        _row("rmsg", 1024, 0.05, 16_000, retransmission_ratio=0.10),
        _row("tcp", 16 * 1024 * 1024, 0.0, 42, mb_per_s=700.0),
        _row("rmsg", 16 * 1024 * 1024, 0.0, 14, mb_per_s=237.0, retransmission_ratio=0.075),
    ],
    "latency": [],
    "scale": None,
}


def _colour_share(path: Path, colour: str) -> float:
    """The share of the picture's pixels in ``colour`` (a matplotlib colour name)."""
    from matplotlib.colors import to_rgb

    want = np.array([round(c * 255) for c in to_rgb(colour)])
    pixels = (image.imread(str(path))[:, :, :3] * 255).round().astype(int)
    return float((abs(pixels - want).sum(axis=2) < 12).mean())


def test_bench_plot_from_saved_figures_shows_every_transport_in_its_colour(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import rmsg.bench
    from rmsg.plots import TRANSPORT_COLOURS, bench_title

    def no_bench(**_: object) -> None:
        raise AssertionError("--from must not measure anything")

    monkeypatch.setattr(rmsg.bench, "run_bench", no_bench)
    saved = tmp_path / "figures.json"
    saved.write_text(json.dumps(FIGURES))
    out = tmp_path / "bench.png"
    result = CliRunner().invoke(main, ["bench", "--from", str(saved), "--plot", str(out)])
    assert result.exit_code == 0, result.output
    assert f"plot written to {out}" in result.stderr
    _check_png(out, 1400, 800)
    for transport, colour in TRANSPORT_COLOURS.items():
        assert _colour_share(out, colour) > 0.001, f"{transport} is drawn in {colour}"
    title = bench_title(FIGURES)
    assert "Linux x86_64, 2 CPUs (test)" in title and "$ rmsg bench --quick" in title


def test_bench_plot_marks_udp_losses() -> None:
    """UDP's lost messages were hidden: now a hatched segment on top of its bar."""
    from rmsg.plots import _lost_rate

    udp = FIGURES["throughput"][0]  # type: ignore[index]
    assert _lost_rate(udp) == 2_919.0  # lost per second of the run


def test_bench_writes_the_machine_and_command_into_its_json_and_plot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import rmsg.bench
    from rmsg.bench import BenchReport, Throughput

    report = BenchReport(rounds=1, cpus=2)
    for row in FIGURES["throughput"]:  # type: ignore[attr-defined]
        report.throughput.append(Throughput(**row))
    monkeypatch.setattr(rmsg.bench, "run_bench", lambda **_: report)
    out = tmp_path / "bench.png"
    result = CliRunner().invoke(
        main, ["bench", "--quick", "--no-scale", "--json", "--plot", str(out)]
    )
    assert result.exit_code == 0, result.output
    figures = json.loads(result.stdout)
    assert figures["command"] == "rmsg bench --quick --no-scale"
    assert "CPUs" in figures["machine"] and "Python" in figures["machine"]
    _check_png(out, 1400, 800)


def test_bench_from_needs_plot_and_readable_figures(tmp_path: Path) -> None:
    saved = tmp_path / "figures.json"
    saved.write_text("not json")
    result = CliRunner().invoke(main, ["bench", "--from", str(saved)])
    assert result.exit_code == 2 and "--plot" in result.output
    result = CliRunner().invoke(
        main, ["bench", "--from", str(saved), "--plot", str(tmp_path / "x.png")]
    )
    assert result.exit_code == 2 and "cannot read figures" in result.output


def test_the_bench_picture_in_the_docs_is_a_real_png_of_its_saved_figures(
    tmp_path: Path,
) -> None:
    docs = Path(__file__).resolve().parent.parent / "docs"
    _check_png(docs / "images" / "bench-plot.png", 1400, 800)
    figures = json.loads((docs / "images" / "bench-figures.json").read_text())
    assert figures["command"] and figures["machine"] and figures["throughput"]
    out = tmp_path / "again.png"  # the command performance.md gives draws it again
    result = CliRunner().invoke(
        main, ["bench", "--from", str(docs / "images" / "bench-figures.json"), "--plot", str(out)]
    )
    assert result.exit_code == 0, result.output
    _check_png(out, 1400, 800)
    assert "images/bench-plot.png" in (docs / "performance.md").read_text()
