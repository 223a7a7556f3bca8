"""What the blocking and asyncio adapters share: socket set-up and event routing.

The adapters differ only in how they wait (a thread and ``selectors`` versus
the event loop) and in their future types; everything they do with the
protocol core's events is here, once.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Callable
from typing import Any, Protocol

from . import errors, events
from .addressing import (
    Address,
    GroupAddress,
    ServiceAddress,
    normalize,
    parse_group,
    parse_service,
    resolve_address,
)
from .endpoint import Endpoint, check_integer, message_bytes
from .mailbox import check_mailbox_name
from .message import GroupReceipt, Message, Receipt
from .stats import MailboxStats, NodeStats

__all__ = [
    "DatagramSocket",
    "Departures",
    "EventSink",
    "MailboxHandle",
    "drain_socket",
    "open_socket",
    "parse_stats",
    "resolve_destination",
    "route_events",
    "split_destination",
]

_SOCKET_BUFFER = 4 * 1024 * 1024  # bytes asked of the kernel for each direction
RECV_BATCH = 512  # datagrams read per wake-up before the protocol gets to answer
MAX_UDP_PAYLOAD = 65535


class DatagramSocket(Protocol):
    """The subset of ``socket.socket`` the adapters use (a netem wrapper provides it too)."""

    @property
    def family(self) -> int: ...

    def fileno(self) -> int: ...

    def recvfrom(self, bufsize: int, /) -> tuple[bytes, Any]: ...

    def sendto(self, data: bytes, address: Any, /) -> int: ...

    def getsockname(self) -> Any: ...

    def setblocking(self, flag: bool, /) -> None: ...

    def close(self) -> None: ...


def open_socket(bind: str | tuple[str, int]) -> socket.socket:
    """A non-blocking UDP socket bound to ``bind`` (``host:port``, port 0 for any)."""
    family, sockaddr = resolve_address(bind, allow_zero_port=True)
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
            try:
                sock.setsockopt(socket.SOL_SOCKET, option, _SOCKET_BUFFER)
            except OSError:  # pragma: no cover - the kernel may cap it; not fatal
                pass
        sock.bind(sockaddr)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        where = errors.format_address(sockaddr)
        raise errors.AddressError(f"cannot bind {where}: {exc.strerror}") from None
    return sock


def receive_buffer(sock: object) -> int | None:
    """The kernel's receive buffer for ``sock``, in bytes; ``None`` if it cannot say."""
    getsockopt = getattr(sock, "getsockopt", None)
    if getsockopt is None:
        return None  # a wrapper such as netem's FaultySocket
    try:
        return int(getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF))
    except (OSError, TypeError, ValueError):
        return None


def resolve_destination(dest: str | tuple[Any, ...], family: int) -> Address:
    """Resolve ``dest`` for a socket of ``family``, with an error that says what to change."""
    text: str | tuple[str, int] = (dest[0], dest[1]) if isinstance(dest, tuple) else dest
    try:
        return resolve_address(text, family=family)[1]
    except errors.AddressError:
        resolve_address(text)  # unresolvable in any family: that error says it best
        ours = "IPv6" if family == socket.AF_INET6 else "IPv4"
        wildcard = "[::]:0" if ours == "IPv4" else "0.0.0.0:0"
        raise errors.AddressError(
            f"{dest!r} has no {ours} address and this node is bound to {ours}; "
            f"bind the node to {wildcard} to reach it"
        ) from None


def split_destination(
    dest: str | tuple[Any, ...], mailbox: str | None
) -> tuple[str | tuple[Any, ...], str]:
    """Split ``host:port/mailbox`` into the node address and the mailbox name.

    ``mailbox`` given as an argument must agree with one in ``dest``; with
    neither, the message goes to the node's default mailbox ``""``.
    """
    named = None
    if isinstance(dest, str) and "/" in dest:
        dest, named = dest.split("/", 1)
    return dest, _mailbox_name(named, mailbox)


def _mailbox_name(named: str | None, mailbox: str | None) -> str:
    """The mailbox a destination names, or the ``mailbox`` argument; they must agree."""
    if named is not None and mailbox is not None and named != mailbox:
        raise errors.UsageError(
            f"destination names mailbox {named!r} but mailbox={mailbox!r} was given; give one"
        )
    name = named if named is not None else (mailbox or "")
    check_mailbox_name(name)
    return name


def group_destination(dest: str, mailbox: str | None) -> GroupAddress | ServiceAddress:
    """Parse a ``multicast://``, ``broadcast://`` or ``anycast://`` destination.

    A ``mailbox`` argument must agree with a mailbox in the URL, as for
    :func:`split_destination`.
    """
    target: GroupAddress | ServiceAddress = (
        parse_service(dest) if dest.startswith("anycast://") else parse_group(dest)
    )
    name = _mailbox_name(target.mailbox or None, mailbox)
    if isinstance(target, GroupAddress):
        return GroupAddress(target.scheme, target.host, target.port, name)
    return ServiceAddress(target.service, name)


def checked_message(data: object, msg_type: object, priority: object) -> bytes:
    """``data`` as bytes, with ``msg_type`` and ``priority`` checked: before anything is
    sent for the call (a group's discovery included), with an error that says what to pass."""
    check_integer(msg_type, "msg_type")
    check_integer(priority, "priority")
    return message_bytes(data)


#: Where a message goes once its destination is parsed: a node and mailbox, a group, a service.
Target = tuple[Address, str] | GroupAddress | ServiceAddress


