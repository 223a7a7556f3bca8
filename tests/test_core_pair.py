"""Deterministic tests of the sans-I/O core: two endpoints, a hand-driven link, virtual time."""

from __future__ import annotations

import itertools
import random

import pytest

from reliable import Config, Endpoint, errors, events, wire
from reliable.sender import PROBE_FLOOR
from reliable.wire import Kind

from .harness import A, B, Pair, decode_all


def test_one_message_is_delivered_with_a_receipt() -> None:
    p = Pair()
    p.connect()
    p.b.create_mailbox("in")
    ticket = p.a.endpoint.send(B, b"hello", now=p.now, msg_type=7, priority=3, mailbox="in")
    p.settle()
    (got,) = p.b.of(events.MessageReceived)
    assert (got.data, got.msg_type, got.priority, got.mailbox, got.peer) == (
        b"hello",
        7,
        3,
        "in",
        A,
    )
    (receipt,) = p.a.of(events.MessageDelivered)
    assert receipt.ticket == ticket and receipt.size == 5 and receipt.transmissions == 1
    assert receipt.incarnation == p.b.endpoint.incarnation


def test_messages_arrive_in_send_order() -> None:
    p = Pair()
    msgs = [bytes([i]) * (i * 37 % 3000) for i in range(200)]
    for m in msgs:
        p.a.endpoint.send(B, m, now=p.now)
    p.settle()
    assert p.b.received() == msgs
    assert len(p.a.of(events.MessageDelivered)) == 200


def test_large_message_is_fragmented_and_reassembled() -> None:
    p = Pair()
    data = random.Random(3).randbytes(300_000)
    p.a.endpoint.send(B, data, now=p.now)
    first = decode_all(p.outgoing(p.a))
    assert all(len(wire.encode(x)) <= 1200 for x in first)
    assert first[0].fragment is not None and first[0].fragment.count > 250
    p.deliver(p.b, [wire.encode(x) for x in first])
    p.settle()
    assert p.b.received() == [data]


def test_both_directions_at_once_piggyback_acks() -> None:
    p = Pair()
    for i in range(20):
        p.a.endpoint.send(B, b"a%d" % i, now=p.now)
        p.b.endpoint.send(A, b"b%d" % i, now=p.now)
    p.settle()
    assert p.b.received() == [b"a%d" % i for i in range(20)]
    assert p.a.received() == [b"b%d" % i for i in range(20)]


def test_a_gap_is_repaired_by_sack_before_any_timeout() -> None:
    p = Pair()
    p.connect()
    msgs = [(b"m%d" % i).ljust(1000, b".") for i in range(10)]  # a datagram each
    for m in msgs:
        p.a.endpoint.send(B, m, now=p.now)
    p.transfer(p.a, drop=lambda i, d: i == 0)  # the first datagram is lost
    ack = p.outgoing(p.b)
    (pkt,) = decode_all(ack)
    assert pkt.sacks and pkt.ack == pkt.sacks[0][0] - 1  # the gap is reported at once
    p.deliver(p.a, ack)
    retransmit = decode_all(p.outgoing(p.a))
    assert [x.fragment.seq for x in retransmit if x.fragment] == [pkt.ack]  # fast retransmit
    assert p.now < p.a.endpoint.config.min_rto
    p.deliver(p.b, [wire.encode(x) for x in retransmit])
    assert p.b.received() == msgs


def test_duplicates_are_delivered_once_and_counted() -> None:
    p = Pair()
    p.connect()
    p.a.endpoint.send(B, b"once", now=p.now)
    out = p.outgoing(p.a)
    p.deliver(p.b, out + out + out)
    assert p.b.received() == [b"once"]
    assert p.b.endpoint.stats().peers[0].duplicates == 2


