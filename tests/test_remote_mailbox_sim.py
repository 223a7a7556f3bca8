"""Receivers on other nodes (reliable/remote_mailbox.py) over the simulated network.

The guarantee under test (docs/mailboxes.md, "Receivers on other nodes"):
every message a sender was told is in the mailbox reaches exactly one
receiver's application, across the owner and every receiving node, and none
is lost when a receiving node dies; waiting receivers are served in turn,
bursts included; only granted nodes may pull.
"""

from __future__ import annotations

import random
import struct
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from netem import Impairment, SimNetwork
from reliable import Config, Endpoint, errors, events
from reliable.message import Message
from reliable.remote_mailbox import (
    Adopt,
    Adopted,
    AdoptEnd,
    Handover,
    Manage,
    ManageReply,
    Move,
    Moved,
    Pull,
    PullCancel,
    Refused,
    Taken,
    decode_remote,
    encode_remote,
)

OWNER = ("10.0.2.1", 7000)
R1 = ("10.0.2.2", 7000)
R2 = ("10.0.2.3", 7000)
SENDER = ("10.0.2.4", 7000)
CONFIG = Config(peer_timeout=2.0, max_probe_interval=0.25)
_TAG = struct.Struct("!I")


class App:
    """A node and its application: with ``pulling``, one receive always waits on
    OWNER's ``jobs`` (a new one as soon as the last was answered)."""

    def __init__(self, ep: Endpoint, *, pulling: bool = False) -> None:
        self.ep = ep
        self.got: list[Message] = []
        self.failures: list[errors.ReliableError] = []
        self.events: list[events.Event] = []
        self.ticket: int | None = None
        self.pulling = pulling
        self.limit: int | None = None

    def start(self, now: float) -> None:
        self.ticket = self.ep.pull(OWNER, "jobs", now=now)

    def receive_datagram(self, data: bytes, addr: Any, now: float) -> None:
        self.ep.receive_datagram(data, addr, now)
        self.react(now)

    def handle_timer(self, now: float) -> None:
        self.ep.handle_timer(now)
        self.react(now)

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, Any]]:
        return self.ep.datagrams_to_send(now)

    def get_timer(self) -> float | None:
        return self.ep.get_timer()

    def react(self, now: float) -> None:
        while (e := self.ep.next_event()) is not None:
            self.events.append(e)
            if isinstance(e, events.MessageTaken) and e.waiter == self.ticket:
                self.got.append(e.message)
                self.ticket = None
                if self.pulling and (self.limit is None or len(self.got) < self.limit):
                    self.start(now)
            elif isinstance(e, events.ReceiveFailed) and e.waiter == self.ticket:
                self.failures.append(e.error)
                self.ticket = None


def tags(msgs: list[Message]) -> list[int]:
    return [_TAG.unpack(m.data[:4])[0] for m in msgs]


def build(
    seed: int = 1, link: Impairment | None = None, *, grant: tuple[Any, ...] = (R1, R2)
) -> tuple[SimNetwork, dict[Any, App]]:
    net = SimNetwork(seed=seed, default=link)
    apps = {}
    for i, addr in enumerate((OWNER, R1, R2, SENDER)):
        app = App(Endpoint(CONFIG, rng=random.Random(seed * 31 + i)), pulling=addr in (R1, R2))
        apps[addr] = app
        net.add_host(addr, app)
    apps[OWNER].ep.create_mailbox("jobs", now=0.0)
    for node in grant:
        apps[OWNER].ep.remote.grant("jobs", node)
    return net, apps


def send_burst(net: SimNetwork, apps: dict[Any, App], count: int, at: float) -> list[int]:
    tickets: list[int] = []

    def burst() -> None:
        for i in range(count):
            tickets.append(
                apps[SENDER].ep.send(OWNER, _TAG.pack(i) + b"job", now=net.now, mailbox="jobs")
            )

    net.call_at(at, burst, host=SENDER)
    return tickets


def start_receivers(net: SimNetwork, apps: dict[Any, App], at: float = 0.0) -> None:
    for addr in (R1, R2):
        net.call_at(at, lambda app=apps[addr]: app.start(net.now), host=addr)


