"""rmsg's build backend: setuptools, plus an optional mypyc-compiled core.

Theory of operation. pyproject.toml names this module as an in-tree PEP 517
backend (``backend-path = ["tools"]``); it is setuptools' own backend with
three decisions added, all made from the environment at build time:

* ``RMSG_COMPILE=1`` on a regular install or wheel (``RMSG_COMPILE=1 pip
  install .``, ``RMSG_COMPILE=1 python -m build``): mypy (which carries mypyc)
  joins the build requirements, and ``setup.py`` hands the modules listed in
  ``reliable/_compiled.py`` to mypyc. A missing C compiler is an error then,
  not a silent fallback: the builder asked for it.
* Without it, or with ``RMSG_PURE_PYTHON=1``: pure Python, exactly the
  files in the source tree, no compiler needed (the default).
* An editable install (``pip install -e .``) is always pure, whatever is
  set: compiled modules beside the sources would run in place of edits made
  after the build. The runtime check in ``reliable/_compiled.py`` guards the
  other ways an extension can land beside a source (``build_ext --inplace``).

A compiled build writes ``reliable/_mypyc_build.json`` into the built
package: the SHA-256 of each compiled module's source, which ``reliable``
compares at import before using the extensions.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from setuptools import build_meta as _setuptools
from setuptools.build_meta import (  # noqa: F401  (re-exported PEP 517 hooks)
    build_sdist,
    get_requires_for_build_sdist,
)

ROOT = Path(__file__).resolve().parent.parent
MYPY_REQUIREMENT = "mypy>=1.10"
_EDITABLE = "_RMSG_BUILD_EDITABLE"  # set while an editable wheel is being built
# Set while setuptools runs setup.py only to learn requirements or metadata: mypyc may not
# be installed yet, and compiling there would only be thrown away.
_NO_EXTENSIONS = "_RMSG_BUILD_NO_EXTENSIONS"


def compile_requested() -> bool:
    """True when this build should compile the core with mypyc."""
    if os.environ.get(_EDITABLE) == "1":
        return False
    if os.environ.get("RMSG_PURE_PYTHON", "") not in ("", "0"):
        return False
    return os.environ.get("RMSG_COMPILE", "") not in ("", "0")


def compiled_modules(root: Path = ROOT) -> tuple[str, ...]:
    """``COMPILED_MODULES`` from reliable/_compiled.py, read without importing reliable."""
    tree = ast.parse((root / "reliable" / "_compiled.py").read_text())
    for node in tree.body:
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and node.target.id == "COMPILED_MODULES"
            and node.value is not None
        ):
            value = ast.literal_eval(node.value)
            return tuple(str(m) for m in value)
    raise RuntimeError("reliable/_compiled.py defines no COMPILED_MODULES")


def module_source(module: str) -> str:
    """A dotted module name's source path, relative to the project root."""
    return "/".join(module.split(".")) + ".py"


def build_record(root: Path = ROOT) -> dict[str, Any]:
    """What the compiled build writes to reliable/_mypyc_build.json."""
    sources = {
        m: hashlib.sha256((root / module_source(m)).read_bytes()).hexdigest()
        for m in compiled_modules(root)
    }
    return {"compiler": "mypyc", "sources": sources}


def setup_arguments() -> dict[str, Any]:
    """Extra ``setup()`` arguments: extensions and the record when compiling, else none."""
    if not compile_requested() or os.environ.get(_NO_EXTENSIONS) == "1":
        return {}
    from mypyc.build import mypycify
    from setuptools.command.build_py import build_py

    class build_py_with_record(build_py):
        def run(self) -> None:
            super().run()
            target = Path(self.build_lib) / "reliable" / "_mypyc_build.json"
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(json.dumps(build_record(), indent=1, sort_keys=True) + "\n")

    os.chdir(ROOT)  # mypycify takes paths relative to the project
    modules = [module_source(m) for m in compiled_modules()]
    print(f"rmsg: compiling {len(modules)} modules with mypyc", file=sys.stderr)
    # The optional cryptography package (encrypted mode) is imported lazily and need not be
    # in the build environment; mypyc treats it as untyped, as the interpreter would.
    options = ["--ignore-missing-imports"]
    return {
        "ext_modules": mypycify([*options, *modules], opt_level="3", debug_level="0"),
        "cmdclass": {"build_py": build_py_with_record},
    }


def _without_extensions(hook: Any, *args: Any) -> Any:
    os.environ[_NO_EXTENSIONS] = "1"
    try:
        return hook(*args)
    finally:
        del os.environ[_NO_EXTENSIONS]


def get_requires_for_build_wheel(config_settings: Any = None) -> list[str]:
    extra = [MYPY_REQUIREMENT] if compile_requested() else []
    found = _without_extensions(_setuptools.get_requires_for_build_wheel, config_settings)
    return [*found, *extra]


def prepare_metadata_for_build_wheel(metadata_directory: str, config_settings: Any = None) -> str:
    prepare = _setuptools.prepare_metadata_for_build_wheel
    return str(_without_extensions(prepare, metadata_directory, config_settings))


def build_wheel(
    wheel_directory: str, config_settings: Any = None, metadata_directory: str | None = None
) -> str:
    # setuptools packs whatever its build/lib holds: a pure wheel must not inherit the
    # extensions of an earlier compiled build (nor a compiled one a stale record).
    for scratch in (*ROOT.glob("build/lib*"), *ROOT.glob("build/bdist*")):
        shutil.rmtree(scratch, ignore_errors=True)
    return _setuptools.build_wheel(wheel_directory, config_settings, metadata_directory)


def _editable(hook: Any, *args: Any) -> Any:
    """Run a setuptools hook for an editable install: always pure (every step runs setup.py)."""
    os.environ[_EDITABLE] = "1"
    try:
        return hook(*args)
    finally:
        del os.environ[_EDITABLE]


def get_requires_for_build_editable(config_settings: Any = None) -> list[str]:
    return list(_editable(_setuptools.get_requires_for_build_editable, config_settings))


def prepare_metadata_for_build_editable(
    metadata_directory: str, config_settings: Any = None
) -> str:
    prepare = _setuptools.prepare_metadata_for_build_editable
    return str(_editable(prepare, metadata_directory, config_settings))


def build_editable(
    wheel_directory: str, config_settings: Any = None, metadata_directory: str | None = None
) -> str:
    if os.environ.get("RMSG_COMPILE", "") not in ("", "0"):
        print("rmsg: editable installs are pure Python; RMSG_COMPILE ignored", file=sys.stderr)
    build = _setuptools.build_editable
    return str(_editable(build, wheel_directory, config_settings, metadata_directory))