def test_corrupt_datagrams_are_dropped_and_counted() -> None:
    p = Pair()
    p.a.endpoint.send(B, b"payload", now=p.now)
    d = p.outgoing(p.a)[0]  # the DATA (PINGs follow it at first contact)
    bad = bytearray(d)
    bad[-10] ^= 0x40
    p.deliver(p.b, [bytes(bad)])
    assert p.b.received() == []
    assert p.b.endpoint.dropped == {"malformed.checksum": 1}
    p.settle()  # the retransmission gets through
    assert p.b.received() == [b"payload"]


def _probe_times(p: Pair, count: int) -> list[float]:
    p.a.endpoint.send(B, b"x", now=p.now)
    p.outgoing(p.a)  # lost, and so is every retransmission
    times = []
    for _ in range(count):
        t = p.a.endpoint.get_timer()
        assert t is not None
        p.now = t
        p.a.endpoint.handle_timer(p.now)
        if p.outgoing(p.a):
            times.append(p.now)
    return times


def test_probe_timeout_backs_off_exponentially() -> None:
    p = Pair(config_a=Config(initial_rto=0.1, peer_timeout=30))
    times = _probe_times(p, 4)
    assert times[0] == pytest.approx(0.1)
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert gaps == pytest.approx([0.2, 0.4, 0.8])


def test_backoff_is_capped_so_several_probes_fit_in_peer_timeout() -> None:
    p = Pair(config_a=Config(initial_rto=0.1, peer_timeout=2.0))
    times = _probe_times(p, 6)
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert max(gaps) == pytest.approx(0.5)  # peer_timeout / 4


def test_karn_no_rtt_sample_from_a_retransmitted_packet() -> None:
    p = Pair()
    p.a.endpoint.send(B, b"x", now=p.now)
    p.outgoing(p.a)  # the original is lost
    p.now = p.a.endpoint.get_timer() or 0
    p.a.endpoint.handle_timer(p.now)
    p.transfer(p.a)
    p.now += 0.0001
    p.transfer(p.b)
    assert p.a.endpoint.stats().peers[0].srtt is None  # ambiguous: not sampled


def test_flow_control_closes_the_window_and_reopens_it() -> None:
    limit = 64 * 1024
    cfg = Config(receive_backlog=limit, inbox_bytes=limit, max_window=256)
    p = Pair(config_b=cfg, release=False)
    for _ in range(40):
        p.a.endpoint.send(B, b"z" * 8000, now=p.now)
    for _ in range(200):
        p.transfer(p.a)
        p.transfer(p.b)
        p.tick()
    (inbox,) = p.b.endpoint.stats().mailboxes
    # The inbox filled; arrivals parked until parking closed the window.
    assert inbox.bytes <= limit and limit <= inbox.parked_bytes <= limit + 256 * 1200
    assert inbox.messages + inbox.parked < 40
    assert p.a.endpoint.stats().peers[0].peer_window == 0
    delivered = p.a.of(events.MessageDelivered)
    assert len(delivered) == inbox.messages  # the parked ones wait for room
    p.release = True
    p.deliver(p.b, [])  # the application consumes what it has
    p.settle()
    assert len(p.b.of(events.MessageReceived)) == 40 and p.b.released == 40
    delivered = p.a.of(events.MessageDelivered)
    assert len(delivered) == 40 and sum(d.deferred for d in delivered) >= 8


def test_receiver_rejects_a_message_over_its_limit() -> None:
    p = Pair(config_b=Config(max_message_size=10_000, send_buffer=64 * 1024 * 1024))
    big = p.a.endpoint.send(B, b"x" * 50_000, now=p.now)
    small = p.a.endpoint.send(B, b"fits", now=p.now)
    p.settle()
    failed = p.a.of(events.MessageFailed)
    assert [f.ticket for f in failed] == [big]
    assert isinstance(failed[0].error, errors.MessageRejected)
    assert "max_message_size" in str(failed[0].error)
    assert [e.ticket for e in p.a.of(events.MessageDelivered)] == [small]
    assert p.b.received() == [b"fits"]


