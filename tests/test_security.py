"""Security modes, replay protection, address validation and refusals, in the core."""

from __future__ import annotations

import os
import random
import stat
import tracemalloc
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from reliable import Config, Endpoint, errors, events, wire
from reliable.node_messages import StatsRequest
from reliable.peer import FIRST_CONTACT_DATAGRAMS
from reliable.security import (
    Authenticated,
    Encrypted,
    Integrity,
    ReplayWindow,
    Security,
    SecurityError,
    make_security,
    read_keyfile,
    write_keyfile,
)
from reliable.wire import Fragment, Kind, MalformedPacket, Packet

from .harness import A, B, Pair, forged_datagram
from .test_wire import packets

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))


def modes() -> list[Security]:
    return [Integrity(), Authenticated(KEY), Encrypted(KEY)]


SEALED = pytest.mark.parametrize("make", [Authenticated, Encrypted], ids=["mac", "aead"])
ALL = pytest.mark.parametrize(
    "make", [lambda _k: Integrity(), Authenticated, Encrypted], ids=["crc", "mac", "aead"]
)

# ------------------------------------------------------------------ the codecs


@settings(max_examples=60, deadline=None)
@given(packet=packets(), pn=st.integers(0, 2**64 - 1))
def test_every_mode_round_trips_every_packet(packet: Packet, pn: int) -> None:
    body = wire.encode_body(packet)
    for security in modes():
        number, opened = security.open(security.seal(body, packet.src_incarnation, pn))
        assert wire.decode_body(opened) == packet
        assert number == (None if isinstance(security, Integrity) else pn)


@settings(max_examples=60, deadline=None)
@given(packet=packets(), data=st.data())
def test_any_tampering_is_caught_and_never_read_as_a_key_mismatch(
    packet: Packet, data: st.DataObject
) -> None:
    """Random damage fails the CRC; only an intact datagram can be judged 'wrong key'."""
    body = wire.encode_body(packet)
    for security in modes()[1:]:
        sealed = bytearray(security.seal(body, packet.src_incarnation, 7))
        i = data.draw(st.integers(0, len(sealed) - 1))
        sealed[i] ^= 1 << data.draw(st.integers(0, 7))
        with pytest.raises((MalformedPacket, SecurityError)) as info:
            security.open(bytes(sealed))
        if isinstance(info.value, SecurityError):
            assert info.value.refusal == 0 or i < 4  # (magic/version are read first)
        cut = data.draw(st.integers(0, len(sealed) - 1))
        with pytest.raises((MalformedPacket, SecurityError)):
            security.open(bytes(sealed[:cut]))


@settings(max_examples=40, deadline=None)
@given(packet=packets())
def test_a_wrong_key_or_mode_is_refused_with_the_reason(packet: Packet) -> None:
    body = wire.encode_body(packet)
    inc = packet.src_incarnation
    for make in (Authenticated, Encrypted):
        with pytest.raises(SecurityError) as info:
            make(KEY).open(make(OTHER_KEY).seal(body, inc, 1))
        assert info.value.reason == "security.bad_tag" and info.value.refusal == 1
        with pytest.raises(SecurityError) as info:
            make(KEY).open(Integrity().seal(body, inc, 1))
        assert info.value.refusal == 2  # unsealed
        with pytest.raises(SecurityError) as info:
            Integrity().open(make(KEY).seal(body, inc, 1))
        assert info.value.refusal == 3  # sealed, we are not
    with pytest.raises(SecurityError) as info:
        Encrypted(KEY).open(Authenticated(KEY).seal(body, inc, 1))
    assert info.value.refusal == 3


def test_encryption_hides_the_payload_and_the_mac_does_not() -> None:
    frag = Fragment(
        seq=1,
        base=1,
        msg_id=0,
        index=0,
        count=1,
        total_len=14,
        msg_type=0,
        priority=0,
        mailbox="",
        payload=b"top secret 123",
    )
    body = wire.encode_body(Packet(kind=Kind.DATA, src_incarnation=9, fragment=frag))
    assert b"top secret" in Authenticated(KEY).seal(body, 9, 0)
    assert b"top secret" not in Encrypted(KEY).seal(body, 9, 0)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 3000), max_size=300))
def test_replay_window_accepts_each_number_once(numbers: list[int]) -> None:
    window = ReplayWindow(size=1024)
    seen: set[int] = set()
    highest = -1
    for n in numbers:
        fresh = n not in seen and n > highest - 1024
        assert window.accept(n) == fresh
        if fresh:
            seen.add(n)
            highest = max(highest, n)