def delivered(apps: dict[Any, App]) -> int:
    return sum(isinstance(e, events.MessageDelivered) for e in apps[SENDER].events)


def test_wire_round_trip_of_every_operation() -> None:
    for msg in (
        Pull(7, "jobs", -3, True, "worker-1"),
        PullCancel(7),
        Handover(7, 9, 5, 300, "10.0.0.1:5000", 2**63 + 5, 2**40, b"\x00data"),
        Handover(7, 9, 5, 300, "10.0.0.1:5000", 1, 2, b"", "10.0.0.7:7000"),
        Adopt(3, "jobs", ("10.0.0.1:1", "10.0.0.2:2")),
        Adopt(3, "jobs"),
        Move(3, -1, 2, "10.0.0.1:5000", 9, 10, b"x", "10.0.0.7:7000"),
        AdoptEnd(3, 12),
        Adopted(3, "no_mailbox", 0),
        Moved("jobs", "10.0.0.9:7000"),
        Taken(9, False),
        Refused(7, "moved", "10.0.0.9:7000"),
        Manage(1, "set_limits", "jobs", 10, None),
        Manage(2, "grant", "jobs", None, None, "127.0.0.1:9"),
        ManageReply(1, 0, b'{"a": 1}'),
    ):
        assert decode_remote(encode_remote(msg)) == msg


def test_a_burst_is_shared_in_turn_between_two_waiting_remote_receivers() -> None:
    net, apps = build()
    start_receivers(net, apps)
    send_burst(net, apps, 30, at=0.5)
    net.run(until=5.0)
    got1, got2 = tags(apps[R1].got), tags(apps[R2].got)
    assert sorted(got1 + got2) == list(range(30))  # each exactly once
    assert abs(len(got1) - len(got2)) <= 2, (len(got1), len(got2))  # not 28 of 30
    assert delivered(apps) == 30
    owner = apps[OWNER].ep
    stats = owner.stats().mailbox("jobs")
    assert (stats.messages, stats.locked) == (0, 0)  # every hand-over was acknowledged
    assert apps[R1].got[0].mailbox == "10.0.2.1:7000/jobs"
    assert apps[R1].got[0].source == SENDER  # the original sender, not the owner


def test_remote_and_local_receivers_share_one_line() -> None:
    net, apps = build(grant=(R1,))
    owner = apps[OWNER]
    local: list[int] = []
    net.call_at(0.0, lambda: apps[R1].start(net.now), host=R1)
    net.run(until=0.2)  # R1's pull waits first
    net.call_at(
        0.2, lambda: local.append(owner.ep.wait_for_message("jobs", now=net.now)), host=OWNER
    )
    apps[R1].limit = 1
    send_burst(net, apps, 2, at=0.3)
    net.run(until=2.0)
    assert tags(apps[R1].got) == [0]  # the longest waiting receiver first
    taken = [e for e in owner.events if isinstance(e, events.MessageTaken)]
    assert [e.waiter for e in taken] == local and tags([e.message for e in taken]) == [1]


def test_only_granted_nodes_may_pull_and_others_learn_why() -> None:
    net, apps = build(grant=(R1,))
    start_receivers(net, apps)
    send_burst(net, apps, 4, at=0.2)
    net.run(until=3.0)
    assert tags(apps[R1].got) == [0, 1, 2, 3]
    assert apps[R2].got == []
    (failure,) = apps[R2].failures
    assert isinstance(failure, errors.ReceiveRefused) and failure.reason == "not_granted"
    assert "grant" in str(failure)


def test_a_port_and_a_missing_mailbox_refuse_remote_receivers() -> None:
    net, apps = build()
    owner = apps[OWNER].ep
    owner.delete_mailbox("jobs", 0.0)
    owner.create_mailbox("jobs", port=True, now=0.0)
    net.call_at(0.0, lambda: apps[R1].start(net.now), host=R1)
    net.call_at(
        0.0, lambda: setattr(apps[R2], "ticket", apps[R2].ep.pull(OWNER, "nope", now=0.0)), host=R2
    )
    net.run(until=2.0)
    assert [f.reason for f in apps[R1].failures] == ["port"]  # type: ignore[attr-defined]
    assert [f.reason for f in apps[R2].failures] == ["no_mailbox"]  # type: ignore[attr-defined]


