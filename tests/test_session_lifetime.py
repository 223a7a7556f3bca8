"""Sessions do not outlive their use: dead peers' memory comes back, live peers get in.

Deterministic, on the simulated network (virtual time). Each test names the
failure it guards against; each failed before sessions could expire.
"""

from __future__ import annotations

import random

from netem import SimNetwork
from reliable import Config, Endpoint, errors, events
from reliable.stats import NodeStats
from reliable.wire import Flag, Kind, Packet, decode, encode

from .harness import A, B, Pair

C = ("10.0.0.3", 3000)

# Small enough to fill quickly: six partial messages of 390 kB overflow 1 MB of receive memory.
SMALL = Config(max_message_size=400_000, receive_memory=1_000_000, send_buffer=1_000_000)


def _events(ep: Endpoint) -> list[events.Event]:
    return list(iter(ep.next_event, None))


def test_a_live_peer_gets_through_after_any_number_of_dead_partial_senders() -> None:
    """Senders killed in the middle of big messages once held the receiver's memory for good."""
    net = SimNetwork(seed=3)
    receiver = Endpoint(SMALL, rng=random.Random(1), arrival_events=True)
    net.add_host(B, receiver)
    dead = [(f"10.0.1.{i}", 4000 + i) for i in range(6)]
    for i, addr in enumerate(dead):
        sender = Endpoint(SMALL, rng=random.Random(10 + i), arrival_events=True)
        net.add_host(addr, sender)
        sender.send(B, bytes(390_000), now=0.0)
        net.flush(addr)
        net.call_at(0.004 + 0.001 * i, lambda a=addr: net.remove_host(a))  # SIGKILL mid-message
    net.run(until=0.05)
    held = receiver.stats().receive_bytes
    assert held > SMALL.receive_memory // 2  # the dead hold most of the memory

    live = Endpoint(SMALL, rng=random.Random(99), arrival_events=True)
    net.add_host(A, live)
    ticket = live.send(B, b"L" * 300_000, now=net.now)
    net.flush(A)
    net.run(until=net.now + 30.0)

    outcomes = [e for e in _events(live) if isinstance(e, events.MessageDelivered)]
    assert [e.ticket for e in outcomes] == [ticket]
    got = [e for e in _events(receiver) if isinstance(e, events.MessageReceived)]
    assert [len(e.data) for e in got] == [300_000]
    stats = receiver.stats()
    # Those holding memory are dropped as unreachable; the rest held nothing (reorder
    # buffers leave one message's room free for the reservation a stream waits for,
    # so some dead senders' fragments were shed) and expire idle.
    assert stats.sessions_dropped.get("unreachable", 0) >= 2
    assert sum(stats.sessions_dropped.values()) == len(dead)
    assert set(stats.sessions_dropped) <= {"unreachable", "idle"}
    assert {p.address for p in stats.peers} <= {A}
    assert stats.receive_bytes == 0


def test_a_dead_senders_reservation_is_released_and_counted() -> None:
    p = Pair(SMALL, SMALL)
    p.connect()
    p.a.endpoint.send(B, bytes(200_000), now=p.now)
    p.deliver(p.b, p.outgoing(p.a))  # the first flight arrives; then A vanishes
    assert p.b.endpoint.stats().receive_bytes >= 200_000
    while not p.b.of(events.SessionDropped):
        assert p.now < 10.0
        p.outgoing(p.b)  # B's probes go nowhere
        p.now = p.b.endpoint.get_timer() or p.now + 0.1
        p.b.endpoint.handle_timer(p.now)
    assert SMALL.peer_timeout <= p.now < SMALL.peer_timeout + 1.0
    (dropped,) = p.b.of(events.SessionDropped)
    assert dropped.peer == A and dropped.reason == "unreachable" and dropped.released >= 200_000
    assert p.b.endpoint.stats().receive_bytes == 0 and p.b.endpoint.peers() == []


