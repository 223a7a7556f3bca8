"""The post office alone (reliable/post_office.py): verdicts, parking and its accounting,
handoffs, withdrawals and deletions, with one real session standing for the sender and
lists for the events, drops and output marks the endpoint would take."""

from __future__ import annotations

import random
from typing import Any

import pytest

from reliable import Config, errors, events
from reliable.mailbox import Selector
from reliable.message import Message
from reliable.node_messages import Admitted, Discarded, decode_node_message
from reliable.outbox_ids import format_tag
from reliable.peer import PeerSession
from reliable.post_office import PostOffice
from reliable.receiver import Delivery
from reliable.wire import Fragment, Verdict

SENDER = ("198.18.0.9", 5000)
NOW = 1.0


class Node:
    """What the endpoint hands a post office, recorded."""

    def __init__(self, config: Config | None = None) -> None:
        self.config = config or Config()
        self.events: list[events.Event] = []
        self.dropped: dict[str, int] = {}
        self.dirty: list[Any] = []
        self.deleted: list[str] = []
        self.missing: list[tuple[Any, str]] = []
        self.peers: dict[Any, PeerSession] = {}
        self.post = PostOffice(
            self.config,
            self.peers,
            emit=self.events.append,
            drop=self.drop,
            mark_dirty=self.dirty.append,
            clock=lambda: NOW,
            on_deleted=self.deleted.append,
            no_mailbox=lambda source, name: self.missing.append((source, name)),
        )
        self.session = PeerSession(SENDER, self.config, random.Random(1), NOW)
        self.session.incarnation = 77
        self.peers[SENDER] = self.session
        self._msg_id = 0

    def drop(self, reason: str) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1

    def deliver(self, mailbox: str, data: bytes = b"x" * 10) -> Verdict | None:
        self._msg_id += 1
        d = Delivery(self._msg_id, data, 0, 0, mailbox, last_seq=self._msg_id)
        return self.post.deliver(self.session, d, NOW)

    def create(
        self,
        name: str,
        capacity: int | None = None,
        max_bytes: int | None = None,
        port: bool = False,
    ) -> int:
        return self.post.create_mailbox(name, capacity, max_bytes, port, None, NOW)

    def take(self, name: str) -> Message | None:
        return self.post.take(name, None, None, "", None, NOW)

    def told(self) -> list[object]:
        """The node messages queued for the sender, decoded."""
        return [decode_node_message(m.data) for m in self.session.sender.node_messages]


def _first(mailbox: str, total_len: int) -> Fragment:
    return Fragment(
        seq=1,
        base=1,
        msg_id=1,
        index=0,
        count=1,
        total_len=total_len,
        msg_type=0,
        priority=0,
        mailbox=mailbox,
        payload=b"",
    )


def test_the_screen_refuses_by_the_first_fragment_and_counts_why() -> None:
    node = Node(Config(mailbox_memory=1000))
    post = node.post
    node.create("small", max_bytes=10)
    node.create("shut")
    post.close_mailbox("shut", NOW, None)
    assert post.screen(_first("nope", 5), SENDER) is Verdict.NO_MAILBOX
    assert node.missing == [(SENDER, "nope")]  # the remote-mailbox protocol may know where
    assert post.screen(_first("shut", 5), SENDER) is Verdict.MAILBOX_CLOSED
    assert post.screen(_first("small", 11), SENDER) is Verdict.TOO_LARGE
    assert post.screen(_first("", 1001), SENDER) is Verdict.NO_MEMORY
    assert post.screen(_first("small", 10), SENDER) is None
    tagged = "small" + format_tag(1, 2, 0)  # an outbox's id: the mailbox is what is judged
    assert post.screen(_first(tagged, 10), SENDER) is None
    assert node.dropped == {
        "refused.no_mailbox": 1,
        "refused.mailbox_closed": 1,
        "refused.too_large": 1,
        "refused.no_memory": 1,
    }


