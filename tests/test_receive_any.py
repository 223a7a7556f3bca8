"""A receive from a set of local mailboxes (a select over queues, issue 19): the core
on virtual time, then both adapters on loopback."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from reliable import AsyncNode, Endpoint, Node, Selector, errors, events
from reliable.store import MemoryStore, sync_stores

ME = ("10.0.0.9", 9000)


def _endpoint(*names: str) -> Endpoint:
    ep = Endpoint()
    for name in names:
        ep.create_mailbox(name, now=0.0)
    return ep


def _taken(ep: Endpoint) -> dict[int, object]:
    out: dict[int, object] = {}
    while (e := ep.next_event()) is not None:
        if isinstance(e, events.MessageTaken):
            out[e.waiter] = e.message
        elif isinstance(e, events.ReceiveFailed):
            out[e.waiter] = e.error
    return out


BOTH = [("a", None), ("b", None)]


def test_take_any_takes_the_highest_priority_head_then_the_first_listed() -> None:
    ep = _endpoint("a", "b")
    ep.post("a", b"a-low", source=ME, now=0.0)
    ep.post("b", b"b-high", source=ME, priority=5, now=0.0)
    ep.post("b", b"b-low", source=ME, now=0.0)
    got = [ep.take_any(BOTH, now=0.0) for _ in range(3)]
    assert [(m.data, m.mailbox) for m in got if m] == [
        (b"b-high", "b"),
        (b"a-low", "a"),  # equal priority: the mailbox listed first
        (b"b-low", "b"),
    ]
    assert ep.take_any(BOTH, now=0.0) is None


def test_take_any_selects_by_type_across_the_mailboxes() -> None:
    ep = _endpoint("a", "b")
    ep.post("a", b"one", source=ME, msg_type=1, now=0.0)
    ep.post("b", b"two", source=ME, msg_type=2, now=0.0)
    msg = ep.take_any(BOTH, Selector(msg_type=2), now=0.0)
    assert msg is not None and (msg.data, msg.mailbox) == (b"two", "b")


def test_a_waiting_receive_gets_exactly_one_message_and_leaves_the_other_lines() -> None:
    ep = _endpoint("a", "b")
    ticket = ep.wait_for_any(BOTH, receiver="r", now=0.0)
    ep.post("b", b"first", source=ME, now=0.0)
    ep.post("a", b"second", source=ME, now=0.0)
    answers = _taken(ep)
    assert list(answers) == [ticket]
    assert getattr(answers[ticket], "data", None) == b"first"
    assert ep.stats().mailbox("a").messages == 1, "the second message was not taken too"
    assert not ep.cancel_wait(ticket), "already answered"
    # it stands in no line any more: a later message stays queued
    ep.post("b", b"third", source=ME, now=0.0)
    assert _taken(ep) == {}
    assert ep.stats().mailbox("b").messages == 1


def test_cancelling_a_waiting_set_receive_takes_it_out_of_every_line() -> None:
    ep = _endpoint("a", "b")
    ticket = ep.wait_for_any(BOTH, now=0.0)
    assert ep.cancel_wait(ticket)
    ep.post("a", b"x", source=ME, now=0.0)
    ep.post("b", b"y", source=ME, now=0.0)
    assert _taken(ep) == {}
    assert ep.stats().mailbox("a").messages == ep.stats().mailbox("b").messages == 1


def test_deleting_one_mailbox_of_the_set_fails_the_receive_everywhere() -> None:
    ep = _endpoint("a", "b")
    ticket = ep.wait_for_any(BOTH, now=0.0)
    ep.delete_mailbox("a", 0.0)
    assert isinstance(_taken(ep)[ticket], errors.MailboxDeleted)
    ep.post("b", b"y", source=ME, now=0.0)
    assert _taken(ep) == {}
    assert ep.stats().mailbox("b").messages == 1


def test_waiters_of_one_mailbox_and_of_a_set_are_served_in_turn() -> None:
    ep = _endpoint("a", "b")
    first = ep.wait_for_message("a", receiver="one", now=0.0)
    both = ep.wait_for_any(BOTH, receiver="set", now=0.0)
    for data in (b"1", b"2", b"3"):
        ep.post("a", data, source=ME, now=0.0)
    answers = _taken(ep)
    assert getattr(answers[first], "data", None) == b"1"
    assert getattr(answers[both], "data", None) == b"2"
    assert ep.stats().mailbox("a").messages == 1


def test_a_set_receive_from_a_durable_mailbox_is_answered_after_the_delete_commits() -> None:
    ep = _endpoint("b")
    store = MemoryStore()
    ep.create_mailbox("d", store=store, now=0.0)
    ticket = ep.wait_for_any([("d", None), ("b", None)], now=0.0)
    ep.post("d", b"kept", source=ME, now=0.0)
    assert _taken(ep) == {}, "staged: not yet committed"
    sync_stores(ep, 0.0)  # insert, hand-off, delete: all committed
    assert getattr(_taken(ep)[ticket], "data", None) == b"kept"
    assert store.rows == {}
    ep.post("b", b"later", source=ME, now=0.0)
    assert _taken(ep) == {}


def test_bad_sets_are_refused_before_anything_waits() -> None:
    with Node() as node:
        node.create_mailbox("a")
        with pytest.raises(errors.UsageError, match="list of mailboxes"):
            node.receive_any("a", timeout=0)
        with pytest.raises(errors.UsageError, match="at least one"):
            node.receive_any([], timeout=0)
        with pytest.raises(errors.UsageError, match="once"):
            node.receive_any(["a", "a"], timeout=0)
        with pytest.raises(errors.UnknownMailbox):
            node.receive_any(["a", "nope"], timeout=0)


pytestmark_loopback = pytest.mark.loopback


@pytestmark_loopback
def test_node_receive_any_waits_on_several_mailboxes_each_message_once() -> None:
    with Node() as server, Node() as client:
        jobs = server.create_mailbox("jobs")
        server.create_mailbox("urgent")
        got: list[tuple[bytes, str]] = []

        def receiver() -> None:
            for _ in range(2):
                msg = server.receive_any([jobs, "urgent"], timeout=5)
                got.append((msg.data, msg.mailbox))

        thread = threading.Thread(target=receiver)
        thread.start()
        time.sleep(0.1)  # it waits in both lines
        base = f"127.0.0.1:{server.address[1]}"
        client.send(f"{base}/urgent", b"fire")
        client.send(f"{base}/jobs", b"build")
        thread.join(10)
        assert got == [(b"fire", "urgent"), (b"build", "jobs")]
        assert server.stats().mailbox("jobs").messages == 0
        with pytest.raises(errors.ReceiveTimeout):
            server.receive_any(["jobs", "urgent"], timeout=0.05)


@pytestmark_loopback
def test_node_receive_any_with_a_lock_and_a_port() -> None:
    with Node() as node:
        port = node.create_mailbox("replies", port=True)
        node.create_mailbox("events")
        node.post("replies", b"r1")
        msg = node.receive_any([port, "events"], timeout=5, lock=30)
        assert (msg.data, msg.mailbox) == (b"r1", "replies")
        assert port.stats().locked == 1 and port.ack(msg)
        with pytest.raises(errors.UsageError):
            node.receive_any(["replies", "events"], timeout=0)  # a port: its owner handle only


@pytestmark_loopback
def test_asyncnode_receive_any_waits_on_several_mailboxes() -> None:
    async def main() -> list[tuple[bytes, str]]:
        async with AsyncNode() as node:
            node.create_mailbox("a")
            node.create_mailbox("b")
            waiting = asyncio.create_task(node.receive_any(["a", "b"], timeout=5))
            await asyncio.sleep(0.05)
            node.post("b", b"from b")
            first = await waiting
            node.post("a", b"low")
            node.post("b", b"high", priority=3)
            second = await node.receive_any(["a", "b"], timeout=5)
            third = await node.receive_any(["a", "b"], timeout=5)
            with pytest.raises(errors.ReceiveTimeout):
                await node.receive_any(["a", "b"], timeout=0.05)
            return [(m.data, m.mailbox) for m in (first, second, third)]

    assert asyncio.run(main()) == [(b"from b", "b"), (b"high", "b"), (b"low", "a")]
