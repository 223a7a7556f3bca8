"""Receivers on other nodes over real loopback sockets: two receiving nodes, a
burst, each message to exactly one of them; refusals; management (rmsg ctl)."""

from __future__ import annotations

import threading
import time

import pytest

from reliable import Mailbox, Node, errors

pytestmark = pytest.mark.loopback


def settled_locks(box: Mailbox) -> int:
    """The owner's locked count once the receiving node's acknowledgement (sent as
    the message was handed out) has had a moment to arrive; bounded wait."""
    deadline = time.monotonic() + 5
    while box.stats().locked and time.monotonic() < deadline:
        time.sleep(0.01)
    return box.stats().locked


def test_two_receiving_nodes_share_a_burst_in_turn_each_message_once() -> None:
    with Node() as owner, Node() as r1, Node() as r2, Node() as sender:
        jobs = owner.create_mailbox("jobs")
        for node in (r1, r2):
            jobs.grant(node.address)
        addr = f"127.0.0.1:{owner.address[1]}/jobs"
        got: dict[int, list[bytes]] = {1: [], 2: []}
        ready = threading.Barrier(3, timeout=10)

        def worker(node: Node, key: int) -> None:
            box = node.remote_mailbox(addr)
            ready.wait()
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and len(got[1]) + len(got[2]) < 30:
                try:
                    got[key].append(box.receive(timeout=0.5).data)
                except errors.ReceiveTimeout:
                    continue

        threads = [threading.Thread(target=worker, args=(n, k)) for k, n in ((1, r1), (2, r2))]
        for t in threads:
            t.start()
        ready.wait()
        deadline = time.monotonic() + 10
        while owner.stats().mailbox("jobs").waiting_receivers < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        for i in range(30):
            sender.send_nowait(addr, b"%d" % i)
        for t in threads:
            t.join(30)
        everything = sorted(int(x) for x in got[1] + got[2])
        assert everything == list(range(30))  # exactly once across both nodes
        assert min(len(got[1]), len(got[2])) >= 5, (len(got[1]), len(got[2]))  # not 28 of 30


def test_an_ungranted_node_is_refused_and_a_granted_one_served() -> None:
    with Node() as owner, Node() as stranger, Node() as sender:
        box = owner.create_mailbox("q")
        addr = f"127.0.0.1:{owner.address[1]}/q"
        with pytest.raises(errors.ReceiveRefused, match="not granted"):
            stranger.remote_mailbox(addr).receive(timeout=5)
        box.grant(stranger.address)
        assert box.granted() == [stranger.address]
        sender.send(addr, b"hello")
        msg = stranger.remote_mailbox(addr).receive(timeout=5)
        assert (msg.data, msg.mailbox, msg.source) == (b"hello", addr, sender.address)
        assert settled_locks(box) == 0
        with pytest.raises(errors.UsageError, match="port"):
            owner.create_mailbox("p", port=True).grant(stranger.address)


def test_a_waiting_remote_receive_learns_the_owner_closed() -> None:
    with Node() as receiver:
        owner = Node()
        owner.create_mailbox("q").grant(receiver.address)
        box = receiver.remote_mailbox(f"127.0.0.1:{owner.address[1]}/q")
        threading.Timer(0.3, owner.close).start()
        started = time.monotonic()
        with pytest.raises(errors.MailboxGone):
            box.receive(timeout=10)
        assert time.monotonic() - started < 5  # not a peer timeout


def test_manage_inspects_sets_limits_and_deletes_from_another_node() -> None:
    with Node() as owner, Node() as ctl:
        owner.create_mailbox("jobs", capacity=5)
        info = ctl.manage(owner.address, "inspect", "jobs")
        assert (info["name"], info["capacity"], info["messages"]) == ("jobs", 5, 0)
        info = ctl.manage(owner.address, "set_limits", "jobs", capacity=9, max_bytes=4096)
        assert (info["capacity"], info["max_bytes"]) == (9, 4096)
        assert owner.stats().mailbox("jobs").capacity == 9
        info = ctl.manage(owner.address, "grant", "jobs", node="127.0.0.1:9")
        assert info["granted"] == ["127.0.0.1:9"]
        assert ctl.manage(owner.address, "delete", "jobs")["deleted"]
        assert "jobs" not in [m.name for m in owner.stats().mailboxes]
        with pytest.raises(errors.UsageError, match="no mailbox"):
            ctl.manage(owner.address, "inspect", "jobs")


def test_transfer_moves_the_mailbox_and_senders_follow() -> None:
    with Node() as old, Node() as new, Node() as sender:
        jobs = old.create_mailbox("jobs")
        here = f"127.0.0.1:{old.address[1]}/jobs"
        for i in range(3):
            sender.send(here, b"%d" % i)
        new.create_mailbox("jobs")  # the new owner's consent
        assert jobs.transfer(new.address) == {
            "mailbox": "jobs",
            "owner": f"127.0.0.1:{new.address[1]}",
            "moved": 3,
        }
        moved = new.mailbox("jobs")
        assert [moved.receive(timeout=5).data for _ in range(3)] == [b"0", b"1", b"2"]
        with pytest.raises(errors.MailboxNotFound) as bounced:
            sender.send(here, b"late")
        assert bounced.value.delivered is False
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:  # the Moved notice may trail the refusal a moment
            try:
                receipt = sender.send(here, b"late")
                break
            except errors.MailboxNotFound:
                time.sleep(0.05)
        assert receipt.peer == new.address
        assert moved.receive(timeout=5).data == b"late"


def test_a_transfer_the_new_node_did_not_consent_to_changes_nothing() -> None:
    with Node() as old, Node() as other:
        jobs = old.create_mailbox("jobs")
        with pytest.raises(errors.UsageError, match="create it there"):
            jobs.transfer(other.address)
        assert old.stats().mailbox("jobs").name == "jobs"


def test_an_asyncio_node_receives_from_a_mailbox_on_another_node() -> None:
    import asyncio

    from reliable.aio import AsyncNode

    with Node() as owner, Node() as sender:
        box = owner.create_mailbox("q")
        addr = f"127.0.0.1:{owner.address[1]}/q"

        async def main() -> tuple[bytes, str]:
            async with AsyncNode() as node:
                box.grant(node.address)
                remote = node.remote_mailbox(addr)
                with pytest.raises(errors.ReceiveTimeout):
                    await remote.receive(timeout=0.2)
                sender.send(addr, b"async")
                msg = await remote.receive(timeout=5)
                return msg.data, msg.mailbox

        assert asyncio.run(main()) == (b"async", addr)
        assert settled_locks(box) == 0
