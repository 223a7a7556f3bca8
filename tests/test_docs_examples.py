"""Every fenced code block in README.md and docs/*.md is tested as what it says it is.

A reader copies these blocks; each is checked the way the reader would use it:

* ```` ```python ````: runs in its own interpreter (a fresh namespace), with a
  timeout, in a scratch directory that holds the files the guides tell the
  reader to make. Where a private network namespace can be made (root, or
  unprivileged user namespaces), the block runs in one with only ``lo`` up:
  the guides use fixed ports and groups (``127.0.0.1:7000``,
  ``239.1.2.4:7402``), and a suite running beside ours on the same host must
  not answer our examples. Tracebacks name the guide and its line.
* ```` ```sh ````: every ``rmsg`` command in it (also after ``|``, ``&&``,
  ``;`` or ``do``) is parsed by the CLI itself: the subcommand, its options,
  their values and types, as the shell would pass them. The ones that are
  self-contained and quick (``demo``, ``keygen``, ``dissect``) also run. A
  block marked ``<!-- session -->`` is a few terminals' worth of commands: it
  runs as written, in order, servers (``rmsg recv``) in the background and
  each other line to completion, which must exit 0.
* ```` ```toml ````: loads as a netem ``Scenario``.
* ```` ```text ````: sample output and diagrams; nothing to run.

A block that is deliberately not runnable is marked by an HTML comment on the
line before it, ``<!-- not-tested: the reason -->``; the reason is required,
and a python block so marked must still compile. ``<!-- file: NAME -->``
names the file a block is (the reader saves it and later blocks use it).
Test ids are ``FILE:LINE`` of the opening fence.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import random
import re
import selectors
import shlex
import shutil
import signal
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
GUIDES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LANGUAGES = {"python", "sh", "toml", "text"}
MARKS = {"not-tested", "file", "session"}
RUN_FOR_REAL = {"demo", "keygen", "dissect"}  # self-contained and quick on loopback
SERVERS = {"recv"}  # runs until stopped: a session starts it in the background
BLOCK_TIMEOUT = 30.0  # seconds for one python block or one command

_ANY_INTERFACE = re.compile(r"0\.0\.0\.0|\[::\]")  # wildcard binds
_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})\s*(.*?)\s*$")
_MARK = re.compile(r"^\s*<!--\s*([\w-]+)\s*(?::\s*(.*?))?\s*-->\s*$")


@dataclass(frozen=True)
class Block:
    guide: str  #: path relative to the repository, e.g. docs/groups.md
    line: int  #: 1-based line of the opening fence
    lang: str
    code: str
    marks: dict[str, str] = field(default_factory=dict)

    @property
    def id(self) -> str:
        return f"{self.guide}:{self.line}"


def _closes(line: str, fence: str) -> bool:
    closing = _FENCE.match(line)
    return (
        closing is not None
        and closing.group(1)[0] == fence[0]
        and len(closing.group(1)) >= len(fence)
        and not closing.group(2)
    )


def _blocks(path: Path) -> list[Block]:
    lines = path.read_text().splitlines()
    out: list[Block] = []
    i = 0
    while i < len(lines):
        opened = _FENCE.match(lines[i])
        if opened is None:
            i += 1
            continue
        fence, info = opened.groups()
        end = i + 1
        while end < len(lines) and not _closes(lines[end], fence):
            end += 1
        marks: dict[str, str] = {}
        j = i - 1
        while j >= 0 and (m := _MARK.match(lines[j])) is not None:
            marks[m.group(1)] = m.group(2) or ""
            j -= 1
        lang = info.split()[0] if info else ""
        code = "\n".join(lines[i + 1 : end]) + "\n"
        out.append(Block(str(path.relative_to(ROOT)), i + 1, lang, code, marks))
        i = end + 1
    return out


ALL_BLOCKS = [b for guide in GUIDES for b in _blocks(guide)]


def _ids(blocks: list[Block]) -> list[str]:
    return [b.id for b in blocks]


# ---------------------------------------------------------------- the reader's files


def _write_capture(path: Path) -> None:
    """A real capture of first contact and one message, as ``rmsg netem --pcap-out``
    would write it: two endpoints on virtual time, every datagram recorded."""
    from netem.pcap import PcapWriter
    from reliable import Endpoint

    a, b = Endpoint(rng=random.Random(1)), Endpoint(rng=random.Random(2))
    addr_a, addr_b = ("127.0.0.1", 45421), ("127.0.0.1", 7000)
    a.send(addr_b, b"hello", now=0.0)
    now = 0.0
    with PcapWriter(path) as pcap:
        for _ in range(100):
            moved = False
            for src, dst, me, peer in ((addr_a, addr_b, a, b), (addr_b, addr_a, b, a)):
                for data, _ in me.datagrams_to_send(now):
                    pcap.write(1e9 + now, src, dst, data)
                    peer.receive_datagram(data, src, now)
                    moved = True
            if not moved:
                break
            now += 0.001
        assert pcap.records >= 3  # DATA, CHALLENGE, DATA + cookie, ACK


@pytest.fixture(scope="module")
def reader_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The reader's working directory: the files the guides name, made as they say."""
    where = tmp_path_factory.mktemp("reader")
    for block in ALL_BLOCKS:
        if "file" in block.marks:
            (where / block.marks["file"]).write_text(block.code)
    for capture in ("run.pcap", "capture.pcap"):
        _write_capture(where / capture)
    saved = where / "docs" / "images"  # a saved bench run, as a reader of the source tree has it
    saved.mkdir(parents=True)
    shutil.copy(ROOT / "docs" / "images" / "bench-figures.json", saved)
    return where


