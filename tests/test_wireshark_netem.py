"""The Wireshark dissector over a capture made by a real ``rmsg netem --pcap-out`` run.

tests/test_wireshark.py checks every field over captures the suite writes itself; this
checks the path a user takes: ``rmsg netem`` as a process between two nodes on loopback,
20% loss each way, its ``--pcap-out`` read by tshark with rmsg.lua, and each frame's
decoded fields compared with the library's own decoder of the same bytes."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from reliable import Node
from rmsg.dissect import _udp_records, timeline

from .conftest import free_port
from .test_wireshark import SCRIPT, _expected, _hexbytes, _list, _tshark_json, needs_tshark

pytestmark = pytest.mark.loopback

RMSG = Path(sys.executable).parent / "rmsg"


@needs_tshark
def test_tshark_decodes_a_capture_from_rmsg_netem_pcap_out(tmp_path: Path) -> None:
    if not RMSG.exists():
        pytest.skip("the rmsg script is not installed beside this interpreter")
    capture = tmp_path / "run.pcap"
    listen = free_port()
    with Node("127.0.0.1:0") as server, Node("127.0.0.1:0") as client:
        proxy = subprocess.Popen(
            [
                str(RMSG),
                "netem",
                "--listen",
                f"127.0.0.1:{listen}",
                "--forward",
                f"127.0.0.1:{server.address[1]}",
                "--spec",
                "loss 20%",
                "--seed",
                "7",
                "--pcap-out",
                str(capture),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            assert proxy.stderr is not None
            assert proxy.stderr.readline().startswith(b"netem:")  # relaying
            dest = f"127.0.0.1:{listen}"
            client.send(dest, bytes(range(256)) * 20, timeout=30)  # several fragments
            for i in range(40):
                client.send(dest, f"message {i}".encode(), timeout=30)
            got = [server.receive(timeout=10).data for _ in range(41)]
            assert got[0] == bytes(range(256)) * 20 and got[-1] == b"message 39"
        finally:
            proxy.send_signal(signal.SIGINT)
            try:
                proxy.communicate(timeout=20)
            except subprocess.TimeoutExpired:
                proxy.kill()
                proxy.communicate()
    assert proxy.returncode == 0
    records = list(_udp_records(capture))  # what 'rmsg dissect' reads
    assert len(records) > 40
    frames = _tshark_json(capture, "-X", f"lua_script:{SCRIPT}")
    assert len(frames) == len(records)
    retx = [e.retransmission for e in timeline(records)]
    assert any(retx), "20% loss should have cost a retransmission"
    for n, (layer, (_, _, _, data), is_retx) in enumerate(zip(frames, records, retx, strict=True)):
        assert layer is not None, f"frame {n + 1} was not recognised as rmsg"
        packet, crc_ok = _expected(data)
        assert crc_ok and packet is not None
        assert layer["rmsg.crc.good"] == "1"
        assert int(layer["rmsg.kind"]) == packet.kind
        assert int(layer["rmsg.src_incarnation"], 16) == packet.src_incarnation
        assert int(layer["rmsg.dst_incarnation"], 16) == packet.dst_incarnation
        assert int(layer["rmsg.ack"]) == packet.ack
        sacks = [
            (int(s["rmsg.sack.start"]), int(s["rmsg.sack.end"]))
            for s in _list(layer.get("rmsg.sack"))
        ]
        assert sacks == list(packet.sacks), n
        got = [
            (
                int(f["rmsg.frag.seq"]),
                int(f["rmsg.frag.msg_id"]),
                int(f["rmsg.frag.number"]),
                int(f["rmsg.frag.count"]),
                _hexbytes(f.get("rmsg.frag.payload")),
            )
            for f in _list(layer.get("rmsg.frag"))
        ]
        want = [(f.seq, f.msg_id, f.index + 1, f.count, bytes(f.payload)) for f in packet.fragments]
        assert got == want, n
        assert ("rmsg.retransmission" in layer) == is_retx, n