# ------------------------------------------------------------------------ keys


def test_keyfiles_are_private_and_checked(tmp_path: Path) -> None:
    path = tmp_path / "key"
    key = write_keyfile(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and read_keyfile(path) == key
    with pytest.raises(errors.UsageError, match="exists"):
        write_keyfile(path)
    os.chmod(path, 0o644)
    with pytest.raises(errors.UsageError, match=f"chmod 600 {path}"):
        read_keyfile(path)
    bad = tmp_path / "bad"
    bad.write_text("not hex\n")
    bad.chmod(0o600)
    with pytest.raises(errors.UsageError, match="rmsg keygen"):
        read_keyfile(bad)


def test_make_security_takes_keys_from_a_file_or_the_environment(tmp_path: Path) -> None:
    path = tmp_path / "key"
    write_keyfile(path, KEY)
    assert isinstance(make_security("authenticated", keyfile=path), Authenticated)
    env = {"RMSG_KEY": KEY.hex()}
    assert isinstance(make_security("encrypted", environ=env), Encrypted)
    with pytest.raises(errors.UsageError, match="needs a key"):
        make_security("authenticated", environ={})
    with pytest.raises(errors.UsageError, match="one of"):
        make_security("rot13")
    with pytest.raises(errors.UsageError, match="16-64 bytes"):
        Authenticated(b"short")
    assert "0001" not in repr(Authenticated(KEY))  # a key never shows in a repr


# ---------------------------------------------------------------- two endpoints


@ALL
def test_messages_flow_in_every_mode(make) -> None:  # type: ignore[no-untyped-def]
    p = Pair(security_a=make(KEY), security_b=make(KEY))
    for i in range(30):
        p.a.endpoint.send(B, b"m%d" % i * (i * 50), now=p.now)
    p.settle()
    assert p.b.received() == [b"m%d" % i * (i * 50) for i in range(30)]
    assert len(p.a.of(events.MessageDelivered)) == 30


@SEALED
def test_replayed_datagrams_are_dropped_even_with_valid_tags(make) -> None:  # type: ignore[no-untyped-def]
    p = Pair(security_a=make(KEY), security_b=make(KEY))
    p.connect()
    p.a.endpoint.send(B, b"pay 100 once", now=p.now)
    captured = p.outgoing(p.a)
    p.deliver(p.b, captured)
    p.settle()
    p.deliver(p.b, captured * 3)  # an attacker replays what it recorded
    assert p.b.received() == [b"pay 100 once"]
    assert p.b.endpoint.stats().dropped["replay"] == 3 * len(captured)


@SEALED
def test_forged_datagrams_create_nothing_and_are_counted(make) -> None:  # type: ignore[no-untyped-def]
    ep = Endpoint(Config(), rng=random.Random(1), security=make(KEY), arrival_events=True)
    forger = make(OTHER_KEY)
    rng = random.Random(5)
    for i in range(500):
        pkt = Packet(kind=Kind.PING, src_incarnation=1 + i, cookie=rng.randbytes(16))
        ep.receive_datagram(forger.seal(wire.encode_body(pkt), 1 + i, i), ("192.0.2.1", i), 0.0)
        ep.receive_datagram(wire.encode(pkt), ("192.0.2.2", i), 0.0)  # unsealed
    assert ep.peers() == [] and ep.next_event() is None
    assert ep.dropped["security.bad_tag"] == 500 and ep.dropped["security.unsealed"] == 500


@pytest.mark.parametrize(
    ("a", "b", "refusal"),
    [
        (lambda: Authenticated(KEY), lambda: Authenticated(OTHER_KEY), "keys differ"),
        (lambda: Integrity(), lambda: Encrypted(KEY), "requires authenticated"),
        (lambda: Encrypted(KEY), lambda: Integrity(), "different security mode"),
    ],
)
def test_a_wrong_key_fails_the_first_send_at_once(a, b, refusal: str) -> None:  # type: ignore[no-untyped-def]
    p = Pair(security_a=a(), security_b=b())
    ticket = p.a.endpoint.send(B, b"hello?", now=p.now)
    p.transfer(p.a)  # the first datagram ...
    p.transfer(p.b)  # ... and B's answer: one round trip, not the liveness timeout
    (failed,) = p.a.of(events.MessageFailed)
    assert failed.ticket == ticket and isinstance(failed.error, errors.AuthenticationFailed)
    assert refusal in str(failed.error)
    assert p.a.of(events.PeerRejectedUs)


def test_an_auth_failed_must_echo_our_incarnation() -> None:
    p = Pair(security_a=Authenticated(KEY), security_b=Authenticated(KEY))
    p.a.endpoint.send(B, b"x", now=p.now)
    forged = Packet(kind=Kind.AUTH_FAILED, src_incarnation=5, dst_incarnation=12345, refusal=1)
    p.a.endpoint.receive_datagram(wire.encode(forged), B, p.now)
    p.settle()
    assert not p.a.of(events.MessageFailed) and p.a.of(events.MessageDelivered)
    assert p.a.endpoint.stats().dropped["stray_auth_failed"] == 1


def test_encrypted_incarnations_never_repeat_even_with_a_seeded_rng() -> None:
    lives = [
        Endpoint(rng=random.Random(7), security=Encrypted(KEY), arrival_events=True)
        for _ in range(50)
    ]
    assert len({e.incarnation for e in lives}) == 50  # so (subkey, nonce) pairs never repeat
    plain = [Endpoint(rng=random.Random(7), arrival_events=True) for _ in range(2)]
    assert plain[0].incarnation == plain[1].incarnation  # (simulations stay reproducible)


def test_packet_numbers_only_go_up() -> None:
    p = Pair(security_a=Encrypted(KEY), security_b=Encrypted(KEY))
    for i in range(20):
        p.a.endpoint.send(B, (b"%d" % i).ljust(1000, b"."), now=p.now)  # a datagram each
    numbers = []
    for _ in range(50):
        for d in p.outgoing(p.a):
            numbers.append(int.from_bytes(d[32:40], "big"))
            p.deliver(p.b, [d])
        p.transfer(p.b)
        p.tick()
    assert numbers == sorted(set(numbers)) and len(numbers) >= 20


# ---------------------------------------------------------- address validation


def test_a_new_address_gets_a_challenge_and_no_state() -> None:
    ep = Endpoint(Config(), rng=random.Random(1), arrival_events=True)
    ping = wire.encode(Packet(kind=Kind.PING, src_incarnation=42))
    ep.receive_datagram(ping, A, 0.0)
    ((reply, to),) = ep.datagrams_to_send(0.0)
    challenge = wire.decode(reply)
    assert to == A and challenge.kind == Kind.CHALLENGE and challenge.dst_incarnation == 42
    assert ep.peers() == [] and len(reply) <= 3 * len(ping)
    # the echo creates the peer; a made-up or misdirected cookie does not
    bogus = Packet(kind=Kind.PING, src_incarnation=42, cookie=bytes(16))
    ep.receive_datagram(wire.encode(bogus), A, 0.0)
    other_address = Packet(kind=Kind.PING, src_incarnation=42, cookie=challenge.cookie)
    ep.receive_datagram(wire.encode(other_address), B, 0.0)
    assert ep.peers() == []
    echo = Packet(kind=Kind.PING, src_incarnation=42, cookie=challenge.cookie)
    ep.receive_datagram(wire.encode(echo), A, 1.0)
    assert ep.peers() == [A]
    stale = Packet(kind=Kind.PING, src_incarnation=43, cookie=challenge.cookie)
    ep.receive_datagram(wire.encode(stale), B, 100.0)  # expired and for someone else
    assert ep.peers() == [A]


def test_the_first_exchange_costs_one_round_trip_then_none() -> None:
    p = Pair()
    p.a.endpoint.send(B, b"first", now=p.now)
    p.settle()
    assert p.b.received() == [b"first"]
    # one CHALLENGE for each datagram of first contact (the DATA and its PINGs)
    assert p.b.endpoint.challenges_sent == FIRST_CONTACT_DATAGRAMS
    # dropped unread once, then resent with the cookie: first contact, not a retransmission
    assert p.a.of(events.MessageDelivered)[0].transmissions == 1
    p.a.endpoint.send(B, b"second", now=p.now)
    p.settle()
    assert p.b.endpoint.challenges_sent == FIRST_CONTACT_DATAGRAMS


@pytest.mark.timeout(120)
def test_a_spoofed_flood_is_absorbed_while_a_real_peer_is_served() -> None:
    """100,000 datagrams from 5,000 forged sources (with made-up cookies, new
    incarnations, valid CRCs) interleaved with a real peer's traffic."""
    p = Pair(config_b=Config(max_challenges_per_second=2000))
    p.connect()
    rng = random.Random(2026)
    floods = [forged_datagram(rng, i) for i in range(1000)]
    sources = [(f"198.18.{n // 250}.{n % 250}", 1000 + n) for n in range(5000)]
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    sent = 0
    for i in range(100_000):
        p.b.endpoint.receive_datagram(floods[i % 1000], sources[i % 5000], p.now)
        if i % 1000 == 0:
            p.a.endpoint.send(B, b"real %d" % sent, now=p.now)
            sent += 1
            p.transfer(p.a)
            out = p.b.endpoint.datagrams_to_send(p.now)
            p.deliver(p.a, [d for d, addr in out if addr == A])
            p.tick(0.001)
    p.settle()
    grown = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    stats = p.b.endpoint.stats()
    assert p.b.received() == [b"real %d" % i for i in range(sent)], "the real peer was served"
    assert [peer.address for peer in stats.peers] == [A], "no forged source got state"
    assert stats.dropped["unvalidated"] == 100_000, "the flood was counted"
    assert p.b.endpoint.challenges_sent <= 2000 * (p.now + 1)  # rate-limited replies
    assert grown < 2_000_000, f"memory grew by {grown} bytes"


# ------------------------------------------------------------- resource limits


@pytest.mark.parametrize("seed", [2, 3, 4])
def test_receive_memory_is_shared_fairly_and_never_deadlocks(seed: int) -> None:
    """Three senders push multi-datagram messages through a reordering link at a node
    whose receive memory holds barely one of them: all arrive, within the cap. (Seeds 2,
    3 and 4 once deadlocked: every peer's out-of-order fragments filled the memory while
    each waited for a start fragment with no room left to reserve its message.)"""
    from netem import Impairment, SimNetwork

    config = Config(max_message_size=40_000, receive_memory=48_000, peer_timeout=30.0)
    net = SimNetwork(seed=seed, default=Impairment(loss=0.05, reorder=0.3, delay=0.002))
    sink = Endpoint(config, rng=random.Random(9), arrival_events=True)
    net.add_host(("sink", 1), sink)
    senders = [Endpoint(config, rng=random.Random(n), arrival_events=True) for n in range(3)]
    for n, ep in enumerate(senders):
        net.add_host(("src", n), ep)
        for i in range(4):
            net.call_at(
                0.001 * i,
                lambda ep=ep, n=n, i=i: ep.send(("sink", 1), bytes([n, i]) * 15_000, now=net.now),
                host=("src", n),
            )
    got: list[bytes] = []
    peak = 0

    def done() -> bool:
        nonlocal peak
        peak = max(peak, sink.stats().receive_bytes)
        while (msg := sink.take(now=net.now)) is not None:
            got.append(msg.data)
        return len(got) == 12

    net.run(stop=done, until=600.0)
    assert sorted(got) == sorted(bytes([n, i]) * 15_000 for n in range(3) for i in range(4))
    assert peak <= config.receive_memory
    stats = sink.stats()
    assert stats.receive_bytes == 0 and sum(p.shed for p in stats.peers) > 0


def test_receive_memory_must_hold_one_message() -> None:
    with pytest.raises(errors.UsageError, match="receive_memory"):
        Config(max_message_size=1 << 20, receive_memory=1 << 19)


def test_stats_queries_are_shed_when_replies_pile_up() -> None:
    p = Pair()
    p.connect()
    session = p.b.endpoint._peers[A]
    for _ in range(64):
        session.send_node_message(StatsRequest(0), p.now)
    p.a.endpoint.query_stats(B, p.now)
    p.transfer(p.a)
    assert p.b.endpoint.stats().dropped["shed.stats"] == 1


def test_the_dissector_shows_sealed_datagrams_without_the_key() -> None:
    from rmsg.dissect import timeline

    body = wire.encode_body(Packet(kind=Kind.ACK, src_incarnation=5, ack=9, flags=wire.Flag.ACK))
    records = [
        (0.0, ("a", 1), ("b", 2), Authenticated(KEY).seal(body, 5, 41)),
        (0.1, ("a", 1), ("b", 2), Encrypted(KEY).seal(body, 5, 42)),
    ]
    signed, secret = list(timeline(records))
    assert signed.packet is not None and signed.packet.ack == 9
    assert "AUTHENTICATED pn=41 ACK" in signed.format()
    assert secret.packet is None and "ENCRYPTED pn=42 ACK (body encrypted)" in secret.format()