def enqueue(
    endpoint: Endpoint,
    target: Target,
    data: bytes,
    *,
    now: float,
    msg_type: int,
    priority: int,
    timeout: float | None,
    deadline: float | None,
    policy: str,
) -> int:
    """Queue ``data`` for ``target`` in the core, whatever kind of destination it is."""
    if isinstance(target, ServiceAddress):
        return endpoint.send_anycast(
            target,
            data,
            now=now,
            msg_type=msg_type,
            priority=priority,
            timeout=timeout,
            policy=policy,
        )
    if isinstance(target, GroupAddress):
        return endpoint.send_group(
            target, data, now=now, msg_type=msg_type, priority=priority, timeout=timeout
        )
    addr, mailbox = target
    return endpoint.send(
        addr,
        data,
        now=now,
        msg_type=msg_type,
        priority=priority,
        mailbox=mailbox,
        timeout=timeout,
        deadline=deadline,
    )


def drain_socket(sock: DatagramSocket, limit: int = RECV_BATCH) -> list[tuple[bytes, Address]]:
    """Read datagrams until the socket would block (or ``limit``): one wake-up, many packets."""
    batch: list[tuple[bytes, Address]] = []
    for _ in range(limit):
        try:
            data, addr = sock.recvfrom(MAX_UDP_PAYLOAD)
        except (BlockingIOError, InterruptedError):
            break
        except OSError:
            # e.g. ECONNREFUSED surfaced by an ICMP error: nothing to read this time
            continue
        batch.append((data, normalize(addr)))
    return batch


class EventSink(Protocol):
    """What an adapter does with the core's events."""

    def on_outcome(
        self,
        ticket: int,
        receipt: Receipt | GroupReceipt | None,
        error: errors.DeliveryFailed | None,
    ) -> None: ...

    def on_receive(
        self, waiter: int, message: Message | None, error: errors.ReliableError | None
    ) -> None: ...

    def on_stats(self, peer: Any, request: int, body: bytes) -> None: ...

    def on_peer_down(self, peer: Any, error: errors.DeliveryFailed) -> None: ...

    def on_closed(self) -> None: ...


def route_events(
    endpoint: Endpoint,
    sink: EventSink,
    observer: Callable[[events.Event], None] | None = None,
) -> None:
    """Hand every pending core event to ``sink`` (and to ``observer``, if any)."""
    while (event := endpoint.next_event()) is not None:
        if observer is not None:
            observer(event)
        if isinstance(event, events.MessageDelivered):
            sink.on_outcome(event.ticket, Receipt.from_event(event), None)
        elif isinstance(event, events.GroupSendDone):
            sink.on_outcome(event.ticket, event.receipt, None)
        elif isinstance(event, events.MessageFailed):
            sink.on_outcome(event.ticket, None, event.error)
        elif isinstance(event, events.MessageTaken):
            sink.on_receive(event.waiter, event.message, None)
        elif isinstance(event, events.ReceiveFailed):
            sink.on_receive(event.waiter, None, event.error)
        elif isinstance(event, events.StatsReceived):
            sink.on_stats(event.peer, event.request, event.body)
        elif isinstance(event, events.PeerUnreachable):
            sink.on_peer_down(event.peer, errors.PeerUnreachable(event.peer, event.silent_for))
        elif isinstance(event, events.PeerClosed):
            sink.on_peer_down(event.peer, errors.PeerClosed(event.peer))
        elif isinstance(event, events.PeerRejectedUs):
            sink.on_peer_down(event.peer, event.error)
        elif isinstance(event, events.Closed):
            sink.on_closed()


def parse_stats(body: bytes) -> NodeStats:
    """A remote node's stats reply, as typed objects."""
    try:
        return NodeStats.from_dict(json.loads(body))
    except (ValueError, TypeError, KeyError) as exc:
        raise errors.ReliableError(f"the node sent an unreadable stats reply: {exc}") from None


_PEER_DOWN_MEMORY = 4096  # peers whose last departure is remembered for waiting receivers


class Departures:
    """Which peers went away, so a receive waiting on one specific peer can end.

    A receive naming a ``source`` makes the core probe that peer; if it is
    declared unreachable (or closes) while the receive waits, the receive
    raises that error instead of waiting out its timeout.
    """

    def __init__(self) -> None:
        self._down: dict[Address, tuple[int, errors.DeliveryFailed]] = {}
        self._count = 0

    def peer_down(self, peer: Address, error: errors.DeliveryFailed) -> None:
        self._count += 1
        self._down[peer] = (self._count, error)
        if len(self._down) > _PEER_DOWN_MEMORY:
            del self._down[next(iter(self._down))]

    def mark(self) -> int:
        """A point in time for :meth:`down_since`."""
        return self._count

    def down_since(self, peer: Address, mark: int) -> errors.DeliveryFailed | None:
        """Why ``peer`` went away after ``mark``, if it did."""
        down = self._down.get(peer)
        return down[1] if down is not None and down[0] > mark else None


class _ManagedNode(Protocol):
    def _manage(self, name: str, action: str) -> None: ...

    def stats(self) -> NodeStats: ...


class MailboxHandle:
    """What the blocking and asyncio mailbox handles share: managing the mailbox.

    The handle a ``create_mailbox`` returns carries the owner token, which a
    port requires of its receiver; other handles carry ``None``.
    """

    def __init__(self, node: _ManagedNode, name: str, owner: int | None) -> None:
        self._managed = node
        self.name = name
        self._owner = owner

    def close(self) -> None:
        """Refuse new messages (their senders get ``MailboxClosed``); queued ones stay."""
        self._managed._manage(self.name, "close")

    def open(self) -> None:
        """Accept messages again after :meth:`close`."""
        self._managed._manage(self.name, "open")

    def delete(self) -> None:
        """Remove the mailbox; pending senders and waiting receivers fail cleanly."""
        self._managed._manage(self.name, "delete")

    def stats(self) -> MailboxStats:
        return self._managed.stats().mailbox(self.name)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"
