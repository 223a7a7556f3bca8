"""Give each of the four things the core called "control" its own name (issue 18).

* the packet flag ``Flag.CONTROL`` -> ``Flag.NODE`` (bit 2: the fragment belongs to a
  node message);
* node control messages (``reliable/control.py``) -> *node messages*
  (``reliable/node_messages.py``: ``NodeMessage``, ``encode_node_message``,
  ``decode_node_message``, ``MalformedNodeMessage``, ``RawNodeMessage``);
  ``reliable/control.py`` stays as a deprecated alias of the old names;
* the message attribute (``OutgoingMessage.control``, ``Fragment.control``,
  ``Delivery.control``) -> ``for_node``, and the send queue of node messages
  (``SendStream.control``) -> ``SendStream.node_messages``;
* a session's bare packets (ACK, PING, CLOSE: ``PeerSession._control``) ->
  ``PeerSession._bare_packet``.

Run from the repository's root: ``python tools/rename_control.py``. It rewrites the
files in place and is idempotent, so it can be run again after merging branches that
still use the old names (then check ``git diff`` and run the suite). Counters keep their
names (``malformed.control`` in ``stats().dropped``): they are public output. The
netem proxy's ``--control`` endpoint is the fault injector's and is not touched.
"""

from __future__ import annotations

import io
import itertools
import re
import subprocess
import sys
import tokenize
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

OLD_MODULE = ROOT / "reliable" / "control.py"
NEW_MODULE = ROOT / "reliable" / "node_messages.py"

#: Identifiers and fixed phrases, whole words, in this order (code, docstrings, docs).
WORDS: list[tuple[str, str]] = [
    # the module and its names
    (r"from \.control import", "from .node_messages import"),
    (r"\breliable\.control\b", "reliable.node_messages"),
    (r"\breliable/control\.py\b", "reliable/node_messages.py"),
    (r"(?<![\w/])control\.py's\b", "node_messages.py's"),
    (r"\bControlMessage\b", "NodeMessage"),
    (r"\bencode_control\b", "encode_node_message"),
    (r"\bdecode_control\b", "decode_node_message"),
    (r"\bMalformedControl\b", "MalformedNodeMessage"),
    (r"\bRawControl\b", "RawNodeMessage"),
    (r"\bRemoteControl\b", "RemoteOperation"),
    # calls and handlers
    (r"\bsend_control_to\b", "send_node_message_to"),
    (r"\bsend_control\b", "send_node_message"),
    (r"\b_on_control_message\b", "_on_node_message"),
    (r"\b_control_handlers\b", "_node_message_handlers"),
    (r"\b_MAX_CONTROL_BACKLOG\b", "_MAX_NODE_BACKLOG"),
    (r"\bon_control\b", "on_node_message"),
    (r"\b_raw_control\b", "_raw_node_message"),
    # the flag
    (r"\bFlag\.CONTROL\b", "Flag.NODE"),
    (r"\b_CONTROL\b", "_NODE"),
    (r"^    CONTROL = 0x0004", "    NODE = 0x0004"),
    (r"`CONTROL`", "`NODE`"),
    (r"``CONTROL``", "``NODE``"),
    (r'"CONTROL on a packet', '"NODE on a packet'),
    # the send queue of node messages
    (r"\bsender\.control\b", "sender.node_messages"),
    # a session's bare packets
    (r"\bself\._control\(", "self._bare_packet("),
    (r"\bdef _control\(", "def _bare_packet("),
    # prose
    (r"\b[Nn]ode-to-node control messages\b", "Node messages"),
    (r"a control message for the node, not", "a message for the node, not"),
    (r"a node-to-node control message, invisible", "a node message, invisible"),
    (r"flag\n(\s*)\(control and", r"flag\n\1(node-message and"),
    (r"flag \(control and", "flag (node-message and"),
    (r"share the first's control flag", "share the first's ``NODE`` flag"),
    (r"for a control\n(\s*)message", r"for a node\n\1message"),
    (r"\bcontrol\.py \(node", "node_messages.py (node"),
    (r"control flag is ``control``", "``NODE`` flag is ``for_node``"),
    (r"only in control\n(\s*)message", r"only in node\n\1message"),
    (r"ack-bearing control packet", "ack-bearing bare packet"),
    (r"cookie, control or nesting flag", "cookie, ``NODE`` or ``NESTED`` flag"),
    (r"\bnode control message", "node message"),
    (r"\bNode control message", "Node message"),
    (r"\bcontrol message", "node message"),
    (r"\bControl message", "Node message"),
    (r"\bcontrol operation", "node-message operation"),
    (r"\bcontrol payload", "node-message payload"),
    (r"\bcontrol fragments\b", "node-message fragments"),
    (r"\bcontrol outcomes\b", "node-message outcomes"),
    (r"\bfragment is control\b", "fragment is a node message's"),
    (r"Mailboxes and control messages", "Mailboxes and node messages"),
    (r'match="control"', 'match="node-message"'),
    (r"a node message for the node itself", "a message for the node itself"),
    (r"mailboxes-and-control-messages", "mailboxes-and-node-messages"),
]

#: Files the words apply to.
WORD_FILES = [
    "reliable/*.py",
    "tests/test_*.py",
    "rmsg/dissect.py",
    "rmsg/scapy_layer.py",
    "docs/protocol.md",
    "docs/architecture.md",
    "docs/mailboxes.md",
    "README.md",
]

