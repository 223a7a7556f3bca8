"""Sockets for group addressing, and the rules that keep group traffic where it belongs.

Shared by the blocking and asyncio adapters. Why each rule:

* A node must be bound to one specific IPv4 address to use groups: that
  address picks the interface multicast leaves by (``IP_MULTICAST_IF``) and
  whose subnet a broadcast covers, so nothing goes out an interface the
  application did not choose.
* Multicast TTL is ``Config.multicast_ttl`` (1 by default: the local
  segment only) and never more than 1 from a loopback-bound node.
* Broadcast from a loopback-bound node goes only to 127.255.255.255;
  otherwise only to the broadcast address of the bound interface
  (``broadcast://:PORT`` means exactly that).

Hearing a group takes one more socket per group: bound to the group (or
broadcast) address and port with ``SO_REUSEADDR``/``SO_REUSEPORT``, so
several nodes on one host can all hear it, and for multicast joined on the
bound interface. Datagrams still leave from the node's own socket, so
members answer the node's own address.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import socket
import struct
from typing import Any

from . import errors
from .addressing import GroupAddress
from .config import Config

__all__ = ["GroupSockets", "interface_broadcast"]

_SIOCGIFADDR = 0x8915
_SIOCGIFBRDADDR = 0x8919
LOOPBACK_BROADCAST = "127.255.255.255"


def interface_broadcast(ip: str) -> str | None:
    """The broadcast address of the interface that holds ``ip``, or None if none does."""
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        for _, name in socket.if_nameindex():
            request = struct.pack("256s", name.encode()[:15])
            try:
                addr = fcntl.ioctl(probe.fileno(), _SIOCGIFADDR, request)
                if socket.inet_ntoa(addr[20:24]) != ip:
                    continue
                brd = fcntl.ioctl(probe.fileno(), _SIOCGIFBRDADDR, request)
                return socket.inet_ntoa(brd[20:24])
            except OSError:
                continue
    finally:
        probe.close()
    return None


class GroupSockets:
    """The group sockets of one node, opened on demand."""

    def __init__(self, main: Any, config: Config) -> None:
        self._main = main
        self._config = config
        self._socks: dict[str, socket.socket] = {}
        self._configured = False
        address = main.getsockname()
        self._ip = str(address[0])

    def resolve(self, group: GroupAddress) -> GroupAddress:
        """``group`` with its broadcast address filled in; raises if the rules forbid it."""
        try:
            ip = ipaddress.IPv4Address(self._ip)
        except ValueError:
            raise errors.UsageError(
                "group addressing is IPv4 only: bind the node to an IPv4 address"
            ) from None
        if ip.is_unspecified:
            raise errors.UsageError(
                "to use groups, bind the node to one specific IPv4 address (e.g. "
                "127.0.0.1:7000), not 0.0.0.0: it chooses the interface group traffic uses"
            )
        loopback = ip.is_loopback
        if group.scheme == "multicast":
            if loopback and self._config.multicast_ttl > 1:
                raise errors.UsageError(
                    "Config.multicast_ttl must be 1 on loopback: multicast from 127.0.0.1 "
                    "must not be routed off the machine"
                )
            return group
        allowed = LOOPBACK_BROADCAST if loopback else interface_broadcast(self._ip)
        if allowed is None:
            raise errors.UsageError(f"no interface holds {self._ip}; cannot broadcast from it")
        if group.host and group.host != allowed:
            raise errors.UsageError(
                f"{group} would broadcast off the node's own subnet: a node bound to "
                f"{self._ip} broadcasts only to {allowed} (write broadcast://:{group.port})"
            )
        return GroupAddress(group.scheme, allowed, group.port, group.mailbox)

    def open(self, group: GroupAddress) -> socket.socket | None:
        """Start hearing ``group`` (resolved); returns the new socket, or None if already open."""
        self._configure_main()
        if group.name in self._socks:
            return None
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if hasattr(socket, "SO_REUSEPORT"):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((group.host, group.port))
            if group.scheme == "multicast":
                membership = socket.inet_aton(group.host) + socket.inet_aton(self._ip)
                sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, membership)
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            raise errors.AddressError(f"cannot listen on {group}: {exc.strerror}") from None
        self._socks[group.name] = sock
        return sock

    def _configure_main(self) -> None:
        if self._configured:
            return
        main = self._main
        ttl = self._config.multicast_ttl
        try:
            main.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(self._ip))
            main.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, ttl)
            main.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 1)
            main.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        except OSError as exc:
            raise errors.UsageError(f"cannot enable group sends on this socket: {exc}") from None
        self._configured = True

    def sockets(self) -> list[socket.socket]:
        return list(self._socks.values())

    def close(self) -> None:
        for sock in self._socks.values():
            with contextlib.suppress(OSError):
                sock.close()
        self._socks.clear()
