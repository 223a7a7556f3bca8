"""Withdrawing sends (``Endpoint.withdraw``) and the fate every failure reports.

Each case on the simulated pair, step by step: one outcome event per ticket,
``delivered`` saying whether a resend is safe, and the receiver's view
agreeing with it (a message reported not delivered is never received).
"""

from __future__ import annotations

import pytest

from reliable import Config, Withdrawal, errors, events
from reliable.addressing import ServiceAddress
from reliable.wire import Kind

from .harness import B, Pair, decode_all

BIG = 200_000  # bytes: many more fragments than the first flight's congestion window


def _outcomes(p: Pair, ticket: int) -> list[events.Event]:
    return [
        e
        for e in p.a.of(events.MessageDelivered) + p.a.of(events.MessageFailed)
        if e.ticket == ticket
    ]


def _failure(p: Pair, ticket: int) -> errors.DeliveryFailed:
    (fate,) = _outcomes(p, ticket)
    assert isinstance(fate, events.MessageFailed), fate
    return fate.error


def _data_fragments(datagrams: list[bytes]) -> int:
    return sum(1 + len(pkt.bundle) for pkt in decode_all(datagrams) if pkt.kind == Kind.DATA)


def test_a_queued_send_is_withdrawn_at_once_and_never_seen() -> None:
    p = Pair()
    p.connect()
    ticket = p.a.endpoint.send(B, b"never mind", now=p.now)
    assert p.a.endpoint.withdraw(ticket, p.now) is Withdrawal.WITHDRAWN
    error = _failure(p, ticket)
    assert isinstance(error, errors.SendCancelled)
    assert (error.stage, error.delivered) == ("queued", False)
    assert "safe to send again" in str(error)
    after = p.a.endpoint.send(B, b"after", now=p.now)
    p.settle()
    assert p.b.received() == [b"after"]
    assert len(_outcomes(p, ticket)) == 1 and len(_outcomes(p, after)) == 1
    assert p.a.endpoint.withdraw(ticket, p.now) is Withdrawal.UNKNOWN
    assert p.a.endpoint.stats().send_buffer_bytes == 0


def test_a_partly_sent_message_is_abandoned_and_the_receiver_discards_its_part() -> None:
    p = Pair()
    p.connect()
    ticket = p.a.endpoint.send(B, b"x" * BIG, now=p.now)
    first_flight = p.outgoing(p.a)
    assert 0 < _data_fragments(first_flight) < BIG // 1000, "only part of it went out"
    p.deliver(p.b, first_flight)
    assert p.b.endpoint.stats().receive_bytes > 0, "the receiver holds the part it got"
    assert p.a.endpoint.withdraw(ticket, p.now) is Withdrawal.WITHDRAWN
    error = _failure(p, ticket)
    assert isinstance(error, errors.SendCancelled)
    assert (error.stage, error.delivered) == ("partial", False)
    p.a.endpoint.send(B, b"after", now=p.now)
    p.settle()
    assert p.b.received() == [b"after"], "the withdrawn part never completes"
    assert p.b.endpoint.stats().receive_bytes == 0, "and its bytes were released"
    assert len(_outcomes(p, ticket)) == 1


def test_a_parked_message_is_taken_back_and_the_receiver_never_gets_it() -> None:
    p = Pair(release=False)
    p.b.create_mailbox("q", capacity=1)
    p.a.endpoint.send(B, b"fills it", now=p.now, mailbox="q")
    ticket = p.a.endpoint.send(B, b"waits", now=p.now, mailbox="q")
    p.run(0.3)
    assert p.b.endpoint.stats().mailbox("q").parked == 1
    assert p.a.endpoint.withdraw(ticket, p.now) is Withdrawal.REQUESTED
    assert not _outcomes(p, ticket), "the receiver's answer decides"
    p.run(0.3)
    error = _failure(p, ticket)
    assert isinstance(error, errors.SendCancelled)
    assert (error.stage, error.delivered) == ("parked", False)
    box = p.b.endpoint.stats().mailbox("q")
    assert (box.messages, box.parked, box.discarded) == (1, 0, 1)
    assert p.b.endpoint.take("q", now=p.now).data == b"fills it"  # type: ignore[union-attr]
    assert p.b.endpoint.take("q", now=p.now) is None
    assert p.a.endpoint.withdraw(ticket, p.now) is Withdrawal.UNKNOWN


def test_a_parked_message_taken_before_the_cancel_arrives_is_a_receipt() -> None:
    p = Pair(release=False)
    p.b.create_mailbox("meet", capacity=0)
    ticket = p.a.endpoint.send(B, b"hello", now=p.now, mailbox="meet")
    p.run(0.3)
    assert p.a.endpoint.withdraw(ticket, p.now) is Withdrawal.REQUESTED
    cancel = p.outgoing(p.a)
    assert p.b.endpoint.take("meet", receiver="bob", now=p.now) is not None  # first
    p.deliver(p.b, cancel)
    p.settle()
    (fate,) = _outcomes(p, ticket)
    assert isinstance(fate, events.MessageDelivered) and fate.receiver == "bob"


def test_a_wholly_sent_message_cannot_be_withdrawn_and_reports_its_real_outcome() -> None:
    p = Pair()
    p.connect()
    ticket = p.a.endpoint.send(B, b"on its way", now=p.now)
    p.deliver(p.b, p.outgoing(p.a))  # B has it; its acknowledgement has not left yet
    assert p.a.endpoint.withdraw(ticket, p.now) is Withdrawal.CONTINUES
    p.settle()
    (fate,) = _outcomes(p, ticket)
    assert isinstance(fate, events.MessageDelivered)
    assert p.b.received() == [b"on its way"]


