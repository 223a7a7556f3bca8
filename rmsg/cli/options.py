"""Shared option types and decorators of the ``rmsg`` commands, and the node they describe."""

from __future__ import annotations

import pathlib
import re
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import click

import reliable
from reliable import Node, UsageError
from reliable.addressing import parse_address
from reliable.driver import open_socket

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def fail(message: str) -> click.ClickException:
    return click.ClickException(message)


def wildcard_for(dest: str) -> str:
    """Bind address matching the destination's family (IPv6 destinations need an IPv6 socket)."""
    try:
        host, _ = parse_address(dest)
    except UsageError:
        return "0.0.0.0:0"
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_DGRAM)
    except (socket.gaierror, UnicodeError):
        return "0.0.0.0:0"
    return "[::]:0" if infos and infos[0][0] == socket.AF_INET6 else "0.0.0.0:0"


def _probability(text: str) -> float:
    """``20%`` or ``0.2`` -> 0.2."""
    text = text.strip()
    value = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    if not 0 <= value <= 1:
        raise ValueError
    return value


if TYPE_CHECKING:
    _FloatParam = click.ParamType[float]
else:  # click < 8.2 has no generic ParamType at run time
    _FloatParam = click.ParamType


class Probability(_FloatParam):
    name = "PROBABILITY"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> float:
        if isinstance(value, float):
            return value
        try:
            return _probability(str(value))
        except ValueError:
            self.fail(f"{value!r} is not a probability: write 20% or 0.2", param, ctx)


class Duration(_FloatParam):
    """``5``, ``5s``, ``250ms``, ``10us`` -> seconds."""

    name = "DURATION"
    _UNITS: ClassVar[dict[str, float]] = {"": 1.0, "s": 1.0, "ms": 1e-3, "us": 1e-6}

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> float:
        if isinstance(value, float):
            return value
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(s|ms|us)?\s*", str(value))
        if not match:
            self.fail(f"{value!r} is not a duration: write 5s, 250ms or 0.25", param, ctx)
        return float(match.group(1)) * self._UNITS[match.group(2) or ""]


PROBABILITY = Probability()
DURATION = Duration()

F = TypeVar("F", bound=Callable[..., Any])


def security_options(command: F) -> F:
    """--security and --keyfile; the key itself never goes on the command line."""
    command = click.option(
        "--keyfile",
        type=click.Path(dir_okay=False),
        default=None,
        help="Pre-shared key file (write one with 'rmsg keygen'); default: $RMSG_KEY (hex).",
    )(command)
    return click.option(
        "--security",
        type=click.Choice(reliable.security.MODES),
        default="integrity",
        show_default=True,
        envvar="RMSG_SECURITY",
        help="CRC only, a MAC on every datagram, or encryption (needs rmsg[crypto]). "
        "Both ends must agree. Also $RMSG_SECURITY.",
    )(command)


def make_security(mode: str, keyfile: str | None) -> reliable.security.Security:
    try:
        return reliable.security.make_security(mode, keyfile=keyfile)
    except UsageError as exc:
        raise click.BadParameter(str(exc), param_hint="--security/--keyfile") from None


LOOPBACK_GROUP_NOTE = (
    "note: the group socket is on loopback, so only members on this host can hear it "
    "(and exit status 0 means every member that announced itself here has the message); "
    "--bind this host's address on the network's interface to reach other hosts"
)


def on_loopback(bind: str) -> bool:
    """Whether ``bind`` (HOST:PORT) is a loopback address."""
    import ipaddress

    try:
        host, _ = parse_address(bind, allow_zero_port=True)
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except (UsageError, ValueError):
        return False


def open_node(bind: str, security: str, keyfile: str | None, impair: str | None) -> Node:
    """A node on ``bind``; with ``impair``, its outgoing datagrams go through netem."""
    sec = make_security(security, keyfile)
    if impair is None:
        return Node(bind, security=sec)
    from netem.socket import FaultySocket
    from netem.spec import SpecError, parse_spec

    try:
        impairment = parse_spec(impair)
    except SpecError as exc:
        raise click.BadParameter(str(exc), param_hint="--netem") from None
    # open_socket raises AddressError (a UsageError) naming what failed, as Node(bind) would
    return Node(sock=FaultySocket(open_socket(bind), impairment, seed=None), security=sec)


def require_plotting(path: str, option: str) -> None:
    """Fail at once, before any work, if a plot could not be drawn or saved."""
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        raise fail(f"{option} needs matplotlib: pip install 'rmsg[plot]'")
    folder = pathlib.Path(path).resolve().parent
    if not folder.is_dir():
        raise click.BadParameter(f"folder {folder} does not exist", param_hint=option)
