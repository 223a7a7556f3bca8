"""Parsing, resolving and normalising node addresses.

Addresses in the API and CLI are strings: ``host:port`` (IPv4 or a hostname)
or ``[v6addr]:port``. They are resolved once, when given, with a clear error
if they do not resolve. Internally a peer is the socket address tuple the
kernel reports as the datagram's source, normalised so that an address we
send to and the address replies come from compare equal (IPv6 4-tuples with
no flow label or scope become ``(host, port)``).
"""

from __future__ import annotations

import socket
from typing import Any

from .errors import AddressError, format_address

__all__ = ["format_address", "normalize", "parse_address", "resolve_address"]

Address = tuple[Any, ...]


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


def normalize(sockaddr: Any) -> Address:
    """Canonical peer key for a socket address."""
    if isinstance(sockaddr, tuple) and len(sockaddr) == 4 and not sockaddr[2] and not sockaddr[3]:
        return (sockaddr[0], sockaddr[1])
    return tuple(sockaddr)
