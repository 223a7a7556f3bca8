"""Parsing, resolving and normalising node addresses.

Addresses in the API and CLI are strings: ``host:port`` (IPv4 or a hostname)
or ``[v6addr]:port``. They are resolved once, when given, with a clear error
if they do not resolve. Internally a peer is the socket address tuple the
kernel reports as the datagram's source, normalised so that an address we
send to and the address replies come from compare equal (IPv6 4-tuples with
no flow label or scope become ``(host, port)``).
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from typing import Any

from .errors import AddressError, format_address

__all__ = [
    "Address",
    "CoreAddress",
    "GroupAddress",
    "ServiceAddress",
    "format_address",
    "is_group_url",
    "normalize",
    "parse_address",
    "parse_group",
    "parse_service",
    "resolve_address",
]

#: A node's socket address, as the OS gives it and receipts, messages and events
#: carry it: ``(host, port)`` for IPv4, ``(host, port, flowinfo, scope_id)`` for
#: IPv6. Index it (``addr[0]``, ``addr[1]``) or format it with
#: :func:`format_address` (``host:port``, ``[v6]:port``).
Address = tuple[str, int] | tuple[str, int, int, int]
#: An address as the sans-I/O core carries it in messages, receipts and events: whatever
#: the adapter handed it, never looked into. A socket :data:`Address` under Node and
#: AsyncNode; any hashable under the simulator (``netem.SimNetwork`` names hosts as it
#: likes). Typed ``Any`` so both hold, compiled (mypyc checks declared types) or not.
CoreAddress = Any


def parse_address(text: str | tuple[str, int], *, allow_zero_port: bool = False) -> tuple[str, int]:
    """Split ``host:port`` / ``[v6]:port`` into ``(host, port)``; no DNS lookup."""
    if isinstance(text, tuple):
        if len(text) < 2 or not isinstance(text[0], str) or not isinstance(text[1], int):
            raise AddressError(f"expected a (host, port) tuple, got {text!r}")
        host, port = text[0], text[1]
    else:
        if not isinstance(text, str) or not text.strip():
            raise AddressError(f"expected an address like 127.0.0.1:7000, got {text!r}")
        text = text.strip()
        if text.startswith("["):
            end = text.find("]")
            if end < 0 or not text[end + 1 :].startswith(":"):
                raise AddressError(f"bad IPv6 address {text!r}: write it as [::1]:7000")
            host, port_text = text[1:end], text[end + 2 :]
        else:
            host, sep, port_text = text.rpartition(":")
            if not sep:
                raise AddressError(f"address {text!r} has no port: write it as HOST:PORT")
            if ":" in host:
                raise AddressError(f"IPv6 address {text!r} needs brackets: [{host}]:{port_text}")
        try:
            port = int(port_text)
        except ValueError:
            raise AddressError(f"port {port_text!r} in {text!r} is not a number") from None
    if not host:
        raise AddressError(f"address {text!r} has no host: write it as HOST:PORT")
    low = 0 if allow_zero_port else 1
    if not low <= port <= 65535:
        raise AddressError(f"port {port} in {text!r} must be between {low} and 65535")
    return host, port


def resolve_address(
    text: str | tuple[str, int],
    *,
    family: int = socket.AF_UNSPEC,
    allow_zero_port: bool = False,
) -> tuple[int, Address]:
    """Parse and resolve ``text`` once; returns ``(address family, socket address)``."""
    host, port = parse_address(text, allow_zero_port=allow_zero_port)
    if family in (socket.AF_UNSPEC, socket.AF_INET) and _is_ipv4_literal(host):
        return socket.AF_INET, (host, port)  # no lookup: this runs on every send
    try:
        infos = socket.getaddrinfo(host, port, family, socket.SOCK_DGRAM)
    except socket.gaierror as exc:
        raise AddressError(f"cannot resolve {host!r}: {exc.strerror}") from None
    except UnicodeError:
        raise AddressError(f"cannot resolve {host!r}: not a valid hostname") from None
    if not infos:  # pragma: no cover - getaddrinfo raises instead
        raise AddressError(f"cannot resolve {host!r}")
    fam, _, _, _, sockaddr = infos[0]
    return int(fam), normalize(sockaddr)


def _is_ipv4_literal(host: str) -> bool:
    try:
        socket.inet_pton(socket.AF_INET, host)
    except OSError:
        return False
    return True


@dataclass(frozen=True, slots=True)
class GroupAddress:
    """A multicast group or broadcast address and port, plus the mailbox members deliver to.

    Spelled ``multicast://239.1.2.3:7000/inbox`` or ``broadcast://:7000/inbox``
    (no host: the broadcast address of the node's own subnet, 127.255.255.255
    on loopback) or ``broadcast://198.18.0.255:7000``.
    """

    scheme: str  #: "multicast" or "broadcast"
    host: str  #: the group or broadcast IPv4 address; "" until a broadcast is resolved
    port: int
    mailbox: str = ""

    @property
    def name(self) -> str:
        """The group's name on the wire: its socket address."""
        return f"{self.host}:{self.port}"

    @property
    def sockaddr(self) -> tuple[str, int]:
        return (self.host, self.port)

    @property
    def url(self) -> str:
        """The group without its mailbox, as receipts and events name it."""
        return f"{self.scheme}://{self.host}:{self.port}"

    def __str__(self) -> str:
        return self.url + (f"/{self.mailbox}" if self.mailbox else "")


