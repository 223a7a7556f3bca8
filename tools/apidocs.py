"""Build the API reference (HTML) from the docstrings, with pdoc, and fail on a broken one.

    pip install -e '.[test]'                 # pdoc is in the test extra
    python tools/apidocs.py                  # writes build/api/index.html
    python tools/apidocs.py OUTDIR [MODULE ...]

The reference covers what a user imports: ``reliable`` (its ``__all__``: the
nodes, the sans-I/O ``Endpoint``, ``Config``, errors, events, addressing and
the ``errors``/``events``/``security``/``wire`` modules) and ``netem`` with its
carriers (``netem.proxy``, ``netem.socket``, ``netem.aio``), the pytest plugin,
the control endpoint and the pcap writers. Docstrings are reStructuredText.

A docstring is broken, and the build exits 1 naming it, when:

* pdoc warns while reading or rendering it (an export that does not resolve,
  an annotation that cannot be evaluated, ...);
* a cross-reference in it (``:class:`X```, ``:func:``, ``:meth:``, ``:mod:``,
  ``:attr:``, ``:exc:``, ``:data:``, ``:obj:``) names nothing: not an
  importable dotted path, nor a name in the documented object's class or module;
* a public module, class, function or method has none.

The test suite runs this (tests/test_api_docs.py), so CI fails on a broken docstring.
"""

from __future__ import annotations

import argparse
import builtins
import importlib
import re
import sys
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any

MODULES = [
    "reliable",
    "netem",
    "netem.proxy",
    "netem.socket",
    "netem.aio",
    "netem.pytest_plugin",
    "netem.control",
    "netem.pcap",
]
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "build" / "api"

_ROLE = re.compile(r":(class|func|meth|mod|attr|exc|data|obj):`~?([^`<]+?)`")


def _dotted(path: str) -> bool:
    """Whether ``path`` is an importable module followed by attributes."""
    parts = path.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj: Any = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for part in parts[cut:]:
            if not hasattr(obj, part):
                return False
            obj = getattr(obj, part)
        return True
    return False


def _resolves(target: str, module: ModuleType, cls: type | None) -> bool:
    target = target.strip().lstrip(".").removesuffix("()")
    if _dotted(target):
        return True
    head, *rest = target.split(".")
    for scope in (cls, module):
        if scope is None or not hasattr(scope, head):
            continue
        obj = getattr(scope, head)
        for part in rest:
            if not hasattr(obj, part):
                break
            obj = getattr(obj, part)
        else:
            return True
    return hasattr(builtins, head)


def check(modules: list[str]) -> list[str]:
    """Every broken docstring in ``modules`` (their pdoc view), as one line each."""
    import pdoc.doc

    problems: list[str] = []

    def home_of(d: pdoc.doc.Doc[Any], cls: type | None) -> ModuleType:
        owner = getattr(d.obj, "__module__", None) if not isinstance(d, pdoc.doc.Variable) else None
        if cls is not None and owner is None:
            owner = cls.__module__
        try:
            return importlib.import_module(owner or d.modulename)
        except ImportError:
            return importlib.import_module(d.modulename)

    def walk(d: pdoc.doc.Doc[Any], cls: type | None = None) -> None:
        # Modules, classes, functions and methods need a docstring.
        needs_one = isinstance(d, (pdoc.doc.Module, pdoc.doc.Class, pdoc.doc.Function))
        if needs_one and not d.name.startswith("_") and not d.docstring.strip():
            problems.append(f"{d.fullname}: no docstring")
        here = d.obj if isinstance(d, pdoc.doc.Class) else cls
        home = d.obj if isinstance(d, pdoc.doc.Module) else home_of(d, cls)
        for match in _ROLE.finditer(d.docstring or ""):
            if not _resolves(match.group(2), home, here):
                problems.append(f"{d.fullname}: {match.group(0)} names nothing")
        if isinstance(d, pdoc.doc.Module):
            for member in d.members.values():
                walk(member)
        elif isinstance(d, pdoc.doc.Class):
            for member in d.own_members:
                walk(member, d.obj)

    for name in modules:
        module = importlib.import_module(name)
        for export in getattr(module, "__all__", ()):
            getattr(module, export, None)  # lazy exports (reliable.AsyncNode) become attributes
        walk(pdoc.doc.Module(module))
    return problems


def build(out: Path, modules: list[str] | None = None) -> list[str]:
    """Render the reference into ``out``; returns the problems found (empty: all good)."""
    import pdoc
    import pdoc.render

    modules = modules or MODULES
    pdoc.render.configure(docformat="restructuredtext", search=True, show_source=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        problems = check(modules)
        pdoc.pdoc(*modules, output_directory=out)
    problems += sorted({f"pdoc: {w.message}" for w in caught})
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", type=Path, default=DEFAULT_OUT, help="output folder")
    parser.add_argument("modules", nargs="*", help=f"modules to document [{' '.join(MODULES)}]")
    args = parser.parse_args(argv)
    try:
        import pdoc  # noqa: F401
    except ImportError:
        print("apidocs: pdoc is not installed: pip install -e '.[test]'", file=sys.stderr)
        return 2
    problems = build(args.out, args.modules or None)
    for line in problems:
        print(f"apidocs: {line}", file=sys.stderr)
    if problems:
        print(f"apidocs: {len(problems)} broken docstring(s)", file=sys.stderr)
        return 1
    print(f"API reference written to {args.out / 'index.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