def test_a_full_peer_table_makes_room_by_evicting_the_least_recently_heard_idle_session() -> None:
    """4,096 peers that spoke once and went silent locked every new peer out."""
    config = Config(max_peers=2)
    net = SimNetwork(seed=1)
    hub = Endpoint(config, rng=random.Random(1), arrival_events=True)
    net.add_host(B, hub)
    spokes = {}
    for i, addr in enumerate([A, C, ("10.0.0.4", 4000)]):
        spokes[addr] = Endpoint(rng=random.Random(20 + i), arrival_events=True)
        net.add_host(addr, spokes[addr])
    for addr in spokes:  # one after another, each then silent
        spokes[addr].send(B, b"hello from %r" % (addr,), now=net.now)
        net.flush(addr)
        net.run(until=net.now + 1.0)
    received = [e for e in _events(hub) if isinstance(e, events.MessageReceived)]
    assert [e.peer for e in received] == [A, C, ("10.0.0.4", 4000)]
    assert hub.stats().sessions_dropped == {"evicted": 1}
    assert set(hub.peers()) == {C, ("10.0.0.4", 4000)}  # A was heard from first

    # A speaks again: it resumes where it was, nothing twice, and C makes way for it.
    spokes[A].send(B, b"A again", now=net.now)
    net.flush(A)
    net.run(until=net.now + 1.0)
    again = [e.data for e in _events(hub) if isinstance(e, events.MessageReceived)]
    assert again == [b"A again"]
    assert hub.stats().sessions_dropped == {"evicted": 2}
    delivered = [e for e in _events(spokes[A]) if isinstance(e, events.MessageDelivered)]
    assert len(delivered) == 2


def test_idle_sessions_expire_and_resume_without_a_duplicate() -> None:
    """An ack lost just before the session expires: the retransmission is no second delivery."""
    config = Config(idle_timeout=2.0)
    p = Pair(config, config)
    p.connect()
    p.a.endpoint.send(B, b"once", now=p.now)
    p.deliver(p.b, p.outgoing(p.a))
    assert p.b.received() == [b"once"]
    for _ in range(3):
        p.tick(0.01)
        p.outgoing(p.b)  # B's acks are lost
    # A retransmits into the void until B's idle session expires.
    p.now = 2.5
    p.b.endpoint.handle_timer(p.now)
    assert p.b.endpoint.peers() == []
    assert p.b.of(events.SessionDropped)[0].reason == "idle"
    p.settle()  # the link works again: A's retransmission reaches a resumed session
    assert p.b.received() == [b"once"]
    assert p.b.endpoint.stats().duplicates >= 1
    assert [type(e) for e in p.a.of(events.MessageDelivered)] == [events.MessageDelivered]


def test_a_peer_that_comes_back_after_its_data_was_dropped_is_told_and_loses_nothing_silently() -> (
    None
):
    """B dropped fragments it had selectively acknowledged; A would never resend them and
    would have counted the message delivered once B's cumulative ack passed it."""
    config_b = Config(peer_timeout=1.0)
    config_a = Config(peer_timeout=60.0)  # A keeps trying long after B gave up on it
    p = Pair(config_a, config_b)
    p.connect()
    t1 = p.a.endpoint.send(B, bytes(range(256)) * 40, now=p.now)  # 9 fragments
    _lost, *rest = p.outgoing(p.a)
    p.deliver(p.b, rest)  # the first fragment is lost; the others are held out of order
    p.deliver(p.a, p.outgoing(p.b))  # ... and selectively acknowledged
    assert p.b.endpoint.stats().receive_bytes > 0
    # A partition: B hears nothing, declares A unreachable, drops the session and what it held.
    while not p.b.of(events.SessionDropped):
        assert p.now < 5.0
        p.outgoing(p.a)
        p.outgoing(p.b)
        p.tick(0.05)
    assert p.b.endpoint.stats().receive_bytes == 0
    # The partition heals. A's retransmissions meet a fenced session: B answers DROPPED.
    t2 = p.a.endpoint.send(B, b"after", now=p.now)
    p.settle()
    failed = {e.ticket: e.error for e in p.a.of(events.MessageFailed)}
    assert isinstance(failed[t1], errors.PeerDroppedSession)
    assert [e.ticket for e in p.a.of(events.MessageDelivered)] == [t2]
    assert p.b.received() == [b"after"]


