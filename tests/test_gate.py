"""The gate alone (reliable/gate.py): cookies, challenges and unsolicited replies,
with a list for a network and a dict for the drop counter, no endpoint."""

from __future__ import annotations

from typing import Any

from reliable.gate import AMPLIFICATION, COOKIE_LIFETIME, RESET_INTERVAL, RESET_MEMORY, Gate
from reliable.security import BAD_TAG
from reliable.wire import Kind, Packet, decode, decode_body, encode, encode_body

OURS = 0x1111
THEIRS = 0x2222
ADDR = ("198.18.0.7", 4000)


class Wire:
    """What the gate is handed: the datagrams it queues and the drops it counts."""

    def __init__(self) -> None:
        self.sent: list[tuple[bytes, Any]] = []
        self.dropped: dict[str, int] = {}

    def queue(self, datagram: bytes, addr: Any) -> None:
        self.sent.append((datagram, addr))

    def drop(self, reason: str) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1


def _gate(wire: Wire, rate: int = 100) -> Gate:
    return Gate(
        OURS, bytes(range(16)), rate, seal=lambda body: body, queue=wire.queue, drop=wire.drop
    )


def _hello(cookie: bytes | None = None, incarnation: int = THEIRS) -> Packet:
    return Packet(kind=Kind.PING, src_incarnation=incarnation, cookie=cookie)


def test_a_cookie_vouches_for_its_address_and_incarnation_for_one_to_two_lifetimes() -> None:
    gate = _gate(Wire())
    cookie = gate.issue_cookie(ADDR, THEIRS, 10.0)
    assert gate.cookie_valid(_hello(cookie), ADDR, 10.0)
    assert gate.cookie_valid(_hello(cookie), ADDR, COOKIE_LIFETIME + 10.0)  # the next bucket
    assert not gate.cookie_valid(_hello(cookie), ADDR, 2 * COOKIE_LIFETIME + 10.0)
    assert not gate.cookie_valid(_hello(cookie), ("198.18.0.8", 4000), 10.0)
    assert not gate.cookie_valid(_hello(cookie, incarnation=THEIRS + 1), ADDR, 10.0)
    assert not gate.cookie_valid(_hello(None), ADDR, 10.0)
    other = Gate(OURS, bytes(16), 100, seal=bytes, queue=Wire().queue, drop=Wire().drop)
    assert not other.cookie_valid(_hello(cookie), ADDR, 10.0)  # another node's key


def test_a_challenge_carries_the_cookie_that_lets_the_address_in() -> None:
    wire = Wire()
    gate = _gate(wire)
    gate.challenge(_hello(), ADDR, 100, 5.0)
    ((datagram, dest),) = wire.sent
    reply = decode_body(datagram)
    assert dest == ADDR
    assert (reply.kind, reply.src_incarnation, reply.dst_incarnation) == (
        Kind.CHALLENGE,
        OURS,
        THEIRS,
    )
    assert reply.cookie is not None and gate.cookie_valid(_hello(reply.cookie), ADDR, 5.0)
    assert gate.challenges_sent == 1


def test_challenges_are_rate_limited_as_a_token_bucket() -> None:
    wire = Wire()
    gate = _gate(wire, rate=3)
    for _ in range(5):
        gate.challenge(_hello(), ADDR, 100, 1.0)
    assert (gate.challenges_sent, wire.dropped) == (3, {"challenge_limited": 2})
    gate.challenge(_hello(), ADDR, 100, 1.5)  # half a second earns one back (and a half)
    assert gate.challenges_sent == 4


def test_no_reply_is_larger_than_the_amplification_bound() -> None:
    wire = Wire()
    gate = _gate(wire)
    size = len(encode_body(Packet(kind=Kind.CHALLENGE, src_incarnation=1, cookie=bytes(16))))
    gate.challenge(_hello(), ADDR, size // AMPLIFICATION - 1, 1.0)  # a tiny datagram
    assert (wire.sent, gate.challenges_sent) == ([], 0)
    assert wire.dropped == {"amplification_limited": 1}


def test_a_reset_names_the_incarnation_it_answers_once_per_interval() -> None:
    wire = Wire()
    gate = _gate(wire)
    gate.reset(ADDR, THEIRS, 1.0, 100)
    gate.reset(ADDR, THEIRS, 1.0 + RESET_INTERVAL / 2, 100)  # too soon: not answered
    gate.reset(("198.18.0.8", 4000), THEIRS, 1.0, 100)  # another address has its own limit
    gate.reset(ADDR, THEIRS, 1.0 + RESET_INTERVAL, 100)
    assert [dest for _, dest in wire.sent] == [ADDR, ("198.18.0.8", 4000), ADDR]
    reply = decode_body(wire.sent[0][0])
    assert (reply.kind, reply.src_incarnation, reply.dst_incarnation) == (Kind.RESET, OURS, THEIRS)


def test_the_rate_limit_remembers_a_bounded_number_of_addresses() -> None:
    gate = _gate(Wire())
    assert gate.may_answer(("198.18.0.1", 1), 0.0)
    for port in range(2, RESET_MEMORY + 2):  # pushes the first address out
        assert gate.may_answer(("198.18.0.1", port), 0.0)
    assert gate.may_answer(("198.18.0.1", 1), 0.0)  # forgotten: answered again
    assert not gate.may_answer(("198.18.0.1", RESET_MEMORY + 1), 0.0)  # still remembered


def test_a_refusal_is_an_unsealed_auth_failed_echoing_the_claimed_incarnation() -> None:
    wire = Wire()
    gate = _gate(wire)
    datagram = encode(Packet(kind=Kind.PING, src_incarnation=THEIRS))
    gate.refuse(datagram, ADDR, BAD_TAG, 1.0)
    ((reply_bytes, dest),) = wire.sent
    reply = decode(reply_bytes)  # unsealed: a plain CRC, whatever the node's mode
    assert dest == ADDR
    assert (reply.kind, reply.dst_incarnation, reply.refusal) == (Kind.AUTH_FAILED, THEIRS, BAD_TAG)


def test_what_is_never_refused_aloud() -> None:
    wire = Wire()
    gate = _gate(wire)
    gate.refuse(b"\x00" * 15, ADDR, BAD_TAG, 1.0)  # too short to claim an incarnation
    gate.refuse(encode(Packet(kind=Kind.AUTH_FAILED, src_incarnation=THEIRS)), ADDR, BAD_TAG, 2.0)
    gate.refuse(bytes(32), ADDR, BAD_TAG, 3.0)  # claims incarnation 0: nobody to answer
    assert wire.sent == []
