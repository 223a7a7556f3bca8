"""The ``rmsg`` command line: thin wrappers that build a config, call the library and
turn its errors into one-line messages and exit codes.

The package's modules, one a job: ``app`` (the click group, and the one place
library errors become CLI errors), ``options`` (shared option types and
decorators, parsed with the library's own parsers), ``render`` (every receipt,
table and JSON record printed), and one module a family of commands, each
command thin (parse, call the library, render): ``messaging`` (send, recv),
``impair`` (netem), ``manage`` (stats, ctl), ``rpc`` (call, serve-demo),
``bench``, ``tools`` (keygen, demo, dissect, wireshark). ``main`` is the entry
point (``rmsg`` and ``python -m rmsg``).
"""

from __future__ import annotations

from .app import main
from .bench import bench
from .impair import netem
from .manage import ctl, stats
from .messaging import recv, send
from .rpc import call, serve_demo
from .tools import demo, dissect, keygen, wireshark

__all__ = ["main"]

for _command in (
    send,
    recv,
    stats,
    ctl,
    call,
    serve_demo,
    netem,
    bench,
    keygen,
    demo,
    dissect,
    wireshark,
):
    main.add_command(_command)