def test_send_timeout_abandons_and_later_messages_still_flow() -> None:
    p = Pair()
    doomed = p.a.endpoint.send(B, b"late" * 1000, now=p.now, timeout=0.5)
    for _ in range(5):
        p.outgoing(p.a)  # everything for 0.5 s is lost
        p.now += 0.1
        p.a.endpoint.handle_timer(p.now)
    p.now += 0.1
    p.a.endpoint.handle_timer(p.now)
    (failed,) = p.a.of(events.MessageFailed)
    assert failed.ticket == doomed and isinstance(failed.error, errors.SendTimeout)
    p.a.endpoint.send(B, b"after", now=p.now)
    p.settle()
    assert p.b.received() == [b"after"]  # the receiver skipped the abandoned sequence numbers


def test_unreachable_peer_fails_pending_sends_with_its_name() -> None:
    p = Pair(config_a=Config(peer_timeout=2.0))
    t1 = p.a.endpoint.send(B, b"one", now=p.now)
    t2 = p.a.endpoint.send(B, b"two" * 2000, now=p.now)
    while not p.a.of(events.PeerUnreachable):
        p.outgoing(p.a)  # B is gone
        t = p.a.endpoint.get_timer()
        assert t is not None
        p.now = t
        p.a.endpoint.handle_timer(p.now)
        assert p.now < 3.0
    assert 2.0 <= p.now < 2.1
    failed = p.a.of(events.MessageFailed)
    assert {f.ticket for f in failed} == {t1, t2}
    assert all(isinstance(f.error, errors.PeerUnreachable) for f in failed)
    assert "10.0.0.2:2000" in str(failed[0].error)
    # No more probing once declared: the one timer left drops the idle session at last.
    p.outgoing(p.a)
    assert p.a.endpoint.quiet()
    assert p.a.endpoint.get_timer() == Config().idle_timeout
    p.now = Config().idle_timeout
    p.a.endpoint.handle_timer(p.now)
    assert p.a.endpoint.peers() == [] and p.a.endpoint.get_timer() is None
    (dropped,) = p.a.of(events.SessionDropped)
    assert (dropped.peer, dropped.reason) == (B, "idle")


def test_watching_a_silent_peer_probes_it_then_declares_it_unreachable() -> None:
    p = Pair(config_a=Config(peer_timeout=1.0))
    p.a.endpoint.watch(B, p.now)
    pings = 0
    while not p.a.of(events.PeerUnreachable):
        pings += sum(1 for x in decode_all(p.outgoing(p.a)) if x.kind == Kind.PING)
        p.now = p.a.endpoint.get_timer() or p.now + 1
        p.a.endpoint.handle_timer(p.now)
    assert pings >= 3


def test_watching_a_live_peer_keeps_it_alive() -> None:
    p = Pair(config_a=Config(peer_timeout=1.0))
    p.a.endpoint.watch(B, p.now)
    for _ in range(50):
        p.transfer(p.a)
        p.transfer(p.b)
        p.tick(0.1)
    assert p.a.of(events.PeerUnreachable) == []


def test_peer_restart_is_detected_and_nothing_is_silently_lost() -> None:
    p = Pair()
    p.a.endpoint.send(B, b"before", now=p.now)
    p.settle()
    old = p.b.endpoint.incarnation
    inflight = p.a.endpoint.send(B, b"in flight", now=p.now)
    p.outgoing(p.a)  # transmitted, then B crashes before it arrives
    queued = p.a.endpoint.send(B, b"queued", now=p.now)
    p.restart_b()
    # B's new life speaks first: A must see a new incarnation, not duplicates.
    p.b.endpoint.send(A, b"hello from the new B", now=p.now)
    p.transfer(p.b)
    p.settle()
    (restart,) = p.a.of(events.PeerRestarted)
    assert restart.old_incarnation == old and restart.new_incarnation == p.b.endpoint.incarnation
    failed = {f.ticket: f.error for f in p.a.of(events.MessageFailed)}
    assert set(failed) == {inflight}
    assert isinstance(failed[inflight], errors.PeerRestarted)
    assert [e.ticket for e in p.a.of(events.MessageDelivered)][-1] == queued
    assert p.b.received() == [b"queued"]
    assert p.a.received() == [b"hello from the new B"]


