"""Mailbox protocol between two endpoints, step by step on virtual time."""

from __future__ import annotations

import json

import pytest

from reliable import Config, Selector, errors, events, wire
from reliable.node_messages import (
    Admitted,
    Cancel,
    Discarded,
    StatsReply,
    decode_node_message,
    encode_node_message,
)
from reliable.sender import OutgoingMessage

from .harness import B, Pair


def _fate(p: Pair, ticket: int) -> events.Event:
    (fate,) = [
        e
        for e in p.a.of(events.MessageDelivered) + p.a.of(events.MessageFailed)
        if e.ticket == ticket
    ]
    return fate


def test_a_missing_mailbox_fails_the_send_promptly_and_names_it() -> None:
    p = Pair()
    ticket = p.a.endpoint.send(B, b"x" * 5000, now=p.now, mailbox="nope")
    p.settle()
    fate = _fate(p, ticket)
    assert isinstance(fate, events.MessageFailed)
    assert isinstance(fate.error, errors.MailboxNotFound) and fate.error.mailbox == "nope"
    assert "nope" in str(fate.error)
    assert p.now < 0.05, "one round trip, not a retry until timeout"
    assert p.b.endpoint.stats().dropped["refused.no_mailbox"] == 1


def test_a_closed_mailbox_refuses_until_reopened() -> None:
    p = Pair()
    p.b.create_mailbox("jobs")
    p.b.endpoint.close_mailbox("jobs", p.now)
    refused = p.a.endpoint.send(B, b"1", now=p.now, mailbox="jobs")
    p.settle()
    assert isinstance(_fate(p, refused).error, errors.MailboxClosed)  # type: ignore[attr-defined]
    p.b.endpoint.open_mailbox("jobs")
    accepted = p.a.endpoint.send(B, b"2", now=p.now, mailbox="jobs")
    p.settle()
    assert isinstance(_fate(p, accepted), events.MessageDelivered)
    assert p.b.endpoint.stats().mailbox("jobs").refused == 1


def test_rendezvous_send_completes_only_when_a_receiver_takes_it() -> None:
    p = Pair(release=False)
    p.b.create_mailbox("meet", capacity=0)
    ticket = p.a.endpoint.send(B, b"hello", now=p.now, mailbox="meet")
    p.run(3.0)
    assert not p.a.of(events.MessageDelivered), "nobody has taken it yet"
    assert p.a.endpoint.stats().peers[0].in_flight == 0, "acknowledged: nothing to retransmit"
    with pytest.raises(errors.MailboxFull):
        p.a.endpoint.send(B, b"again", now=p.now, mailbox="meet")
    msg = p.b.endpoint.take("meet", receiver="alice", now=p.now)
    assert msg is not None and msg.data == b"hello"
    p.settle()
    fate = _fate(p, ticket)
    assert isinstance(fate, events.MessageDelivered)
    assert (fate.receiver, fate.deferred, fate.mailbox) == ("alice", True, "meet")
    p.a.endpoint.send(B, b"again", now=p.now, mailbox="meet")  # room known again


def test_a_waiting_receiver_takes_a_rendezvous_message_on_arrival() -> None:
    p = Pair(release=False)
    p.b.create_mailbox("meet", capacity=0)
    waiter = p.b.endpoint.wait_for_message("meet", receiver="bob", now=p.now)
    ticket = p.a.endpoint.send(B, b"hi", now=p.now, mailbox="meet")
    p.settle()
    (taken,) = p.b.of(events.MessageTaken)
    assert taken.waiter == waiter and taken.message.data == b"hi"
    assert _fate(p, ticket).receiver == "bob"  # type: ignore[attr-defined]


def test_deleting_a_mailbox_fails_parked_sends_and_waiting_receivers() -> None:
    p = Pair(release=False)
    p.b.create_mailbox("q", capacity=1)
    tickets = [p.a.endpoint.send(B, bytes([i]), now=p.now, mailbox="q") for i in range(4)]
    p.run(0.5)
    assert isinstance(_fate(p, tickets[0]), events.MessageDelivered)
    assert p.b.endpoint.stats().mailbox("q").parked == 3
    p.b.create_mailbox("other")
    waiter = p.b.endpoint.wait_for_message("other", now=p.now)
    p.b.endpoint.delete_mailbox("q", p.now)
    p.b.endpoint.delete_mailbox("other", p.now)
    p.settle()
    for ticket in tickets[1:]:
        fate = _fate(p, ticket)
        assert isinstance(fate, events.MessageFailed)
        assert isinstance(fate.error, errors.MailboxClosed) and fate.error.mailbox == "q"
    (failed,) = p.b.of(events.ReceiveFailed)
    assert failed.waiter == waiter and isinstance(failed.error, errors.MailboxDeleted)
    later = p.a.endpoint.send(B, b"late", now=p.now, mailbox="q")
    p.settle()
    assert isinstance(_fate(p, later).error, errors.MailboxNotFound)  # type: ignore[attr-defined]
    stats = p.b.endpoint.stats()
    assert stats.mailbox_bytes == 0 and stats.peers[0].messages_received == 4


def test_a_timed_out_deferred_send_is_withdrawn_exactly() -> None:
    p = Pair(release=False)
    p.b.create_mailbox("q", capacity=1)
    p.a.endpoint.send(B, b"fills it", now=p.now, mailbox="q")
    ticket = p.a.endpoint.send(B, b"waits", now=p.now, mailbox="q", timeout=0.5)
    p.settle()
    fate = _fate(p, ticket)
    assert isinstance(fate, events.MessageFailed) and isinstance(fate.error, errors.SendTimeout)
    box = p.b.endpoint.stats().mailbox("q")
    assert (box.messages, box.parked, box.discarded) == (1, 0, 1), "withdrawn, not left behind"


