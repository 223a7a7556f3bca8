"""Anycast in the sans-I/O core: who serves which service, and which member to try.

A node *serves* a service by announcing it (ANNOUNCE heartbeats, a
WITHDRAW when it stops) on one or more discovery groups, multicast or
broadcast. Nodes that listen on such a group keep a soft-state directory
(:class:`~reliable.membership.MemberView` per service, so a member silent
for ``peer_timeout`` drops out), which can be merged with a static list of
members for networks without multicast. A send to the service goes to one
member chosen round-robin or by lowest smoothed RTT; the endpoint fails it
over to another member when that one proves unreachable, closes,
restarts, refuses or has no such mailbox.

The failover guarantee is written out in ``docs/groups.md``: at least
once across members, never twice to one member incarnation, exactly once
when no failover happens; the receipt names the member that took it and
the members tried before.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

from . import events
from .config import Config
from .membership import Change, MemberView, change_event
from .wire import Kind, Packet

__all__ = ["Services"]

_MAX_SERVICES = 256  # distinct service names a directory tracks; more are dropped
#: An ANNOUNCE always carries a cookie-sized field (zeros, or an echoed cookie), so the
#: unicast SOLICIT that checks its source is never larger than the ANNOUNCE itself.
_NO_COOKIE = bytes(16)

#: Issues a cookie for (address, incarnation, now); checks one echoed in a packet.
IssueCookie = Callable[[Any, int, float], bytes]
CheckCookie = Callable[[Packet, Any, float], bool]


class Services:
    """The services this node serves and the directory of the ones it has heard of."""

    def __init__(
        self,
        config: Config,
        rng: random.Random,
        incarnation: int,
        *,
        emit: Callable[[events.Event], None],
        drop: Callable[[str], None],
        issue_cookie: IssueCookie,
        cookie_valid: CheckCookie,
    ) -> None:
        self.config = config
        self._issue_cookie = issue_cookie
        self._cookie_valid = cookie_valid
        # (address, incarnation) of announcers that echoed our cookie: they receive there
        self._confirmed: set[tuple[Any, int]] = set()
        self._unicast: list[tuple[Packet, Any]] = []  # confirmation SOLICITs and echoes
        self._rng = rng
        self.incarnation = incarnation
        self._emit = emit
        self._drop = drop
        self.served: dict[str, dict[str, Any]] = {}  # service -> {group name: dest}
        self._announce_at: dict[str, float] = {}
        self._withdrawals: list[tuple[str, Any]] = []
        self.directory: dict[str, MemberView] = {}
        self.static: dict[str, list[Any]] = {}
        self._turn: dict[str, int] = {}
        self.pending = False

    # ---------------------------------------------------------- serving

    def serve(self, service: str, groups: dict[str, Any], now: float) -> None:
        """Announce ``service`` on ``groups`` (name -> destination) from now on."""
        self.served.setdefault(service, {}).update(groups)
        self._announce_at[service] = now
        self.pending = True

    def unserve(self, service: str) -> None:
        groups = self.served.pop(service, {})
        self._announce_at.pop(service, None)
        for dest in groups.values():
            self._withdrawals.extend([(service, dest)] * 2)  # best-effort: two copies
        self.pending = True

    def confirm_request(self, pkt: Packet, addr: Any) -> None:
        """A unicast SOLICIT with a cookie: "do you serve this, at this address?" Echo it."""
        if pkt.group not in self.served:
            self._drop("anycast.not_served")
        elif pkt.cookie is not None:
            inc = self.incarnation
            echo = Packet(
                kind=Kind.ANNOUNCE, src_incarnation=inc, group=pkt.group, cookie=pkt.cookie
            )
            self._unicast.append((echo, addr))  # the same size as the SOLICIT
            self.pending = True

    def solicited(self, group: str, now: float) -> None:
        """Someone asked who is on ``group``: announce what we serve there, soon and once."""
        soon = now + self._rng.uniform(0, self.config.nak_delay)
        for service, groups in self.served.items():
            if group in groups and self._announce_at.get(service, soon) > soon:
                self._announce_at[service] = soon
                self.pending = True

    # ---------------------------------------------------------- directory

    def add_static(self, service: str, members: list[Any]) -> None:
        known = self.static.setdefault(service, [])
        known.extend(m for m in members if m not in known)

    def on_packet(self, pkt: Packet, addr: Any, now: float) -> None:
        if pkt.src_incarnation == self.incarnation:
            return
        view = self.directory.get(pkt.group)
        if pkt.kind == Kind.WITHDRAW:
            if view is not None:
                view.remove(addr, "withdrawn", pkt.src_incarnation)
            return
        if view is None:
            if len(self.directory) >= _MAX_SERVICES:
                self._drop("anycast.too_many_services")
                return
            name = pkt.group
            view = self.directory[name] = MemberView(
                self.config.peer_timeout, lambda c: self._changed(name, c)
            )
        if len(view) >= self.config.max_peers and addr not in view:
            self._drop("peer_limit")
            return
        view.heard(addr, pkt.src_incarnation, now)
        member = (addr, pkt.src_incarnation)
        if member in self._confirmed:
            return
        if self._cookie_valid(pkt, addr, now):
            self._confirmed.add(member)  # it received our SOLICIT there: a real member
        elif pkt.cookie is None:
            self._drop("anycast.unconfirmable")  # too small to answer without amplifying
        else:
            # Before any message goes there, check the announcer receives at that address
            # (a forged ANNOUNCE could name anyone): one SOLICIT, exactly the ANNOUNCE's size.
            cookie = self._issue_cookie(addr, pkt.src_incarnation, now)
            probe = Packet(
                kind=Kind.SOLICIT, src_incarnation=self.incarnation, group=pkt.group, cookie=cookie
            )
            self._unicast.append((probe, addr))
            self.pending = True

    def member_down(self, addr: Any, reason: str) -> None:
        """A unicast session with ``addr`` ended: it serves nothing until it announces again."""
        for view in self.directory.values():
            view.remove(addr, reason)

    def candidates(self, service: str) -> list[Any]:
        """Live members: confirmed announcers (oldest first), then static ones not announced."""
        view = self.directory.get(service)
        found = (
            [m for m, inc in view.members().items() if (m, inc) in self._confirmed]
            if view is not None
            else []
        )
        found.extend(m for m in self.static.get(service, ()) if m not in found)
        return found

    def choose(
        self,
        service: str,
        *,
        policy: str,
        exclude: set[Any],
        rtt: Callable[[Any], float | None],
    ) -> Any | None:
        """The member to try next, or None if every candidate is excluded."""
        options = [m for m in self.candidates(service) if m not in exclude]
        if not options:
            return None
        if policy == "lowest-rtt":
            # Members never measured come first: measuring them is how the choice improves.
            def key(member: Any) -> float:
                value = rtt(member)
                return -1.0 if value is None else value

            return min(options, key=key)
        turn = self._turn.get(service, 0)
        self._turn[service] = turn + 1
        return options[turn % len(options)]

    # ---------------------------------------------------------- timers, output

    def deadline(self) -> float | None:
        if not self._announce_at and not self.directory:
            return None  # the common case: a node that neither serves nor discovers
        times = list(self._announce_at.values())
        times.extend(d for v in self.directory.values() if (d := v.deadline()) is not None)
        return min(times, default=None)

    def on_timer(self, now: float) -> None:
        self.pending = True
        for view in self.directory.values():
            view.expire(now)

    def datagrams(self, now: float) -> list[tuple[Packet, Any]]:
        self.pending = False
        inc = self.incarnation
        out = [
            (Packet(kind=Kind.WITHDRAW, src_incarnation=inc, group=service), dest)
            for service, dest in self._withdrawals
        ]
        self._withdrawals.clear()
        out.extend(self._unicast)
        self._unicast.clear()
        for service, due in self._announce_at.items():
            if now >= due:
                announce = Packet(
                    kind=Kind.ANNOUNCE, src_incarnation=inc, group=service, cookie=_NO_COOKIE
                )
                out.extend((announce, dest) for dest in self.served[service].values())
                self._announce_at[service] = now + self.config.announce_interval
        return out

    def _changed(self, service: str, change: Change) -> None:
        url = f"anycast://{service}"
        if change.reason is not None and not any(
            v.incarnation(change.member) == change.incarnation for v in self.directory.values()
        ):
            self._confirmed.discard((change.member, change.incarnation))  # keeps it bounded
        self._emit(change_event(url, change))

    def stats(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for service in sorted(set(self.directory) | set(self.static) | set(self.served)):
            out.append(
                {
                    "group": f"anycast://{service}",
                    "member": service in self.served,
                    "members": len(self.candidates(service)),
                }
            )
        return out
