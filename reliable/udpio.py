"""UDP segmentation offload for the adapters: many datagrams per system call.

Theory of operation
-------------------
Across a real network a datagram is at most a path MTU (about 1.5 KB), so a
16 MiB message is some 11,000 datagrams; one ``sendto`` and one
``recvfrom`` each cost more than the protocol's own work on a datagram.
Linux (4.18+ for sending, 5.0+ for receiving) moves them in bulk:

* **GSO** (``UDP_SEGMENT``): one ``sendmsg`` of a buffer plus a control
  message naming a segment size; the kernel (or the NIC) cuts it into
  datagrams of that size, the last one possibly shorter, all to one
  destination. Each segment is an ordinary datagram on the wire: receivers
  need nothing special.
* **GRO** (``UDP_GRO``, a socket option): the kernel may hand such a train
  of datagrams from one source to ``recvmsg`` as one buffer with a control
  message giving the segment size; :func:`receive` splits it again.

Both are decided per socket by :func:`enable` (the adapters call it through
``open_socket(..., offload=True)``, which also sets DF for path MTU probing:
:func:`set_probe_mtu`): GRO is asked of the kernel, GSO is
tried with ``getsockopt``; anything missing (another OS, an old kernel, a
wrapper such as netem's ``FaultySocket``, ``RMSG_UDP_OFFLOAD=0`` in the
environment) leaves plain ``sendto``/``recvfrom``. A socket that reads with
GRO on must split every read, so only the adapters' own reading loop
(``driver.drain_socket``) gets it. A GSO send that fails for a reason other
than a full socket (a device without checksum offload answers ``EIO``)
turns GSO off for that socket and the caller sends the run one datagram at
a time, which also reads the error queue as before: the fallback is
exactly the path without offload.

The protocol core knows nothing of this: it hands out datagrams; runs of
equal-size ones to one address (the fragments of a big message) are what
:func:`runs` finds to batch.
"""

from __future__ import annotations

import errno as _errno
import os
import socket
import struct
import sys
import weakref
from collections.abc import Sequence
from typing import Any

__all__ = [
    "GSO_MAX_BYTES",
    "GSO_MAX_SEGMENTS",
    "Offload",
    "enable",
    "offload_of",
    "receive",
    "run_end",
    "send_segments",
    "set_probe_mtu",
]

# Linux's numbers (include/uapi/linux/udp.h); the socket module does not export them.
SOL_UDP = 17
UDP_SEGMENT = 103
UDP_GRO = 104
#: Most segments one GSO send may carry (the kernel's UDP_MAX_SEGMENTS).
GSO_MAX_SEGMENTS = 64
#: Most payload bytes one GSO send may carry: it travels as one IP datagram.
GSO_MAX_BYTES = 65_000
_U16 = struct.Struct("=H")
_INT = struct.Struct("=i")
_ANCILLARY = socket.CMSG_SPACE(_INT.size)
#: errnos of a GSO send that say the path cannot segment, not that the peer is unreachable
_UNSUPPORTED = {_errno.EIO, _errno.EINVAL, _errno.ENOPROTOOPT, _errno.EOPNOTSUPP}


class Offload:
    """What one socket may use: ``gso`` (send side) and ``gro`` (receive side)."""

    __slots__ = ("gro", "gro_reads", "gso", "gso_sends")

    def __init__(self, gso: bool, gro: bool) -> None:
        self.gso = gso
        self.gro = gro
        self.gso_sends = 0  #: sendmsg calls that carried more than one datagram
        self.gro_reads = 0  #: reads that returned more than one datagram


_SOCKETS: weakref.WeakKeyDictionary[Any, Offload] = weakref.WeakKeyDictionary()


def enable(sock: Any, *, gso: bool = True, gro: bool = True) -> Offload | None:
    """Turn on what ``sock`` supports of ``gso`` and ``gro``; what it got, or None.

    Only a plain ``socket.socket`` of UDP on Linux qualifies, and nothing is
    enabled when the environment sets ``RMSG_UDP_OFFLOAD=0``.
    """
    if (
        not sys.platform.startswith("linux")
        or type(sock) is not socket.socket
        or sock.type != socket.SOCK_DGRAM
        or sock.family not in (socket.AF_INET, socket.AF_INET6)
        or os.environ.get("RMSG_UDP_OFFLOAD", "1") == "0"
    ):
        return None
    can_gso = can_gro = False
    if gso:
        try:
            sock.getsockopt(SOL_UDP, UDP_SEGMENT)
            can_gso = True
        except OSError:
            pass
    if gro:
        try:
            sock.setsockopt(SOL_UDP, UDP_GRO, 1)
            can_gro = True
        except OSError:
            pass
    if not (can_gso or can_gro):
        return None
    offload = Offload(can_gso, can_gro)
    _SOCKETS[sock] = offload
    return offload