def test_deleting_the_mailbox_refuses_the_waiting_remote_receivers() -> None:
    net, apps = build()
    start_receivers(net, apps)
    net.run(until=0.5)
    net.call_at(0.5, lambda: apps[OWNER].ep.delete_mailbox("jobs", net.now), host=OWNER)
    net.run(until=2.0)
    for addr in (R1, R2):
        assert [f.reason for f in apps[addr].failures] == ["no_mailbox"]  # type: ignore[attr-defined]


def test_a_receiving_node_that_dies_gets_its_messages_requeued_for_another() -> None:
    net, apps = build()
    apps[R2].pulling = False
    net.call_at(0.0, lambda: apps[R1].start(net.now), host=R1)
    net.run(until=0.3)
    # R1 dies the moment the message is handed to it: the hand-over is never answered.
    net.crash(R1, at=0.4)
    send_burst(net, apps, 1, at=0.4)
    net.run(until=0.45)
    net.call_at(0.45, lambda: apps[R2].start(net.now), host=R2)  # R2 waits behind R1
    net.run(until=8.0)
    assert tags(apps[R2].got) == [0]
    assert apps[R1].got == []
    assert apps[OWNER].ep.remote.requeued == 1
    assert apps[OWNER].ep.stats().mailbox("jobs").locked == 0


def test_a_receive_that_gives_up_hands_back_a_crossing_message() -> None:
    net, apps = build(grant=(R1,))
    r1 = apps[R1]
    net.call_at(0.0, lambda: r1.start(net.now), host=R1)
    net.run(until=0.2)
    owner = apps[OWNER].ep

    def arrive_and_cancel() -> None:
        # The message reaches the owner, which hands it over, while R1 cancels.
        assert r1.ticket is not None
        assert r1.ep.cancel_wait(r1.ticket)
        r1.ticket = None

    send_burst(net, apps, 1, at=0.2)
    net.call_at(0.2, arrive_and_cancel, host=R1)
    net.run(until=2.0)
    assert r1.got == []
    stats = owner.stats().mailbox("jobs")
    assert (stats.messages, stats.locked) == (1, 0)  # back in the mailbox, not lost
    assert owner.take("jobs", now=net.now) is not None


def test_a_receive_fails_with_mailbox_gone_when_the_owner_closes() -> None:
    net, apps = build()
    start_receivers(net, apps)
    net.run(until=0.3)
    net.call_at(0.3, lambda: apps[OWNER].ep.close(net.now), host=OWNER)
    net.run(until=1.0)
    for addr in (R1, R2):
        (failure,) = apps[addr].failures
        assert isinstance(failure, errors.MailboxGone)


def test_pulls_survive_a_restart_that_kept_the_mailbox_and_fail_one_that_did_not() -> None:
    net, apps = build(grant=(R1,))
    net.call_at(0.0, lambda: apps[R1].start(net.now), host=R1)
    net.run(until=0.3)

    def fresh_owner() -> App:
        app = App(Endpoint(CONFIG, rng=random.Random(777)))
        apps[OWNER] = app
        return app

    net.restart(OWNER, fresh_owner, at=0.3)
    send_burst(net, apps, 1, at=0.4)  # sends to the new life: it re-establishes the session
    net.run(until=3.0)
    (failure,) = apps[R1].failures
    assert isinstance(failure, errors.ReceiveRefused) and failure.reason == "no_mailbox"


# ---------------------------------------------------------- prompt MailboxGone