@dataclass(frozen=True, slots=True)
class ServiceAddress:
    """An anycast service: ``anycast://printer`` or ``anycast://printer/jobs``."""

    service: str
    mailbox: str = ""

    def __str__(self) -> str:
        return f"anycast://{self.service}" + (f"/{self.mailbox}" if self.mailbox else "")


_SCHEMES = ("multicast://", "broadcast://", "anycast://")


def is_group_url(text: object) -> bool:
    """Whether ``text`` is spelled as a group or anycast destination."""
    return isinstance(text, str) and text.startswith(_SCHEMES)


def parse_group(text: str) -> GroupAddress:
    """Parse ``multicast://GROUP:PORT[/MAILBOX]`` or ``broadcast://[ADDR]:PORT[/MAILBOX]``."""
    scheme, sep, rest = text.partition("://")
    if not sep or scheme not in ("multicast", "broadcast"):
        raise AddressError(
            f"{text!r} is not a group address: write multicast://239.1.2.3:7000/inbox "
            "or broadcast://:7000/inbox"
        )
    where, _, mailbox = rest.partition("/")
    host, colon, port_text = where.rpartition(":")
    if not colon or not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise AddressError(f"{text!r} needs a port between 1 and 65535, e.g. {scheme}://:7000")
    port = int(port_text)
    if scheme == "multicast":
        try:
            ip = ipaddress.IPv4Address(host)
        except ValueError:
            raise AddressError(
                f"multicast group {host!r} in {text!r} must be an IPv4 address "
                "(IPv6 groups are not supported yet)"
            ) from None
        if not ip.is_multicast:
            raise AddressError(
                f"{host} is not a multicast address: use one in 224.0.0.0/4, "
                "e.g. 239.1.2.3 (the organisation-local range)"
            )
    elif host:
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            raise AddressError(
                f"broadcast address {host!r} in {text!r} must be IPv4, or empty for the "
                "node's own subnet: broadcast://:7000"
            ) from None
    return GroupAddress(scheme, host, port, mailbox)


def parse_service(text: str) -> ServiceAddress:
    """Parse ``anycast://SERVICE[/MAILBOX]``."""
    if not text.startswith("anycast://"):
        raise AddressError(f"{text!r} is not an anycast address: write anycast://printer")
    service, _, mailbox = text[len("anycast://") :].partition("/")
    check_service_name(service)
    return ServiceAddress(service, mailbox)


def check_service_name(service: str) -> None:
    if not service or len(service.encode("utf-8")) > 255 or "/" in service:
        raise AddressError(
            f"service name {service!r} must be 1-255 bytes of UTF-8 without '/', "
            "e.g. anycast://printer"
        )


def normalize(sockaddr: Any) -> Address:
    """Canonical peer key for a socket address."""
    if isinstance(sockaddr, tuple) and len(sockaddr) == 4 and not sockaddr[2] and not sockaddr[3]:
        return (sockaddr[0], sockaddr[1])
    return tuple(sockaddr)
