"""Loss recovery on the simulated pair: probes, time-based detection, the first flight.

Deterministic: two endpoints, a hand-driven link, virtual time (tests/harness.py).
"""

from __future__ import annotations

import random

import pytest

from reliable import Config, Endpoint, events
from reliable.config import K_PACKET_THRESHOLD, K_TIME_THRESHOLD
from reliable.peer import DATAGRAM_GROWTH, FIRST_CONTACT_DATAGRAMS
from reliable.sender import CALM_RECOVERIES, PROBE_FLOOR
from reliable.wire import Kind

from .harness import A, B, Pair, decode_all

STEP = 0.0001
#: Loopback addresses: the path gets 64 KiB datagrams, as between two local processes.
LOOPBACK = (("127.0.0.1", 1000), ("127.0.0.1", 2000))


def _wait_for_output(p: Pair, limit: float) -> tuple[list[bytes], float]:
    """Advance in small steps until A sends something or ``limit`` seconds pass."""
    waited = 0.0
    while waited < limit:
        p.tick(STEP)
        waited += STEP
        sent = p.outgoing(p.a)
        if sent:
            return sent, waited
    return [], waited


def _connect(p: Pair, rtt: float = 0.001) -> None:
    """Like ``Pair.connect``, but over a link with a round trip of ``rtt`` seconds, so
    the estimators have real samples (``settle`` answers in the same instant)."""
    for side in (p.a, p.b):
        side.endpoint.send(p.other(side).addr, b"warm", now=p.now)
    for _ in range(20):
        moved = p.transfer(p.a)
        p.now += rtt / 2
        moved += p.transfer(p.b)
        p.now += rtt / 2
        if not moved:
            break
    for side in (p.a, p.b):
        assert len(side.of(events.MessageDelivered)) == 1
        side.events.clear()


def test_a_path_timed_only_by_the_challenge_is_not_probed_before_min_rto() -> None:
    """The case the old 10 ms floor was added for (test_sealed_nodes_talk[aead] once saw
    its first message go out three times): the CHALLENGE times a stateless round trip,
    tiny on loopback, and the peer then takes longer to handle the resent flight (it
    sets up the session; AEAD on a shared CPU). Until an acknowledgement of data has
    timed the path, the tail loss probe keeps ``min_rto`` as its floor."""
    p = Pair()
    p.a.endpoint.send(B, b"x" * 1000, now=p.now)
    p.transfer(p.a)  # B keeps no state: it answers with a CHALLENGE
    p.now += 0.0002  # a 0.2 ms round trip for the challenge
    p.transfer(p.b)
    sender = p.a.endpoint._peers[B].sender
    assert sender.rtt.srtt is not None and sender.rtt.srtt < 0.001 and not sender.data_timed
    resent = p.outgoing(p.a)  # the flight again, cookie attached
    assert resent
    busy, _ = _wait_for_output(p, 0.005)  # B is busy for 5 ms before it handles it
    assert busy == []  # no probe: 2 x SRTT (0.4 ms) and PROBE_FLOOR (2 ms) were not enough
    p.deliver(p.b, resent)
    p.settle()
    (receipt,) = p.a.of(events.MessageDelivered)
    assert receipt.transmissions == receipt.fragments
    assert p.a.endpoint.stats().retransmissions == 0 and sender.probes == 0
    assert sender.data_timed or sender.rtt.samples == 1  # the resent flight is not timed (Karn)


def test_once_data_timed_the_path_the_probe_waits_two_rtts_not_min_rto() -> None:
    """The other side of the guard: after an acknowledgement of data, a lost tail is
    probed at about 2 x SRTT even below ``min_rto``."""
    p = Pair()
    p.connect()
    sender = p.a.endpoint._peers[B].sender
    assert sender.data_timed
    p.a.endpoint.send(B, b"tail", now=p.now)
    p.transfer(p.a, drop=lambda i, d: True)
    sent, waited = _wait_for_output(p, 0.02)
    rtt = sender.rtt
    assert rtt.srtt is not None
    assert sent and waited < Config().min_rto
    assert waited >= max(2 * rtt.srtt, PROBE_FLOOR) - 1e-9
    assert sender.probes == 1


