"""Mailbox guarantees over the simulated lossy network, with hypothesis choosing everything.

Two producers feed one bounded mailbox that a slow consumer drains. Back-
pressure must never drop a message: each one is taken exactly once, each
producer's messages come out in send order within a priority, every send
gets its receipt, and the consumer's node holds a bounded amount.
"""

from __future__ import annotations

import random
import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from netem import Impairment, SimNetwork
from reliable import Config, Endpoint, Message, errors, events

from .harness import links

P1 = ("sim-p1", 1)
P2 = ("sim-p2", 2)
C = ("sim-c", 3)
_TAG = struct.Struct("!BI")  # producer, index


SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _collect(ep: Endpoint, fates: dict[int, events.Event]) -> None:
    while (e := ep.next_event()) is not None:
        if isinstance(e, (events.MessageDelivered, events.MessageFailed)):
            assert e.ticket not in fates, "a message had two fates"
            fates[e.ticket] = e


@SETTINGS
@given(
    capacity=st.sampled_from([0, 1, 3, 8]),
    messages=st.lists(
        st.tuples(st.integers(0, 1), st.integers(0, 2), st.integers(0, 3000)),
        min_size=1,
        max_size=30,
    ),
    take_every=st.floats(0.001, 0.05),
    link=links,
    seed=st.integers(0, 2**16),
)
def test_back_pressure_never_drops_and_keeps_each_senders_order(
    capacity: int,
    messages: list[tuple[int, int, int]],
    take_every: float,
    link: Impairment,
    seed: int,
) -> None:
    config = Config(peer_timeout=30.0, receive_backlog=16 * 1024, max_window=64)
    net = SimNetwork(seed=seed, default=link)
    producers = [Endpoint(config, rng=random.Random(seed + n)) for n in range(2)]
    consumer = Endpoint(config, rng=random.Random(seed + 7))
    for addr, ep in ((P1, producers[0]), (P2, producers[1]), (C, consumer)):
        net.add_host(addr, ep)
    consumer.create_mailbox("q", capacity=capacity, now=0.0)
    rng = random.Random(seed)
    tickets: list[dict[int, int]] = [{}, {}]  # per producer: ticket -> index
    backlog: list[list[tuple[int, bytes]]] = [[], []]  # what each application still has to send

    def produce(who: int) -> None:
        """Send in order until the mailbox is known full, then retry shortly (would block)."""
        while backlog[who]:
            priority, data = backlog[who][0]
            try:
                ticket = producers[who].send(C, data, now=net.now, mailbox="q", priority=priority)
            except errors.MailboxFull:
                net.call_at(net.now + 0.005, lambda: produce(who), host=(P1, P2)[who])
                return
            tickets[who][ticket] = _TAG.unpack_from(data)[1]
            backlog[who].pop(0)

    for index, (who, priority, size) in enumerate(messages):
        data = _TAG.pack(who, index) + rng.randbytes(size)

        def arrive(who: int = who, data: bytes = data, priority: int = priority) -> None:
            backlog[who].append((priority, data))
            if len(backlog[who]) == 1:
                produce(who)

        net.call_at(index * 0.002, arrive, host=(P1, P2)[who])
    taken: list[Message] = []
    peak = [0]

    def consume() -> None:
        peak[0] = max(peak[0], consumer.stats().mailbox_bytes)
        msg = consumer.take("q", now=net.now)
        if msg is not None:
            taken.append(msg)
        if len(taken) < len(messages):
            net.call_at(net.now + take_every, consume, host=C)

    net.call_at(0.01, consume, host=C)
    fates: list[dict[int, events.Event]] = [{}, {}]

    def done() -> bool:
        for who in range(2):
            _collect(producers[who], fates[who])
        return len(taken) == len(messages) and sum(map(len, fates)) == len(messages)

    net.run(stop=done, until=3600.0)
    assert len(taken) == len(messages), "a message accepted for a mailbox was lost"
    tags = [_TAG.unpack_from(m.data) for m in taken]
    assert sorted(i for _, i in tags) == list(range(len(messages))), "each exactly once"
    for who in range(2):
        for priority in range(3):
            order = [
                i
                for (w, i), m in zip(tags, taken, strict=True)
                if w == who and m.priority == priority
            ]
            assert order == sorted(order), "a producer's order within a priority changed"
        assert all(isinstance(f, events.MessageDelivered) for f in fates[who].values())
        if capacity == 0:  # a rendezvous receipt names its receiver
            assert all(f.receiver is not None for f in fates[who].values())  # type: ignore[attr-defined]
    # bounded: what the mailbox may queue, plus parking up to the window, per producer
    bound = 8 * 3010 + 2 * (16 * 1024 + 64 * 1200 + 3010)
    assert peak[0] <= bound