def test_a_dropped_notice_is_idempotent() -> None:
    """A DROPPED that arrives twice must not take messages sent after the first."""
    p = Pair(Config(peer_timeout=60.0), Config(peer_timeout=1.0))
    p.connect()
    p.a.endpoint.send(B, bytes(10_000), now=p.now)
    _, *rest = p.outgoing(p.a)
    p.deliver(p.b, rest)
    while not p.b.of(events.SessionDropped):
        p.outgoing(p.a)
        p.outgoing(p.b)
        p.tick(0.05)
    notices: list[bytes] = []
    while not notices:  # A's retransmissions reach the fenced session, which answers
        assert p.now < 5.0
        p.deliver(p.b, p.outgoing(p.a))
        out = p.outgoing(p.b)  # (first a CHALLENGE: B validates A's address again)
        notices = [d for d in out if decode(d).kind == Kind.DROPPED]
        p.deliver(p.a, [d for d in out if d not in notices])
        p.tick(0.05)
    p.deliver(p.a, notices)
    later = p.a.endpoint.send(B, b"later", now=p.now)
    p.deliver(p.b, p.outgoing(p.a))
    p.deliver(p.a, notices)  # a copy of the same notice, late
    p.settle()
    assert later in {e.ticket for e in p.a.of(events.MessageDelivered)}
    assert b"later" in p.b.received()


def test_one_peer_cannot_hold_more_than_its_share_out_of_order() -> None:
    """Fragments far ahead of a gap could take the whole node's receive memory."""
    config = Config(receive_memory=8_000_000, max_message_size=1_000_000)
    share = config.peer_receive_share
    assert share == 2_000_000
    p = Pair(Config(), config)
    p.connect()
    for _ in range(8):
        p.a.endpoint.send(B, bytes(900_000), now=p.now)
    hole = None
    for _ in range(3000):  # one fragment is lost every time it is sent: a gap that never fills
        out = []
        for d in p.outgoing(p.a):
            seqs = {f.seq for f in decode(d).fragments}
            hole = min(seqs) if hole is None else hole
            if hole not in seqs:
                out.append(d)
        p.deliver(p.b, out)
        p.deliver(p.a, p.outgoing(p.b))
        p.tick(0.001)
    stats = p.b.endpoint.stats()
    assert share // 2 < stats.receive_bytes <= share
    assert stats.peers[0].shed > 0


def test_sessions_dropped_show_in_stats_and_survive_a_round_trip_through_json() -> None:
    p = Pair(Config(idle_timeout=1.0), Config(idle_timeout=1.0))
    p.connect()
    p.settle(until=p.now + 2.0)
    stats = p.a.endpoint.stats()
    assert stats.sessions_dropped == {"idle": 1}
    assert NodeStats.from_dict(stats.as_dict()).sessions_dropped == {"idle": 1}


def test_forged_acks_are_counted_in_peer_stats_and_node_drops() -> None:
    """They were counted inside the session and shown nowhere."""
    p = Pair()
    p.connect()
    p.a.endpoint.send(B, b"x", now=p.now)
    (data,) = p.outgoing(p.a)
    sent = decode(data).fragment
    assert sent is not None
    forged = Packet(
        kind=Kind.ACK,
        flags=int(Flag.ACK),
        src_incarnation=p.b.endpoint.incarnation,
        dst_incarnation=p.a.endpoint.incarnation,
        ack=(sent.seq + 1000) & 0xFFFFFFFF,  # acknowledges what was never sent
    )
    p.a.endpoint.receive_datagram(encode(forged), B, p.now)
    stats = p.a.endpoint.stats()
    assert stats.peers[0].forged_acks == 1
    assert stats.dropped.get("forged_ack") == 1


WAITS = Config(wait_for_peer=True)


def test_a_send_waits_for_a_peer_that_has_not_started_yet() -> None:
    """A producer started before its consumer failed after peer_timeout (5 s)."""
    p = Pair(WAITS)
    ticket = p.a.endpoint.send(B, b"early", now=p.now, timeout=20.0)
    untimed = p.a.endpoint.send(B, b"no timeout", now=p.now)
    while p.now < 12.0:  # nobody listens at B yet: everything A sends vanishes
        p.outgoing(p.a)
        p.tick(0.05)
    assert not p.a.of(events.MessageFailed)
    p.settle()  # B is up now
    assert [e.ticket for e in p.a.of(events.MessageDelivered)] == [ticket, untimed]
    assert p.b.received() == [b"early", b"no timeout"]


