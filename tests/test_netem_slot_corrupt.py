"""tc-netem to the letter, the last part: ``slot``, ``ecn`` and where ``corrupt`` lands.

Slot timings are checked exactly against hand-traced runs of the kernel's
``netem_dequeue``/``get_slot_next``; the gap distributions statistically, with
fixed seeds and tolerances derived from the distribution (stated at each
assertion).
"""

from __future__ import annotations

import itertools
import math
import socket
import statistics
import struct
import time
from pathlib import Path

import pytest

from netem.models import FaultModel, Impairment, distribution_table
from netem.pcap import udp_packet
from netem.spec import SpecError, format_spec, parse_spec

MS = 1e-3


def _releases(spec: str | Impairment, arrivals: list[float], size: int = 100) -> list[float]:
    model = FaultModel(parse_spec(spec) if isinstance(spec, str) else spec, seed=1)
    out = []
    for t in arrivals:
        fates = model.apply(b"x" * size, t)
        assert len(fates) == 1
        out.append(fates[0][0])
    return out


# ---------------------------------------------------------------- slot: exact traces


def test_a_slot_releases_what_is_due_in_bursts_of_its_packet_limit() -> None:
    # kernel trace: #0 at 0 finds a stale slot, draws 10 ms from its arrival; 2 per slot;
    # a used-up slot draws the next 10 ms from its own opening
    got = _releases("slot 10ms packets 2", [i * MS for i in range(20)])
    assert got == pytest.approx([10 * MS * (i // 2 + 1) for i in range(20)])


def test_a_slot_byte_limit_charges_headers_and_lets_the_crossing_datagram_go() -> None:
    # 100 B + 42 B of headers = 142 B: 300 -> 158 -> 16 -> -126, so three per slot
    got = _releases("slot 10ms bytes 300", [i * MS for i in range(9)])
    assert got == pytest.approx([10 * MS * (i // 3 + 1) for i in range(9)])


def test_a_stale_slot_is_redrawn_when_the_queue_looks_at_the_datagram() -> None:
    # slot opened at 10 ms, the next datagram arrives at 15 ms: redrawn from 15 ms
    assert _releases("slot 10ms", [0.0, 15 * MS]) == pytest.approx([10 * MS, 25 * MS])
    # delay 5 ms < slot 10 ms: the slot wait overlaps the delay (due at 5, out at 10)
    assert _releases("delay 5ms slot 10ms", [0.0]) == pytest.approx([10 * MS])
    # delay 30 ms > slot: the slot drawn on arrival opens at 10 ms, before it is due, so
    # the kernel's watchdog at 30 ms redraws: out at 40 ms
    assert _releases("delay 30ms slot 10ms", [0.0]) == pytest.approx([40 * MS])


def test_a_datagram_queued_behind_a_slot_redraws_from_that_release() -> None:
    # #0 (100 B) arrives at 0, is due at 1.136 ms and leaves with the slot at 10 ms.
    # #1 (1500 B) arrives at 1 ms but the rate makes it due at 1.136 + 12.336 ms, after
    # that slot opened: the kernel looks at it when #0 leaves (10 ms) and draws the next
    # slot from there, 20 ms — not from its arrival (11 ms, then 23.5 ms from its due time)
    model = FaultModel(parse_spec("rate 1mbit slot 10ms"), seed=1)
    assert model.apply(b"x" * 100, 0.0)[0][0] == pytest.approx(10 * MS)
    assert model.apply(b"x" * 1500, 1 * MS)[0][0] == pytest.approx(20 * MS)


def test_reordered_datagrams_skip_the_slot_as_they_skip_netems_tfifo() -> None:
    got = _releases("delay 50ms reorder 100% slot 10ms", [i * MS for i in range(5)])
    assert got == pytest.approx([i * MS for i in range(5)])


def test_slot_waits_count_towards_the_queue_limit() -> None:
    model = FaultModel(parse_spec("slot 1s limit 2"), seed=1)
    fates = [model.apply(b"x", 0.0) for _ in range(3)]
    assert [len(f) for f in fates] == [1, 1, 0]
    assert model.counters.dropped_queue == 1


# ------------------------------------------------------------ slot: gap distributions

N = 20_000


def _gaps(imp: Impairment) -> list[float]:
    """Gaps between successive slots: N datagrams all due at 0, one per slot."""
    model = FaultModel(imp, seed=11)
    releases = [model.apply(b"x", 0.0)[0][0] for _ in range(N)]
    return [b - a for a, b in itertools.pairwise([0.0, *releases])]


def test_uniform_slot_gaps_lie_between_min_and_max() -> None:
    gaps = _gaps(Impairment(slot_min=10 * MS, slot_max=30 * MS, slot_packets=1, limit=N + 1))
    assert min(gaps) >= 10 * MS - 1e-12 and max(gaps) <= 30 * MS + 1e-12
    # uniform on [10, 30] ms: mean 20 ms, sd 20/sqrt(12) = 5.774 ms. Standard error of
    # the mean 5.774/sqrt(20000) = 0.041 ms: 0.25 ms is 6 of them. The sd's standard
    # error is sd * sqrt((kurtosis - 1) / 4N) = 5.774 * sqrt(0.8 / 80000) = 0.018 ms:
    # 0.12 ms is 6.5 of them.
    assert statistics.fmean(gaps) == pytest.approx(20 * MS, abs=0.25 * MS)
    assert statistics.pstdev(gaps) == pytest.approx(20 * MS / math.sqrt(12), abs=0.12 * MS)


def test_slot_distribution_gaps_follow_the_table() -> None:
    imp = Impairment(
        slot_distribution="normal",
        slot_delay=20 * MS,
        slot_jitter=4 * MS,
        slot_packets=1,
        limit=N + 1,
    )
    gaps = _gaps(imp)
    table = distribution_table("normal")
    # the table is clipped, so no gap strays beyond its extremes (about +/-4 sigma)
    assert min(gaps) >= 20 * MS + min(table) / 8192 * 4 * MS - 1e-9
    assert max(gaps) <= 20 * MS + max(table) / 8192 * 4 * MS + 1e-9
    # normal, sigma 4 ms: standard error of the mean 4/sqrt(20000) = 0.028 ms, 0.17 ms is
    # 6 of them; of the sd 4/sqrt(2N) = 0.020 ms, 0.12 ms is 6 of them (the table's own
    # sd is 1 within 0.1%)
    assert statistics.fmean(gaps) == pytest.approx(20 * MS, abs=0.17 * MS)
    assert statistics.pstdev(gaps) == pytest.approx(4 * MS, abs=0.12 * MS)


# -------------------------------------------------------------------- slot: the spec


@pytest.mark.parametrize(
    "spec",
    [
        "slot 10ms",
        "slot 10ms 20ms packets 3",
        "slot 10ms bytes 1500",
        "slot distribution pareto 10ms 2ms packets 2 bytes 3000",
        "delay 10ms 2ms slot 5ms 15ms",
    ],
)
def test_slot_specs_read_back(spec: str) -> None:
    imp = parse_spec(spec)
    assert imp.slotted
    assert format_spec(imp) == spec
    assert parse_spec(format_spec(imp)) == imp


def test_slot_bytes_take_tcs_size_units() -> None:
    assert parse_spec("slot 10ms bytes 64kb").slot_bytes == 64 * 1024


@pytest.mark.parametrize(
    ("spec", "why"),
    [
        ("slot 20ms 10ms", "below its min"),
        ("slot 0ms", "does nothing"),
        ("slot distribution normal 10ms 0ms", "jitter > 0"),
        ("slot fast", "'distribution NAME DELAY JITTER'"),
        ("slot distribution nosuchtable 10ms 1ms", "nosuchtable"),
        ("slot 10ms packets 0", ">= 1"),
        ("slot 10ms bytes lots", "size in bytes"),
    ],
)
def test_slot_specs_tc_rejects_or_that_do_nothing_are_refused(spec: str, why: str) -> None:
    with pytest.raises(SpecError, match=why):
        parse_spec(spec)


def test_slot_limits_without_a_gap_are_refused_from_python() -> None:
    with pytest.raises(ValueError, match="need a slot gap"):
        Impairment(slot_packets=5)


# ----------------------------------------------------------------------------- ecn


@pytest.mark.parametrize("spec", ["ecn", "loss 1% ecn", "loss gemodel 1% 10% ecn"])
def test_ecn_is_refused_saying_why(spec: str) -> None:
    with pytest.raises(SpecError, match=r"'ecn' is not supported.*ECN bits.*Leave 'ecn' out"):
        parse_spec(spec)


# ---------------------------------------------------------------- corrupt anywhere


def test_corrupt_anywhere_lands_in_headers_and_payload_and_fails_the_checksum() -> None:
    model = FaultModel(parse_spec("corrupt 100% where anywhere"), seed=5, log=True)
    assert all(model.apply(b"p" * 100, 0.0) == [] for _ in range(N))
    c = model.counters
    assert c.dropped_checksum == c.dropped == c.vanished == c.corrupted == N
    assert c.delivered == 0
    assert model.log is not None
    in_header = sum(d.corruption[0].startswith("header bit") for d in model.log)
    assert all(d.dropped == "checksum" for d in model.log)
    # one bit among 28 header bytes + 100 payload bytes: P(header) = 28/128 = 0.219;
    # binomial standard error sqrt(p(1-p)/N) = 0.0029, and 0.015 is 5 of them
    assert in_header / N == pytest.approx(28 / 128, abs=0.015)


def test_a_datagram_the_receiver_drops_still_held_its_place_in_the_queue() -> None:
    # as in the kernel, the corrupted packet crossed the link: it takes the queue's room
    model = FaultModel(parse_spec("delay 1s corrupt 100% where anywhere limit 1"), seed=1)
    assert model.apply(b"a", 0.0) == [] and model.apply(b"b", 0.0) == []
    assert model.counters.dropped_checksum == 1 and model.counters.dropped_queue == 1


def test_corrupt_payload_still_delivers_one_flipped_bit() -> None:
    model = FaultModel(parse_spec("corrupt 100%"), seed=5)
    for _ in range(100):
        ((_, data),) = model.apply(b"\0" * 50, 0.0)
        assert sum(bin(b).count("1") for b in data) == 1
    assert model.counters.dropped == 0


def test_where_needs_a_known_place_and_a_corrupt() -> None:
    with pytest.raises(SpecError, match="payload or anywhere"):
        parse_spec("corrupt 1% where header")
    with pytest.raises(SpecError, match="give corrupt P first"):
        parse_spec("where anywhere")
    with pytest.raises(ValueError, match="corrupt_fn"):
        Impairment(corrupt=0.1, corrupt_where="anywhere", corrupt_fn=lambda d, r: d)


# ---------------------------------------------------- captures show the corruption


def _udp_checksum_ok(packet: bytes) -> bool:
    """Verify an IPv4 UDP packet's checksum as a receiving kernel does."""
    header = (packet[0] & 0x0F) * 4
    udp = packet[header:]
    pseudo = packet[12:20] + struct.pack("!BBH", 0, 17, len(udp))
    data = pseudo + udp + b"\0" * (len(udp) % 2)
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total == 0xFFFF


def test_a_capture_of_a_damaged_datagram_carries_the_checksum_of_what_was_sent() -> None:
    src, dst = ("127.0.0.1", 5000), ("127.0.0.1", 6000)
    sent = b"hello, world"
    damaged = bytes([sent[0] ^ 4]) + sent[1:]
    assert _udp_checksum_ok(udp_packet(src, dst, sent))
    assert _udp_checksum_ok(udp_packet(src, dst, damaged))  # recomputed: looks fine
    assert not _udp_checksum_ok(udp_packet(src, dst, damaged, checksum_of=sent))
    # a different length (truncate, garbage) keeps a valid checksum
    assert _udp_checksum_ok(udp_packet(src, dst, sent[:5], checksum_of=sent))


def _pcap_packets(path: Path) -> list[bytes]:
    raw = path.read_bytes()[24:]
    packets = []
    while raw:
        length = struct.unpack("<I", raw[8:12])[0]
        packets.append(raw[16 : 16 + length])
        raw = raw[16 + length :]
    return packets


@pytest.mark.loopback
def test_the_proxy_captures_corrupted_datagrams_with_a_bad_checksum(tmp_path: Path) -> None:
    from netem.proxy import UdpProxy

    server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    server.bind(("127.0.0.1", 0))
    server.settimeout(2.0)
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client.bind(("127.0.0.1", 0))
    out = tmp_path / "out.pcap"
    capture = tmp_path / "legs.pcapng"
    try:
        with UdpProxy(
            "127.0.0.1:0",
            server.getsockname(),
            up="corrupt 100%",
            down="corrupt 100% where anywhere",
            pcap_out=out,
            capture=capture,
            seed=3,
        ) as proxy:
            client.sendto(b"x" * 64, proxy.address)
            got, upstream = server.recvfrom(100)
            assert got != b"x" * 64  # payload corruption is delivered
            server.sendto(b"y" * 64, upstream)  # corrupted anywhere: dropped on the way
            deadline = time.monotonic() + 2.0
            while proxy.snapshot().down.dropped_checksum < 1:
                assert time.monotonic() < deadline
                time.sleep(0.01)
        packets = _pcap_packets(out)
        assert len(packets) == 1 and not _udp_checksum_ok(packets[0])
        comments = capture.read_bytes()
        assert b"dropped (checksum)" in comments
        assert b"copy 1/1: delayed 0.000 ms, corrupted" in comments
    finally:
        server.close()
        client.close()
