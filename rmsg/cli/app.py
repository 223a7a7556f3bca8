"""The ``rmsg`` click group, and the one place library errors become CLI errors.

Every command is made with :func:`command` (or :func:`group`), so it is a
:class:`Command` whose invocation runs inside :func:`library_errors`: a
command body calls the library and lets its errors rise. A
:class:`reliable.UsageError` (a bad address, name or combination: something
the user should change) becomes a click usage error, exit 2, with the
command's usage line, and so does a netem spec or scenario that does not
parse; any other :class:`reliable.ReliableError` (unreachable, refused, timed
out) becomes a one-line failure, exit 1. A command that means something more
particular (``--bind`` is what was wrong; a file transfer that can be
resumed) says so itself, before this catches it.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import Any

import click

import reliable
from netem.scenario import ScenarioError
from netem.spec import SpecError
from reliable import ReliableError, UsageError

__all__ = ["CONTEXT", "Command", "Group", "command", "group", "library_errors", "main"]

#: Every command's context: -h as well as --help, help text up to 100 columns.
CONTEXT: dict[str, Any] = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


@contextlib.contextmanager
def library_errors(ctx: click.Context) -> Iterator[None]:
    """Turn the library's errors into click's: misuse exits 2 with usage, failure exits 1.

    A netem spec or scenario that does not parse is misuse too.
    """
    try:
        yield
    except (UsageError, SpecError, ScenarioError) as exc:
        raise click.UsageError(str(exc), ctx=ctx) from None
    except ReliableError as exc:
        raise click.ClickException(str(exc)) from None


class Command(click.Command):
    """A command whose library errors are translated once, by :func:`library_errors`."""

    def invoke(self, ctx: click.Context) -> Any:
        with library_errors(ctx):
            return super().invoke(ctx)


class Group(click.Group):
    """A group of :class:`Command` (and of groups like itself), translated the same way."""

    command_class = Command
    group_class = type  # click: subgroups are of this same class

    def invoke(self, ctx: click.Context) -> Any:
        with library_errors(ctx):
            return super().invoke(ctx)


def command(name: str | None = None, **attrs: Any) -> Callable[[Callable[..., Any]], Command]:
    """``click.command`` making a :class:`Command` with the shared context settings."""
    attrs.setdefault("context_settings", CONTEXT)
    return click.command(name, cls=Command, **attrs)


def group(name: str | None = None, **attrs: Any) -> Callable[[Callable[..., Any]], Group]:
    """``click.group`` making a :class:`Group` with the shared context settings."""
    attrs.setdefault("context_settings", CONTEXT)
    return click.group(name, cls=Group, **attrs)


class _StderrHandler(logging.Handler):
    """Log lines to whatever stderr is when they are written (click's, in tests)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            click.echo(self.format(record), err=True)
        except Exception:  # a logging handler never raises into the library
            self.handleError(record)


_LOGGERS = ("reliable", "netem")


def _configure_logging(verbose: int) -> Callable[[], None]:
    """-v: INFO from the library and netem (sessions, refusals, evictions); -vv: DEBUG too.

    Returns what undoes it, so a command run in-process leaves no handler behind.
    """
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("rmsg: %(levelname)s %(name)s: %(message)s"))
    level = logging.INFO if verbose == 1 else logging.DEBUG
    saved = []
    for name in _LOGGERS:
        logger = logging.getLogger(name)
        saved.append((logger, logger.level))
        logger.setLevel(level)
        logger.addHandler(handler)

    def undo() -> None:
        for logger, old in saved:
            logger.removeHandler(handler)
            logger.setLevel(old)

    return undo


@group()
@click.version_option(
    reliable.__version__,
    prog_name="rmsg",
    message="%(prog)s, version %(version)s"
    + (" (compiled core)" if reliable.__compiled__ else " (pure core)"),
)
@click.option(
    "-v",
    "--verbose",
    count=True,
    help="Log to stderr what the library does: -v sessions established, dropped and "
    "restarted, unreachable peers, refusals, evictions; -vv also debug detail.",
)
@click.pass_context
def main(ctx: click.Context, verbose: int) -> None:
    """Reliable message passing over UDP.

    Messages arrive exactly once, intact and in order, or the sender is told
    they did not — over a network that drops, corrupts, duplicates and
    reorders datagrams.

    \b
    Try it:
      rmsg demo                                  # lossy loopback link, live counts
      rmsg recv --bind 127.0.0.1:7000            # terminal 1
      rmsg send 127.0.0.1:7000 "hello"           # terminal 2
      rmsg stats 127.0.0.1:7000                  # its mailboxes and peers
      rmsg -v recv --bind 127.0.0.1:7000         # and log sessions and refusals
    """
    if verbose:
        ctx.call_on_close(_configure_logging(verbose))
