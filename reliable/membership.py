"""Who is in a group, as one node sees it: joins, leaves and liveness.

Why a soft-state view: IP multicast and broadcast have no membership the
sender can ask the network for, so members announce themselves (a JOIN to
the group every ``announce_interval`` seconds, a LEAVE when they go) and
every node that has the group open keeps what it heard. A member not heard
from for ``peer_timeout`` seconds is dropped, exactly like a silent unicast
peer. The same view serves anycast services, whose members ANNOUNCE and
WITHDRAW instead.

A member is an address *and* an incarnation: a member that restarts leaves
(reason ``"restarted"``) and joins again, so nothing promised to its old
life is credited to the new one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from . import events

__all__ = ["Change", "MemberView", "change_event"]


@dataclass(frozen=True, slots=True)
class Change:
    """A member joined (``reason`` is ``None``) or left, and why."""

    member: Any
    incarnation: int
    reason: str | None = None  #: "left", "unreachable", "restarted" or "withdrawn"


def change_event(group: str, change: Change) -> events.MemberJoined | events.MemberLeft:
    """The event that tells the application about ``change`` in ``group`` (a URL)."""
    if change.reason is None:
        return events.MemberJoined(
            group=group, member=change.member, incarnation=change.incarnation
        )
    return events.MemberLeft(
        group=group, member=change.member, incarnation=change.incarnation, reason=change.reason
    )


@dataclass(slots=True)
class _Member:
    incarnation: int
    last_heard: float
    joined: float


class MemberView:
    """The live members of one group or service."""

    __slots__ = ("_members", "_notify", "timeout")

    def __init__(self, timeout: float, notify: Callable[[Change], None]) -> None:
        self.timeout = timeout
        self._notify = notify
        self._members: dict[Any, _Member] = {}

    def heard(self, member: Any, incarnation: int, now: float) -> bool:
        """``member`` announced itself (or spoke in the group); returns whether it is new."""
        known = self._members.get(member)
        if known is not None and known.incarnation == incarnation:
            known.last_heard = max(known.last_heard, now)
            return False
        if known is not None:
            self.remove(member, "restarted")
        self._members[member] = _Member(incarnation, now, now)
        self._notify(Change(member, incarnation))
        return True

    def touch(self, member: Any, incarnation: int, now: float) -> None:
        """Traffic from a known member proves it alive; strangers are not admitted this way."""
        known = self._members.get(member)
        if known is not None and known.incarnation == incarnation:
            known.last_heard = max(known.last_heard, now)

    def remove(self, member: Any, reason: str, incarnation: int | None = None) -> bool:
        known = self._members.get(member)
        if known is None or (incarnation is not None and known.incarnation != incarnation):
            return False
        del self._members[member]
        self._notify(Change(member, known.incarnation, reason))
        return True

    def expire(self, now: float) -> None:
        # The same sum as deadline(): a difference could round below it and never expire.
        for member in [m for m, k in self._members.items() if k.last_heard + self.timeout <= now]:
            self.remove(member, "unreachable")

    def deadline(self) -> float | None:
        if not self._members:
            return None
        return min(k.last_heard for k in self._members.values()) + self.timeout

    def incarnation(self, member: Any) -> int | None:
        known = self._members.get(member)
        return None if known is None else known.incarnation

    def members(self) -> dict[Any, int]:
        """Live members and their incarnations, oldest member first."""
        return {m: k.incarnation for m, k in self._members.items()}

    def __contains__(self, member: object) -> bool:
        return member in self._members

    def __len__(self) -> int:
        return len(self._members)

    def clear(self, reason: str) -> None:
        for member in list(self._members):
            self.remove(member, reason)