def test_a_deferred_send_that_got_in_before_its_cancel_is_a_success() -> None:
    p = Pair(release=False)
    p.b.create_mailbox("q", capacity=1)
    p.a.endpoint.send(B, b"fills it", now=p.now, mailbox="q")
    ticket = p.a.endpoint.send(B, b"waits", now=p.now, mailbox="q", timeout=0.5)
    p.run(0.2)  # the deferral is known; the deadline is still ahead
    p.now = 0.5
    p.a.endpoint.handle_timer(p.now)  # A's deadline: it sends Cancel ...
    cancel = p.outgoing(p.a)
    assert p.b.endpoint.take("q", now=p.now) is not None  # ... B's reader makes room first
    p.deliver(p.b, cancel)
    p.settle()
    fate = _fate(p, ticket)
    assert isinstance(fate, events.MessageDelivered) and fate.deferred
    assert p.b.endpoint.stats().mailbox("q").messages == 1


def test_the_node_memory_cap_refuses_with_a_clear_error() -> None:
    p = Pair(config_b=Config(mailbox_memory=10_000), release=False)
    first = p.a.endpoint.send(B, b"x" * 8000, now=p.now)
    second = p.a.endpoint.send(B, b"y" * 8000, now=p.now)
    p.settle()
    assert isinstance(_fate(p, first), events.MessageDelivered)
    error = _fate(p, second).error  # type: ignore[attr-defined]
    assert isinstance(error, errors.MessageRejected) and "mailbox_memory" in str(error)


def test_a_message_larger_than_a_mailbox_could_ever_hold_is_refused() -> None:
    p = Pair()
    p.b.create_mailbox("small", max_bytes=100)
    ticket = p.a.endpoint.send(B, b"x" * 101, now=p.now, mailbox="small")
    p.settle()
    assert isinstance(_fate(p, ticket).error, errors.MessageRejected)  # type: ignore[attr-defined]


def test_a_port_delivers_only_to_its_owner() -> None:
    p = Pair(release=False)
    owner = p.b.endpoint.create_mailbox("svc", port=True, now=p.now)
    p.a.endpoint.send(B, b"req", now=p.now, mailbox="svc")
    p.settle()
    with pytest.raises(errors.UsageError, match="port"):
        p.b.endpoint.take("svc", now=p.now)
    msg = p.b.endpoint.take("svc", owner=owner, now=p.now)
    assert msg is not None and msg.data == b"req"


def test_mailbox_management_errors() -> None:
    p = Pair()
    with pytest.raises(errors.MailboxExists):
        p.b.endpoint.create_mailbox("", now=0)
    with pytest.raises(errors.UnknownMailbox):
        p.b.endpoint.take("ghost", now=0)
    with pytest.raises(errors.UsageError, match="default mailbox"):
        p.b.endpoint.delete_mailbox("", 0)
    with pytest.raises(errors.UsageError, match="'/'"):
        p.b.endpoint.create_mailbox("a/b", now=0)


def test_selective_receive_across_the_network() -> None:
    p = Pair(release=False)
    for t, prio in [(1, 0), (2, 0), (1, 9), (3, 0)]:
        p.a.endpoint.send(B, f"{t}/{prio}".encode(), now=p.now, msg_type=t, priority=prio)
    p.settle()
    take = p.b.endpoint.take
    assert take(selector=Selector(msg_type=3), now=p.now).data == b"3/0"  # type: ignore[union-attr]
    assert take(now=p.now).data == b"1/9"  # type: ignore[union-attr]
    assert take(selector=Selector(msg_type=-2), now=p.now).data == b"1/0"  # type: ignore[union-attr]
    assert take(selector=Selector(source=("elsewhere", 1)), now=p.now) is None


def test_stats_can_be_queried_over_the_network() -> None:
    p = Pair()
    p.b.create_mailbox("jobs", capacity=5)
    request = p.a.endpoint.query_stats(B, p.now)
    p.settle()
    (reply,) = p.a.of(events.StatsReceived)
    assert reply.request == request and reply.peer == B
    body = json.loads(reply.body)
    assert [m["name"] for m in body["mailboxes"]] == ["", "jobs"]
    assert body["mailboxes"][1]["capacity"] == 5


def test_a_node_can_refuse_stats_queries() -> None:
    p = Pair(config_b=Config(serve_stats=False))
    p.a.endpoint.query_stats(B, p.now)
    p.settle()
    assert not p.a.of(events.StatsReceived)
    assert p.b.endpoint.stats().dropped["stats_refused"] == 1


def test_control_messages_round_trip_and_garbage_is_counted() -> None:
    for msg in (
        Admitted(7, taken=True, receiver="w-1"),
        Admitted(2**32 - 1),
        Discarded(3, wire.Verdict.CANCELLED),
        Cancel(9),
        StatsReply(4, b"{}"),
    ):
        assert decode_node_message(encode_node_message(msg)) == msg
    p = Pair()
    session = p.a.endpoint._peer_for_send(B, 0.0)
    session.sender.node_messages.append(_raw_node_message(b"\xff garbage"))
    p.a.endpoint._dirty[B] = None
    p.settle()
    assert p.b.endpoint.stats().dropped["malformed.control"] == 1


def _raw_node_message(payload: bytes) -> OutgoingMessage:
    return OutgoingMessage(
        ticket=0,
        data=payload,
        msg_type=0,
        priority=0,
        mailbox="",
        created=0.0,
        deadline=None,
        timeout=None,
        fragment_size=1000,
        count=1,
        for_node=True,
    )