def test_a_send_to_a_node_that_closed_fails_promptly_with_mailbox_gone() -> None:
    net, apps = build()
    sender = apps[SENDER]
    send_burst(net, apps, 1, at=0.1)
    net.run(until=0.5)
    assert delivered(apps) == 1
    net.call_at(0.5, lambda: apps[OWNER].ep.close(net.now), host=OWNER)
    net.run(until=1.0)
    net.crash(OWNER, at=1.0)  # its socket is gone: nothing answers any more
    send_burst(net, apps, 1, at=1.0)
    net.run(until=1.0 + CONFIG.peer_timeout + 1)
    (failed,) = [e for e in sender.events if isinstance(e, events.MessageFailed)]
    assert isinstance(failed.error, errors.MailboxGone)
    assert isinstance(failed.error, errors.PeerClosed)  # what code catching that expects
    # within the grace, not after peer_timeout (a PeerUnreachable)
    took = [e for e in sender.events if isinstance(e, events.MessageFailed)]
    assert took


def test_mailbox_gone_comes_within_the_grace_not_the_peer_timeout() -> None:
    net, apps = build()
    send_burst(net, apps, 1, at=0.1)
    net.call_at(0.5, lambda: apps[OWNER].ep.close(net.now), host=OWNER)
    net.crash(OWNER, at=1.0)
    send_burst(net, apps, 1, at=1.0)
    net.run(stop=lambda: any(isinstance(e, events.MessageFailed) for e in apps[SENDER].events))
    assert net.now - 1.0 < CONFIG.peer_timeout  # 1.5 s grace against a 2 s peer_timeout
    assert net.now - 1.0 <= 1.5 * CONFIG.initial_rto + 0.01


def test_a_node_that_came_back_after_closing_is_not_reported_gone() -> None:
    net, apps = build()
    send_burst(net, apps, 1, at=0.1)
    net.call_at(0.5, lambda: apps[OWNER].ep.close(net.now), host=OWNER)

    def back() -> App:
        app = App(Endpoint(CONFIG, rng=random.Random(778)))
        app.ep.create_mailbox("jobs", now=net.now)
        return app

    net.restart(OWNER, back, at=1.0)
    send_burst(net, apps, 1, at=1.2)
    net.run(until=5.0)
    assert delivered(apps) == 2
    assert not [e for e in apps[SENDER].events if isinstance(e, events.MessageFailed)]


def test_a_node_restarted_without_the_mailbox_answers_not_found_at_once() -> None:
    net, apps = build()
    send_burst(net, apps, 1, at=0.1)
    net.run(until=0.5)
    net.restart(OWNER, lambda: App(Endpoint(CONFIG, rng=random.Random(779))), at=0.5)
    send_burst(net, apps, 2, at=0.6)
    net.run(until=0.6 + 0.5)  # well inside peer_timeout
    failures = [e.error for e in apps[SENDER].events if isinstance(e, events.MessageFailed)]
    assert failures and all(
        isinstance(f, (errors.PeerRestarted, errors.MailboxNotFound)) for f in failures
    )


# ------------------------------------------------------------- property


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**16),
    loss=st.sampled_from([0.0, 0.05, 0.15]),
    count=st.integers(1, 25),
    crash_at=st.none() | st.floats(0.2, 1.5),
)
def test_every_message_reaches_exactly_one_receiver_even_if_one_dies(
    seed: int, loss: float, count: int, crash_at: float | None
) -> None:
    net, apps = build(seed, Impairment(loss=loss, duplicate=0.02, reorder=0.05))
    start_receivers(net, apps)
    send_burst(net, apps, count, at=0.2)
    if crash_at is not None:
        net.crash(R1, at=crash_at)
    net.run(until=12.0)
    got1, got2 = tags(apps[R1].got), tags(apps[R2].got)
    assert len(set(got1)) == len(got1) and len(set(got2)) == len(got2)  # dedupe per node
    if crash_at is None:
        assert not set(got1) & set(got2)  # exactly once across the nodes
    # (a node that dies after its application got a message, before the owner heard
    # its acknowledgement, may see that message received again elsewhere: at least once)
    accepted = delivered(apps)
    left = apps[OWNER].ep.stats().mailbox("jobs")
    got = set(got1) | set(got2)
    assert left.locked == 0 and left.messages == 0  # R2 keeps pulling: nothing stays
    assert len(got) >= accepted
    if crash_at is None:
        assert len(got) == accepted == count