# ---------------------------------------------------------------- isolation


@functools.cache
def _netns_prefix() -> tuple[str, ...]:
    """A command prefix running its command in a private network namespace with only
    ``lo`` up, or ``()`` where none can be made (then blocks share the host's loopback)."""
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return ()
    unshare = ["unshare", "--net"]
    if os.geteuid() != 0:
        unshare = ["unshare", "--user", "--map-root-user", "--net"]
    prefix = (*unshare, "sh", "-c", 'ip link set lo up && exec "$@"', "sh")
    try:
        probe = subprocess.run([*prefix, "true"], capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return ()
    return prefix if probe.returncode == 0 else ()


def _env(home: Path) -> dict[str, str]:
    env = dict(os.environ, HOME=str(home))
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.pop("RMSG_KEY", None)
    return env


# ---------------------------------------------------------------- shell parsing


def _commands(code: str) -> list[list[str]]:
    """The simple commands of a shell block as the shell splits them (comments, quotes,
    line continuations and ``~`` handled; pipelines and lists split at their operators)."""
    out: list[list[str]] = []
    for line in code.replace("\\\n", " ").splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        words: list[str] = []
        for token in [*lexer, ";"]:
            if token and set(token) <= set("();<>|&"):
                while words and words[0] in {"do", "then", "else", "!"}:
                    words.pop(0)
                if words:
                    out.append(words)
                words = []
            else:
                words.append(token)
    return out


def _rmsg_argv(words: list[str], home: Path) -> list[str] | None:
    """``rmsg``'s arguments in ``words`` (``~`` expanded to ``home``), or None if
    the command is not rmsg."""
    if Path(words[0]).name != "rmsg":
        return None
    return [str(home) + w[1:] if w == "~" or w.startswith("~/") else w for w in words[1:]]


def _tool_script(words: list[str]) -> str | None:
    """The ``tools/NAME.py`` a ``python tools/NAME.py ...`` command runs, if it is one."""
    rest = [w for w in words if "=" not in w or w.startswith("-")]  # drop VAR=value prefixes
    if len(rest) >= 2 and Path(rest[0]).name.startswith("python") and rest[1].startswith("tools/"):
        return rest[1]
    return None


def _check_tool(words: list[str], block: Block) -> None:
    """A repository script named in a guide exists and accepts the arguments shown:
    parsed with its ``build_parser()`` (``--help`` alone would hide an unknown option,
    since argparse exits on ``--help`` before it complains)."""
    script = _tool_script(words)
    assert script is not None
    path = ROOT / script
    assert path.is_file(), f"{block.id}: {script} does not exist"
    args = words[words.index(script) + 1 :]
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert hasattr(module, "build_parser"), f"{script}: give it a build_parser() to check"
    try:
        module.build_parser().parse_args(args)
    except SystemExit as exc:
        pytest.fail(f"{block.id}: {shlex.join(words)} does not parse (exit {exc.code})")


def _check_cli(argv: list[str]) -> str:
    """Parse ``rmsg ARGV`` as the CLI would, without running it; return the subcommand."""
    import click

    from rmsg.cli import main

    assert argv, "rmsg with no subcommand"
    try:  # the group's own options first (-v, -vv)
        parent = main.make_context("rmsg", list(argv))
    except click.ClickException as exc:
        raise AssertionError(f"rmsg {shlex.join(argv)}: {exc.format_message()}") from None
    argv = [*getattr(parent, "_protected_args", []), *parent.args]  # click 8.2+ / 8.1
    if not hasattr(parent, "_protected_args"):
        argv = [*parent.protected_args, *parent.args]
    assert argv, "rmsg with no subcommand"
    command = main.get_command(parent, argv[0])
    assert command is not None, f"rmsg has no subcommand {argv[0]!r}"
    try:
        command.make_context(argv[0], list(argv[1:]), parent=parent)
    except click.ClickException as exc:
        raise AssertionError(f"rmsg {shlex.join(argv)}: {exc.format_message()}") from None
    return argv[0]


# ---------------------------------------------------------------- the tests


def test_blocks_found() -> None:
    """The collector sees the guides (a broken fence regex would silently test nothing)."""
    guides = {b.guide for b in ALL_BLOCKS}
    assert {"README.md", "docs/groups.md", "docs/usage.md", "docs/netem.md"} <= guides
    assert sum(b.lang == "python" for b in ALL_BLOCKS) >= 15
    assert sum(b.lang == "sh" for b in ALL_BLOCKS) >= 8
    assert len([b for b in ALL_BLOCKS if "not-tested" in b.marks]) <= 4  # sketches stay few


@pytest.mark.parametrize("block", ALL_BLOCKS, ids=_ids(ALL_BLOCKS))
def test_block_says_what_it_is(block: Block) -> None:
    assert block.lang in LANGUAGES, (
        f"{block.id}: say what this block is: ```python, ```sh, ```toml or ```text"
    )
    unknown = set(block.marks) - MARKS
    assert not unknown, f"{block.id}: unknown mark(s) {sorted(unknown)}; known: {sorted(MARKS)}"
    if "not-tested" in block.marks:
        assert block.marks["not-tested"], f"{block.id}: say why it is not tested"
        assert block.lang in {"python", "sh"}, f"{block.id}: only code can be not-tested"
    if "session" in block.marks:
        assert block.lang == "sh", f"{block.id}: a session is a shell block"


PYTHON = [b for b in ALL_BLOCKS if b.lang == "python"]
_EXEC = (
    "import sys; "
    "exec(compile(open(sys.argv[1]).read(), sys.argv[2], 'exec'), {'__name__': '__main__'})"
)


@pytest.mark.loopback
@pytest.mark.parametrize("block", PYTHON, ids=_ids(PYTHON))
def test_python_block(block: Block, reader_dir: Path, tmp_path: Path) -> None:
    source = "\n" * block.line + block.code  # so tracebacks give the guide's line numbers
    compile(source, block.guide, "exec")
    if "not-tested" in block.marks:
        pytest.skip(f"not-tested: {block.marks['not-tested']}")
    if _ANY_INTERFACE.search(block.code) and not _netns_prefix():
        pytest.skip("binds every interface: runs only in a private network namespace")
    script = tmp_path / "block.py"
    script.write_text(source)
    argv = [*_netns_prefix(), sys.executable, "-c", _EXEC, str(script), block.guide]
    try:
        done = subprocess.run(
            argv,
            cwd=reader_dir,
            env=_env(tmp_path),
            capture_output=True,
            text=True,
            timeout=BLOCK_TIMEOUT,
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{block.id} did not finish in {BLOCK_TIMEOUT:g}s: {exc.stderr!r}")
    assert done.returncode == 0, f"{block.id} failed:\n{done.stdout}{done.stderr}"


SHELL = [b for b in ALL_BLOCKS if b.lang == "sh"]


@pytest.mark.loopback
@pytest.mark.parametrize("block", SHELL, ids=_ids(SHELL))
def test_shell_block(
    block: Block, reader_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(reader_dir)  # where the files the guides name are
    commands = _commands(block.code)
    invocations = [(w, a) for w in commands if (a := _rmsg_argv(w, tmp_path)) is not None]
    for _words, argv in invocations:
        _check_cli(argv)
    tools = [w for w in commands if _tool_script(w) is not None]
    for words in tools:
        _check_tool(words, block)
    if "not-tested" in block.marks:
        pytest.skip(f"not-tested: {block.marks['not-tested']}")
    assert invocations or tools, f"{block.id}: no rmsg command or tools/ script in a shell block"
    if "session" in block.marks:
        _run_session(block, reader_dir, tmp_path)
        return
    for words, argv in invocations:
        if argv[0] in RUN_FOR_REAL and shlex.join(words) not in _RAN:
            _RAN.add(shlex.join(words))  # the same command in another guide adds nothing
            done = subprocess.run(
                ["rmsg", *argv],
                cwd=reader_dir,
                env=_env(tmp_path),
                capture_output=True,
                text=True,
                timeout=BLOCK_TIMEOUT,
            )
            assert done.returncode == 0, f"rmsg {shlex.join(argv)}: {done.stderr}"
            assert done.stdout or argv[0] == "keygen", f"rmsg {shlex.join(argv)} printed nothing"


_RAN: set[str] = set()


TOML = [b for b in ALL_BLOCKS if b.lang == "toml"]


@pytest.mark.parametrize("block", TOML, ids=_ids(TOML))
def test_toml_block(block: Block) -> None:
    from netem import Scenario

    tomllib.loads(block.code)
    scenario = Scenario.from_toml(block.code)
    up, down = scenario.links(seed=1)
    assert up is not None and down is not None


# ---------------------------------------------------------------- sessions


def _run_session(block: Block, reader_dir: Path, home: Path) -> None:
    """Run a ``<!-- session -->`` block's lines in order in one (private) network
    namespace: the driver is this file, run as a script."""
    lines = [ln for ln in block.code.replace("\\\n", " ").splitlines() if ln.strip()]
    argv = [*_netns_prefix(), sys.executable, __file__, json.dumps(lines)]
    try:
        done = subprocess.run(
            argv,
            cwd=reader_dir,
            env=_env(home),
            capture_output=True,
            text=True,
            timeout=BLOCK_TIMEOUT * 2,
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{block.id}: the session did not finish: {exc.stdout!r} {exc.stderr!r}")
    assert done.returncode == 0, f"{block.id}:\n{done.stdout}{done.stderr}"


def _session(lines: list[str]) -> int:
    """Each line as a reader in a terminal of their own would: ``rmsg recv`` starts in
    the background and is waited for until it says it listens; every other line runs
    to completion and must exit 0. Returns the exit code; every server is stopped."""
    servers: list[subprocess.Popen[str]] = []
    status = 0
    try:
        for line in lines:
            words = shlex.split(line, comments=True)
            if len(words) >= 2 and words[0] == "rmsg" and words[1] in SERVERS:
                proc = subprocess.Popen(words, stderr=subprocess.PIPE, text=True)
                servers.append(proc)
                said = _first_line(proc, timeout=BLOCK_TIMEOUT)
                print(f"$ {line}\n  (background) {said.strip()}")
                if "listening" not in said:
                    return 1
                continue
            done = subprocess.run(
                ["bash", "-c", line], capture_output=True, text=True, timeout=BLOCK_TIMEOUT
            )
            print(f"$ {line}\n{done.stdout}{done.stderr}  -> exit {done.returncode}")
            if done.returncode != 0:
                return 1
    finally:
        for proc in servers:
            proc.send_signal(signal.SIGINT)  # Ctrl-C, as the reader would
        for proc in servers:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                status = 1
    return status


def _first_line(proc: subprocess.Popen[str], timeout: float) -> str:
    """The first line ``proc`` writes to stderr, or "" if none comes within ``timeout`` s."""
    assert proc.stderr is not None
    with selectors.DefaultSelector() as wait:
        wait.register(proc.stderr, selectors.EVENT_READ)
        return proc.stderr.readline() if wait.select(timeout) else ""


if __name__ == "__main__":
    sys.exit(_session(json.loads(sys.argv[1])))
