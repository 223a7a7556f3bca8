"""Request/reply: the ack of a request rides on its reply (a delayed-ack rule that
still answers promptly when no reply comes). Virtual time, two endpoints."""

from __future__ import annotations

from reliable import Config, events
from reliable.wire import Kind

from .harness import A, B, Pair, decode_all


def _waiting_pair(reply_ack_delay: float = 0.001) -> Pair:
    config = Config(reply_ack_delay=reply_ack_delay)
    pair = Pair(config, config, release=False)
    pair.connect()
    return pair


def _request(pair: Pair) -> int:
    """A sends a request to B, where a receiver already waits for it."""
    b = pair.b.endpoint
    waiter = b.wait_for_message(now=pair.now)
    pair.a.endpoint.send(B, b"request", now=pair.now)
    assert pair.transfer(pair.a) == 1
    assert [e.waiter for e in pair.b.of(events.MessageTaken)] == [waiter]
    return waiter


def test_the_reply_carries_the_ack_of_its_request() -> None:
    pair = _waiting_pair()
    _request(pair)
    assert pair.outgoing(pair.b) == []  # no lone ACK: the reply is about to leave
    pair.b.endpoint.send(A, b"reply", now=pair.now)
    out = pair.outgoing(pair.b)
    packets = decode_all(out)
    assert [p.kind for p in packets] == [Kind.DATA]  # one datagram: the reply, with the ack
    pair.deliver(pair.a, out)
    delivered = pair.a.of(events.MessageDelivered)
    assert [d.size for d in delivered] == [len(b"request")]


def test_without_a_reply_the_ack_leaves_after_reply_ack_delay() -> None:
    pair = _waiting_pair(0.001)
    _request(pair)
    assert pair.outgoing(pair.b) == []
    timer = pair.b.endpoint.get_timer()
    assert timer is not None and timer <= pair.now + 0.001 + 1e-9
    pair.now = timer
    pair.b.endpoint.handle_timer(pair.now)
    out = pair.outgoing(pair.b)
    assert [p.kind for p in decode_all(out)] == [Kind.ACK]
    pair.deliver(pair.a, out)
    assert len(pair.a.of(events.MessageDelivered)) == 1


def test_no_waiting_receiver_or_a_zero_delay_acks_at_once() -> None:
    pair = _waiting_pair()
    pair.a.endpoint.send(B, b"into the mailbox", now=pair.now)  # nobody waits for it
    pair.transfer(pair.a)
    assert [p.kind for p in decode_all(pair.outgoing(pair.b))] == [Kind.ACK]
    prompt = _waiting_pair(0.0)
    _request(prompt)
    assert [p.kind for p in decode_all(prompt.outgoing(prompt.b))] == [Kind.ACK]


def test_a_one_way_stream_is_acked_at_once() -> None:
    """Its acks clock the sender: holding them for a reply that never comes slowed a
    lossy stream into a waiting receiver by a third."""
    pair = _waiting_pair()
    pair.now += 2.0  # B last sent A data (connect) long ago: A only streams to B
    _request(pair)
    assert [p.kind for p in decode_all(pair.outgoing(pair.b))] == [Kind.ACK]