# ------------------------------------------------------------- transfer


def _answers(app: App) -> list[events.ManageAnswered]:
    app.react(0.0)
    return [e for e in app.events if isinstance(e, events.ManageAnswered)]


def test_transfer_moves_the_queue_in_order_and_redirects_senders_and_receivers() -> None:
    net, apps = build(grant=(R1,))
    new_owner = R2  # R2 becomes the owner: it consents by creating the mailbox, empty
    apps[R2].pulling = False
    apps[R2].ep.create_mailbox("jobs", now=0.0)
    send_burst(net, apps, 5, at=0.1)
    net.run(until=1.0)
    assert delivered(apps) == 5
    started: list[int] = []
    net.call_at(
        1.0,
        lambda: started.append(apps[OWNER].ep.remote.transfer("jobs", new_owner, net.now)),
        host=OWNER,
    )
    net.run(until=2.0)
    (answer,) = _answers(apps[OWNER])
    assert answer.status == 0 and b'"moved": 5' in answer.body
    assert not apps[OWNER].ep.has_mailbox("jobs")
    new = apps[R2].ep
    assert new.stats().mailbox("jobs").messages == 5
    assert new.remote.granted("jobs") == [R1]  # the grants moved too
    # A sender that still addresses the old owner is refused (safe to resend) and told.
    later = send_burst(net, apps, 1, at=2.0)
    net.run(until=3.0)
    failed = [e for e in apps[SENDER].events if isinstance(e, events.MessageFailed)]
    assert [e.ticket for e in failed] == later
    assert isinstance(failed[0].error, errors.MailboxNotFound)
    assert failed[0].error.delivered is False
    again = send_burst(net, apps, 1, at=3.0)  # its node now sends to the new owner
    net.run(until=4.0)
    receipts = [e for e in apps[SENDER].events if isinstance(e, events.MessageDelivered)]
    assert receipts[-1].ticket == again[0] and receipts[-1].peer == R2
    # A remote receiver asking the old owner follows the mailbox to the new one.
    net.call_at(4.0, lambda: apps[R1].start(net.now), host=R1)
    net.run(until=6.0)
    assert tags(apps[R1].got) == [0, 1, 2, 3, 4, 0]  # in order, then the resent one


def test_a_refused_transfer_leaves_the_mailbox_and_its_messages_in_place() -> None:
    net, apps = build()
    send_burst(net, apps, 3, at=0.1)
    net.run(until=1.0)
    net.call_at(1.0, lambda: apps[OWNER].ep.remote.transfer("jobs", R2, net.now), host=OWNER)
    net.run(until=2.0)
    (answer,) = _answers(apps[OWNER])
    assert answer.status != 0 and b"create it there" in answer.body
    owner = apps[OWNER].ep
    assert tags([owner.take("jobs", now=net.now) for _ in range(3)]) == [0, 1, 2]  # type: ignore[misc]
    assert owner.remote.granted("jobs") == [R1, R2]


def test_a_transfer_to_a_node_that_dies_leaves_the_mailbox_in_place() -> None:
    net, apps = build()
    apps[R2].ep.create_mailbox("jobs", now=0.0)
    send_burst(net, apps, 3, at=0.1)
    net.run(until=1.0)
    net.crash(R2, at=1.0)
    net.call_at(1.0, lambda: apps[OWNER].ep.remote.transfer("jobs", R2, net.now), host=OWNER)
    net.run(until=1.0 + CONFIG.peer_timeout + 1.0)
    (answer,) = _answers(apps[OWNER])
    assert answer.status != 0 and b"went away" in answer.body
    assert apps[OWNER].ep.stats().mailbox("jobs").messages == 3


def test_transfer_refuses_a_port_and_a_mailbox_with_locked_messages() -> None:
    ep = Endpoint(CONFIG, rng=random.Random(5))
    ep.create_mailbox("p", port=True, now=0.0)
    try:
        ep.remote.transfer("p", R2, 0.0)
    except errors.UsageError as exc:
        assert "ports stay" in str(exc)
    else:  # pragma: no cover
        raise AssertionError("a port was transferred")