def test_restarted_peer_answers_old_life_traffic_with_reset() -> None:
    p = Pair()
    p.a.endpoint.send(B, b"first", now=p.now)
    p.settle()
    p.restart_b()
    second = p.a.endpoint.send(B, b"second", now=p.now)
    p.transfer(p.a)  # addressed to B's old incarnation
    assert p.b.endpoint.dropped == {"stale_incarnation": 1}
    reset = p.outgoing(p.b)
    assert [x.kind for x in decode_all(reset)] == [Kind.RESET]
    p.deliver(p.a, reset)
    (restart,) = p.a.of(events.PeerRestarted)
    assert restart.new_incarnation == p.b.endpoint.incarnation
    (failed,) = p.a.of(events.MessageFailed)
    assert failed.ticket == second and isinstance(failed.error, errors.PeerRestarted)
    p.a.endpoint.send(B, b"third", now=p.now)
    p.settle()
    assert p.b.received() == [b"third"]


def test_reset_is_rate_limited_and_needs_our_incarnation() -> None:
    p = Pair()
    p.a.endpoint.send(B, b"first", now=p.now)
    p.settle()
    p.restart_b()
    for _ in range(5):
        p.a.endpoint.send(B, b"again", now=p.now)
        p.transfer(p.a)
    assert len(p.outgoing(p.b)) == 1  # one RESET, not one per stale datagram
    forged = wire.encode(wire.Packet(kind=Kind.RESET, src_incarnation=12345, dst_incarnation=999))
    p.deliver(p.a, [forged])  # a RESET that does not name A's incarnation
    assert p.a.of(events.PeerRestarted) == []


def test_late_datagrams_from_a_dead_incarnation_are_rejected() -> None:
    p = Pair()
    p.a.endpoint.send(B, b"x", now=p.now)
    p.settle()
    p.b.endpoint.send(A, b"old life", now=p.now)
    stale = p.outgoing(p.b)  # delayed in the network
    p.restart_b()
    p.b.endpoint.send(A, b"new life", now=p.now)
    p.settle()
    p.deliver(p.a, stale)
    assert p.a.endpoint.dropped.get("dead_incarnation") == 1
    assert p.a.received() == [b"new life"]


def test_close_flushes_then_tells_the_peer() -> None:
    p = Pair()
    ticket = p.a.endpoint.send(B, b"last words", now=p.now)
    p.b.endpoint.send(A, b"to a closing node", now=p.now)
    p.a.endpoint.close(p.now, timeout=1.0)
    with pytest.raises(errors.NodeClosed):
        p.a.endpoint.send(B, b"too late", now=p.now)
    p.settle()
    assert [e.ticket for e in p.a.of(events.MessageDelivered)] == [ticket]
    assert p.a.of(events.Closed)
    (closed,) = p.b.of(events.PeerClosed)
    assert closed.peer == A
    assert p.b.received() == [b"last words"]


def test_close_deadline_fails_what_could_not_be_flushed() -> None:
    p = Pair()
    ticket = p.a.endpoint.send(B, b"never acked", now=p.now)
    p.a.endpoint.close(p.now, timeout=0.5)
    while not p.a.of(events.Closed):
        p.outgoing(p.a)
        p.now = p.a.endpoint.get_timer() or p.now + 0.1
        p.a.endpoint.handle_timer(p.now)
    (failed,) = p.a.of(events.MessageFailed)
    assert failed.ticket == ticket and isinstance(failed.error, errors.SendAborted)
    assert p.now == pytest.approx(0.5)


