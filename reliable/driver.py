"""What the blocking and asyncio adapters share: the driver of an :class:`Endpoint`.

Public by design: code that drives the core itself (the CLI's benchmarks, a
custom adapter, tests) imports from here. The adapters differ only in how
they wait (calling threads and one background thread versus the event loop)
and in their handle types; the rest is here, once: socket set-up, the
transmit backlog of a full socket, routing the core's events, the steps of a
receive that must give up, mailbox management and the shared constants.

What the operating system says about unreachable peers is read here too.
An unconnected UDP socket hears nothing of ICMP errors by default; with
``IP_RECVERR`` (``IPV6_RECVERR``) Linux queues one message per error on the
socket's error queue, naming the destination of the datagram that provoked
it, and leaves the error pending on the socket, so the next ``recvfrom`` or
``sendto`` raises it — whatever destination that call is about. Hence: every
error a call raises sends us to read the error queue, which says whose it
was; a ``sendto`` that failed is tried once more, and only a second failure
with nothing queued is blamed on its own destination (a missing route).
Reading the queue also clears the socket's readiness (POLLERR), which would
otherwise wake the adapter for ever. See ip(7) and ipv6(7).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno as _errno
import itertools
import json
import os
import socket
import struct
import sys
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

from . import errors, events, message, udpio
from .addressing import (
    Address,
    GroupAddress,
    ServiceAddress,
    is_group_url,
    normalize,
    parse_group,
    parse_service,
    resolve_address,
)
from .endpoint import Endpoint, check_integer, check_timeout, message_bytes
from .handle import MailboxHandle
from .localpost import PostQueue
from .mailbox import Selector, Sources, check_mailbox_name, selector_for
from .message import DeliveryFacts, GroupReceipt, Message, Receipt
from .outbox import OutboxRow, OutboxStore, check_outbox_mailbox
from .remote_mailbox import ACTIONS, Manage
from .stats import NodeStats

#: Public arguments whose type is checked inside, with a ``UsageError`` that says what
#: to pass: compiled (mypyc) code checks a declared type at the call and raises
#: ``TypeError``, so the adapters declare these ``Any`` to fail the same way compiled
#: and pure. ``Data``: bytes, bytearray or memoryview; ``Int``: an int, not a bool.
Data = Any
Int = Any
#: ``Seconds``: a timeout, None or a number (see :func:`check_seconds`); ``Dest``: a
#: node's ``host:port[/mailbox]`` or ``(host, port)`` (see :func:`resolve_destination`).
Seconds = Any
Dest = Any


def check_seconds(timeout: Seconds, name: str, *, positive: bool = False) -> None:
    """The core's ``check_timeout`` for a value of any type: that check is compiled with
    a declared ``float | None``, which would raise ``TypeError`` for a string."""
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))):
        raise errors.UsageError(f"{name} must be a number of seconds or None, got {timeout!r}")
    check_timeout(timeout, name, positive=positive)


__all__ = [
    "CLOSE_GRACE",
    "DISCOVERY_MAX",
    "DISCOVERY_WAIT",
    "DRIVE_GAP",
    "HOLD_MAX",
    "Backlog",
    "BatchOutcomes",
    "DatagramSocket",
    "Departures",
    "Destinations",
    "EventSink",
    "MailboxHandle",
    "StoredBatch",
    "Unreachable",
    "batch_destination",
    "check_count",
    "drain_socket",
    "enable_error_queue",
    "give_up_receive",
    "manage_request",
    "no_answer",
    "open_socket",
    "outbox_batch",
    "outbox_message",
    "parse_extended_error",
    "parse_stats",
    "post_local",
    "read_error_queue",
    "receipt_of",
    "receive_failure",
    "receive_selector",
    "replay_target",
    "report_unreachable",
    "resolve_destination",
    "route_events",
    "send_datagram",
    "settle_unqueued",
    "split_destination",
]

_SOCKET_BUFFER = 4 * 1024 * 1024  # bytes asked of the kernel for each direction
RECV_BATCH = 512  # datagrams read per wake-up before the protocol gets to answer
MAX_UDP_PAYLOAD = 65535
#: Seconds an adapter gives the close beyond its flush timeout, and a full socket
#: to take the final datagrams (CLOSE), before it releases the socket anyway.
CLOSE_GRACE = 1.0
#: After opening a group to send to it, how long members get to answer its SOLICIT.
DISCOVERY_WAIT = 0.2
#: ... and, while no member has answered yet, how long in all the sender waits for the
#: first: a loaded host answers late, and a group send to no known member is
#: acknowledged by nobody (its receipt would say so though members heard it).
DISCOVERY_MAX = 1.0
#: Sends to a busy peer an adapter holds back (to share datagrams) before it flushes
#: them. Bounded, so that a burst leaves as several datagrams: one lost costs only its
#: own messages, and the acks of the others carry the SACKs that repair it at once
#: (one datagram with the whole burst left only the retransmission timer to notice).
HOLD_MAX = 16
#: Seconds after a read of the socket in which a receive that found a message queued
#: hands it out without reading again: one read serves a run of receives, and the
#: acks of what arrives meanwhile wait at most this long for the application.
DRIVE_GAP = 0.0005


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


def open_socket(
    bind: str | tuple[str, int], *, error_queue: bool = False, offload: bool = False
) -> socket.socket:
    """A non-blocking UDP socket bound to ``bind`` (``host:port``, port 0 for any).

    ``error_queue`` asks the OS to queue ICMP errors (see
    :func:`enable_error_queue`); only for a caller that reads them with
    :func:`drain_socket` and :func:`send_datagram`, since an unread error queue
    keeps the socket ready to read (a wrapper without ``recvmsg``, such as
    netem's ``FaultySocket``, cannot). ``offload`` turns on UDP GSO and GRO
    where the OS has them (:mod:`reliable.udpio`); likewise only for a caller
    that reads with :func:`drain_socket`, which splits coalesced reads. It
    also sets DF without the kernel's path MTU cache, for the core's path MTU
    probes (:func:`reliable.udpio.set_probe_mtu`).
    """
    family, sockaddr = resolve_address(bind, allow_zero_port=True)
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
            try:
                sock.setsockopt(socket.SOL_SOCKET, option, _SOCKET_BUFFER)
            except OSError:  # pragma: no cover - the kernel may cap it; not fatal
                pass
        if error_queue:
            enable_error_queue(sock)
        if offload:
            udpio.enable(sock)
            udpio.set_probe_mtu(sock)
        sock.bind(sockaddr)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        where = errors.format_address(sockaddr)
        raise errors.BindError(exc.errno or 0, f"cannot bind {where}: {exc.strerror}") from None
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


def resolve_destination(dest: Dest, family: int) -> Address:
    """Resolve ``dest`` for a socket of ``family``, with an error that says what to change.

    Its type is checked here, before the (compiled) parser's declared one would raise
    ``TypeError``: an ``AddressError`` compiled and pure alike."""
    text: str | tuple[str, int]
    if isinstance(dest, str):
        text = dest
    elif (
        isinstance(dest, tuple)
        and len(dest) >= 2
        and isinstance(dest[0], str)
        and isinstance(dest[1], int)
        and not isinstance(dest[1], bool)
    ):
        text = (dest[0], dest[1])
    elif isinstance(dest, tuple):
        raise errors.AddressError(f"expected a (host, port) tuple, got {dest!r}")
    else:
        raise errors.AddressError(f"expected an address like 127.0.0.1:7000, got {dest!r}")
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


def split_destination(dest: Dest, mailbox: str | None) -> tuple[Dest, str]:
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


def refuse_group(dest: object, method: str) -> None:
    """``send``/``send_nowait`` take one node or an anycast service; a multicast or
    broadcast group goes through ``send_group`` so its receipt is typed as what it is."""
    if isinstance(dest, str | GroupAddress) and (
        isinstance(dest, GroupAddress) or dest.startswith(("multicast://", "broadcast://"))
    ):
        raise errors.UsageError(
            f"{dest} is a group: call send_group{method}() for it (its outcome is a "
            "GroupReceipt: which members have the message); send and send_nowait "
            "take one node (host:port[/mailbox]) or an anycast:// service"
        )


def group_target(group: Dest, mailbox: str | None) -> GroupAddress:
    """The group a ``send_group`` names: a ``multicast://``/``broadcast://`` URL or a
    :class:`~reliable.addressing.GroupAddress`."""
    if isinstance(group, GroupAddress):
        text = str(group)
    elif isinstance(group, str) and group.startswith(("multicast://", "broadcast://")):
        text = group
    else:
        raise errors.UsageError(
            f"send_group takes multicast://GROUP:PORT[/MAILBOX] or "
            f"broadcast://[ADDR]:PORT[/MAILBOX], got {group!r}; send to one node "
            "or an anycast:// service with send()"
        )
    target = group_destination(text, mailbox)
    assert isinstance(target, GroupAddress)
    return target


#: Parsed destinations an adapter remembers (a cache; cleared when full).
_DESTINATIONS = 1024


class Destinations:
    """The parsed node destinations of an adapter's sends, remembered.

    ``(dest, mailbox)`` as the application gave them -> ``((address, mailbox
    name), address)``: a node's address is parsed (and resolved) once, not on
    every send. Group and anycast URLs are not kept here (their targets are
    opened per call).
    """

    __slots__ = ("_known",)

    def __init__(self) -> None:
        self._known: dict[tuple[Any, str | None], tuple[tuple[Address, str], Address]] = {}

    def get(self, dest: object, mailbox: str | None) -> tuple[tuple[Address, str], Address] | None:
        """What ``dest`` was parsed to before, if it was."""
        try:
            return self._known.get((dest, mailbox))
        except TypeError:  # unhashable: not a destination; resolve() says why
            return None

    def resolve(
        self, dest: Dest, mailbox: str | None, family: int
    ) -> tuple[tuple[Address, str], Address]:
        """Parse node destination ``dest`` (``host:port[/mailbox]``) for a socket of
        ``family`` and remember it; raises the error that says what to change."""
        node, name = split_destination(dest, mailbox)
        address = resolve_destination(node, family)
        known = self._known
        if len(known) >= _DESTINATIONS:
            known.clear()
        parsed = ((address, name), address)
        with contextlib.suppress(TypeError):
            known[(dest, mailbox)] = parsed
        return parsed


def batch_destination(
    dest: Dest,
    messages: Iterable[Data],
    msg_type: Int,
    priority: Int,
    mailbox: str | None,
    family: int,
) -> tuple[Address, str, list[bytes]]:
    """``send_many``'s arguments checked, every message before any is sent: the
    node address, the mailbox name and the messages as bytes."""
    if isinstance(dest, str) and is_group_url(dest):
        raise errors.UsageError(
            "send_many sends to one node; send to a group with send_group() "
            "or to an anycast service with send()"
        )
    datas = [checked_message(d, msg_type, priority) for d in messages]
    node, name = split_destination(dest, mailbox)
    return resolve_destination(node, family), name, datas


def outbox_destination(
    dest: Dest,
    data: Data,
    msg_type: Int,
    priority: Int,
    mailbox: str | None,
    family: int,
) -> tuple[Address, str, bytes]:
    """A durable outbox send's arguments checked before it is stored: one node's
    address, the mailbox name (with room for the outbox id) and the data as bytes."""
    if isinstance(dest, str) and is_group_url(dest):
        raise errors.UsageError(
            "an outbox sends to one node's mailbox (host:port/name), not to a group or an "
            "anycast service"
        )
    data = checked_message(data, msg_type, priority)
    node, name = split_destination(dest, mailbox)
    check_outbox_mailbox(name)
    return resolve_destination(node, family), name, data


def outbox_message(
    endpoint: Endpoint,
    dest: Dest,
    data: Data,
    msg_type: Int,
    priority: Int,
    mailbox: str | None,
    family: int,
) -> tuple[Address, str, bytes]:
    """An outbox send checked whole, by the core too, before it is stored: the node,
    the mailbox name and the data (as :func:`outbox_destination`)."""
    addr, name, data = outbox_destination(dest, data, msg_type, priority, mailbox, family)
    endpoint.check_message(data, msg_type=msg_type, priority=priority, mailbox=name)
    return addr, name, data


def outbox_batch(
    endpoint: Endpoint,
    dest: Dest,
    messages: Iterable[Data],
    msg_type: Int,
    priority: Int,
    mailbox: str | None,
    family: int,
) -> tuple[Address, str, list[bytes]]:
    """An outbox's ``send_many``: every message checked, by the core too, before any
    is stored (they are stored in one commit)."""
    addr, name, _ = outbox_destination(dest, b"", msg_type, priority, mailbox, family)
    checked = [checked_message(data, msg_type, priority) for data in messages]
    for data in checked:
        endpoint.check_message(data, msg_type=msg_type, priority=priority, mailbox=name)
    return addr, name, checked


def replay_target(store: OutboxStore, row: OutboxRow) -> OutboxTarget:
    """Where a send an outbox file still held (``store.restored``) goes again."""
    return OutboxTarget(row.dest, row.mailbox, store.tag(row.row))


def settle_unqueued(store: OutboxStore, rows: Iterable[tuple[int, str]]) -> None:
    """Stored sends of a batch that were never queued (an earlier one failed to queue):
    nothing will retry them, so they leave the outbox file."""
    for row, _tag in rows:
        store.settle(row)


class StoredBatch:
    """An outbox's ``send_many`` after its one commit: what each adapter queues, one
    send at a time (blocking or awaited: the one part the adapters do differently).

    Iterating yields ``(row, target, data)`` per stored message. Used as a context
    manager around that loop: if queueing one raises, the rows after it were stored
    but will never be queued, and leave the outbox file (:func:`settle_unqueued`).
    """

    __slots__ = ("_addr", "_checked", "_name", "_next", "_store", "_stored")

    def __init__(
        self,
        store: OutboxStore,
        addr: Address,
        name: str,
        stored: list[tuple[int, str]],
        checked: list[bytes],
    ) -> None:
        self._store, self._addr, self._name = store, addr, name
        self._stored, self._checked = stored, checked
        self._next = 0  # how many were handed out to be queued

    def __iter__(self) -> Iterator[tuple[int, OutboxTarget, bytes]]:
        for (row, tag), data in zip(self._stored, self._checked, strict=True):
            self._next += 1
            yield row, OutboxTarget(self._addr, self._name, tag), data

    def __enter__(self) -> StoredBatch:
        return self

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> None:
        if kind is not None:
            settle_unqueued(self._store, self._stored[self._next :])


def post_local(
    endpoint: Endpoint,
    posts: PostQueue,
    closed: bool,
    mailbox: str,
    data: Data,
    msg_type: Int,
    priority: Int,
) -> None:
    """``post``: check a local message now (argument errors raise here) and queue it
    for the node's next turn, without its lock (see :mod:`reliable.localpost`)."""
    data = checked_message(data, msg_type, priority)  # before check_message: compiled,
    check_mailbox_name(mailbox)  # its declared int would let a bool pass as an int
    endpoint.check_message(data, msg_type=msg_type, priority=priority, mailbox=mailbox)
    if closed:
        raise errors.NodeClosed("the node is closed")
    posts.put(mailbox, data, msg_type, priority)


def manage_request(
    action: str,
    mailbox: str,
    capacity: int | None,
    max_bytes: int | None,
    node: str,
) -> Manage:
    """A management request (``manage``, what ``rmsg ctl`` sends), its action checked."""
    if action not in ACTIONS:
        raise errors.UsageError(f"action must be one of {', '.join(ACTIONS)}, not {action!r}")
    return Manage(0, action, mailbox, capacity, max_bytes, node)


def no_answer(addr: Any, timeout: float, *, stats: bool = False) -> errors.ReceiveTimeout:
    """The error of a management request (or, ``stats``, a stats query) left unanswered."""
    where = errors.format_address(addr)
    if stats:
        return errors.ReceiveTimeout(
            f"{where} sent no stats within {timeout:g}s "
            "(is an rmsg node running there, with Config.serve_stats?)"
        )
    return errors.ReceiveTimeout(
        f"{where} did not answer within {timeout:g}s (is an rmsg node running there?)"
    )


def receive_selector(
    source: Sources,
    msg_type: Int,
    except_type: Any,
    max_size: int | None,
    truncate: bool,
    family: int,
) -> Selector:
    """A receive call's selector (:func:`reliable.mailbox.selector_for`), a named
    source parsed as an address of the node's ``family``."""
    if source is None:  # the common case: nothing to parse
        return Selector.of(None, msg_type, except_type, max_size, truncate)
    return selector_for(
        source,
        msg_type,
        except_type,
        max_size,
        truncate,
        lambda one: resolve_destination(one, family),
    )


def check_count(max_count: object) -> None:
    """``receive_many``'s ``max_count``: a positive integer."""
    if isinstance(max_count, bool) or not isinstance(max_count, int) or max_count < 1:
        raise errors.UsageError(f"max_count must be a positive integer, not {max_count!r}")


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
class OutboxTarget(NamedTuple):
    """A send from a durable outbox (reliable/outbox.py): one node's mailbox, and the
    message's outbox id, which travels with the mailbox name (outbox_ids.format_tag)."""

    addr: Address
    mailbox: str
    tag: str


Target = tuple[Address, str] | GroupAddress | ServiceAddress | OutboxTarget


def enqueue(
    endpoint: Endpoint,
    target: Target,
    data: Data,
    *,
    now: float,
    msg_type: Int,
    priority: Int,
    timeout: float | None,
    deadline: float | None,
    policy: str,
) -> int:
    """Queue ``data`` for ``target`` in the core, whatever kind of destination it is.

    A node (an ``(address, mailbox)`` tuple, the common case) skips the checks for
    the other kinds: one type check per send instead of three.
    """
    if type(target) is not tuple:
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
        if isinstance(target, OutboxTarget):
            return endpoint.send(
                target.addr,
                data,
                now=now,
                msg_type=msg_type,
                priority=priority,
                mailbox=target.mailbox,
                timeout=timeout,
                deadline=deadline,
                outbox=target.tag,
            )
    addr, mailbox = target  # type: ignore[misc]  # (mypy: OutboxTarget is handled above)
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


def drain_socket(
    sock: DatagramSocket,
    limit: int = RECV_BATCH,
    reports: list[Unreachable] | None = None,
) -> list[tuple[bytes, Address]]:
    """Read datagrams until the socket would block (or ``limit``): one wake-up, many packets.

    With ``reports``, what the OS queued about unreachable destinations is
    added to it: read when ``recvfrom`` raised a pending ICMP error, and when
    the wake-up found nothing to read (the error queue alone makes a socket
    ready).
    """
    batch: list[tuple[bytes, Address]] = []
    failed = False
    offload = udpio.offload_of(sock)
    if offload is not None and offload.gro:
        # Each read may hold a train of datagrams (GRO): count datagrams, bound the reads.
        assert isinstance(sock, socket.socket)
        for _ in range(limit):
            try:
                datagrams, addr = udpio.receive(sock, MAX_UDP_PAYLOAD)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                failed = True
                continue
            source = normalize(addr)
            batch.extend([(d, source) for d in datagrams])
            if len(batch) >= limit:
                break
        if reports is not None and (failed or not batch):
            reports.extend(read_error_queue(sock))
        return batch
    for _ in range(limit):
        try:
            data, addr = sock.recvfrom(MAX_UDP_PAYLOAD)
        except (BlockingIOError, InterruptedError):
            break
        except OSError:
            # e.g. ECONNREFUSED: an ICMP error for an earlier datagram, pending on the socket
            failed = True
            continue
        batch.append((data, normalize(addr)))
    if reports is not None and (failed or not batch):
        reports.extend(read_error_queue(sock))
    return batch


# ---------------------------------------------------- the OS's word on peers

# Linux's numbers; the socket module does not export them all (ip(7), ipv6(7)).
_IP_RECVERR = 11
_IPV6_RECVERR = 25
_MSG_ERRQUEUE = getattr(socket, "MSG_ERRQUEUE", 0x2000)
_ERROR_MESSAGES = {(socket.IPPROTO_IP, _IP_RECVERR), (socket.IPPROTO_IPV6, _IPV6_RECVERR)}
_ORIGIN_ICMP = 2
_ORIGIN_ICMP6 = 3
#: struct sock_extended_err: ee_errno, ee_origin, ee_type, ee_code, ee_pad, ee_info, ee_data
_EXTENDED_ERR = struct.Struct("=IBBBBII")
_ANCILLARY = 512  # bytes: one sock_extended_err and the offender's sockaddr_in6, with room

#: errno of an unreachable destination -> whether it is *soft*: routing's word,
#: which may be taken back (RFC 1122 section 4.2.3.9), rather than the peer's host's.
#: Other errors (ENOBUFS, EMSGSIZE, ...) say nothing about reachability.
_UNREACHABLE = {
    _errno.ECONNREFUSED: False,  # ICMP port unreachable: the host is up, nothing listens
    _errno.ENOPROTOOPT: False,  # ICMP protocol unreachable
    _errno.ENETUNREACH: True,  # no route, or ICMP network unreachable
    _errno.EHOSTUNREACH: True,  # no route to host, ICMP host unreachable, TTL exceeded
    _errno.EHOSTDOWN: True,  # ICMP destination host unknown
    _errno.EACCES: True,  # ICMPv6 administratively prohibited
    _errno.EPERM: True,  # a local firewall (or a full connection-tracking table)
}
if hasattr(_errno, "ENONET"):  # Linux: ICMP source host isolated
    _UNREACHABLE[_errno.ENONET] = True

_ICMP_UNREACH = {
    0: "network unreachable",
    1: "host unreachable",
    2: "protocol unreachable",
    3: "port unreachable",
    5: "source route failed",
    6: "destination network unknown",
    7: "destination host unknown",
    8: "source host isolated",
    9: "network administratively prohibited",
    10: "host administratively prohibited",
    11: "network unreachable for TOS",
    12: "host unreachable for TOS",
    13: "communication administratively prohibited",
}
_ICMP6_UNREACH = {
    0: "no route to destination",
    1: "communication administratively prohibited",
    2: "beyond scope of source address",
    3: "address unreachable",
    4: "port unreachable",
    5: "source address failed policy",
    6: "reject route to destination",
}


@dataclass(frozen=True, slots=True)
class Unreachable:
    """The OS's word that datagrams to ``addr`` do not get through.

    ``reason`` is for people ("connection refused (the OS reported ICMP port
    unreachable)"); ``soft`` is as for ``Endpoint.handle_unreachable``.
    """

    addr: Address
    reason: str
    errno: int
    soft: bool


def enable_error_queue(sock: socket.socket) -> bool:
    """Have the OS queue ICMP errors per destination on ``sock``; whether it could.

    Linux only (``IP_RECVERR``, and ``IPV6_RECVERR`` on an IPv6 socket, whose
    IPv4-mapped traffic takes the IPv4 option too); elsewhere a no-op.
    """
    if not sys.platform.startswith("linux") or not hasattr(sock, "recvmsg"):
        return False
    options = [(socket.IPPROTO_IP, _IP_RECVERR)]
    if sock.family == socket.AF_INET6:
        options.insert(0, (socket.IPPROTO_IPV6, _IPV6_RECVERR))
    elif sock.family != socket.AF_INET:
        return False
    enabled = False
    for level, option in options:
        try:
            sock.setsockopt(level, option, 1)
            enabled = True
        except OSError:
            pass
    return enabled


def read_error_queue(sock: object, limit: int = RECV_BATCH) -> list[Unreachable]:
    """Empty ``sock``'s error queue (up to ``limit`` messages) into unreachability reports.

    Returns nothing for a socket without an error queue, or a wrapper without
    ``recvmsg`` (netem's ``FaultySocket``); errors that say nothing about
    reachability (a path MTU, a local ENOBUFS) are read and dropped.
    """
    recvmsg = getattr(sock, "recvmsg", None)
    if recvmsg is None:
        return []
    reports: list[Unreachable] = []
    for _ in range(limit):
        try:
            _data, ancdata, _flags, dest = recvmsg(0, _ANCILLARY, _MSG_ERRQUEUE)
        except OSError:  # EAGAIN: empty; EINVAL etc.: no error queue here
            break
        for level, kind, payload in ancdata:
            report = parse_extended_error(level, kind, payload, dest)
            if report is not None:
                reports.append(report)
    return reports


def parse_extended_error(level: int, kind: int, payload: bytes, dest: Any) -> Unreachable | None:
    """One error-queue node message about a datagram to ``dest``, if it says unreachable.

    ``payload`` is a ``struct sock_extended_err`` followed by the sockaddr of
    the node that reported it (the ICMP's source).
    """
    if (level, kind) not in _ERROR_MESSAGES or len(payload) < _EXTENDED_ERR.size:
        return None
    err, origin, icmp_type, code, _pad, _info, _data = _EXTENDED_ERR.unpack_from(payload)
    if origin not in (_ORIGIN_ICMP, _ORIGIN_ICMP6) or err not in _UNREACHABLE:
        return None
    if not isinstance(dest, tuple) or len(dest) < 2:
        return None
    addr = normalize(dest)
    if origin == _ORIGIN_ICMP:
        name = _ICMP_UNREACH.get(code) if icmp_type == 3 else None
    else:
        name = _ICMP6_UNREACH.get(code) if icmp_type == 1 else None
    if name is None:
        exceeded = icmp_type == (11 if origin == _ORIGIN_ICMP else 3)
        name = "time exceeded" if exceeded else f"type {icmp_type} code {code}"
    offender = _sockaddr_host(payload[_EXTENDED_ERR.size :])
    source = f" from {offender}" if offender is not None and offender != addr[0] else ""
    reason = f"{_strerror(err)} (the OS reported ICMP {name}{source})"
    return Unreachable(addr, reason, err, _UNREACHABLE[err])


def _sockaddr_host(raw: bytes) -> str | None:
    """The host of a ``sockaddr_in``/``sockaddr_in6`` in native layout, or None."""
    if len(raw) < 2:
        return None
    (family,) = struct.unpack_from("=H", raw)
    if family == socket.AF_INET and len(raw) >= 8:
        return socket.inet_ntop(socket.AF_INET, raw[4:8])
    if family == socket.AF_INET6 and len(raw) >= 24:
        return socket.inet_ntop(socket.AF_INET6, raw[8:24])
    return None


def _strerror(err: int) -> str:
    text = os.strerror(err)
    return text[:1].lower() + text[1:]


def send_datagram(
    sock: DatagramSocket, data: bytes, addr: Address, reports: list[Unreachable]
) -> None:
    """``sendto``, adding what the OS says about unreachable destinations to ``reports``.

    Raises ``BlockingIOError`` or ``InterruptedError`` (the caller keeps the
    datagram for later). Any other error is read for what it says (see the
    module docstring) and otherwise swallowed: the protocol retransmits.
    """
    try:
        sock.sendto(data, addr)
        return
    except (BlockingIOError, InterruptedError):
        raise
    except OSError:
        pass
    # Perhaps an earlier datagram's ICMP error, pending: the queue says whose. Once more.
    reports.extend(read_error_queue(sock))
    try:
        sock.sendto(data, addr)
        return
    except (BlockingIOError, InterruptedError):
        raise
    except OSError as exc:
        failure = exc
    queued = read_error_queue(sock)
    reports.extend(queued)
    report = None if queued else refused_send(failure, addr)
    if report is not None:
        reports.append(report)


def send_all(
    sock: DatagramSocket, out: list[tuple[bytes, Address]], reports: list[Unreachable]
) -> int:
    """Send ``out`` in order until the socket is full; returns how many went.

    Runs of equal-size datagrams to one address go in one GSO ``sendmsg``
    where the socket has it (:mod:`reliable.udpio`); the rest, and a run
    whose GSO send failed for any reason but a full socket, one at a time
    through :func:`send_datagram`, which reads what the OS says.
    """
    if len(out) == 1:  # the common case (a message, an ack, a reply): nothing to segment
        data, addr = out[0]
        try:
            send_datagram(sock, data, addr, reports)
        except (BlockingIOError, InterruptedError):
            return 0
        return 1
    offload = udpio.offload_of(sock)
    if offload is None or not offload.gso:
        for i, (data, addr) in enumerate(out):
            try:
                send_datagram(sock, data, addr, reports)
            except (BlockingIOError, InterruptedError):
                return i
        return len(out)
    assert isinstance(sock, socket.socket)
    i = 0
    n = len(out)
    while i < n:
        end = udpio.run_end(out, i) if offload.gso else i + 1
        if end - i > 1:
            try:
                if udpio.send_segments(sock, [d for d, _ in out[i:end]], out[i][1]):
                    i = end
                    continue
            except (BlockingIOError, InterruptedError):
                return i
            except OSError:
                pass  # one at a time, reading what the OS says
        for j in range(i, end):
            data, addr = out[j]
            try:
                send_datagram(sock, data, addr, reports)
            except (BlockingIOError, InterruptedError):
                return j
        i = end
    return n


def refused_send(failure: OSError, addr: Address) -> Unreachable | None:
    """A ``sendto`` to ``addr`` that failed with ``failure`` (twice), as a report if it is one.

    ECONNREFUSED never is: the OS only raises it for an earlier datagram's ICMP.
    """
    err = failure.errno
    if err is None or err == _errno.ECONNREFUSED or err not in _UNREACHABLE:
        return None
    return Unreachable(addr, f"{_strerror(err)} (the OS refused the send)", err, _UNREACHABLE[err])


class Backlog:
    """Datagrams that found the socket full, sent in order before any newer one."""

    __slots__ = ("_queue",)

    def __init__(self) -> None:
        self._queue: deque[tuple[bytes, Address]] = deque()

    def __bool__(self) -> bool:
        return bool(self._queue)

    def __len__(self) -> int:
        return len(self._queue)

    def transmit(
        self, sock: DatagramSocket, out: list[tuple[bytes, Address]], reports: list[Unreachable]
    ) -> bool:
        """Send ``out`` (after what already waits); whether some of it had to wait."""
        if self._queue:
            self._queue.extend(out)
            return True
        sent = send_all(sock, out, reports)
        if sent < len(out):
            self._queue.extend(out[sent:])
            return True
        return False

    def flush(self, sock: DatagramSocket, reports: list[Unreachable]) -> bool:
        """Send what waited, as far as the socket takes it; whether all of it went."""
        queue = self._queue
        while queue:
            waiting = list(itertools.islice(queue, udpio.GSO_MAX_SEGMENTS))
            sent = send_all(sock, waiting, reports)
            for _ in range(sent):
                queue.popleft()
            if sent < len(waiting):
                return False
        return True

    def extend(self, out: list[tuple[bytes, Address]]) -> None:
        self._queue.extend(out)

    def clear(self) -> None:
        self._queue.clear()


def report_unreachable(endpoint: Endpoint, reports: list[Unreachable], now: float) -> None:
    """Hand the OS's reports to the core."""
    for r in reports:
        endpoint.handle_unreachable(r.addr, r.reason, now, errno=r.errno, soft=r.soft)


class EventSink(Protocol):
    """What an adapter does with the core's events (:func:`route_events` calls these).

    The methods are underscored: an adapter implements them for the driver,
    not for its users, so they stay out of its public API."""

    def _on_outcome(
        self,
        ticket: int,
        receipt: Receipt | GroupReceipt | events.MessageDelivered | None,
        error: errors.DeliveryFailed | None,
    ) -> None:
        """A send's fate. A ``MessageDelivered`` stands for its receipt when the
        adapter asked :func:`route_events` for ``lazy_receipts``
        (``Receipt.from_event`` makes it)."""

    def _on_receive(
        self, waiter: int, message: Message | None, error: errors.ReliableError | None
    ) -> None: ...

    def _on_stats(self, peer: Any, request: int, body: bytes) -> None: ...

    def _on_manage(self, request: int, status: int, body: bytes) -> None: ...

    def _on_peer_down(self, peer: Any, error: errors.DeliveryFailed) -> None: ...

    def _on_closed(self) -> None: ...


def _receipt_maker() -> Callable[[DeliveryFacts], Receipt]:
    """A maker of the :class:`Receipt` a ``MessageDelivered`` event describes, as
    ``Receipt.from_event`` but about twice as fast in the pure core: a frozen
    dataclass's ``__init__`` takes every field by keyword and sets it through a
    global lookup, about 1 us per receipt, which a stream of ``result()`` calls paid
    per message. Made from the dataclass's own fields, so a field added later is
    copied too; the compiled core's ``from_event`` is native code already (and its
    classes are not built through ``object.__new__``), so it keeps that one."""
    if not (getattr(message, "__file__", None) or "").endswith(".py"):
        return Receipt.from_event  # pragma: no cover - the compiled core
    names = [field.name for field in dataclasses.fields(Receipt)]
    body = "".join(f"    _set(r, {name!r}, e.{name})\n" for name in names)
    head = "def receipt_of(e, _new=_new, _set=_set, _R=_R):\n    r = _new(_R)\n"
    source = f"{head}{body}    return r\n"
    scope: dict[str, Any] = {"_new": object.__new__, "_set": object.__setattr__, "_R": Receipt}
    exec(source, scope)  # fixed text, made from the dataclass's field names
    maker: Callable[[DeliveryFacts], Receipt] = scope["receipt_of"]
    return maker


#: ``receipt_of(event)``: the :class:`Receipt` of a ``MessageDelivered`` event (as
#: ``Receipt.from_event``, faster).
receipt_of = _receipt_maker()


def route_events(
    endpoint: Endpoint,
    sink: EventSink,
    observer: Callable[[events.Event], None] | None = None,
    *,
    lazy_receipts: bool = False,
) -> None:
    """Hand every pending core event to ``sink`` (and to ``observer``, if any).

    The three kinds every message makes are told apart by exact type first
    (an arrival, which the adapters ignore, used to walk the whole chain).
    ``lazy_receipts``: a delivery reaches ``sink._on_outcome`` as its
    ``MessageDelivered`` event, for the sink to make the :class:`Receipt` only
    if someone asks for it (most sends are never asked).
    """
    received, delivered, taken = (
        events.MessageReceived,
        events.MessageDelivered,
        events.MessageTaken,
    )
    while (event := endpoint.next_event()) is not None:
        if observer is not None:
            observer(event)
        kind = type(event)
        if kind is received:
            continue
        if kind is delivered:
            assert isinstance(event, events.MessageDelivered)
            receipt = event if lazy_receipts else receipt_of(event)
            sink._on_outcome(event.ticket, receipt, None)
        elif kind is taken:
            assert isinstance(event, events.MessageTaken)
            sink._on_receive(event.waiter, event.message, None)
        else:
            _route_rare(event, sink)


def _route_rare(event: events.Event, sink: EventSink) -> None:
    """:func:`route_events` for the kinds that are not one per message."""
    if isinstance(event, events.MessageDelivered):
        sink._on_outcome(event.ticket, receipt_of(event), None)
    elif isinstance(event, events.GroupSendDone):
        sink._on_outcome(event.ticket, event.receipt, None)
    elif isinstance(event, events.MessageFailed):
        sink._on_outcome(event.ticket, None, event.error)
    elif isinstance(event, events.MessageTaken):
        sink._on_receive(event.waiter, event.message, None)
    elif isinstance(event, events.ReceiveFailed):
        sink._on_receive(event.waiter, None, event.error)
    elif isinstance(event, events.StatsReceived):
        sink._on_stats(event.peer, event.request, event.body)
    elif isinstance(event, events.ManageAnswered):
        sink._on_manage(event.request, event.status, event.body)
    elif isinstance(event, events.PeerUnreachable):
        error = errors.PeerUnreachable(
            event.peer, event.silent_for, cause=event.cause, errno=event.errno
        )
        sink._on_peer_down(event.peer, error)
    elif isinstance(event, events.PeerClosed):
        sink._on_peer_down(event.peer, errors.PeerClosed(event.peer))
    elif isinstance(event, events.PeerRejectedUs):
        sink._on_peer_down(event.peer, event.error)
    elif isinstance(event, events.Closed):
        sink._on_closed()


def parse_manage_reply(dest: Any, status: int, body: bytes) -> dict[str, Any]:
    """A management answer (``rmsg ctl``) as a dict, or the error it carries, raised."""
    text = body.decode("utf-8", "replace")
    where = errors.format_address(dest)
    if status == 1:
        raise errors.ReliableError(f"{where} refused: {text}")
    if status != 0:
        raise errors.UsageError(f"{where}: {text}")
    try:
        answer = json.loads(text)
    except ValueError as exc:
        raise errors.ReliableError(f"{where} sent an unreadable answer: {exc}") from None
    if not isinstance(answer, dict):
        raise errors.ReliableError(f"{where} sent an unreadable answer")
    return answer


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


class BatchOutcomes:
    """What both adapters' batch handles keep: message ``i``'s ticket and its outcome.

    ``tickets[i]`` is message ``i``'s ticket; every ticket gets exactly one
    outcome (:meth:`resolve`), a receipt or an error, filed under its index.
    """

    __slots__ = ("_index", "errors", "pending", "receipts", "tickets")

    def __init__(self) -> None:
        self.tickets: list[int] = []
        self._index: dict[int, int] = {}
        self.receipts: list[Receipt | GroupReceipt | None] = []
        self.errors: dict[int, errors.ReliableError] = {}
        self.pending = 0

    def add(self, ticket: int) -> None:
        self._index[ticket] = len(self.tickets)
        self.tickets.append(ticket)
        self.receipts.append(None)
        self.pending += 1

    def resolve(
        self,
        ticket: int,
        receipt: Receipt | GroupReceipt | None,
        error: errors.ReliableError | None,
    ) -> None:
        i = self._index[ticket]
        if error is not None:
            self.errors[i] = error
        else:
            self.receipts[i] = receipt
        self.pending -= 1

    def unresolved(self) -> list[int]:
        """The tickets whose outcome is not known yet (the ones a cancel may withdraw)."""
        return [
            t
            for i, t in enumerate(self.tickets)
            if self.receipts[i] is None and i not in self.errors
        ]

    def delivered(self) -> list[Receipt | GroupReceipt]:
        return [r for r in self.receipts if r is not None]


def receive_failure(
    *,
    closed: bool,
    departures: Departures,
    peer: Address | None,
    mark: int,
    remaining: float | None,
    timeout: float | None,
) -> errors.ReliableError | None:
    """Why a waiting receive must give up now, if it must.

    The node closed; the peer the receive named went away since ``mark``
    (see :class:`Departures`); or ``remaining`` seconds of ``timeout`` ran
    out. The caller then asks the core to cancel the wait
    (``Endpoint.cancel_wait``): if the core already answered it, the answer
    wins over this error, since the message was taken.
    """
    if closed:
        return errors.NodeClosed("the node closed while waiting to receive")
    if peer is not None:
        down = departures.down_since(peer, mark)
        if down is not None:
            return down
    if remaining is not None and remaining <= 0:
        return errors.ReceiveTimeout(f"no message within {timeout:g}s")
    return None


def give_up_receive(
    endpoint: Endpoint,
    ticket: int,
    taken: dict[int, Any],
    *,
    locked: bool,
    local: bool,
    route: Callable[[], None],
    now: float,
) -> None:
    """A waiting receive gives up (cancelled, interrupted) whatever the core did with it.

    Still waiting: the wait is withdrawn, or the core would hand the next message to
    nobody. Already answered (routed into ``taken``, the adapter's answers by ticket,
    or still in the core's events: ``route`` routes them): the message it was handed
    goes back to its mailbox (``Endpoint.put_back``: its place, a waiting receive
    first, a lock released, a durable row again), since its sender already has its
    receipt; only for a ``local`` mailbox's receive (a remote mailbox's message is
    not ours to put back). ``route`` runs the adapter's pump after whatever changed
    (a remote owner hears of the withdrawal; a hand-off; a durable row to commit).
    """
    if ticket not in taken and endpoint.cancel_wait(ticket):
        route()
        return
    if ticket not in taken:
        route()
    answer = taken.pop(ticket, None)
    if local and isinstance(answer, Message):
        owner = endpoint.port_owner(answer.mailbox)
        if endpoint.put_back(answer, owner=owner, locked=locked, now=now):
            route()


def manage_mailbox(
    endpoint: Endpoint, name: str, action: str, owner: int | None, now: float
) -> None:
    """Close, open or delete mailbox ``name`` in the core (a port: by its owner only)."""
    if action == "close":
        endpoint.close_mailbox(name, now, owner=owner)
    elif action == "open":
        endpoint.open_mailbox(name, owner=owner)
    else:
        endpoint.delete_mailbox(name, now, owner=owner)


def delete_abandoned_ports(endpoint: Endpoint, ports: list[tuple[str, int]], now: float) -> None:
    """Delete the ports whose owner handles are gone (see :class:`MailboxHandle`)."""
    while ports:
        name, owner = ports.pop()
        if not endpoint.is_port_of(name, owner):
            continue  # a plain mailbox outlives its handles (a durable one: its store too)
        with contextlib.suppress(errors.UsageError):  # already deleted (or replaced)
            endpoint.delete_mailbox(name, now, owner=owner)


def mailbox_set(mailboxes: Iterable[str | MailboxHandle]) -> list[tuple[str, int | None]]:
    """The ``(name, owner)`` pairs of a receive from a set of mailboxes (names, or
    handles: a port's owner handle carries the right to receive from it)."""
    if isinstance(mailboxes, (str, MailboxHandle)):
        raise errors.UsageError(
            "receive_any takes a list of mailboxes, e.g. ['jobs', 'urgent']; "
            "to receive from one, use receive(mailbox=...)"
        )
    chosen: list[tuple[str, int | None]] = []
    for box in mailboxes:
        if isinstance(box, MailboxHandle):
            chosen.append((box.name, box._owner))
        elif isinstance(box, str):
            check_mailbox_name(box)
            chosen.append((box, None))
        else:
            raise errors.UsageError(f"a mailbox is a name or a handle, not {box!r}")
    if not chosen:
        raise errors.UsageError("give at least one mailbox to receive from")
    names = [name for name, _ in chosen]
    if len(set(names)) != len(names):
        raise errors.UsageError(f"name each mailbox once: {names}")
    return chosen


def remote_mailbox_address(address: str) -> tuple[str, str]:
    """Split ``host:port/name`` for ``remote_mailbox``; the name is required."""
    if not isinstance(address, str) or "/" not in address:
        raise errors.UsageError(
            f"a remote mailbox is named host:port/name, got {address!r}; e.g. '127.0.0.1:7000/jobs'"
        )
    node, name = address.split("/", 1)
    check_mailbox_name(name)
    if not name:
        raise errors.UsageError("name the remote mailbox: host:port/name")
    return node, name
