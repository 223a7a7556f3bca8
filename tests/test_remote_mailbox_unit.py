"""The remote-mailbox protocol on its own (issue 18): ``RemoteMailboxes`` is handed the
node calls it makes (``RemoteNode``) and callables for events, drops and the time, so
these tests give it a small stand-in node and read what it sends, with no endpoint and
no pair of them."""

from __future__ import annotations

import random
from typing import Any

from reliable import Config, events
from reliable.message import Message
from reliable.node_messages import RawNodeMessage
from reliable.peer import PeerSession
from reliable.remote_mailbox import (
    Handover,
    Manage,
    Pull,
    Refused,
    RemoteMailboxes,
    Taken,
    decode_remote,
    encode_remote,
)

OWNER = ("10.0.0.1", 1000)
RECEIVER = ("10.0.0.2", 2000)
NOW = 50.0


class StandIn:
    """A node with plain mailboxes: what RemoteMailboxes may call, recorded."""

    def __init__(self) -> None:
        self.boxes: dict[str, list[Message]] = {"jobs": []}
        self.sent: list[tuple[Any, object]] = []
        self.calls: list[tuple[str, Any]] = []
        self.waits = 0

    def take(self, mailbox: str, selector: Any = None, **kw: Any) -> Message | None:
        self.calls.append(("take", (mailbox, kw["lock"], kw["receiver"])))
        box = self.boxes[mailbox]
        return box.pop(0) if box else None

    def wait_for_message(self, mailbox: str, selector: Any = None, **kw: Any) -> int:
        self.waits += 1
        return 100 + self.waits

    def cancel_wait(self, ticket: int) -> bool:
        self.calls.append(("cancel_wait", ticket))
        return True

    def ack(self, mailbox: str, msg: Message, **kw: Any) -> bool:
        self.calls.append(("ack", msg.data))
        return True

    def release(self, mailbox: str, msg: Message, **kw: Any) -> bool:
        self.calls.append(("release", msg.data))
        return True

    def has_mailbox(self, name: str) -> bool:
        return name in self.boxes

    def port_owner(self, name: str) -> int | None:
        return None

    def watch(self, peer: Any, now: float) -> None:
        self.calls.append(("watch", peer))

    def unwatch(self, peer: Any, now: float) -> None:
        self.calls.append(("unwatch", peer))

    def has_heard(self, peer: Any) -> bool:
        return True

    def send_node_message_to(self, peer: Any, message: object, now: float) -> None:
        assert isinstance(message, RawNodeMessage)
        self.sent.append((peer, decode_remote(message.payload)))


def _owner(
    config: Config | None = None,
) -> tuple[RemoteMailboxes, StandIn, dict[str, int], list[events.Event]]:
    node = StandIn()
    drops: dict[str, int] = {}
    emitted: list[events.Event] = []

    def drop(reason: str) -> None:
        drops[reason] = drops.get(reason, 0) + 1

    remote = RemoteMailboxes(
        config or Config(),
        node,  # type: ignore[arg-type]  (a stand-in: only the calls these tests reach)
        emit=emitted.append,
        drop=drop,
        clock=lambda: NOW,
    )
    return remote, node, drops, emitted


def _from(addr: Any) -> PeerSession:
    """The session a node message came in on (only its address is read)."""
    return PeerSession(addr, Config(), random.Random(1), NOW)


def test_a_pull_from_a_node_without_the_right_is_refused_and_takes_nothing() -> None:
    remote, node, _, _ = _owner()
    node.boxes["jobs"].append(Message(source=OWNER, data=b"m1", mailbox="jobs"))
    remote.on_node_message(_from(RECEIVER), encode_remote(Pull(7, "jobs")), NOW)
    assert node.sent == [(RECEIVER, Refused(7, "not_granted"))]
    assert not [c for c in node.calls if c[0] == "take"]
    remote.on_node_message(_from(RECEIVER), encode_remote(Pull(8, "nope")), NOW)
    assert node.sent[-1] == (RECEIVER, Refused(8, "no_mailbox"))


def test_a_granted_pull_takes_under_a_lease_hands_over_and_acks_on_taken() -> None:
    remote, node, drops, _ = _owner(Config(peer_timeout=30.0))
    remote.grant("jobs", RECEIVER)
    node.boxes["jobs"].append(
        Message(source=("10.0.0.3", 3000), data=b"m1", mailbox="jobs", msg_id=4, incarnation=9)
    )
    remote.on_node_message(_from(RECEIVER), encode_remote(Pull(7, "jobs", receiver="bob")), NOW)
    assert ("take", ("jobs", 120.0, "bob")) in node.calls  # the lease: 4 x peer_timeout
    ((peer, handover),) = node.sent
    assert peer == RECEIVER and isinstance(handover, Handover)
    assert (handover.request, handover.data, handover.source) == (7, b"m1", "10.0.0.3:3000")
    assert ("watch", RECEIVER) in node.calls and remote.handed_over == 1
    remote.on_node_message(_from(RECEIVER), encode_remote(Taken(handover.key, True)), NOW)
    assert node.calls[-2:] == [("unwatch", RECEIVER), ("ack", b"m1")]
    # the same answer again names nothing handed over: counted, nothing acked twice
    remote.on_node_message(_from(RECEIVER), encode_remote(Taken(handover.key, True)), NOW)
    assert drops == {"remote.stray_taken": 1}
    assert [c for c in node.calls if c[0] == "ack"] == [("ack", b"m1")]


def test_a_pull_with_nothing_waiting_waits_and_a_refused_hand_over_goes_back() -> None:
    remote, node, _, _ = _owner()
    remote.grant("jobs", RECEIVER)
    remote.on_node_message(_from(RECEIVER), encode_remote(Pull(1, "jobs")), NOW)
    assert node.waits == 1 and not node.sent
    assert remote.receivers("jobs") == {"waiting": 1, "handed_over": 0}
    node.boxes["jobs"].append(Message(source=OWNER, data=b"m2", mailbox="jobs"))
    remote.on_node_message(_from(RECEIVER), encode_remote(Pull(2, "jobs")), NOW)
    ((_, handover),) = node.sent
    remote.on_node_message(_from(RECEIVER), encode_remote(Taken(handover.key, False)), NOW)
    assert node.calls[-1] == ("release", b"m2") and remote.returned == 1


def test_garbage_is_counted_and_management_from_another_host_is_refused() -> None:
    remote, node, drops, emitted = _owner()
    remote.on_node_message(_from(RECEIVER), b"\x10", NOW)  # a Pull cut short
    assert drops == {"malformed.control": 1} and not node.sent
    remote.local_address = OWNER
    remote.on_node_message(
        _from(("192.0.2.7", 4000)), encode_remote(Manage(3, "inspect", "jobs")), NOW
    )
    ((peer, reply),) = node.sent
    assert peer == ("192.0.2.7", 4000) and reply.request == 3 and reply.status != 0
    assert not emitted