def test_pending_sends_to_a_closing_peer_fail_at_once() -> None:
    p = Pair()
    p.a.endpoint.send(B, b"hi", now=p.now)
    p.settle()
    p.b.endpoint.close(p.now, timeout=1.0)
    t = p.a.endpoint.send(B, b"in flight", now=p.now)
    p.outgoing(p.a)  # lost
    p.transfer(p.b)  # CLOSE
    (failed,) = p.a.of(events.MessageFailed)
    assert failed.ticket == t and isinstance(failed.error, errors.PeerClosed)


class _WrapRng(random.Random):
    """Puts every initial sequence number just below 2**32 so sessions wrap at once."""

    def getrandbits(self, k: int) -> int:
        return 2**32 - 20 if k == 32 else super().getrandbits(k)


def test_sequence_numbers_wrap_safely() -> None:
    p = Pair()
    p.a.endpoint = Endpoint(Config(), rng=_WrapRng(5), arrival_events=True)
    msgs = [b"w%d" % i * 300 for i in range(100)]
    for m in msgs:
        p.a.endpoint.send(B, m, now=p.now)
    p.transfer(p.a, drop=lambda i, d: i % 7 == 3)  # losses on both sides of the wrap
    p.settle()
    assert p.b.received() == msgs


def test_acks_for_data_never_sent_are_counted_not_trusted() -> None:
    p = Pair()
    p.a.endpoint.send(B, b"x", now=p.now)
    p.settle()
    inc_b, inc_a = p.b.endpoint.incarnation, p.a.endpoint.incarnation
    forged = wire.encode(
        wire.Packet(
            kind=Kind.ACK,
            flags=wire.Flag.ACK,
            src_incarnation=inc_b,
            dst_incarnation=inc_a,
            ack=(p.a.endpoint._peers[B].sender.next_seq + 1000) & 0xFFFFFFFF,
            window=10,
        )
    )
    p.deliver(p.a, [forged])
    assert p.a.endpoint._peers[B].bogus_acks == 1
    t = p.a.endpoint.send(B, b"still works", now=p.now)
    p.settle()
    assert p.a.of(events.MessageDelivered)[-1].ticket == t


def test_local_misuse_fails_before_anything_is_queued() -> None:
    ep = Endpoint(Config(max_message_size=1000), arrival_events=True)
    with pytest.raises(errors.MessageTooLarge, match="max_message_size"):
        ep.send(B, b"x" * 1001, now=0)
    with pytest.raises(errors.UsageError, match="priority"):
        ep.send(B, b"x", now=0, priority=70_000)
    with pytest.raises(errors.UsageError, match="msg_type"):
        ep.send(B, b"x", now=0, msg_type=2**40)
    with pytest.raises(errors.UsageError, match="255 bytes"):
        ep.send(B, b"x", now=0, mailbox="m" * 256)
    with pytest.raises(errors.UsageError, match="timeout"):
        ep.send(B, b"x", now=0, timeout=-1)
    assert ep.peers() == [] and ep.datagrams_to_send(0) == []


def test_send_buffer_is_bounded() -> None:
    ep = Endpoint(Config(max_message_size=1000, send_buffer=3000), arrival_events=True)
    for _ in range(3):
        ep.send(B, b"x" * 1000, now=0)
    with pytest.raises(errors.SendBufferFull):
        ep.send(B, b"y", now=0)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_datagram_size", 100),
        ("max_datagram_size", 70_000),
        ("min_rto", -1.0),
        ("peer_timeout", float("inf")),
        ("max_window", 100_000),
    ],
)
def test_bad_config_says_what_to_change(field: str, value: float) -> None:
    with pytest.raises(errors.UsageError, match=f"Config.{field}"):
        Config(**{field: value})


