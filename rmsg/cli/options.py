"""Shared option types and decorators of the ``rmsg`` commands, and the node they describe.

Values are parsed here once, with the library's own parsers: durations and
probabilities (:class:`Duration`, :class:`Probability`), a destination
(:class:`DestinationType`: a node and mailbox, a multicast or broadcast
group, an anycast service, by :mod:`reliable.addressing` and
:func:`reliable.driver.split_destination`), a tc-netem spec
(:data:`NETEM_SPEC`), the security mode and key (:func:`security_options`).
An address error is the library's own :class:`reliable.UsageError`, worded as
it is everywhere else.
"""

from __future__ import annotations

import functools
import pathlib
import re
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar, overload

import click

import reliable
from netem.models import Impairment
from reliable import Node, UsageError
from reliable.addressing import (
    GroupAddress,
    ServiceAddress,
    is_group_url,
    parse_address,
    parse_group,
    parse_service,
)
from reliable.driver import open_socket, split_destination


def fail(message: str) -> click.ClickException:
    """A failure to report in one line, exit status 1 (the CLI's ``Error: ...``)."""
    return click.ClickException(message)


def _probability(text: str) -> float:
    """``20%`` or ``0.2`` -> 0.2."""
    text = text.strip()
    value = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    if not 0 <= value <= 1:
        raise ValueError
    return value


if TYPE_CHECKING:
    _FloatParam = click.ParamType[float]
    _ImpairmentParam = click.ParamType[Impairment]
    _DestinationParam = click.ParamType["Destination"]
else:  # click < 8.2 has no generic ParamType at run time
    _FloatParam = _ImpairmentParam = _DestinationParam = click.ParamType


class Probability(_FloatParam):
    """``20%`` or ``0.2``: a share of datagrams, for the demo's link."""

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
    """``5``, ``5s``, ``250ms``, ``10us`` -> seconds.

    ``positive=True`` refuses 0, naming the option (a timeout of nothing would
    fail every send before it starts).
    """

    name = "DURATION"
    _UNITS: ClassVar[dict[str, float]] = {"": 1.0, "s": 1.0, "ms": 1e-3, "us": 1e-6}

    def __init__(self, *, positive: bool = False) -> None:
        self.positive = positive

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> float:
        if isinstance(value, float):
            seconds = value
        else:
            match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(s|ms|us)?\s*", str(value))
            if not match:
                self.fail(f"{value!r} is not a duration: write 5s, 250ms or 0.25", param, ctx)
            seconds = float(match.group(1)) * self._UNITS[match.group(2) or ""]
        if self.positive and seconds <= 0:
            hint = param.opts[0] if param is not None and param.opts else None
            raise click.BadParameter("must be more than 0", ctx=ctx, param=param, param_hint=hint)
        return seconds


PROBABILITY = Probability()
DURATION = Duration()
#: A duration that must be more than 0 (timeouts, measuring windows).
POSITIVE_DURATION = Duration(positive=True)


class NetemSpec(_ImpairmentParam):
    """A tc-netem spec (``'loss 10%'``) for ``--netem``: the impairment it describes."""

    name = "SPEC"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> Impairment:
        if isinstance(value, Impairment):
            return value
        from netem.spec import SpecError, parse_spec

        try:
            return parse_spec(str(value))
        except SpecError as exc:
            raise click.BadParameter(str(exc), ctx=ctx, param=param, param_hint="--netem") from None


NETEM_SPEC = NetemSpec()


@dataclass(frozen=True, slots=True)
class Destination:
    """Where ``rmsg send`` sends: exactly one of ``node``, ``group`` and ``service`` is set.

    ``text`` is the destination as written, what the library is handed.
    """

    text: str
    node: str | None = None  #: HOST:PORT of one node (its mailbox named after the /)
    group: GroupAddress | None = None  #: a multicast:// or broadcast:// group
    service: ServiceAddress | None = None  #: an anycast:// service

    def __str__(self) -> str:
        return self.text


