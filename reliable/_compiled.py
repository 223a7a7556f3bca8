"""Which of reliable's modules may run compiled (mypyc), and whether they do.

Theory of operation. ``COMPILED_MODULES`` below is the one list the build
(``tools/rmsg_build.py``) hands to mypyc; everything else in the package is
always interpreted (``errors`` because its classes inherit from built-in
exceptions such as ``TimeoutError``, which mypyc cannot compile; this module
and ``reliable/__init__.py`` so the choice below is made in plain Python;
``handle`` (``MailboxHandle`` and the blocking ``Mailbox``) because
interpreted ``aio.AsyncMailbox`` subclasses the first, owner handles are
weakly referenced, and mypyc cannot compile their methods' closures;
``aio`` so far (issue 20: not yet converted); RPC and storage because their
cost is system calls, not Python). ``mailbox`` compiles because its public
``Selector`` and limits take their arguments as ``Any``/``object`` and check
them inside. The blocking adapter (``node``, ``driver``) compiles the same
way since issue 20: the arguments it checks itself are declared ``Any``
(``driver.Data``, ``Int``, ``Seconds``, ``Dest``) so a wrong-typed one raises
the same ``UsageError`` compiled and pure, not mypyc's ``TypeError``.
A compiled build still ships every ``.py`` source beside its extension
modules, so the same installation can always run pure.

A compiled module is used only when it is exactly the code its source says.
The build records a SHA-256 of each compiled module's source in
``_mypyc_build.json`` next to this file; at import, before any other
submodule loads, :func:`select` checks every compiled module's extension
and source against it. It runs pure -- installing a finder that loads every
module with an extension from its ``.py`` file, all of them or none, because
compiled modules call each other natively -- when:

* ``RMSG_PURE_PYTHON=1`` is set (asked; silent);
* there is no build record, a source no longer matches its hash, an
  extension is missing, or one is there that the build did not make (a
  stale or partial build beside edited sources, or a module since removed
  from the list: with a ``RuntimeWarning`` naming the module).

So an edited source is never shadowed by an old compiled module. Editable
installs never build extensions at all (see docs/performance.md).
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import json
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

__all__ = ["ACTIVE", "BUILD_RECORD", "COMPILED_MODULES", "select"]

#: The modules mypyc compiles (dotted names under ``reliable``): the sans-I/O core.
COMPILED_MODULES: tuple[str, ...] = (
    "reliable.addressing",
    "reliable.anycast",
    "reliable.config",
    "reliable.congestion",
    "reliable.driver",
    "reliable.node_messages",
    "reliable.endpoint",
    "reliable.events",
    "reliable.failover",
    "reliable.fate",
    "reliable.gate",
    "reliable.group_member",
    "reliable.group_sender",
    "reliable.groups",
    "reliable.mailbox",
    "reliable.node",
    "reliable.membership",
    "reliable.message",
    "reliable.peer",
    "reliable.post_office",
    "reliable.pmtud",
    "reliable.receiver",
    "reliable.remote_mailbox",
    "reliable.rtt",
    "reliable.security",
    "reliable.sender",
    "reliable.stats",
    "reliable.timers",
    "reliable.udpio",
    "reliable.wire",
)

#: The build record's file name, in the package directory.
BUILD_RECORD = "_mypyc_build.json"

_PACKAGE_DIR = Path(__file__).resolve().parent


def source_path(module: str, package_dir: Path = _PACKAGE_DIR) -> Path:
    """The ``.py`` file of a dotted module name under ``reliable``."""
    parts = module.split(".")[1:]
    return package_dir.joinpath(*parts).with_suffix(".py")


def source_hash(path: Path) -> str:
    """SHA-256 (hex) of a source file's bytes, as the build records it."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _extensions(package_dir: Path = _PACKAGE_DIR) -> dict[str, Path]:
    """Every extension module in the package that sits beside a ``.py`` source."""
    found: dict[str, Path] = {}
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        for path in package_dir.rglob(f"*{suffix}"):
            source = path.with_name(path.name[: -len(suffix)] + ".py")
            if source.exists():
                parts = source.relative_to(package_dir).with_suffix("").parts
                found.setdefault(".".join(("reliable", *parts)), path)
    return found


def _check_build(extensions: dict[str, Path]) -> tuple[bool, str]:
    """(compiled usable, why not). Reads the build record and hashes the sources."""
    if not extensions:
        return False, ""
    record_path = _PACKAGE_DIR / BUILD_RECORD
    try:
        record = json.loads(record_path.read_text())
        hashes: dict[str, str] = record["sources"]
    except (OSError, ValueError, KeyError, TypeError):
        found = ", ".join(sorted(extensions))
        return False, f"compiled modules ({found}) have no valid {BUILD_RECORD}"
    for module in sorted(extensions):
        if module not in COMPILED_MODULES or module not in hashes:
            return False, f"{module} is compiled but not part of this build (a stale extension)"
    for module in COMPILED_MODULES:
        if module not in extensions:
            return False, f"{module} has no compiled extension (a partial build)"
        if hashes.get(module) != source_hash(source_path(module)):
            return False, f"{module}'s source changed since it was compiled"
    return True, ""


class _SourceFinder:
    """A meta-path finder that loads the compiled modules from their ``.py`` sources."""

    def __init__(self, modules: Sequence[str]) -> None:
        self._modules = frozenset(modules)

    def find_spec(
        self, name: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if name not in self._modules:
            return None
        return importlib.util.spec_from_file_location(name, source_path(name))


def select() -> bool:
    """Decide once, before any compiled module is imported; True if compiled runs."""
    extensions = _extensions()
    if os.environ.get("RMSG_PURE_PYTHON", "") not in ("", "0"):
        usable, why = False, ""
    else:
        usable, why = _check_build(extensions)
        if why:
            warnings.warn(
                f"rmsg: running the pure-Python core: {why}; rebuild (pip install .) "
                "or set RMSG_PURE_PYTHON=1",
                RuntimeWarning,
                stacklevel=2,
            )
    if not usable and extensions:
        sys.meta_path.insert(0, _SourceFinder([*COMPILED_MODULES, *extensions]))
    return usable


#: Decided when ``reliable`` is imported (this module is its first import).
ACTIVE: bool = select()
