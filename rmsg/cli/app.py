"""The ``rmsg`` click group: version, verbosity and logging; the commands live beside it."""

from __future__ import annotations

import logging
from collections.abc import Callable

import click

import reliable

from .options import CONTEXT


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


@click.group(context_settings=CONTEXT)
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
