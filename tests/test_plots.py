"""Pictures: ``rmsg dissect --plot`` draws a time-sequence graph a reader can open.

Each PNG is opened again: it exists, has the promised size, and is not blank
(many distinct colours, the retransmission red among them)."""

from __future__ import annotations

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
