"""The ``rmsg`` command line: thin wrappers that build a config, call the library and
turn its errors into one-line messages and exit codes.

The package's modules, one a job: ``app`` (the click group, logging), ``options``
(shared option types and decorators), one module a family of commands
(``messaging``: send and recv; ``impair``: netem; ``manage``: stats and ctl;
``rpc``: call and serve-demo; ``bench``; ``tools``: keygen, demo, dissect and
wireshark). ``main`` is the entry point (``rmsg`` and ``python -m rmsg``).
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