def test_close_repeats_the_final_acks_so_delivered_messages_do_not_fail() -> None:
    p = Pair()
    p.connect()
    ticket = p.a.endpoint.send(B, b"got it, but the ack was lost", now=p.now)
    p.transfer(p.a)
    p.outgoing(p.b)  # B's acknowledgement is lost
    assert p.b.received() == [b"got it, but the ack was lost"]
    p.b.endpoint.close(p.now, timeout=1.0)
    p.transfer(p.b)  # the CLOSE arrives and carries B's acknowledgement
    assert [e.ticket for e in p.a.of(events.MessageDelivered)] == [ticket]
    assert p.a.of(events.MessageFailed) == []
    assert p.a.of(events.PeerClosed)


def test_jitter_without_loss_widens_the_loss_thresholds_instead_of_retransmitting() -> None:
    """Reordering comparable to the RTT must not look like loss for long (RFC 8985's lesson).

    Nothing is lost, so every retransmission is spurious. The first ones are
    unavoidable (the thresholds start at RFC 8985's 9/8 RTT); once they have
    widened, retransmissions must stop: the second half of the transfer may
    retransmit at most 1% of its packets. (Over seeds 0-15 the whole run
    retransmits 5-11%, all but 0-2 packets of it in the first half.)
    """
    from netem import Impairment, SimNetwork

    net = SimNetwork(seed=8, default=Impairment(delay=0.001, jitter=0.001))
    a, b = (
        Endpoint(rng=random.Random(1), arrival_events=True),
        Endpoint(rng=random.Random(2), arrival_events=True),
    )
    net.add_host(A, a)
    net.add_host(B, b)
    for i in range(2000):
        a.send(B, b"%d" % i * 100, now=0.0)
    net.flush(A)
    samples: list[tuple[int, int]] = []  # (packets sent, retransmissions) every 5 ms
    for step in range(1, 4001):  # (until 20 s at most, before the idle session expires)
        net.run(until=step * 0.005)
        sender = a._peers[B].sender
        samples.append((sender.packets_sent, sender.retransmissions))
        if not sender.has_outstanding():
            break
    delivered = [e for e in iter(a.next_event, None) if isinstance(e, events.MessageDelivered)]
    assert len(delivered) == 2000
    assert sender.spurious > 0 and sender.time_threshold > 9 / 8
    total, retransmitted = samples[-1]
    half_sent, half_retransmitted = next(s for s in samples if s[0] >= total / 2)
    assert retransmitted - half_retransmitted <= 0.01 * (total - half_sent)


def test_a_long_silence_keeps_being_probed_every_second_while_data_waits() -> None:
    """Retransmission backoff spaces resends up to peer_timeout/4 apart; PINGs fill the
    gaps, so a lossy but live peer gets many chances to answer before the timeout."""
    p = Pair(Config(peer_timeout=30.0), Config(peer_timeout=30.0))
    p.connect()
    ticket = p.a.endpoint.send(B, b"patience", now=p.now)
    kinds: list[wire.Kind] = []
    start = p.now
    while p.now < start + 20.0:  # everything is lost, both ways, for 20 s
        kinds += [wire.decode(d).kind for d in p.outgoing(p.a)]
        p.outgoing(p.b)
        p.tick(0.05)
    assert kinds.count(wire.Kind.PING) >= 12  # about one a second once backoff passes 1 s
    assert kinds.count(wire.Kind.DATA) <= 15  # the retransmissions themselves back off
    p.settle()  # the link heals
    (receipt,) = p.a.of(events.MessageDelivered)
    assert receipt.ticket == ticket and not p.a.of(events.MessageFailed)