@SETTINGS
@given(
    count=st.integers(1, 20),
    timeout=st.floats(0.01, 0.5),
    take_after=st.floats(0.0, 1.0),
    link=links,
    seed=st.integers(0, 2**16),
)
def test_timed_sends_to_a_full_mailbox_each_get_one_truthful_outcome(
    count: int, timeout: float, take_after: float, link: Impairment, seed: int
) -> None:
    """Timeouts race the consumer: whatever was reported delivered really got in, once."""
    config = Config(peer_timeout=30.0)
    net = SimNetwork(seed=seed, default=link)
    producer = Endpoint(config, rng=random.Random(seed))
    consumer = Endpoint(config, rng=random.Random(seed + 1))
    net.add_host(P1, producer)
    net.add_host(C, consumer)
    consumer.create_mailbox("q", capacity=1, now=0.0)
    sent: dict[int, bytes] = {}

    def send_all() -> None:
        for i in range(count):
            data = _TAG.pack(0, i)
            sent[producer.send(C, data, now=net.now, mailbox="q", timeout=timeout)] = data

    net.call_at(0.0, send_all, host=P1)
    taken: list[bytes] = []

    def drain() -> None:
        while (msg := consumer.take("q", now=net.now)) is not None:
            taken.append(msg.data)
        net.call_at(net.now + 0.05, drain, host=C)

    net.call_at(take_after, drain, host=C)
    fates: dict[int, events.Event] = {}

    def done() -> bool:
        _collect(producer, fates)
        return len(fates) == count and not consumer.stats().mailbox("q").parked

    net.run(stop=done, until=600.0)
    net.run(until=net.now + 1.0)  # let any last admission reach the consumer
    assert len(fates) == count
    assert len(set(taken)) == len(taken), "nothing taken twice"
    for ticket, fate in fates.items():
        if isinstance(fate, events.MessageDelivered):
            assert sent[ticket] in taken, "a receipt means it really got in"
        else:
            assert isinstance(fate, events.MessageFailed)
            assert isinstance(fate.error, errors.SendTimeout)
    assert set(taken) <= set(sent.values())
    withdrawn = consumer.stats().mailbox("q").discarded
    timed_out = sum(isinstance(f, events.MessageFailed) for f in fates.values())
    assert withdrawn <= timed_out


def test_a_sacked_message_keeps_its_parked_notice_until_the_sender_hears_it() -> None:
    """Found by soaking the back-pressure property (5,000 examples, seed 4242).

    The third message's two fragments were selectively acknowledged while the first
    (retransmitted) was still missing, so the rendezvous mailbox could not judge it yet.
    The sender's base then moved past it on that SACK alone; the receiver took the
    base as proof that its DEFERRED notice had been heard and dropped it, and the next
    cumulative ack completed the parked message as plainly delivered: a rendezvous
    receipt without its receiver (and, for a refusal, a refused message reported
    delivered). SendStream._verdict_hold keeps the base at such a message."""
    test_back_pressure_never_drops_and_keeps_each_senders_order.hypothesis.inner_test(
        capacity=0,
        messages=[(0, 0, 37), (0, 0, 968), (0, 0, 1044), (0, 0, 0)],
        take_every=0.00390625,
        link=Impairment(
            loss=0.203125,
            duplicate=0.125,
            corrupt=0.0625,
            delay=0.001953125,
            jitter=0.0008809686721332956,
            reorder=0.25,
        ),
        seed=65535,
    )
