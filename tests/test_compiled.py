"""The optional compiled core (mypyc): same behaviour as pure, and never a stale module.

CI runs this suite twice: on the editable (pure) install and on a compiled
install (``RMSG_EXPECT_CORE=compiled``, see .ci/run). Tests that need a
compiled build skip on the pure run, saying so.
"""

from __future__ import annotations

import importlib.machinery
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import reliable
from reliable import _compiled

PACKAGE = Path(reliable.__file__).resolve().parent
CORES = ["pure", "compiled"]

# Every wrong-typed argument the public API checks itself, as a snippet and the words its
# UsageError must carry. Run in a fresh interpreter per core (the choice is made at import).
MISUSE = textwrap.dedent(
    """
    import json, random
    from reliable import Endpoint, Selector, errors
    from reliable.mailbox import Mailbox
    B = ("127.0.0.1", 2)
    ep = Endpoint(rng=random.Random(1))
    cases = [
        ("text", lambda: ep.send(B, "text", now=0.0), "encode text first"),
        ("int data", lambda: ep.send(B, 42, now=0.0), "got int"),
        ("bool msg_type", lambda: ep.send(B, b"x", now=0.0, msg_type=True), "msg_type"),
        ("float msg_type", lambda: ep.send(B, b"x", now=0.0, msg_type=1.5), "msg_type"),
        ("str priority", lambda: ep.send(B, b"x", now=0.0, priority="3"), "priority"),
        ("bool priority", lambda: ep.send(B, b"x", now=0.0, priority=True), "priority"),
        ("str selector", lambda: Selector(msg_type="3"), "integer"),
        ("bool except_type", lambda: Selector(msg_type=0, except_type=True), "except_type"),
        ("float capacity", lambda: Mailbox("m", capacity=1.5, max_bytes=None, owner=None, now=0.0,
            on_unpark=print, on_handoff=print), "capacity"),
    ]
    seen = {}
    for name, call, words in cases:
        try:
            call()
        except errors.UsageError as exc:
            seen[name] = "ok" if words in str(exc) else f"UsageError without {words!r}: {exc}"
        except Exception as exc:
            seen[name] = f"{type(exc).__name__}: {exc}"
        else:
            seen[name] = "accepted"
    assert ep.peers() == [] and ep.datagrams_to_send(0.0) == []
    import reliable
    print(json.dumps({"compiled": reliable.__compiled__, "seen": seen}))
    """
)


# The same through the blocking Node, compiled too since issue 20: each call fails before
# anything is queued or sent (the destination is a discard port that is never reached).
NODE_MISUSE = textwrap.dedent(
    """
    import json
    from reliable import Node, errors
    B = "127.0.0.1:9"
    with Node() as node:
        cases = [
            ("send text", lambda: node.send(B, "text", timeout=1), "encode text first"),
            ("send_nowait int data", lambda: node.send_nowait(B, 42), "got int"),
            ("bool msg_type", lambda: node.send_nowait(B, b"x", msg_type=True), "msg_type"),
            ("str priority", lambda: node.send_nowait(B, b"x", priority="3"), "priority"),
            ("send_many text", lambda: node.send_many(B, [b"x", "y"]), "encode text first"),
            ("many float msg_type", lambda: node.send_many(B, [b"x"], msg_type=1.5), "msg_type"),
            ("post text", lambda: node.post("", "text"), "encode text first"),
            ("post bool priority", lambda: node.post("", b"x", priority=False), "priority"),
            ("receive str msg_type", lambda: node.receive_nowait(msg_type="3"), "integer"),
            ("many str msg_type", lambda: node.receive_many(2, timeout=0, msg_type="3"), "integer"),
            ("send str timeout", lambda: node.send(B, b"x", timeout="1"), "timeout"),
            ("receive str timeout", lambda: node.receive(timeout="1"), "timeout"),
            ("send int dest", lambda: node.send_nowait(9, b"x"), ""),
        ]
        seen = {}
        for name, call, words in cases:
            try:
                call()
            except errors.UsageError as exc:
                seen[name] = "ok" if words in str(exc) else f"UsageError without {words!r}: {exc}"
            except Exception as exc:
                seen[name] = f"{type(exc).__name__}: {exc}"
            else:
                seen[name] = "accepted"
        import reliable
        print(json.dumps({"compiled": reliable.__compiled__, "seen": seen}))
    """
)


