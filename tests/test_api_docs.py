"""The API reference is generated from the docstrings (pdoc, tools/apidocs.py), and a
broken docstring fails the build — so it fails this suite, and CI."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest

import reliable

ROOT = Path(__file__).resolve().parent.parent
TOOL = ROOT / "tools" / "apidocs.py"


def _apidocs(*args: str, pythonpath: Path | None = None) -> subprocess.CompletedProcess[str]:
    pytest.importorskip("pdoc", reason="pdoc is in the test extra: pip install -e '.[test]'")
    env = dict(os.environ)
    if pythonpath is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(pythonpath), env.get("PYTHONPATH", "")])
    return subprocess.run(
        [sys.executable, str(TOOL), *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env=env,
    )


def test_pdoc_is_in_the_test_extra_so_ci_builds_the_reference() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert any(dep.startswith("pdoc") for dep in project["optional-dependencies"]["test"])


@pytest.mark.skipif(
    reliable.__compiled__,
    reason="the reference is built from the pure sources (the pure CI run builds it); "
    "pdoc cannot read compiled classes' docstrings and signatures",
)
def test_the_api_reference_builds_from_the_docstrings_without_a_warning(tmp_path: Path) -> None:
    done = _apidocs(str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    page = (tmp_path / "reliable.html").read_text()
    for name in ("Node", "AsyncNode", "Endpoint", "Config", "Receipt", "PeerUnreachable"):
        assert f'id="{name}"' in page, name
    assert "One rmsg node's protocol state" in page  # Endpoint's docstring, rendered
    assert ":class:" not in page and ":mod:" not in page  # reST roles became links or code
    assert 'id="UdpProxy"' in (tmp_path / "netem" / "proxy.html").read_text()
    assert 'id="FaultySocket"' in (tmp_path / "netem" / "socket.html").read_text()
    assert (tmp_path / "index.html").exists() and (tmp_path / "search.js").exists()


def test_a_broken_docstring_fails_the_build(tmp_path: Path) -> None:
    package = tmp_path / "src" / "brokenpkg"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(
        textwrap.dedent(
            '''
            """A package whose docstrings are wrong."""

            __all__ = ["Thing", "undocumented", "Missing"]


            class Thing:
                """Made by :func:`make_thing`, see :class:`Thing` and :mod:`brokenpkg`."""

                def method(self) -> None:
                    pass


            def undocumented() -> None:
                pass
            '''
        )
    )
    done = _apidocs(str(tmp_path / "out"), "brokenpkg", pythonpath=tmp_path / "src")
    assert done.returncode == 1
    assert "brokenpkg.Thing: :func:`make_thing` names nothing" in done.stderr
    assert ":class:`Thing`" not in done.stderr and ":mod:`brokenpkg`" not in done.stderr
    assert "brokenpkg.undocumented: no docstring" in done.stderr
    assert "brokenpkg.Thing.method: no docstring" in done.stderr  # public methods too
    assert "Found 'Missing' in brokenpkg.__all__, but it does not resolve" in done.stderr
    assert "4 broken docstring(s)" in done.stderr