def test_waiting_for_first_contact_ends_at_the_sends_own_timeout() -> None:
    p = Pair(WAITS)
    ticket = p.a.endpoint.send(B, b"nobody", now=p.now, timeout=8.0)
    while not p.a.of(events.MessageFailed):
        assert p.now < 9.0
        p.outgoing(p.a)
        p.tick(0.05)
    (failed,) = p.a.of(events.MessageFailed)
    assert failed.ticket == ticket and isinstance(failed.error, errors.SendTimeout)
    assert 8.0 <= p.now < 8.1


def test_a_refusal_from_the_os_is_ridden_out_while_waiting_for_first_contact() -> None:
    p = Pair(WAITS)
    p.a.endpoint.send(B, b"early", now=p.now, timeout=20.0)
    p.outgoing(p.a)
    p.a.endpoint.handle_unreachable(B, "connection refused", p.now + 0.01, errno=111)
    assert not p.a.of(events.MessageFailed)
    p.settle()
    assert p.b.received() == [b"early"]


def test_by_default_a_silent_new_peer_is_unreachable_after_peer_timeout() -> None:
    p = Pair()
    p.a.endpoint.send(B, b"nobody", now=p.now, timeout=20.0)
    while not p.a.of(events.MessageFailed):
        assert p.now < 6.0
        p.outgoing(p.a)
        p.tick(0.05)
    assert isinstance(p.a.of(events.MessageFailed)[0].error, errors.PeerUnreachable)
    assert Config().peer_timeout <= p.now < Config().peer_timeout + 0.1


def test_an_established_peer_that_goes_silent_is_unreachable_even_when_waiting_for_peers() -> None:
    """Waiting for first contact must not weaken dead-peer detection."""
    p = Pair(WAITS)
    p.connect()
    start = p.now
    p.a.endpoint.send(B, b"into the void", now=p.now, timeout=30.0)
    while not p.a.of(events.MessageFailed):
        assert p.now < start + 6.0
        p.outgoing(p.a)
        p.outgoing(p.b)
        p.tick(0.05)
    assert isinstance(p.a.of(events.MessageFailed)[0].error, errors.PeerUnreachable)


def test_bad_message_arguments_fail_before_anything_is_sent() -> None:
    """send("text") raised a bare TypeError, and msg_type=True was accepted by send but
    refused by receive."""
    ep = Endpoint(rng=random.Random(1), arrival_events=True)
    for data, words in (("text", "encode text first"), (42, "got int")):
        try:
            ep.send(B, data, now=0.0)  # type: ignore[arg-type]
        except errors.UsageError as exc:
            assert words in str(exc)
        else:
            raise AssertionError("accepted")
    for field in ("msg_type", "priority"):
        for bad in (True, 1.5, "3"):
            try:
                ep.send(B, b"x", now=0.0, **{field: bad})  # type: ignore[arg-type]
            except errors.UsageError as exc:
                assert field in str(exc)
            else:
                raise AssertionError(f"{field}={bad!r} accepted")
    assert ep.peers() == [] and ep.datagrams_to_send(0.0) == []
    assert ep.send(B, bytearray(b"ok"), now=0.0) and ep.send(B, memoryview(b"ok"), now=0.0)


def test_an_os_refusal_from_a_dead_sender_releases_what_it_held() -> None:
    """The OS's word (ICMP port unreachable for our probe) ended the wait outside the timer,
    and the session was never dropped: its reservation stayed held for good."""
    p = Pair(SMALL, SMALL)
    p.connect()
    p.a.endpoint.send(B, bytes(200_000), now=p.now)
    p.deliver(p.b, p.outgoing(p.a))  # the first flight arrives; then A's process dies
    p.now += 1.0
    p.b.endpoint.handle_timer(p.now)
    p.outgoing(p.b)  # B's probe meets a closed port
    assert p.b.endpoint.handle_unreachable(A, "connection refused", p.now, errno=111)
    (dropped,) = p.b.of(events.SessionDropped)
    assert (dropped.peer, dropped.reason) == (A, "unreachable")
    assert p.b.endpoint.stats().receive_bytes == 0 and p.b.endpoint.peers() == []
    p.now += 40.0  # nothing comes back to life, no timer loops
    assert p.b.endpoint.get_timer() is None