def test_the_first_flight_is_timed_from_the_challenge() -> None:
    """Karn's rule rejects every sample of a resent first flight; the CHALLENGE times it,
    so a loss right after first contact waits about an RTT, not initial_rto (1 s)."""
    p = Pair()
    p.a.endpoint.send(B, b"first", now=p.now)
    first = p.outgoing(p.a)
    p.now += 0.004  # the round trip
    p.deliver(p.b, first)  # b keeps no state: it answers with a CHALLENGE
    p.transfer(p.b)
    rtt = p.a.endpoint._peers[B].rtt
    assert rtt.samples == 1 and rtt.srtt == pytest.approx(0.004)
    assert rtt.rto < 0.1


def test_an_ack_that_may_answer_a_probe_is_not_timed() -> None:
    """Data whose acks were lost is acknowledged again only after a probe timeout; that
    sample would time the timeout (seconds at startup), not the path. Seen in the bench
    at 10% loss: a 2 s first sample made every later loss wait 6 s."""
    p = Pair()
    p.connect()
    rtt = p.a.endpoint._peers[B].rtt
    before = rtt.samples
    for name in b"wxyz":
        p.a.endpoint.send(B, bytes([name]) * 1000, now=p.now)  # a datagram each
    p.transfer(p.a, drop=lambda i, d: i < 2)  # w and x are lost; y and z arrive
    p.transfer(p.b, drop=lambda i, d: True)  # and their acks are lost
    while not p.a.endpoint._peers[B].sender.backoff:
        p.tick(0.01)  # the probe timeout fires and resends w and x ...
    p.transfer(p.a, drop=lambda i, d: True)  # ... which are lost again
    p.now += 0.5
    p.b.endpoint.send(A, b"reply", now=p.now)  # its DATA acknowledges y and z at last
    p.transfer(p.b)
    assert rtt.samples == before  # y and z were sent before the probe: not timed
    p.settle()
    assert len(p.a.of(events.MessageDelivered)) == 4


def test_loopback_peers_get_large_datagrams_but_at_least_four_per_window() -> None:
    """64 KiB datagrams to a loopback peer, except that a window always spans four or
    more datagrams: with two, one loss leaves loss detection nothing to compare."""
    a = Endpoint(rng=random.Random(1), arrival_events=True)
    lo = ("127.0.0.1", 9)
    a.send(lo, b"x" * 1_000_000, now=0.0)
    session = a._peers[lo]
    session.heard = True  # past first contact (see tests/test_recovery_pair.py for before)
    first = [d for d, _ in a.datagrams_to_send(0.0)]
    assert session.datagram_size == 65000 and session.cc.window == 10 * 65000
    assert max(len(d) for d in first) <= 65000 and len(first) >= 10
    session.cc.cwnd = 2 * 65000.0  # after losses: the floor of two datagrams' worth
    a.send(lo, b"y" * 1_000_000, now=0.0)  # cut to fit four datagrams in that window
    small = [m for m in session.sender.queue if m.data[:1] == b"y"]
    assert small[0].fragment_size <= 2 * 65000 // 4
    small_msgs = Endpoint(rng=random.Random(2), arrival_events=True)
    for _ in range(200):
        small_msgs.send(lo, b"z" * 1000, now=0.0)
    small_msgs._peers[lo].cc.cwnd = 2 * 65000.0
    small_msgs._peers[lo].heard = True
    bundles = [d for d, _ in small_msgs.datagrams_to_send(0.0)]
    assert len(bundles) >= 4 and max(len(d) for d in bundles) <= 2 * 65000 // 4
    elsewhere = Endpoint(rng=random.Random(1), arrival_events=True)
    elsewhere.send(B, b"x" * 100_000, now=0.0)
    assert max(len(d) for d, _ in elsewhere.datagrams_to_send(0.0)) <= 1200