def test_a_probe_proven_spurious_raises_the_probe_floor() -> None:
    """The peer was only slow: the original's acknowledgement arrives right after the
    probe's copy left, sooner than any round trip. The floor doubles (up to min_rto),
    so a peer that is often this slow is not probed spuriously again and again."""
    p = Pair(config_b=Config(reply_ack_delay=0))  # B acknowledges at once
    _connect(p)
    sender = p.a.endpoint._peers[B].sender
    p.a.endpoint.send(B, b"slow", now=p.now)
    original = p.outgoing(p.a)
    probe, _ = _wait_for_output(p, 0.02)
    assert probe and sender.probes == 1
    p.deliver(p.b, original)  # B gets the original at last and acknowledges it at once
    p.now += STEP
    p.transfer(p.b)
    assert sender.probe_floor == 2 * PROBE_FLOOR
    p.settle()
    assert len(p.a.of(events.MessageDelivered)) == 1


def test_a_lost_retransmission_is_detected_by_time_not_by_the_probe_timer() -> None:
    """RACK judges a packet by its latest transmission: a retransmission that is lost
    too is declared lost once data sent after it is acknowledged and 9/8 RTT passed,
    with no probe timeout (which would wait at least two RTTs and back off)."""
    p = Pair()
    p.connect()
    sender = p.a.endpoint._peers[B].sender
    for i in range(6):
        p.a.endpoint.send(B, bytes([65 + i]) * 1000, now=p.now)  # a datagram each
    p.transfer(p.a, drop=lambda i, d: i == 0)  # the first is lost
    p.tick()
    p.transfer(p.b)  # the gap is reported at once: three datagrams later arrived
    retransmission = p.outgoing(p.a)
    assert sender.retransmissions == 1 and len(retransmission) == 1  # lost again
    for i in range(3):
        p.a.endpoint.send(B, bytes([97 + i]) * 1000, now=p.now)  # new data after it
    p.transfer(p.a)
    p.tick()
    p.transfer(p.b)  # acknowledges the new data: the retransmission is overdue
    again, waited = _wait_for_output(p, 0.05)
    assert again, "the lost retransmission was not repaired"
    rtt = sender.rtt
    assert rtt.srtt is not None
    assert sender.probes == 0 and sender.retransmissions == 2
    assert waited <= 2 * max(rtt.srtt, rtt.latest)
    p.deliver(p.b, again)
    p.settle()
    assert len(p.a.of(events.MessageDelivered)) == 9


def test_a_flight_after_a_small_challenge_is_bundled_so_its_loss_waits_round_trips() -> None:
    """Regression: the CHALLENGE times the first contact, one small datagram. Bundling
    everything queued meanwhile into one 25 KB datagram meant that, if it was lost, the
    probe waited for what such a slow path might take to carry it (srtt x 188, cut to
    ``initial_rto``: 1 s, where the RTO was 22 ms; the benchmark's 5% loss row often
    ended after 257 messages). Bundles now grow from the size a round trip timed."""
    p = Pair(addrs=LOOPBACK)
    b = p.b.addr
    p.a.endpoint.send(b, bytes(64), now=p.now)
    first = p.outgoing(p.a)
    sampled = max(len(d) for d in first)
    p.deliver(p.b, first)  # B keeps no state for A yet: it answers with a CHALLENGE
    for _ in range(255):
        p.a.endpoint.send(b, bytes(64), now=p.now)
    p.now += 0.008  # a slow first round trip, as on a loaded machine
    p.transfer(p.b)
    sender = p.a.endpoint._peers[b].sender
    assert sender.rtt.sampled_size == sampled and not sender.data_timed
    flight = p.outgoing(p.a)  # the lot again, with the cookie; all of it is lost
    limit = max(Config().max_datagram_size, DATAGRAM_GROWTH * sampled)
    assert len(flight) > 1 and max(len(d) for d in flight) <= limit
    probe, waited = _wait_for_output(p, Config().initial_rto)
    assert probe, "the lost flight was never probed"
    assert waited < Config().initial_rto / 4
    p.deliver(p.b, probe)
    p.settle()
    assert len(p.a.of(events.MessageDelivered)) == 256
    assert p.b.received() == [bytes(64)] * 256


