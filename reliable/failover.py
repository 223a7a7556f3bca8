"""Anycast sends: one message, one member of a service at a time, failing over.

Theory of operation. An anycast send (``Endpoint.send_anycast``) is an
ordinary unicast send to one member of a service, chosen by the service
directory (:mod:`reliable.anycast`: round-robin or lowest smoothed RTT).
Each attempt is a unicast ticket of its own; :class:`Failover` remembers,
by that inner ticket, which anycast send it serves. When the attempt's
outcome event comes back, the failover either reports it under the
application's ticket (delivered: with the members tried before, in
``failovers``; failed for a reason another member would not share) or tries
the next member not yet tried. The reasons worth another member are those
of ``FAILOVER_ERRORS``: the member is unreachable, closed, restarted,
refused the message, or refuses our keys. Nothing is tried again once the
application withdrew the send, once its deadline passed, or while the node
closes; when no member is left the send fails with
:class:`~reliable.errors.NoServiceMember`, which lists every member tried
and says whether one of them may have the message after all.

The guarantee (``docs/groups.md``): at least once across members, never
twice to one member incarnation, exactly once when no failover happens.

The failover is handed the unicast send, the member choice and the event
queue; it never sees a session. ``attempts`` is the dict the endpoint looks
at for every outcome event while anycast sends run (empty: one test).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any, Protocol

from . import errors, events
from .addressing import ServiceAddress

__all__ = ["ANYCAST_POLICIES", "FAILOVER_ERRORS", "Anycast", "Failover", "short_reason"]

#: The member-choice policies an anycast send may ask for.
ANYCAST_POLICIES = ("round-robin", "lowest-rtt")

#: Failures after which an anycast message is tried on another member.
FAILOVER_ERRORS = (
    errors.PeerUnreachable,
    errors.PeerClosed,
    errors.PeerRestarted,
    errors.MessageRejected,
    errors.AuthenticationFailed,
)


class SendUnicast(Protocol):
    """``Endpoint.send``, as an attempt calls it; returns the attempt's own ticket."""

    def __call__(
        self,
        dest: Any,
        data: bytes,
        *,
        now: float,
        msg_type: int,
        priority: int,
        mailbox: str,
        deadline: float | None,
    ) -> int: ...


class Choose(Protocol):
    """``Services.choose``: the member to try next, or None."""

    def __call__(
        self,
        service: str,
        *,
        policy: str,
        exclude: set[Any],
        rtt: Callable[[Any], float | None],
    ) -> Any | None: ...


class Anycast:
    """One anycast send: the application's ticket and the members tried so far."""

    __slots__ = (
        "cancelled",
        "data",
        "deadline",
        "inner",
        "mailbox",
        "maybe_delivered",
        "member",
        "msg_type",
        "policy",
        "priority",
        "service",
        "ticket",
        "tried",
    )

    def __init__(
        self,
        ticket: int,
        service: ServiceAddress,
        data: bytes,
        msg_type: int,
        priority: int,
        deadline: float | None,
        policy: str,
    ) -> None:
        self.ticket = ticket
        self.service = service.service
        self.mailbox = service.mailbox
        self.data = data
        self.msg_type = msg_type
        self.priority = priority
        self.deadline = deadline
        self.policy = policy
        self.member: Any = None
        self.inner = 0  #: the unicast ticket of the attempt in progress
        self.cancelled = False  #: the application withdrew it: no failover
        self.maybe_delivered = False  #: some member tried may have it
        self.tried: list[tuple[Any, str]] = []


class Failover:
    """The anycast sends under way, by the unicast ticket of their current attempt.

    ``send`` queues a unicast message (and raises as ``Endpoint.send``
    does); ``choose`` picks a member, ``rtt`` tells a member's smoothed RTT
    (for the ``lowest-rtt`` policy); ``report`` queues the event the
    application will see.
    """

    def __init__(
        self,
        *,
        send: SendUnicast,
        choose: Choose,
        rtt: Callable[[Any], float | None],
        report: Callable[[events.Event], None],
    ) -> None:
        self._send = send
        self._choose = choose
        self._rtt = rtt
        self._report = report
        #: inner (unicast) ticket -> the anycast send it serves
        self.attempts: dict[int, Anycast] = {}

    def first_member(self, service: str, policy: str) -> Any:
        """The member a new send to ``service`` goes to; ``NoServiceMember`` if none."""
        member = self._choose(service, policy=policy, exclude=set(), rtt=self._rtt)
        if member is None:
            raise errors.NoServiceMember(service)
        return member

    def start(self, attempt: Anycast, member: Any, now: float) -> None:
        """Send ``attempt`` to ``member`` (raises as the unicast send does)."""
        inner = self._send(
            member,
            attempt.data,
            now=now,
            msg_type=attempt.msg_type,
            priority=attempt.priority,
            mailbox=attempt.mailbox,
            deadline=attempt.deadline,
        )
        attempt.member = member
        attempt.inner = inner
        self.attempts[inner] = attempt

    def withdraw(self, ticket: int) -> int | None:
        """The application withdrew anycast send ``ticket``: no other member will be
        tried. Returns the ticket of the attempt under way, or None if ``ticket`` is
        not an anycast send's (any more)."""
        for attempt in self.attempts.values():
            if attempt.ticket == ticket:
                attempt.cancelled = True
                return attempt.inner
        return None

    def outcome(
        self,
        attempt: Anycast,
        event: events.MessageDelivered | events.MessageFailed,
        now: float,
        closing: bool,
    ) -> None:
        """The attempt's outcome (already taken out of ``attempts``): report it under
        the application's ticket, or try the next member."""
        if isinstance(event, events.MessageDelivered):
            failovers = tuple(attempt.tried)
            self._report(replace(event, ticket=attempt.ticket, failovers=failovers))
            return
        error = event.error
        if not isinstance(error, FAILOVER_ERRORS):
            self._report(replace(event, ticket=attempt.ticket))
            return
        attempt.tried.append((attempt.member, short_reason(error)))
        attempt.maybe_delivered = attempt.maybe_delivered or error.delivered is None
        tried = {m for m, _ in attempt.tried}
        member = None
        if not attempt.cancelled and (attempt.deadline is None or now < attempt.deadline):
            member = self._choose(
                attempt.service, policy=attempt.policy, exclude=tried, rtt=self._rtt
            )
        if member is not None and not closing:
            try:
                self.start(attempt, member, now)
                return
            except errors.ReliableError:
                pass  # no room now: report the failure rather than hold it
        failure = errors.NoServiceMember(
            attempt.service,
            tuple(attempt.tried),
            delivered=None if attempt.maybe_delivered else False,
        )
        self._report(events.MessageFailed(ticket=attempt.ticket, peer=failure.peer, error=failure))


def short_reason(error: errors.DeliveryFailed) -> str:
    """A failure as one word or two, for anycast receipts (``failovers``)."""
    names = {
        errors.PeerUnreachable: "unreachable",
        errors.PeerClosed: "closed",
        errors.PeerRestarted: "restarted",
        errors.MailboxNotFound: "no_mailbox",
        errors.MailboxClosed: "mailbox_closed",
        errors.AuthenticationFailed: "auth_failed",
    }
    return names.get(type(error), type(error).__name__)