def test_a_cancelled_message_that_turns_out_parked_is_taken_back_then() -> None:
    p = Pair(release=False)
    p.b.create_mailbox("meet", capacity=0)
    ticket = p.a.endpoint.send(B, b"hello", now=p.now, mailbox="meet")
    p.deliver(p.b, p.outgoing(p.a))  # parked at B; the DEFERRED notice is not back yet
    assert p.a.endpoint.withdraw(ticket, p.now) is Withdrawal.CONTINUES
    p.run(0.3)
    error = _failure(p, ticket)
    assert isinstance(error, errors.SendCancelled) and error.stage == "parked"
    assert p.b.endpoint.take("meet", now=p.now) is None
    assert p.b.endpoint.stats().mailbox("meet").discarded == 1


def _lose_everything(p: Pair, seconds: float) -> None:
    end = p.now + seconds
    while p.now < end:
        p.outgoing(p.a)
        p.now += 0.05
        p.a.endpoint.handle_timer(p.now)


@pytest.mark.parametrize(
    ("first", "second", "stage", "delivered"),
    [
        (b"short", None, "unacknowledged", None),
        (b"x" * BIG, None, "partial", False),
        (b"x" * BIG, b"behind it", "queued", False),
    ],
)
def test_a_send_timeout_says_how_far_the_message_got(
    first: bytes, second: bytes | None, stage: str, delivered: bool | None
) -> None:
    p = Pair()
    p.connect()
    ticket = p.a.endpoint.send(B, first, now=p.now, timeout=0.5)
    if second is not None:
        ticket = p.a.endpoint.send(B, second, now=p.now, timeout=0.5)
    _lose_everything(p, 0.7)
    error = _failure(p, ticket)
    assert isinstance(error, errors.SendTimeout) and isinstance(error, TimeoutError)
    assert (error.stage, error.delivered) == (stage, delivered)
    text = str(error)
    assert "0.5s" in text
    assert ("safe to send again" in text) == (delivered is False)
    assert ("could deliver it twice" in text) == (delivered is None)


def test_a_timed_out_parked_message_is_confirmed_not_delivered() -> None:
    p = Pair(release=False)
    p.b.create_mailbox("q", capacity=1)
    p.a.endpoint.send(B, b"fills it", now=p.now, mailbox="q")
    ticket = p.a.endpoint.send(B, b"waits", now=p.now, mailbox="q", timeout=0.5)
    p.settle()
    error = _failure(p, ticket)
    assert isinstance(error, errors.SendTimeout)
    assert (error.stage, error.delivered) == ("parked", False)


def test_failures_say_delivered_false_only_for_messages_never_wholly_sent() -> None:
    p = Pair(config_a=Config(peer_timeout=1.0))
    p.connect()
    sent = p.a.endpoint.send(B, b"x" * 500, now=p.now)
    partial = p.a.endpoint.send(B, b"x" * BIG, now=p.now)
    queued = p.a.endpoint.send(B, b"behind", now=p.now)
    _lose_everything(p, 1.5)
    for ticket, delivered in ((sent, None), (partial, False), (queued, False)):
        error = _failure(p, ticket)
        assert isinstance(error, errors.PeerUnreachable) and error.delivered is delivered
        assert error.after >= 1.0


def test_close_aborts_with_the_same_fates() -> None:
    p = Pair()
    p.connect()
    sent = p.a.endpoint.send(B, b"x" * 500, now=p.now)
    queued = p.a.endpoint.send(B, b"x" * BIG, now=p.now)
    p.outgoing(p.a)  # lost
    p.a.endpoint.close(p.now, timeout=0)
    assert isinstance(_failure(p, sent), errors.SendAborted)
    assert (_failure(p, sent).delivered, _failure(p, queued).delivered) == (None, False)


def test_an_anycast_send_is_withdrawn_without_failing_over() -> None:
    p = Pair(config_a=Config(peer_timeout=0.5))
    p.connect()
    silent = ("10.0.0.9", 9000)  # never answers
    p.a.endpoint.add_service_members("printer", [B, silent])  # round-robin: B, then silent
    queued = p.a.endpoint.send_anycast(ServiceAddress("printer"), b"page 1", now=p.now)
    assert p.a.endpoint.withdraw(queued, p.now) is Withdrawal.WITHDRAWN
    error = _failure(p, queued)
    assert isinstance(error, errors.SendCancelled) and error.delivered is False
    sent = p.a.endpoint.send_anycast(ServiceAddress("printer"), b"page 2", now=p.now)
    p.outgoing(p.a)  # to the silent member
    assert p.a.endpoint.withdraw(sent, p.now) is Withdrawal.CONTINUES
    end = p.now + 2.0
    while p.now < end:  # the link reaches B only
        p.deliver(p.b, [d for d, to in p.a.endpoint.datagrams_to_send(p.now) if to == B])
        p.transfer(p.b)
        p.tick(0.01)
    error = _failure(p, sent)
    assert isinstance(error, errors.NoServiceMember) and len(error.tried) == 1
    assert error.delivered is None
    assert p.b.received() == [], "cancelled: B, the next member, was never tried"


def test_errors_copy_and_pickle_with_their_fate() -> None:
    import pickle

    error = errors.PeerUnreachable(B, 5.0)
    clone = error.with_delivered(False)
    assert (error.delivered, clone.delivered, clone.after, clone.peer) == (None, False, 5.0, B)
    assert "safe to send again" in str(clone) and "twice" in str(error)
    timeout = errors.SendTimeout(B, 3.0, stage="queued")
    for original in (clone, timeout, errors.MailboxClosed(B, "q")):
        copy = pickle.loads(pickle.dumps(original))
        assert type(copy) is type(original) and str(copy) == str(original)
        assert copy.delivered == original.delivered