def test_a_parked_message_stays_charged_to_its_sender_until_it_gets_in() -> None:
    node = Node()
    post = node.post
    node.create("box", capacity=1)
    assert node.deliver("box") is None  # in
    assert node.deliver("box") is Verdict.DEFERRED  # full: parked
    assert (post.held, node.session.parked) == (20, 10)
    assert node.told() == []
    first = node.take("box")
    assert first is not None and first.msg_id == 1 and first.incarnation == 77
    # Room: the parked one got in, its sender hears so and its window bytes come back.
    assert (post.held, node.session.parked) == (10, 0)
    assert node.told() == [Admitted(2)]
    assert node.dirty == [SENDER]


def test_a_message_for_a_waiting_receiver_is_handed_over_at_once() -> None:
    node = Node()
    post = node.post
    ticket = post.wait_for_message("", Selector(msg_type=0), None, "", None, NOW)
    assert node.deliver("") is None
    (taken,) = node.events
    assert isinstance(taken, events.MessageTaken) and taken.waiter == ticket
    assert (post.held, node.session.parked) == (0, 0)
    assert not post.cancel_wait(ticket)  # already answered


def test_a_withdrawn_parked_message_leaves_and_its_sender_hears_cancelled() -> None:
    node = Node()
    post = node.post
    node.create("box", capacity=0)  # rendezvous: everything parks
    assert node.deliver("box") is Verdict.DEFERRED
    post.withdraw_parked(node.session, 2)  # not parked here: nothing happens
    assert post.held == 10
    post.withdraw_parked(node.session, 1)
    assert (post.held, node.session.parked) == (0, 0)
    assert node.told() == [Discarded(1, Verdict.CANCELLED)]


def test_an_ended_incarnations_parked_messages_are_forgotten_silently() -> None:
    node = Node()
    post = node.post
    node.create("box", capacity=0)
    node.deliver("box")
    node.deliver("box")
    post.forget_parked(SENDER, 76)  # another incarnation: not these
    assert post.held == 20
    post.forget_parked(SENDER, 77)
    assert (post.held, node.session.parked, node.told()) == (0, 0, [])


def test_deleting_a_mailbox_fails_its_receives_and_tells_its_parked_senders() -> None:
    node = Node()
    post = node.post
    owner = node.create("box", capacity=1, port=True)
    node.deliver("box")
    node.deliver("box")
    ticket = post.wait_for_any([("box", owner), ("", None)], None, "", None, NOW)
    with pytest.raises(errors.UsageError):
        post.delete_mailbox("box", NOW, None)  # a port: only its owner deletes it
    post.delete_mailbox("box", NOW, owner)
    assert node.deleted == ["box"]
    assert not post.has_mailbox("box") and post.held == 0
    assert node.told() == [Discarded(2, Verdict.MAILBOX_CLOSED)]
    (failed,) = node.events
    assert isinstance(failed, events.ReceiveFailed) and failed.waiter == ticket
    assert isinstance(failed.error, errors.MailboxDeleted)
    assert node.deliver("") is None  # it left the default mailbox's line too
    assert node.take("") is not None
    with pytest.raises(errors.UsageError):
        post.delete_mailbox("", NOW, None)  # the default mailbox stays


def test_a_resent_outbox_message_is_acknowledged_and_not_delivered_twice() -> None:
    node = Node()
    node.create("jobs")
    tagged = "jobs" + format_tag(3, 9, 0)
    assert node.deliver(tagged) is None
    assert node.deliver(tagged) is None  # the re-send after the sender's restart
    assert node.dropped == {"duplicate.outbox": 1}
    first = node.take("jobs")
    assert first is not None and first.mailbox == "jobs"
    assert node.take("jobs") is None


def test_a_local_post_is_judged_and_numbered_as_an_arrival() -> None:
    node = Node()
    post = node.post
    assert post.post("", b"one", SENDER, 0, 0, NOW) is None
    assert post.post("nope", b"two", SENDER, 0, 0, NOW) is Verdict.NO_MAILBOX
    msg = node.take("")
    assert msg is not None and (msg.data, msg.msg_id, msg.incarnation) == (b"one", 1, 0)
