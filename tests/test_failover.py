"""Anycast failover alone (reliable/failover.py): a fake unicast send and a fixed member
list stand in for the endpoint and the service directory."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from reliable import errors, events
from reliable.addressing import ServiceAddress
from reliable.failover import Anycast, Failover

A, B, C = ("198.18.0.1", 1), ("198.18.0.2", 1), ("198.18.0.3", 1)
SERVICE = ServiceAddress(service="echo", mailbox="jobs")


class Fakes:
    """The unicast send (tickets from 100 on; ``refuse`` makes it raise) and the
    directory: members in order, the first not excluded is chosen."""

    def __init__(self, members: list[Any]) -> None:
        self.members = members
        self.sends: list[tuple[Any, bytes, str, float | None]] = []
        self.reported: list[events.Event] = []
        self.refuse = False
        self._next = 100

    def send(
        self,
        dest: Any,
        data: bytes,
        *,
        now: float,
        msg_type: int,
        priority: int,
        mailbox: str,
        deadline: float | None,
    ) -> int:
        if self.refuse:
            raise errors.SendBufferFull("full")
        self.sends.append((dest, data, mailbox, deadline))
        self._next += 1
        return self._next

    def choose(
        self,
        service: str,
        *,
        policy: str,
        exclude: set[Any],
        rtt: Callable[[Any], float | None],
    ) -> Any | None:
        assert service == "echo"
        return next((m for m in self.members if m not in exclude), None)

    def failover(self) -> Failover:
        return Failover(
            send=self.send, choose=self.choose, rtt=lambda _m: None, report=self.reported.append
        )


def _start(fakes: Fakes, failover: Failover, deadline: float | None = None) -> Anycast:
    attempt = Anycast(7, SERVICE, b"job", 0, 0, deadline, "round-robin")
    failover.start(attempt, failover.first_member("echo", "round-robin"), 0.0)
    return attempt


def _failed(attempt: Anycast, error: errors.DeliveryFailed) -> events.MessageFailed:
    return events.MessageFailed(ticket=attempt.inner, peer=attempt.member, error=error)


def test_a_delivery_is_reported_under_the_applications_ticket_with_the_members_tried() -> None:
    fakes = Fakes([A, B])
    failover = fakes.failover()
    attempt = _start(fakes, failover)
    failover.outcome(
        failover.attempts.pop(attempt.inner), _failed(attempt, errors.PeerClosed(A)), 1.0, False
    )
    assert [dest for dest, *_ in fakes.sends] == [A, B]  # failed over to B
    assert fakes.sends[1][1:3] == (b"job", "jobs")
    delivered = events.MessageDelivered(
        ticket=attempt.inner,
        peer=B,
        size=3,
        fragments=1,
        transmissions=1,
        elapsed=0.5,
        incarnation=2,
    )
    failover.outcome(failover.attempts.pop(attempt.inner), delivered, 2.0, False)
    (report,) = fakes.reported
    assert isinstance(report, events.MessageDelivered)
    assert (report.ticket, report.peer, report.failovers) == (7, B, ((A, "closed"),))
    assert failover.attempts == {}


def test_a_failure_no_other_member_would_mend_is_reported_as_it_is() -> None:
    fakes = Fakes([A, B])
    failover = fakes.failover()
    attempt = _start(fakes, failover)
    timeout = errors.SendTimeout(A, 1.0)
    failover.outcome(failover.attempts.pop(attempt.inner), _failed(attempt, timeout), 1.0, False)
    (report,) = fakes.reported
    assert isinstance(report, events.MessageFailed)
    assert (report.ticket, report.error) == (7, timeout)
    assert len(fakes.sends) == 1


@pytest.mark.parametrize(
    ("cancelled", "now", "closing", "refuse"),
    [
        (False, 1.0, False, False),  # every member tried
        (True, 1.0, False, False),  # withdrawn by the application
        (False, 5.0, False, False),  # past its deadline
        (False, 1.0, True, False),  # the node closes
        (False, 1.0, False, True),  # no room for another attempt now
    ],
)
def test_when_no_member_is_tried_again_the_send_fails_with_no_service_member(
    cancelled: bool, now: float, closing: bool, refuse: bool
) -> None:
    fakes = Fakes([A] if not (cancelled or closing or refuse or now > 1) else [A, B])
    failover = fakes.failover()
    attempt = _start(fakes, failover, deadline=5.0)
    if cancelled:
        assert failover.withdraw(7) == attempt.inner
    fakes.refuse = refuse
    unreachable = errors.PeerUnreachable(A, 1.0)  # may have arrived: delivered unknown
    failover.outcome(
        failover.attempts.pop(attempt.inner), _failed(attempt, unreachable), now, closing
    )
    (report,) = fakes.reported
    assert isinstance(report, events.MessageFailed) and report.ticket == 7
    assert isinstance(report.error, errors.NoServiceMember)
    assert report.error.tried == ((A, "unreachable"),)
    assert report.error.delivered is None  # A may have it
    assert len(fakes.sends) == 1


def test_withdraw_knows_only_sends_under_way() -> None:
    fakes = Fakes([A])
    failover = fakes.failover()
    assert failover.withdraw(7) is None
    attempt = _start(fakes, failover)
    assert failover.withdraw(8) is None
    assert failover.withdraw(7) == attempt.inner and attempt.cancelled


def test_a_service_without_members_is_refused_at_once() -> None:
    with pytest.raises(errors.NoServiceMember):
        Fakes([]).failover().first_member("echo", "round-robin")