# ip(7), ipv6(7): DF set, the kernel's path MTU cache ignored (RFC 8899's probing needs both)
_IP_MTU_DISCOVER = 10
_IPV6_MTU_DISCOVER = 23
_PMTUDISC_PROBE = 3


def set_probe_mtu(sock: socket.socket) -> bool:
    """Send with DF and without the kernel's path MTU cache (``IP_PMTUDISC_PROBE``).

    The core's path MTU discovery (:mod:`reliable.pmtud`) then sees a probe too
    big for the path lost, rather than fragmented by the kernel; a datagram
    too big for the local interface fails with ``EMSGSIZE``, which the
    adapters drop like any send error that says nothing about the peer.
    Returns whether the option took (Linux only: the numbers are Linux's).
    """
    if not sys.platform.startswith("linux"):
        return False
    if sock.family == socket.AF_INET6:
        level, option = socket.IPPROTO_IPV6, _IPV6_MTU_DISCOVER
    else:
        level, option = socket.IPPROTO_IP, _IP_MTU_DISCOVER
    try:
        sock.setsockopt(level, option, _PMTUDISC_PROBE)
    except OSError:
        return False
    return True


def offload_of(sock: Any) -> Offload | None:
    """What :func:`enable` turned on for ``sock``, if anything."""
    try:
        return _SOCKETS.get(sock)
    except TypeError:  # not weakly referenceable: never enabled
        return None


def run_end(out: Sequence[tuple[bytes, Any]], start: int) -> int:
    """One past the last datagram from ``start`` that can share a GSO send with it.

    A run is datagrams to the same address, all of the first one's size but
    the last, which may be shorter, within :data:`GSO_MAX_SEGMENTS` and
    :data:`GSO_MAX_BYTES`.
    """
    data, addr = out[start]
    size = len(data)
    limit = min(len(out), start + GSO_MAX_SEGMENTS, start + GSO_MAX_BYTES // max(size, 1))
    end = start + 1
    while end < limit:
        nxt, to = out[end]
        n = len(nxt)
        if to != addr or n > size:
            break
        end += 1
        if n < size:
            break  # a shorter one ends the run
    return end


def send_segments(sock: socket.socket, datagrams: Sequence[bytes], addr: Any) -> bool:
    """Send ``datagrams`` (equal sizes but the last) to ``addr`` in one GSO ``sendmsg``.

    Returns False, having sent nothing, when the socket cannot segment: GSO
    is then off for it (the caller sends them one by one). Raises
    ``BlockingIOError``/``InterruptedError`` when the socket is full (nothing
    was sent) and any other ``OSError`` for the caller's one-by-one path to
    look into.
    """
    offload = _SOCKETS.get(sock)
    if offload is None or not offload.gso:
        return False
    size = len(datagrams[0])
    try:
        sock.sendmsg([b"".join(datagrams)], [(SOL_UDP, UDP_SEGMENT, _U16.pack(size))], 0, addr)
    except (BlockingIOError, InterruptedError):
        raise
    except OSError as exc:
        if exc.errno in _UNSUPPORTED:
            offload.gso = False
            return False
        raise
    offload.gso_sends += 1
    return True


def receive(sock: socket.socket, bufsize: int) -> tuple[list[bytes], Any]:
    """One read from a GRO socket: the datagrams it held (split again), and their source.

    Raises what ``recvmsg`` raises (``BlockingIOError`` when nothing waits).
    """
    data, ancdata, _flags, addr = sock.recvmsg(bufsize, _ANCILLARY)
    for level, kind, value in ancdata:
        if level == SOL_UDP and kind == UDP_GRO and len(value) >= _INT.size:
            (size,) = _INT.unpack_from(value)
            if 0 < size < len(data):
                offload = _SOCKETS.get(sock)
                if offload is not None:
                    offload.gro_reads += 1
                return [data[i : i + size] for i in range(0, len(data), size)], addr
    return [data], addr