def test_once_data_is_acknowledged_bundles_fill_the_path_datagram_size() -> None:
    """The limit lasts one round trip: after the first acknowledgement of data, small
    messages are bundled into datagrams of the path's full size again."""
    p = Pair(addrs=LOOPBACK)
    b = p.b.addr
    p.a.endpoint.send(b, bytes(64), now=p.now)
    p.deliver(p.b, p.outgoing(p.a))  # a CHALLENGE
    p.now += 0.001
    p.transfer(p.b)
    peer = p.a.endpoint._peers[b]
    assert peer.bundle_size() == Config().max_datagram_size < peer.current_datagram_size()
    p.a.endpoint.send(b, bytes(64), now=p.now)  # new: the resent first one is not timed
    p.now += 0.0005
    p.transfer(p.a)  # both, with the cookie
    p.now += 0.0005
    p.transfer(p.b)  # their acknowledgement times the path
    assert peer.sender.data_timed
    for _ in range(1000):
        p.a.endpoint.send(b, bytes(64), now=p.now)
    flight = p.outgoing(p.a)
    assert peer.bundle_size() == peer.current_datagram_size()
    assert max(len(d) for d in flight) > 16 * Config().max_datagram_size
    p.deliver(p.b, flight)
    p.settle()
    assert len(p.b.received()) == 1002


def _bytes_before_validation(p: Pair) -> int:
    """What A sends to a B that has never heard of it, before B's CHALLENGE reaches it
    (B drops all of it unread), in bytes."""
    before = p.outgoing(p.a)
    p.deliver(p.b, before)
    assert p.b.endpoint.dropped == {"unvalidated": len(before)}
    return sum(len(d) for d in before)


def test_a_cold_big_send_validates_before_its_flight() -> None:
    """A fresh session's first flight was a whole congestion window (650 KB of loopback
    datagrams) that the peer dropped unread while it validated our address. Now a PING
    goes first (three, in case one is lost), the CHALLENGE answers it, and the flight
    follows with the cookie."""
    loopback = ("127.0.0.1", 2)
    a = Endpoint(rng=random.Random(1), arrival_events=True)
    b = Endpoint(rng=random.Random(2), arrival_events=True)
    a_addr = ("127.0.0.1", 1)
    data = random.Random(3).randbytes(2_000_000)
    a.send(loopback, data, now=0.0)
    first = [d for d, _ in a.datagrams_to_send(0.0)]
    kinds = [pkt.kind for pkt in decode_all(first)]
    assert kinds == [Kind.PING] * FIRST_CONTACT_DATAGRAMS  # not 650 KB of DATA
    for d in first:
        b.receive_datagram(d, a_addr, 0.0)
    assert b.dropped == {"unvalidated": FIRST_CONTACT_DATAGRAMS}
    now, moved = 0.0, True
    for _ in range(1000):
        if not moved:
            break
        now += 0.0001
        moved = False
        for src, dst, src_addr in ((a, b, a_addr), (b, a, loopback)):
            for d, _ in src.datagrams_to_send(now):
                dst.receive_datagram(d, src_addr, now)
                moved = True
    got = b.take(now=now)
    assert got is not None and got.data == data
    assert b.dropped == {"unvalidated": FIRST_CONTACT_DATAGRAMS}  # nothing after the PINGs
    assert a.stats().retransmissions == 0


def test_a_cold_small_send_still_goes_in_the_first_datagram() -> None:
    """A message that fits one ordinary datagram goes at once (a peer that needs no
    validation, or keeps state for us, delivers it with no extra round trip)."""
    p = Pair(config_b=Config(validate_addresses=False))
    p.a.endpoint.send(B, b"hello", now=p.now)
    p.a.endpoint.send(B, b"world", now=p.now)
    first = p.outgoing(p.a)
    data = [pkt for pkt in decode_all(first) if pkt.kind == Kind.DATA]
    assert len(data) == 1 and len(data[0].fragments) == 2  # both messages, bundled
    assert len(first) == FIRST_CONTACT_DATAGRAMS  # and PINGs, in case it is lost
    p.deliver(p.b, first)
    assert p.b.received() == [b"hello", b"world"]