#: Files where every remaining Python name ``control`` (an attribute, a keyword argument,
#: a local) is the message attribute, and the string "control" names it (``__slots__``).
ATTRIBUTE_FILES = [
    "reliable/sender.py",
    "reliable/wire.py",
    "reliable/receiver.py",
    "reliable/peer.py",
    "reliable/post_office.py",
    "reliable/endpoint.py",
    "rmsg/dissect.py",
    "tests/test_wire.py",
    "tests/test_mailbox_pair.py",
    "tests/test_fuzz_endpoint.py",
]

#: In sender.py, ``self.control`` is SendStream's queue of node messages.
SENDER_QUEUE = [
    (r"\bself\.control\b", "self.node_messages"),
    (r'^        "control",$', '        "node_messages",'),  # in SendStream.__slots__
    (r"^``control`` and go first", "``node_messages`` and go first"),
]

#: The display of the flag in the decoders.
LABELS = [
    ("rmsg/dissect.py", 'parts.append("CONTROL")', 'parts.append("NODE")'),
    ("rmsg/scapy_layer.py", '    "CONTROL",\n', '    "NODE",\n'),
]

SHIM = '''"""Deprecated: node messages moved to :mod:`reliable.node_messages` (issue 18: "control"
meant four things). The old names keep working here, with a warning."""

from __future__ import annotations

import warnings

from .node_messages import *  # noqa: F403
from .node_messages import (
    MalformedNodeMessage,
    NodeMessage,
    RawNodeMessage,
    decode_node_message,
    encode_node_message,
)
from .node_messages import __all__ as _names

warnings.warn(
    "reliable.control is deprecated: use reliable.node_messages",
    DeprecationWarning,
    stacklevel=2,
)

ControlMessage = NodeMessage
MalformedControl = MalformedNodeMessage
RawControl = RawNodeMessage
encode_control = encode_node_message
decode_control = decode_node_message

__all__ = [
    *_names,
    "ControlMessage",
    "MalformedControl",
    "RawControl",
    "decode_control",
    "encode_control",
]
'''


#: Files that speak of the old names on purpose (the alias's own test).
KEEP_FILES = {"tests/test_control_alias.py"}
#: A line that holds this speaks of an old name on purpose and is left as it is.
KEEP_MARK = "rename-control: keep"


def _files(patterns: list[str]) -> list[Path]:
    found: list[Path] = []
    for pattern in patterns:
        found += sorted(
            p
            for p in ROOT.glob(pattern)
            if p != OLD_MODULE and str(p.relative_to(ROOT)) not in KEEP_FILES
        )
    return found


def _apply_words(text: str) -> str:
    """WORDS on ``text``, but for the lines marked with KEEP_MARK."""
    lines = text.split("\n")
    kept = {i: line for i, line in enumerate(lines) if KEEP_MARK in line}
    for i in kept:
        lines[i] = f"\0{i}\0"
    text = "\n".join(lines)
    for pattern, replacement in WORDS:
        text = re.sub(pattern, replacement, text, flags=re.M)
    for i, line in kept.items():
        text = text.replace(f"\0{i}\0", line)
    return text


def _rename_names(text: str, old: str, new: str) -> str:
    """Every Python NAME token ``old`` -> ``new``, and the string ``"old"``."""
    spots: list[tuple[int, int, int]] = []
    tokens = list(tokenize.generate_tokens(io.StringIO(text).readline))
    for tok, after in itertools.pairwise(tokens):
        if tok.type == tokenize.NAME and tok.string == old:
            spots.append((tok.start[0], tok.start[1], len(old)))
        elif (
            tok.type == tokenize.STRING
            and tok.string in (f'"{old}"', f"'{old}'")
            and after.string in (",", ":")  # a name in __slots__, a key of fields
        ):
            spots.append((tok.start[0], tok.start[1] + 1, len(old)))
    lines = text.splitlines(keepends=True)
    for row, col, size in reversed(spots):
        line = lines[row - 1]
        lines[row - 1] = line[:col] + new + line[col + size :]
    return "".join(lines)


def main() -> int:
    if OLD_MODULE.exists() and not NEW_MODULE.exists():
        subprocess.run(["git", "mv", str(OLD_MODULE), str(NEW_MODULE)], cwd=ROOT, check=True)
    changed: set[Path] = set()
    for path in _files(WORD_FILES):
        text = before = path.read_text()
        text = _apply_words(text)
        if path.name == "sender.py":
            for pattern, replacement in SENDER_QUEUE:
                text = re.sub(pattern, replacement, text, flags=re.M)
        if path.match("reliable/sender.py") or path in _files(ATTRIBUTE_FILES):
            text = _rename_names(text, "control", "for_node")
        if text != before:
            path.write_text(text)
            changed.add(path)
    for name, old, new in LABELS:
        path = ROOT / name
        text = path.read_text()
        if old in text:
            path.write_text(text.replace(old, new))
            changed.add(path)
    if not OLD_MODULE.exists() or OLD_MODULE.read_text() != SHIM:
        OLD_MODULE.write_text(SHIM)
        changed.add(OLD_MODULE)
    for path in sorted(changed):
        print(path.relative_to(ROOT))
    python = [str(p) for p in sorted(changed) if p.suffix == ".py"]
    if python:  # the renamed imports' order, and lines the longer names made too long
        ruff = [sys.executable, "-m", "ruff"]
        subprocess.run([*ruff, "check", "-q", "--fix", "--select", "I,RUF022,RUF023", *python])
        subprocess.run([*ruff, "format", "-q", *python])
    return 0


if __name__ == "__main__":
    sys.exit(main())