def _run(code: str, *, pure: bool, cwd: Path, pythonpath: Path | None = None) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("RMSG_PURE_PYTHON", "PYTHONPATH")}
    if pure:
        env["RMSG_PURE_PYTHON"] = "1"
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    # -S with a doctored copy: no site-packages, so no editable install's import hook
    # can answer for reliable in its place (the library needs only the standard library)
    isolate = ["-S"] if pythonpath is not None else []
    done = subprocess.run(
        [sys.executable, *isolate, "-W", "error::RuntimeWarning", "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
        env=env,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.parametrize("core", CORES)
def test_a_wrong_typed_argument_is_a_usage_error_in_either_core(core: str, tmp_path: Path) -> None:
    """Compiled, send("text") raised TypeError at the call (mypyc checks declared types)
    and msg_type=True was accepted (a bool becomes an int at a compiled boundary)."""
    if core == "compiled" and not reliable.__compiled__:
        pytest.skip("no compiled build installed here (CI's second run has one)")
    # tmp_path as the working directory: the installed reliable, never a checkout's
    result = json.loads(_run(MISUSE, pure=core == "pure", cwd=tmp_path))
    assert result["compiled"] is (core == "compiled")
    assert result["seen"] == dict.fromkeys(result["seen"], "ok")


@pytest.mark.parametrize("core", CORES)
def test_a_wrong_typed_argument_to_a_node_is_a_usage_error_in_either_core(
    core: str, tmp_path: Path
) -> None:
    """Node's public arguments are declared ``Any`` where the adapter checks them itself
    (reliable.driver.Data and Int), so a compiled adapter raises the same UsageError."""
    if core == "compiled" and not reliable.__compiled__:
        pytest.skip("no compiled build installed here (CI's second run has one)")
    result = json.loads(_run(NODE_MISUSE, pure=core == "pure", cwd=tmp_path))
    assert result["compiled"] is (core == "compiled")
    assert result["seen"] == dict.fromkeys(result["seen"], "ok")


def _copy_package(tmp_path: Path) -> Path:
    """A copy of the reliable package under test, to doctor."""
    target = tmp_path / "site" / "reliable"
    shutil.copytree(PACKAGE, target, ignore=shutil.ignore_patterns("__pycache__"))
    return target


def _fake_extension(package: Path, module: str) -> Path:
    """A file where a compiled module's extension would be; importing it would fail."""
    path = _compiled.source_path(module, package).with_suffix(
        importlib.machinery.EXTENSION_SUFFIXES[0]
    )
    if not path.exists():
        path.write_bytes(b"not a shared object: importing this would fail")
    return path


PROBE = "import reliable, reliable.endpoint; print(reliable.__compiled__)"


@pytest.mark.parametrize("damage", ["no record", "edited source", "unlisted extension"])
def test_an_extension_beside_an_edited_source_never_runs(damage: str, tmp_path: Path) -> None:
    """A compiled module left beside a source edited after the build (or built in place,
    without the build's record) would run instead of the edit: reliable runs pure, warns."""
    package = _copy_package(tmp_path)
    for module in _compiled.COMPILED_MODULES:
        _fake_extension(package, module)
    if damage == "no record":
        (package / _compiled.BUILD_RECORD).unlink(missing_ok=True)
    else:  # a record that matches every listed module's source
        record = {
            "sources": {
                m: _compiled.source_hash(_compiled.source_path(m, package))
                for m in _compiled.COMPILED_MODULES
            }
        }
        (package / _compiled.BUILD_RECORD).write_text(json.dumps(record))
    if damage == "edited source":
        endpoint = _compiled.source_path("reliable.endpoint", package)
        endpoint.write_text(endpoint.read_text() + "\nEDITED = True\n")
    if damage == "unlisted extension":  # an old build's module, since taken off the list
        _fake_extension(package, "reliable.errors")
    env = {k: v for k, v in os.environ.items() if k not in ("RMSG_PURE_PYTHON",)}
    env["PYTHONPATH"] = str(package.parent)
    done = subprocess.run(
        [sys.executable, "-S", "-c", PROBE + "; print(getattr(reliable.endpoint, 'EDITED', 0))"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env=env,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False", "True" if damage == "edited source" else "0"]
    assert "running the pure-Python core" in done.stderr and "RuntimeWarning" in done.stderr
    expected = {
        "no record": "no valid",
        "edited source": "reliable.endpoint's source changed",
        "unlisted extension": "reliable.errors is compiled but not part of this build",
    }
    assert expected[damage] in done.stderr


def test_pure_python_is_chosen_quietly_when_asked(tmp_path: Path) -> None:
    package = _copy_package(tmp_path)
    for module in _compiled.COMPILED_MODULES:
        _fake_extension(package, module)
    out = _run(PROBE, pure=True, cwd=tmp_path, pythonpath=package.parent)
    assert out.split() == ["False"]  # and no RuntimeWarning: -W error would have failed it


def test_the_build_compiles_exactly_the_listed_modules() -> None:
    """tools/rmsg_build.py reads the list without importing reliable; both agree."""
    tools = Path(__file__).resolve().parent.parent / "tools"
    sys.path.insert(0, str(tools))
    try:
        import rmsg_build
    finally:
        sys.path.remove(str(tools))
    root = PACKAGE.parent  # the checkout, or site-packages for a compiled install's run
    listed = rmsg_build.compiled_modules(root)
    assert listed == _compiled.COMPILED_MODULES
    # errors: mypyc cannot compile subclasses of built-in exceptions; __init__ and
    # _compiled choose the core in plain Python
    for interpreted in ("reliable.errors", "reliable", "reliable._compiled"):
        assert interpreted not in listed
    for module in listed:
        assert (root / rmsg_build.module_source(module)).is_file()


@pytest.mark.parametrize(
    ("environ", "editable", "compiles"),
    [
        ({}, False, False),
        ({"RMSG_COMPILE": "1"}, False, True),
        ({"RMSG_COMPILE": "1", "RMSG_PURE_PYTHON": "1"}, False, False),
        ({"RMSG_COMPILE": "1"}, True, False),  # editable installs are always pure
    ],
)
def test_when_the_build_compiles(
    environ: dict[str, str], editable: bool, compiles: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
    try:
        import rmsg_build
    finally:
        sys.path.pop(0)
    for name in ("RMSG_COMPILE", "RMSG_PURE_PYTHON", "_RMSG_BUILD_EDITABLE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    if editable:
        monkeypatch.setenv("_RMSG_BUILD_EDITABLE", "1")
    assert rmsg_build.compile_requested() is compiles


def test_version_and_bench_say_which_core_runs() -> None:
    from click.testing import CliRunner

    from rmsg.bench import BenchReport, format_report
    from rmsg.cli import main

    core = "compiled" if reliable.__compiled__ else "pure"
    done = CliRunner().invoke(main, ["--version"])
    assert done.exit_code == 0 and f"({core} core)" in done.output
    header = format_report(BenchReport(rounds=1, cpus=2, core=core)).splitlines()[0]
    assert f"loopback, {core} core, 2 CPUs" in header


def test_every_editable_hook_builds_pure(monkeypatch: pytest.MonkeyPatch) -> None:
    """`RMSG_COMPILE=1 pip install -e .` failed: setuptools runs setup.py to learn an
    editable build's requirements too, and that step still asked for mypyc."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
    try:
        import rmsg_build
    finally:
        sys.path.pop(0)
    monkeypatch.setenv("RMSG_COMPILE", "1")
    monkeypatch.delenv("RMSG_PURE_PYTHON", raising=False)
    seen: list[bool] = []

    def hook(*args: object) -> list[str]:
        seen.append(rmsg_build.compile_requested())
        return []

    for name in ("get_requires_for_build_editable", "prepare_metadata_for_build_editable"):
        monkeypatch.setattr(rmsg_build._setuptools, name, hook)
    monkeypatch.setattr(rmsg_build._setuptools, "build_editable", hook)
    rmsg_build.get_requires_for_build_editable()
    rmsg_build.prepare_metadata_for_build_editable("meta")
    rmsg_build.build_editable("wheels")
    assert seen == [False, False, False]
    assert rmsg_build.compile_requested()  # and a regular build still compiles


def test_written_out_inits_match_their_dataclass_fields() -> None:
    """The hot dataclasses write out ``__init__`` (mypyc leaves a generated one
    interpreted): each must take exactly the fields the generated one would, in
    order, with the same defaults and keyword-only-ness, and set every slot."""
    if reliable.__compiled__:
        pytest.skip("reads the sources' signatures: the pure run checks them")
    import dataclasses
    import inspect

    from reliable import events, message, receiver, sender, wire

    classes = [
        wire.Packet,
        wire.Fragment,
        sender.OutgoingMessage,
        sender.SentPacket,
        receiver.Delivery,
        events.MessageDelivered,
        message.Message,
    ]
    for cls in classes:
        fields = [f for f in dataclasses.fields(cls) if f.init]
        params = [p for p in inspect.signature(cls.__init__).parameters.values()][1:]
        assert [p.name for p in params] == [f.name for f in fields], cls
        for param, field in zip(params, fields, strict=True):
            default = (
                inspect.Parameter.empty if field.default is dataclasses.MISSING else field.default
            )
            assert param.default == default, (cls, field.name)
            assert (param.kind == inspect.Parameter.KEYWORD_ONLY) == bool(field.kw_only), (
                cls,
                field.name,
            )
        # built from its required fields alone, every slot is set
        required = {f.name: object() for f in fields if f.default is dataclasses.MISSING}
        if cls is sender.OutgoingMessage:
            required["mailbox"] = "box"
        obj = cls(**required)
        for name in cls.__slots__:
            assert hasattr(obj, name), (cls, name)