def test_before_first_contact_only_one_small_datagram_is_sent() -> None:
    """With validation, what A sends before the CHALLENGE is bounded by one datagram of
    max_datagram_size and two PINGs, whatever is queued (it was ten full datagrams)."""
    p = Pair()
    for _ in range(20):
        p.a.endpoint.send(B, bytes(1000), now=p.now)
    p.a.endpoint.send(B, bytes(100_000), now=p.now)
    pings = (FIRST_CONTACT_DATAGRAMS - 1) * 100
    assert 0 < _bytes_before_validation(p) <= Config().max_datagram_size + pings
    p.settle()
    assert len(p.a.of(events.MessageDelivered)) == 21
    assert p.a.endpoint.stats().retransmissions == 0


def test_the_send_window_slides_with_what_the_peer_holds_not_the_oldest_hole() -> None:
    """The advertised window bounds the fragments in flight beyond the highest one the
    peer holds (its socket buffer takes those); it used to count from the cumulative
    ack, so one lost fragment stopped the sender a window past it until it was repaired.
    The reorder buffer stays bounded: the peer shrinks its window by the span it holds,
    so nothing goes past ``expected + max_window``."""
    p = Pair(config_b=Config(max_window=40))
    p.connect()
    p.b.endpoint.set_receive_buffer(1000)  # the smallest window: 8 fragments in flight
    sender = p.a.endpoint._peers[B].sender
    hole = b"\x00" * 1000
    for i in range(60):
        p.a.endpoint.send(B, bytes([i]) * 1000, now=p.now)  # a datagram each
    start = sender.next_seq
    for _ in range(40):  # the first message is lost, again and again
        p.transfer(p.a, drop=lambda i, d: hole in d)
        p.tick()
        p.transfer(p.b)
    receiver = p.b.endpoint._peers[A].receiver
    assert sender.peer_window <= 8
    assert sender.next_seq - start > 8 + 8  # past the hole by more than a window
    assert sender.next_seq - start <= 40  # but never past expected + max_window
    assert receiver.beyond_window == 0 and len(receiver.ooo) < 40
    p.settle()
    assert p.b.received() == [bytes([i]) * 1000 for i in range(60)]


def test_after_a_tail_loss_probe_the_rto_is_not_doubled() -> None:
    """The tail loss probe is not a timeout: the probe after it waits one RTO, not two
    (RFC 8985 7.3); only later expiries double it. At 19% loss a lost probe used to
    stall the stream for 2, 4 then 8 RTOs."""
    p = Pair()
    _connect(p)
    sender = p.a.endpoint._peers[B].sender
    p.a.endpoint.send(B, b"tail", now=p.now)
    p.transfer(p.a, drop=lambda i, d: True)
    times = []
    for _ in range(3):
        deadline = p.a.endpoint.get_timer()
        assert deadline is not None
        p.now = deadline
        p.a.endpoint.handle_timer(p.now)
        if p.outgoing(p.a):  # every probe lost too
            times.append(p.now)
    rto = sender.rtt.rto
    assert sender.probes == 3
    assert times[1] - times[0] == pytest.approx(rto)
    assert times[2] - times[1] == pytest.approx(2 * rto)


def test_a_probe_sends_its_packets_in_separate_datagrams() -> None:
    """The two oldest packets a probe resends travelled in one datagram: bundled again,
    one loss takes both and the probe is wasted. Each goes alone now."""
    p = Pair()
    _connect(p)
    sender = p.a.endpoint._peers[B].sender
    for i in range(4):
        p.a.endpoint.send(B, bytes([i]) * 100, now=p.now)
    first = p.outgoing(p.a)
    assert len(first) == 1  # four small messages, one datagram: lost
    sent, _ = _wait_for_output(p, 0.05)
    assert sender.probes == 1 and len(sent) == 2
    assert [len(decode_all([d])[0].fragments) for d in sent] == [1, 1]
    assert all(sender.unacked[seq].datagram_size < 300 for seq in sender.probed)  # as sent
    p.deliver(p.b, sent)
    p.settle()
    assert len(p.a.of(events.MessageDelivered)) == 4