def test_the_first_probe_is_a_tail_loss_probe_at_two_rtts() -> None:
    """A lost burst tail is probed after two smoothed RTTs (RFC 8985), not a whole RTO:
    at 10% loss on loopback, RTO-long stalls took half the time. Once data acks have
    timed the path, min_rto (10 ms) is no floor: only PROBE_FLOOR (2 ms) is; the bench
    saw 60 probes in 3 s wait 10 ms each against a 3-5 ms smoothed RTT."""
    for min_rto in (0.002, 0.01):
        config = Config(min_rto=min_rto)
        p = Pair(config, config)
        p.connect()
        sender = p.a.endpoint._peers[B].sender
        rtt = sender.rtt
        assert rtt.srtt is not None and 2 * rtt.srtt < rtt.rto and sender.data_timed
        p.a.endpoint.send(B, b"tail", now=p.now)
        p.transfer(p.a, drop=lambda i, d: True)
        sent, waited = [], 0.0
        while not sent:
            p.tick(0.0001)
            waited += 0.0001
            sent = p.outgoing(p.a)
        expected = min(rtt.rto, max(2 * rtt.srtt, rtt.latest, PROBE_FLOOR))
        assert expected <= waited + 1e-9 < expected + 0.0002
        assert waited < min(rtt.rto, 0.01)  # the tail loss probe, well before the RTO
        p.deliver(p.b, sent)
        p.settle()
        assert len(p.a.of(events.MessageDelivered)) == 1


def test_the_window_fits_the_receivers_socket_buffer_at_the_peers_fragment_size() -> None:
    """The kernel drops what overflows a socket's receive buffer before the protocol
    sees it; an adapter that says how big it is gets windows that fit half of it."""
    p = Pair()
    p.b.endpoint.set_receive_buffer(200_000)
    data = random.Random(5).randbytes(300_000)
    p.a.endpoint.send(B, data, now=p.now)
    p.settle()
    assert p.b.received() == [data]
    fragment = p.a.endpoint._peers[B].sender.peer_window
    record = wire.data_budget(1200)  # full fragments of 1200-byte datagrams
    assert fragment == 100_000 // record
    p.b.endpoint.set_receive_buffer(None)
    p.a.endpoint.send(B, b"again", now=p.now)
    p.settle()
    assert p.a.endpoint._peers[B].sender.peer_window == 4096  # max_window: no bound


def test_first_contact_resend_is_not_a_retransmission() -> None:
    """The peer drops our first flight unread while it validates our address (a
    CHALLENGE); sending it again is first contact, not loss: a clean link reports
    0 retransmissions, in the receipt and in the statistics."""
    p = Pair()
    p.a.endpoint.send(B, b"x" * 5000, now=p.now)
    p.a.endpoint.send(B, b"hello", now=p.now)
    p.settle()
    delivered = p.a.of(events.MessageDelivered)
    assert len(delivered) == 2
    assert [d.transmissions for d in delivered] == [d.fragments for d in delivered]
    assert p.a.endpoint.stats().retransmissions == 0
    # a real loss after that still counts
    p.a.endpoint.send(B, b"again", now=p.now)
    p.transfer(p.a, drop=lambda i, d: True)
    p.settle()
    assert p.a.endpoint.stats().retransmissions == 1
    assert p.a.of(events.MessageDelivered)[-1].transmissions == 2


def test_the_shared_no_news_ack_outcome_is_never_changed() -> None:
    """Acks that complete nothing return one shared outcome (sender._NO_NEWS): a round
    trip's piggybacked repeats, older acks overtaken in the network. Whoever reads it must
    find it empty however many went by, and the real receipts must still come."""
    from reliable import sender

    p = Pair()
    for i in range(30):  # request/reply: each DATA repeats the ack state the ACK before it had
        p.a.endpoint.send(B, b"q%d" % i, now=p.now)
        p.settle()
        p.b.endpoint.send(A, b"r%d" % i, now=p.now)
        p.settle()
    shared = sender._NO_NEWS
    assert (shared.newly_acked, shared.completed, shared.bogus) == (0, [], False)
    assert len(p.a.of(events.MessageDelivered)) == len(p.b.of(events.MessageDelivered)) == 30
