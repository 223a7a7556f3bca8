"""Group addressing inside the sans-I/O core: the groups a node has open.

A group is an IP multicast group or a broadcast address plus a port,
named by its socket address (``"239.1.2.3:7000"``); the adapter owns the
socket that receives what is sent there and hands those datagrams to
:meth:`reliable.Endpoint.receive_datagram` like any other. A node *opens*
a group to send to it and to watch its membership, and *joins* it to be a
member: members announce themselves with JOIN heartbeats, receive the
group's messages into their mailboxes and acknowledge them.

This module dispatches the group packet kinds, schedules heartbeats and
turns streams' output into packets; the protocol halves are
:mod:`reliable.group_sender`, :mod:`reliable.group_member` and
:mod:`reliable.membership`. Packets come back unencoded; the endpoint
seals them like every other datagram.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

from . import events
from .config import Config
from .group_member import MemberStream
from .group_sender import GroupMessage, GroupSendStream
from .membership import Change, MemberView, change_event
from .message import GroupReceipt
from .receiver import Delivery, MemoryBudget, Screen
from .wire import ACK_DELAY_TICK, SECURITY_OVERHEAD, Kind, Packet, Verdict, encoded_size, unwrap

__all__ = ["Groups"]

#: Admits a delivered group message to its mailbox: (sender, incarnation, group url, delivery).
Admit = Callable[[Any, int, str, Delivery, float], Verdict | None]

_LEAVE_COPIES = 2  # LEAVE is best-effort; a second copy survives a single loss
_STREAM_IDLE = 4.0  # in peer_timeouts: a silent sender's stream is forgotten after this
_SOLICITS = 3  # SOLICITs sent when a group is opened, so one lost copy does not hide members
_SOLICIT_INTERVAL = 0.05
#: A closing member keeps answering a sender heard from this recently (its last acks
#: may have been lost, and the sender's retransmission asks again).
_LINGER = 0.5


class _Group:
    __slots__ = (
        "dest",
        "farewells",
        "join_at",
        "member",
        "name",
        "sender",
        "solicit_at",
        "solicits",
        "streams",
        "url",
        "view",
    )

    def __init__(self, name: str, dest: Any, url: str, view: MemberView) -> None:
        self.name = name
        self.dest = dest
        self.url = url
        self.view = view
        self.member = False
        self.join_at: float | None = None
        self.farewells: list[Packet] = []  # LEAVEs still to send
        self.solicit_at: float | None = None
        self.solicits = _SOLICITS
        self.sender: GroupSendStream | None = None
        self.streams: dict[Any, MemberStream] = {}


class Groups:
    """Every group one node has open."""

    def __init__(
        self,
        config: Config,
        rng: random.Random,
        incarnation: int,
        *,
        emit: Callable[[events.Event], None],
        admit: Admit,
        screen: Screen,
        drop: Callable[[str], None],
        budget: MemoryBudget,
    ) -> None:
        self.config = config
        self._rng = rng
        self.incarnation = incarnation
        self._emit = emit
        self._admit = admit
        self._screen = screen
        self._drop = drop
        self._budget = budget
        self._groups: dict[str, _Group] = {}
        self.pending = False  # something may be due: datagrams() is worth calling
        self._now = 0.0  # the latest time given, for receipts resolved by a membership change

    # --------------------------------------------------------- application

    def open(self, name: str, dest: Any, url: str, now: float, *, join: bool) -> None:
        self._now = now
        group = self._groups.get(name)
        if group is None:
            view = MemberView(self.config.peer_timeout, lambda c: self._changed(name, c))
            group = self._groups[name] = _Group(name, dest, url, view)
            group.solicit_at = now
        if join and not group.member:
            group.member = True
            group.farewells = []
            group.join_at = now
        self.pending = True

    def leave(self, name: str, now: float) -> None:
        self._now = now
        group = self._groups.get(name)
        if group is None or not group.member:
            return
        group.member = False
        group.join_at = None
        # Each sender gets a LEAVE carrying our final acknowledgement of its stream, so
        # that ack is as safe as the LEAVE itself (a lost GACK would read as "left").
        inc = self.incarnation
        farewells = []
        for stream in group.streams.values():
            state = stream.ack_state(now)
            farewells.append(
                Packet(
                    kind=Kind.LEAVE,
                    src_incarnation=inc,
                    dst_incarnation=stream.incarnation,
                    ack=state.ack,
                    sacks=state.sacks,
                    notices=state.notices,
                    group=name,
                )
            )
        if not farewells:
            farewells.append(Packet(kind=Kind.LEAVE, src_incarnation=inc, group=name))
        group.farewells = farewells * _LEAVE_COPIES
        for stream in group.streams.values():
            stream.receive.release()
        group.streams.clear()
        self.pending = True

    def is_open(self, name: str) -> bool:
        return name in self._groups

    def is_member(self, name: str) -> bool:
        group = self._groups.get(name)
        return group is not None and group.member

    def members(self, name: str) -> dict[Any, int]:
        group = self._groups.get(name)
        return {} if group is None else group.view.members()

    def send(
        self,
        name: str,
        ticket: int,
        data: bytes,
        *,
        msg_type: int,
        priority: int,
        mailbox: str,
        fragment_size: int,
        deadline: float,
        now: float,
    ) -> GroupMessage:
        self._now = now
        group = self._groups[name]
        if group.sender is None:
            group.sender = GroupSendStream(name, self.config, self._rng)
        self.pending = True
        return group.sender.send(
            ticket,
            data,
            msg_type=msg_type,
            priority=priority,
            mailbox=mailbox,
            fragment_size=fragment_size,
            now=now,
            deadline=deadline,
            expected=group.view.members(),
        )

    def has_outstanding(self) -> bool:
        return any(g.sender is not None and g.sender.messages for g in self._groups.values())

    def buffered(self) -> int:
        """Bytes of group messages awaiting their receipts (asked on every send)."""
        if not self._groups:
            return 0
        return sum(g.sender.buffered for g in self._groups.values() if g.sender is not None)

    def linger_until(self) -> float | None:
        """Until when a closing node should keep answering the senders of its groups."""
        times = [s.last_heard + _LINGER for g in self._groups.values() for s in g.streams.values()]
        return max(times, default=None)

    def flush_acks(self) -> None:
        """Acknowledge now whatever is unacknowledged (the node is about to leave)."""
        for group in self._groups.values():
            for stream in group.streams.values():
                if stream.pending or stream.gack_deadline is not None:
                    stream.gack_due = True
                    self.pending = True

    def close(self, reason: str, now: float) -> None:
        """The node is going: give up on every group message, leave every group."""
        self._now = now
        for group in self._groups.values():
            if group.sender is not None:
                self._report(group, group.sender.abandon_all(reason))
            if group.member:
                self.leave(group.name, now)

    # ------------------------------------------------------------- network

    def on_packet(self, pkt: Packet, addr: Any, size: int, now: float) -> None:
        """One decoded group packet from ``addr`` (a member's or sender's own address)."""
        self._now = now
        if pkt.src_incarnation == self.incarnation:
            return  # our own multicast, looped back by the kernel
        group = self._groups.get(pkt.group)
        if group is None:
            self._drop("group.not_open")
            return
        kind = pkt.kind
        self.pending = True
        if kind == Kind.JOIN:
            if len(group.view) >= self.config.max_peers and addr not in group.view:
                self._drop("peer_limit")
                return
            group.view.heard(addr, pkt.src_incarnation, now)
        elif kind == Kind.LEAVE:
            if pkt.dst_incarnation == self.incarnation and group.sender is not None:
                self._acknowledged(group, pkt, addr, now)  # its final word on our stream
            group.view.remove(addr, "left", pkt.src_incarnation)
        elif kind == Kind.SOLICIT:
            if group.member and (
                group.join_at is None or group.join_at > now + self.config.nak_delay
            ):
                # One JOIN per SOLICIT at most, the same size: a SOLICIT never buys more.
                group.join_at = now + self._rng.uniform(0, self.config.nak_delay)
        elif kind == Kind.GACK:
            if pkt.dst_incarnation != self.incarnation or group.sender is None:
                self._drop("group.stray_ack")
                return
            group.view.touch(addr, pkt.src_incarnation, now)
            self._acknowledged(group, pkt, addr, now)
        elif kind == Kind.GNAK:
            self._on_nak(group, pkt, addr, now)
        elif kind in (Kind.GDATA, Kind.GSYNC):
            self._on_stream(group, pkt, addr, size, now)
        else:
            self._drop("group.kind")

    def _acknowledged(self, group: _Group, pkt: Packet, addr: Any, now: float) -> None:
        sender = group.sender
        assert sender is not None
        delay = pkt.ack_delay * ACK_DELAY_TICK
        sender.on_ack(addr, pkt.src_incarnation, pkt.ack, pkt.sacks, pkt.notices, delay, now)
        self._report(group, sender.resolved())

    def _on_nak(self, group: _Group, pkt: Packet, addr: Any, now: float) -> None:
        if pkt.dst_incarnation == self.incarnation:
            sender = group.sender
            if sender is None or (addr not in group.view and addr not in sender.progress):
                self._drop("group.stray_nak")
                return
            group.view.touch(addr, pkt.src_incarnation, now)
            sender.on_nak(pkt.sacks, now)
            return
        for stream in group.streams.values():
            if stream.incarnation == pkt.dst_incarnation and stream.receive.expected is not None:
                ref = stream.receive.expected
                ranges = [(unwrap(s, ref), unwrap(e, ref)) for s, e in pkt.sacks]
                stream.overheard_nak(ranges, now)
                return

    def _on_stream(self, group: _Group, pkt: Packet, addr: Any, size: int, now: float) -> None:
        if not group.member:
            self._drop("group.not_member")
            return
        stream = group.streams.get(addr)
        if stream is None or stream.incarnation != pkt.src_incarnation:
            if stream is not None:
                stream.receive.release()
            elif len(group.streams) >= self.config.max_peers:
                self._drop("peer_limit")
                return
            stream = group.streams[addr] = MemberStream(
                pkt.src_incarnation,
                self.config,
                self._rng,
                screen=self._screen,
                budget=self._budget,
                now=now,
            )
        stream.heard(size, now)
        if pkt.kind == Kind.GDATA:
            assert pkt.fragment is not None
            delivered = stream.on_fragment(pkt.fragment, now)
        else:
            if len(pkt.sacks) != 1:
                self._drop("malformed.gsync")
                return
            base_w, high_w = pkt.sacks[0]
            ref = stream.receive.expected if stream.receive.expected is not None else base_w
            delivered = stream.on_sync(unwrap(base_w, ref), unwrap(high_w, ref), now)
        for d in delivered:
            verdict = self._admit(addr, pkt.src_incarnation, group.url, d, now)
            if verdict is not None:
                stream.receive.add_notice(d.msg_id, verdict, d.last_seq)
                stream.gack_due = True

    def datagrams(self, now: float) -> list[tuple[Packet, Any]]:
        """Every group packet due now, with its destination."""
        self.pending = False
        out: list[tuple[Packet, Any]] = []
        inc = self.incarnation
        for group in self._groups.values():
            name = group.name
            if group.solicit_at is not None and now >= group.solicit_at:
                group.solicits -= 1
                group.solicit_at = now + _SOLICIT_INTERVAL if group.solicits > 0 else None
                out.append((Packet(kind=Kind.SOLICIT, src_incarnation=inc, group=name), group.dest))
            if group.member and group.join_at is not None and now >= group.join_at:
                out.append((Packet(kind=Kind.JOIN, src_incarnation=inc, group=name), group.dest))
                group.join_at = now + self.config.announce_interval
            out.extend((farewell, group.dest) for farewell in group.farewells)
            group.farewells = []
            sender = group.sender
            if sender is not None:
                for seq, target in sender.due(now):
                    pkt = Packet(
                        kind=Kind.GDATA,
                        src_incarnation=inc,
                        group=name,
                        fragment=sender.fragment(seq),
                    )
                    out.append((pkt, group.dest if target is None else target))
                if sender.sync_due:
                    sender.synced(now)
                    span = ((sender.base, sender.next_seq),)
                    pkt = Packet(kind=Kind.GSYNC, src_incarnation=inc, group=name, sacks=span)
                    out.append((pkt, group.dest))
            for addr, stream in group.streams.items():
                gaps = stream.nak_due(now)
                if gaps is not None:
                    nak = Packet(
                        kind=Kind.GNAK,
                        src_incarnation=inc,
                        dst_incarnation=stream.incarnation,
                        ack=gaps[0][0],
                        sacks=tuple(gaps),
                        group=name,
                    )
                    if stream.spend(_size(nak)):
                        out.append((nak, group.dest))
                        stream.naks_sent += 1
                    else:
                        self._drop("group.no_credit")
                if stream.wants_gack(now):
                    state = stream.ack_state(now)
                    gack = Packet(
                        kind=Kind.GACK,
                        src_incarnation=inc,
                        dst_incarnation=stream.incarnation,
                        ack=state.ack,
                        ack_delay=state.ack_delay,
                        sacks=state.sacks,
                        notices=state.notices,
                        group=name,
                    )
                    if stream.spend(_size(gack)):
                        out.append((gack, addr))
                        stream.gack_sent()
                    else:
                        self._drop("group.no_credit")
                        stream.gack_deadline = now + self.config.nak_delay
                        stream.gack_due = False
        return out

    # --------------------------------------------------------------- timers

    def deadline(self) -> float | None:
        if not self._groups:
            return None  # the common case: a node with no group open
        times: list[float] = []
        for group in self._groups.values():
            if group.join_at is not None:
                times.append(group.join_at)
            if group.solicit_at is not None:
                times.append(group.solicit_at)
            if (d := group.view.deadline()) is not None:
                times.append(d)
            if group.sender is not None and (d := group.sender.deadline()) is not None:
                times.append(d)
            idle = self.config.peer_timeout * _STREAM_IDLE
            for stream in group.streams.values():
                if (d := stream.deadline()) is not None:
                    times.append(d)
                times.append(stream.last_heard + idle)
        return min(times, default=None)

    def on_timer(self, now: float) -> None:
        self._now = now
        self.pending = True
        idle = self.config.peer_timeout * _STREAM_IDLE
        for group in self._groups.values():
            group.view.expire(now)
            if group.sender is not None:
                group.sender.on_timer(now)
                self._report(group, group.sender.resolved())
            for addr in [a for a, s in group.streams.items() if s.last_heard + idle <= now]:
                group.streams.pop(addr).receive.release()

    # ------------------------------------------------------------- internal

    def _changed(self, name: str, change: Change) -> None:
        group = self._groups[name]
        self._emit(change_event(group.url, change))
        if change.reason is not None and group.sender is not None:
            group.sender.member_gone(change.member, change.reason)
            self._report(group, group.sender.resolved())

    def _report(self, group: _Group, done: list[GroupMessage]) -> None:
        for msg in done:
            missing: dict[Any, str] = {m: v.name.lower() for m, v in msg.refused.items()}
            missing.update((m, why) for m, why in msg.gone.items() if m not in msg.acked)
            mailbox = f"/{msg.mailbox}" if msg.mailbox else ""
            receipt = GroupReceipt(
                group=group.url + mailbox,
                size=len(msg.data),
                fragments=msg.count,
                transmissions=msg.transmissions,
                elapsed=max(0.0, self._now - msg.created),
                acked=tuple(msg.acked),
                missing=missing,
            )
            self._emit(events.GroupSendDone(ticket=msg.ticket, receipt=receipt))

    def stats(self) -> list[dict[str, Any]]:
        out = []
        for group in self._groups.values():
            entry: dict[str, Any] = {
                "group": group.url,
                "member": group.member,
                "members": len(group.view),
                "streams": len(group.streams),
            }
            if group.sender is not None:
                entry.update(
                    unresolved=len(group.sender.messages),
                    transmissions=group.sender.transmissions,
                    repairs=group.sender.repairs_sent,
                    naks_received=group.sender.naks_received,
                )
            entry["naks_sent"] = sum(s.naks_sent for s in group.streams.values())
            entry["naks_suppressed"] = sum(s.naks_suppressed for s in group.streams.values())
            out.append(entry)
        return out


def _size(pkt: Packet) -> int:
    """Bytes ``pkt`` occupies on the wire, sealed (an upper bound: the largest mode)."""
    return encoded_size(pkt) + SECURITY_OVERHEAD