class DestinationType(_DestinationParam):
    """``HOST:PORT[/MAILBOX]``, ``multicast://...``, ``broadcast://...`` or ``anycast://...``.

    A group or service that does not parse is a usage error at once, in the
    library's words; a node address is checked (and resolved) when it is used.
    """

    name = "DEST"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> Destination:
        if isinstance(value, Destination):
            return value
        text = str(value)
        try:
            if text.startswith("anycast://"):
                return Destination(text, service=parse_service(text))
            if is_group_url(text):
                return Destination(text, group=parse_group(text))
            node, _ = split_destination(text, None)
        except UsageError as exc:
            raise click.UsageError(str(exc), ctx=ctx) from None
        return Destination(text, node=str(node))


DESTINATION = DestinationType()


def wildcard_for(dest: str) -> str:
    """Bind address matching the destination's family (IPv6 destinations need an IPv6 socket).

    ``dest`` is ``HOST:PORT``, with or without ``/MAILBOX``.
    """
    try:
        node, _ = split_destination(dest, None)
        host, _ = parse_address(node)
    except UsageError:
        return "0.0.0.0:0"
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_DGRAM)
    except (socket.gaierror, UnicodeError):
        return "0.0.0.0:0"
    return "[::]:0" if infos and infos[0][0] == socket.AF_INET6 else "0.0.0.0:0"


F = TypeVar("F", bound=Callable[..., Any])

_SECURITY_HELP = (
    "CRC only, a MAC on every datagram, or encryption (needs rmsg[crypto]). "
    "Both ends must agree. Also $RMSG_SECURITY."
)
_KEYFILE_HELP = "Pre-shared key file (write one with 'rmsg keygen'); default: $RMSG_KEY (hex)."


@overload
def security_options(command: F) -> F: ...
@overload
def security_options(*, security_help: str = ..., keyfile_help: str = ...) -> Callable[[F], F]: ...
def security_options(
    command: F | None = None,
    *,
    security_help: str = _SECURITY_HELP,
    keyfile_help: str = _KEYFILE_HELP,
) -> F | Callable[[F], F]:
    """--security and --keyfile; the key itself never goes on the command line.

    The command receives one ``security`` argument: the
    :class:`reliable.security.Security` the two describe, made before the
    command runs (a bad key file is an error about these options).
    """

    def decorate(command: F) -> F:
        @functools.wraps(command)
        def with_security(*args: Any, security: str, keyfile: str | None, **kwargs: Any) -> Any:
            return command(*args, security=make_security(security, keyfile), **kwargs)

        decorated = click.option(
            "--keyfile", type=click.Path(dir_okay=False), default=None, help=keyfile_help
        )(with_security)
        return click.option(  # type: ignore[return-value]
            "--security",
            type=click.Choice(reliable.security.MODES),
            default="integrity",
            show_default=True,
            envvar="RMSG_SECURITY",
            help=security_help,
        )(decorated)

    return decorate if command is None else decorate(command)


def make_security(mode: str, keyfile: str | None) -> reliable.security.Security:
    """The security mode and key the options name; a bad one is an error about them."""
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


def open_node(
    bind: str, security: reliable.security.Security, impair: Impairment | None = None
) -> Node:
    """A node on ``bind``; with ``impair``, its outgoing datagrams go through netem."""
    if impair is None:
        return Node(bind, security=security)
    from netem.socket import FaultySocket

    # open_socket raises AddressError (a UsageError) naming what failed, as Node(bind) would
    return Node(sock=FaultySocket(open_socket(bind), impair, seed=None), security=security)


def require_plotting(path: str, option: str) -> None:
    """Fail at once, before any work, if a plot could not be drawn or saved."""
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        raise fail(f"{option} needs matplotlib: pip install 'rmsg[plot]'")
    folder = pathlib.Path(path).resolve().parent
    if not folder.is_dir():
        raise click.BadParameter(f"folder {folder} does not exist", param_hint=option)