def test_a_reordered_bundle_widens_the_loss_thresholds_one_step_not_one_per_fragment() -> None:
    """A datagram of many bundled messages overtaken by three later ones is declared
    lost, then turns up: every fragment in it proves a spurious loss, but it was one
    reordering, so the time threshold widens one step (RFC 8985: once per round trip)
    and detection goes by time alone (the packet threshold is dropped, as RFC 8985
    does once it has seen reordering). Widening per fragment took the time threshold
    to its 4 RTT cap at once on the loopback bench, and every later loss waited four
    round trips to be detected. The window's reduction for those losses is undone."""
    p = Pair()
    _connect(p)
    sender = p.a.endpoint._peers[B].sender
    for i in range(60):
        p.a.endpoint.send(B, bytes([65 + i % 26]) * 100, now=p.now)
    flight = p.outgoing(p.a)
    assert len(flight) >= 5
    bundled = 1 + len(decode_all(flight[:1])[0].bundle)
    assert bundled > 2
    window = sender.cc.window
    p.deliver(p.b, flight[1:])  # the first datagram is held up: the others overtake it
    p.now += 0.001
    p.transfer(p.b)  # A hears of the gap, three datagrams on: the first is "lost"
    assert sender.lost and sender.cc.window < window
    p.deliver(p.b, flight[:1])  # ... but it was only late
    p.tick(Config().max_ack_delay)
    p.transfer(p.b)  # acknowledged before its retransmission went out
    assert sender.spurious == bundled
    assert sender.time_threshold == pytest.approx(K_TIME_THRESHOLD * 1.25)
    assert sender.reorder_threshold > 1000  # none: by time alone
    assert sender.cc.window >= window  # (halved without the undo)
    p.settle()
    assert len(p.a.of(events.MessageDelivered)) == 60


def test_widened_loss_thresholds_narrow_again_after_calm_recoveries() -> None:
    """Reordering does not last for ever: each ``CALM_RECOVERIES`` loss recoveries with
    no spurious loss take half the time threshold's widening away (RFC 8985 resets
    its reordering window after 16), and the packet threshold comes back with the
    last of it, so real losses are found in 9/8 RTT once more."""
    p = Pair()
    _connect(p)
    sender = p.a.endpoint._peers[B].sender
    sender.reorder_threshold = 1 << 30  # as after a reordering
    sender.time_threshold = K_TIME_THRESHOLD * 1.25
    thresholds = []
    for _ in range(4 * CALM_RECOVERIES):
        for i in range(8):
            p.a.endpoint.send(B, bytes([65 + i]) * 1000, now=p.now)  # a datagram each
        p.transfer(p.a, drop=lambda i, d: i == 0)  # the first is really lost
        for _ in range(200):
            p.tick(0.0005)
            p.transfer(p.b)
            p.transfer(p.a)
            if not sender.has_outstanding():
                break
        assert not sender.has_outstanding()
        thresholds.append((sender.time_threshold, sender.reorder_threshold))
    assert sender.spurious == 0
    assert thresholds[CALM_RECOVERIES - 2][0] == K_TIME_THRESHOLD * 1.25
    assert K_TIME_THRESHOLD < thresholds[CALM_RECOVERIES][0] < K_TIME_THRESHOLD * 1.25
    assert thresholds[-1] == (K_TIME_THRESHOLD, K_PACKET_THRESHOLD)


def test_the_packet_threshold_returns_even_when_the_time_threshold_never_widened() -> None:
    """A spurious loss of a packet sent before the last widening drops the packet
    threshold without widening the time threshold again; calm recoveries must still
    bring the packet threshold back (it once waited for a time threshold already at
    its default, for ever)."""
    p = Pair()
    _connect(p)
    sender = p.a.endpoint._peers[B].sender
    sender.reorder_threshold = 1 << 30
    assert sender.time_threshold == K_TIME_THRESHOLD
    for _ in range(CALM_RECOVERIES):
        sender._recovered()
    assert sender.reorder_threshold == K_PACKET_THRESHOLD
