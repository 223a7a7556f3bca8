"""The Wireshark dissector (rmsg/wireshark/rmsg.lua) decodes what the library sends.

A capture is made here the way ``rmsg netem --pcap-out`` makes one: two
endpoints exchange messages over a scripted lossy link on virtual time
(first contact, bundles, multi-fragment messages, SACKs, a refusal,
retransmissions), followed by one datagram of every packet kind with
seeded random fields, sealed datagrams and a corrupted one. tshark runs the
dissector over it, and every decoded field is compared with what the
library's own decoder makes of the same bytes. The ports are arbitrary, so
the heuristic is what finds rmsg.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from netem.pcap import PcapWriter
from reliable import Config, Endpoint, wire
from rmsg.cli import main
from rmsg.dissect import timeline
from rmsg.wireshark_plugin import lua_source

SCRIPT = Path(__file__).resolve().parent.parent / "rmsg" / "wireshark" / "rmsg.lua"


def _tshark_reason() -> str | None:
    tshark = shutil.which("tshark")
    if tshark is None:
        return "tshark is not installed (Debian: apt-get install tshark; .ci/run installs it)"
    version = subprocess.run([tshark, "-v"], capture_output=True, text=True, timeout=60).stdout
    if "with Lua" not in version:
        return "this tshark was built without Lua, so it cannot load rmsg.lua"
    return None


needs_tshark = pytest.mark.skipif(
    (reason := _tshark_reason()) is not None, reason=reason or "tshark available"
)

Record = tuple[float, tuple[str, int], tuple[str, int], bytes]


def _exchange() -> list[Record]:
    """Two endpoints on virtual time; the link drops every third datagram A sends once."""
    a = Endpoint(Config(), rng=random.Random(3))
    b = Endpoint(Config(), rng=random.Random(4))
    addr_a, addr_b = ("10.1.0.1", 45421), ("10.1.0.2", 7000)
    b.create_mailbox("jobs", now=0.0)
    a.send(addr_b, b"hello", now=0.0)
    a.send(addr_b, bytes(range(256)) * 20, now=0.0, mailbox="jobs", msg_type=-3, priority=9)
    for i in range(6):
        a.send(addr_b, f"small {i}".encode(), now=0.0)
    a.send(addr_b, b"nobody reads this", now=0.0, mailbox="missing")
    records: list[Record] = []
    now, sent_by_a = 0.0, 0
    for _ in range(2000):
        moved = False
        for src, dst, me, peer in ((addr_a, addr_b, a, b), (addr_b, addr_a, b, a)):
            for data, _ in me.datagrams_to_send(now):
                records.append((1e9 + now, src, dst, data))
                moved = True
                if me is a:
                    sent_by_a += 1
                    if sent_by_a % 3 == 0:
                        continue  # lost on the way
                peer.receive_datagram(data, src, now)
        if moved:
            now += 0.001
            continue
        if a.quiet() and b.quiet():
            break
        timers = [t for t in (a.get_timer(), b.get_timer()) if t is not None]
        now = max(now + 0.001, min(timers))
        a.handle_timer(now)
        b.handle_timer(now)
    return records


def _every_kind(rng: random.Random) -> list[Record]:
    """One datagram of every kind, with seeded random fields, on ports other than 7431."""
    records: list[Record] = []
    names = ["239.1.2.3:7400", "printer", "ünïcode, with comma"]
    for n, kind in enumerate(wire.Kind):
        fragments = ()
        if kind in (wire.Kind.DATA, wire.Kind.GDATA):
            fragments = tuple(
                wire.Fragment(
                    seq=rng.getrandbits(32),
                    base=rng.getrandbits(32),
                    msg_id=rng.getrandbits(32),
                    index=i,
                    count=3,
                    total_len=300,
                    msg_type=rng.randint(wire.MSG_TYPE_MIN, wire.MSG_TYPE_MAX),
                    priority=rng.randint(0, 65535),
                    mailbox=rng.choice(["", "jobs", "bo,x"]),
                    payload=rng.randbytes(rng.randint(0, 100)),
                )
                for i in range(1 if kind == wire.Kind.GDATA else 3)
            )
        packet = wire.Packet(
            kind=kind,
            flags=rng.choice([0, wire.Flag.ACK, wire.Flag.ACK | wire.Flag.ACK_NOW]),
            window=rng.randint(0, 65535),
            src_incarnation=rng.getrandbits(64) | 1 << 63,
            dst_incarnation=rng.getrandbits(64),
            ack=rng.getrandbits(32),
            ack_delay=rng.randint(0, 65535),
            sacks=tuple((rng.getrandbits(32), rng.getrandbits(32)) for _ in range(n % 4)),
            notices=tuple((rng.getrandbits(32), rng.randint(1, 7)) for _ in range(n % 3)),
            cookie=rng.randbytes(16) if kind in (wire.Kind.CHALLENGE, wire.Kind.ANNOUNCE) else None,
            refusal=2 if kind == wire.Kind.AUTH_FAILED else 0,
            probe=rng.getrandbits(32) if kind in (wire.Kind.PROBE, wire.Kind.PROBE_ACK) else 0,
            padding=rng.randint(0, 200) if kind == wire.Kind.PROBE else 0,
            fragment=fragments[0] if fragments else None,
            bundle=fragments[1:],
            group=rng.choice(names) if kind in wire.GROUP_KINDS else "",
        )
        src = ("127.0.0.1", rng.randint(1024, 65535))
        dst = ("::1", 9000) if n % 2 else ("127.0.0.1", 40000 + n)
        records.append((2e9 + n, src, dst, wire.encode(packet)))
    return records


def _sealed() -> list[Record]:
    from reliable.security import Authenticated, Encrypted

    key = bytes(range(32))
    frag = wire.Fragment(
        seq=10,
        base=10,
        msg_id=4,
        index=0,
        count=1,
        total_len=6,
        msg_type=0,
        priority=0,
        mailbox="box",
        payload=b"secret",
    )
    body = wire.encode_body(
        wire.Packet(
            kind=wire.Kind.DATA, src_incarnation=77, flags=wire.Flag.ACK, ack=5, fragment=frag
        )
    )
    out: list[Record] = [
        (3e9, ("127.0.0.1", 5001), ("127.0.0.1", 5002), Authenticated(key).seal(body, 77, 3))
    ]
    try:
        out.append(
            (3e9 + 1, ("127.0.0.1", 5001), ("127.0.0.1", 5002), Encrypted(key).seal(body, 77, 4))
        )
    except Exception:  # pragma: no cover - the crypto extra is in the test extra
        pass
    return out


@pytest.fixture(scope="module")
def capture(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Record]]:
    records = _exchange() + _every_kind(random.Random(17)) + _sealed()
    corrupt = bytearray(records[3][3])
    corrupt[14] ^= 0x10
    records.append((4e9, records[3][1], records[3][2], bytes(corrupt)))
    path = tmp_path_factory.mktemp("ws") / "suite.pcap"
    with PcapWriter(path) as pcap:
        for when, src, dst, data in records:
            pcap.write(when, src, dst, data)
    return path, records


#: Wireshark tries a port's registered dissector before heuristics by default, and
#: random ports do hit registered ones (17500 is Dropbox's): the documented remedy.
HEURISTICS_FIRST = ("-o", "udp.try_heuristic_first:TRUE")


def _tshark_json(path: Path, *extra: str, env: dict[str, str] | None = None) -> list[Any]:
    out = subprocess.run(
        [
            "tshark",
            *HEURISTICS_FIRST,
            *extra,
            "-r",
            str(path),
            "-T",
            "json",
            "--no-duplicate-keys",
            "-J",
            "rmsg",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=True,
    ).stdout
    return [frame["_source"]["layers"].get("rmsg") for frame in json.loads(out)]


def _list(value: Any) -> list[Any]:
    if value is None:
        return []
    return value if isinstance(value, list) else [value]


def _hexbytes(value: str | None) -> bytes:
    return bytes.fromhex((value or "").replace(":", ""))


def _expected(data: bytes) -> tuple[wire.Packet | None, bool]:
    """What the library makes of a datagram: (packet, or None if encrypted; CRC good).

    Sealed bodies are read as ``rmsg dissect`` reads them (no key: the tag is shown,
    not checked); a corrupted datagram is read past its failed CRC."""
    try:
        wire.check_crc(data)
        crc_ok = True
    except wire.MalformedPacket as exc:
        assert exc.reason == "checksum"
        crc_ok = False
    flags = int.from_bytes(data[4:6], "big")
    if flags & wire.Flag.ENCRYPTED:
        return None, crc_ok
    if flags & wire.Flag.AUTHENTICATED:
        return wire.decode_body(data[:32] + data[40:-20]), crc_ok
    return wire.decode_body(data, len(data) - 4), crc_ok


@needs_tshark
def test_tshark_decodes_every_field_the_library_decodes(
    capture: tuple[Path, list[Record]],
) -> None:
    path, records = capture
    frames = _tshark_json(path, "-X", f"lua_script:{SCRIPT}")
    assert len(frames) == len(records)
    retx = [e.retransmission for e in timeline(records)]
    kinds_seen = set()
    for n, (layer, (_, _, _, data), is_retx) in enumerate(zip(frames, records, retx, strict=True)):
        assert layer is not None, f"frame {n + 1} was not recognised as rmsg"
        packet, crc_ok = _expected(data)
        assert layer["rmsg.crc.good"] == ("1" if crc_ok else "0"), n
        assert int(layer["rmsg.kind"]) == data[3]
        kinds_seen.add(data[3])
        assert int(layer["rmsg.src_incarnation"], 16) == int.from_bytes(data[8:16], "big")
        flags = int.from_bytes(data[4:6], "big")
        if flags & wire.MODE_FLAGS:
            assert int(layer["rmsg.packet_number"]) == int.from_bytes(data[32:40], "big")
            assert _hexbytes(layer["rmsg.tag"]) == data[-20:-4]
        if packet is None:
            assert _hexbytes(layer["rmsg.ciphertext"]) == data[40:-20]
            continue
        assert int(layer["rmsg.window"]) == packet.window
        assert int(layer["rmsg.dst_incarnation"], 16) == packet.dst_incarnation
        assert int(layer["rmsg.ack"]) == packet.ack
        assert int(layer["rmsg.ack_delay"]) == packet.ack_delay
        if packet.kind == wire.Kind.DROPPED:
            assert int(layer["rmsg.fence"]) == packet.ack
        sacks = [
            (int(s["rmsg.sack.start"]), int(s["rmsg.sack.end"]))
            for s in _list(layer.get("rmsg.sack"))
        ]
        assert sacks == list(packet.sacks)
        notices = [
            (int(s["rmsg.notice.msg_id"]), int(s["rmsg.notice.verdict"]))
            for s in _list(layer.get("rmsg.notice"))
        ]
        assert notices == list(packet.notices)
        assert _hexbytes(layer.get("rmsg.cookie")) == (packet.cookie or b"")
        assert layer.get("rmsg.group", "") == packet.group
        if packet.kind == wire.Kind.AUTH_FAILED:
            assert int(layer["rmsg.refusal"]) == packet.refusal
        if packet.kind in (wire.Kind.PROBE, wire.Kind.PROBE_ACK):
            assert int(layer["rmsg.probe"]) == packet.probe
            assert len(_hexbytes(layer.get("rmsg.padding"))) == packet.padding
        got = [
            (
                int(f["rmsg.frag.seq"]),
                int(f["rmsg.frag.base"]),
                int(f["rmsg.frag.msg_id"]),
                int(f["rmsg.frag.index"]),
                int(f["rmsg.frag.number"]),
                int(f["rmsg.frag.count"]),
                int(f["rmsg.frag.total_len"]),
                int(f["rmsg.frag.msg_type"]),
                int(f["rmsg.frag.priority"]),
                f.get("rmsg.frag.mailbox", ""),
                _hexbytes(f.get("rmsg.frag.payload")),
            )
            for f in _list(layer.get("rmsg.frag"))
        ]
        want = [
            (
                f.seq,
                f.base,
                f.msg_id,
                f.index,
                f.index + 1,
                f.count,
                f.total_len,
                f.msg_type,
                f.priority,
                f.mailbox,
                bytes(f.payload),
            )
            for f in packet.fragments
        ]
        assert got == want, n
        assert ("rmsg.retransmission" in layer) == is_retx, n
    assert kinds_seen >= {int(k) for k in wire.Kind}
    assert any(retx), "the lossy exchange should have retransmitted"


@needs_tshark
def test_info_column_numbers_fragments_from_one_like_rmsg_dissect(
    capture: tuple[Path, list[Record]],
) -> None:
    path, records = capture
    lines = subprocess.run(
        [
            "tshark",
            *HEURISTICS_FIRST,
            "-X",
            f"lua_script:{SCRIPT}",
            "-r",
            str(path),
            "-T",
            "fields",
            "-e",
            "_ws.col.Info",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout.splitlines()
    entries = list(timeline(records))
    data_lines = [
        (line, e)
        for line, e in zip(lines, entries, strict=True)
        if e.packet is not None and e.packet.kind == wire.Kind.DATA and not e.sealed
    ]
    assert data_lines
    for line, entry in data_lines:
        assert entry.packet is not None and entry.packet.fragment is not None
        f = entry.packet.fragment
        assert f"frag={f.index + 1}/{f.count}" in line and f"frag={f.index + 1}/{f.count}" in (
            entry.format()
        )
        assert ("RETX" in line) == entry.retransmission
    assert any("BAD CRC" in line for line in lines)
    assert any(line.startswith("DROPPED") and "fence=" in line for line in lines)


@needs_tshark
def test_installed_plugin_is_loaded_by_tshark(
    capture: tuple[Path, list[Record]], tmp_path: Path
) -> None:
    """`rmsg wireshark install` puts the file where tshark looks for it: no -X needed."""
    path, records = capture
    env = {**os.environ, "HOME": str(tmp_path), "XDG_CONFIG_HOME": str(tmp_path / ".config")}
    done = subprocess.run(
        [sys.executable, "-m", "rmsg", "wireshark", "install"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=True,
    )
    installed = Path(done.stdout.strip())
    assert installed.read_text() == lua_source()
    assert str(installed).startswith(str(tmp_path))
    frames = _tshark_json(path, env=env)
    assert all(layer is not None for layer in frames) and len(frames) == len(records)


def test_install_to_a_given_folder_and_print(tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(main, ["wireshark", "install", "--path", str(tmp_path / "plugins")])
    assert result.exit_code == 0, result.output
    target = tmp_path / "plugins" / "rmsg.lua"
    assert result.output.strip() == str(target)
    assert target.read_text() == SCRIPT.read_text()
    printed = runner.invoke(main, ["wireshark", "install", "--print"])
    assert printed.exit_code == 0 and printed.output == SCRIPT.read_text()
    assert not (Path.home() / "nonexistent").exists()


def test_install_reports_an_unwritable_folder_as_a_runtime_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    result = CliRunner().invoke(main, ["wireshark", "install", "--path", str(blocker / "x")])
    assert result.exit_code == 1
    assert "cannot install the dissector" in result.output and "Usage:" not in result.output


def test_the_dissector_knows_every_kind_and_verdict() -> None:
    """A kind added to the wire format without the dissector learning it fails here."""
    source = lua_source()
    for kind in wire.Kind:
        assert f'[{int(kind)}] = "{kind.name}"' in source
    for verdict in wire.Verdict:
        assert f'[{int(verdict)}] = "{verdict.name}"' in source
