"""Durable outboxes, the core's half: message ids that outlive the sender, and the
receiver's bounded memory of the ones it delivered.

Theory of operation
-------------------
A sender with a durable outbox (:mod:`reliable.outbox`) stores each send
before it goes out and deletes it once its outcome is known; after a crash,
the restarted sender sends again whatever is still stored. The transport's
duplicate filter cannot catch such a re-send: it is keyed on the sender's
incarnation and sequence numbers, and the restarted sender has a new
incarnation. So an outbox send carries a stable id of its own: the outbox's
id (random, 64 bits, made when its file was created) and the message's row
in it (numbered in the order sends were accepted). The receiving node keeps
a memory of the ids it delivered and acknowledges a re-send of one of them
without delivering it again.

The id travels in the mailbox name, which cannot contain ``/``:
``jobs/o.<outbox>.<row>.<floor>`` (hexadecimal) is the mailbox ``jobs``,
tagged. No wire change was needed, and a node that knows nothing of
outboxes refuses a tagged name (no such mailbox) rather than delivering
without the check. ``floor`` is the sender's promise that every row below it
is settled and deleted from its outbox *on disk*, so will never be sent
again: the receiver forgets those rows. Its memory of one outbox is
therefore only the rows from the floor on, as many as the sender has sends
outstanding.

Bounds (what the guarantee rests on): the memory holds at most
:data:`REMEMBERED_OUTBOXES` outboxes (least recently heard from forgotten
first) and :data:`REMEMBERED_ROWS` rows above each floor (the oldest
forgotten first). It lives in the receiving node's memory; a durable mailbox
also stores the ids of the messages it took in with them (``outbox_ids``
table, :mod:`reliable.store`), and a node restarting on that file
remembers them again. A receiving node that restarts otherwise has
forgotten them. A forgotten id delivered again is a
duplicate (at least once); nothing is ever dropped because of the memory,
since a row is treated as delivered only when this node remembers it or the
sender itself declared it settled (below the floor).
"""

from __future__ import annotations

from collections import OrderedDict

__all__ = [
    "REMEMBERED_OUTBOXES",
    "REMEMBERED_ROWS",
    "TAG_MAX",
    "DeliveredIds",
    "format_tag",
    "parse_tagged",
]

#: Most outboxes a node remembers delivered ids of (least recently heard from goes).
REMEMBERED_OUTBOXES = 4096
#: Most delivered rows a node remembers per outbox, above that outbox's floor.
REMEMBERED_ROWS = 65536
_PREFIX = "/o."
_HEX_DIGITS = 16  # a 64-bit field
#: Longest tag :func:`format_tag` makes: a mailbox name for an outbox send must leave room.
TAG_MAX = len(_PREFIX) + 3 * _HEX_DIGITS + 2
_HEX = frozenset("0123456789abcdef")


def format_tag(outbox: int, row: int, floor: int) -> str:
    """The suffix that tags a mailbox name with outbox message id ``(outbox, row)``."""
    return f"{_PREFIX}{outbox:x}.{row:x}.{floor:x}"


def _field(text: str) -> int | None:
    if not 0 < len(text) <= _HEX_DIGITS or not _HEX.issuperset(text):
        return None
    return int(text, 16)


def parse_tagged(name: str) -> tuple[str, int, int, int] | None:
    """``(mailbox, outbox, row, floor)`` of a tagged mailbox name; None if it is not one
    (then it names no mailbox: mailbox names never contain ``/``)."""
    mailbox, slash, tag = name.partition("/")
    if not slash or not tag.startswith(_PREFIX[1:]):
        return None
    parts = tag[len(_PREFIX) - 1 :].split(".")
    if len(parts) != 3:
        return None
    outbox, row, floor = (_field(p) for p in parts)
    if outbox is None or row is None or floor is None or floor > row:
        return None
    return mailbox, outbox, row, floor


class _Rows:
    __slots__ = ("floor", "rows")

    def __init__(self) -> None:
        self.floor = 0
        self.rows: set[int] = set()


class DeliveredIds:
    """One node's memory of the outbox message ids it delivered (see the module
    docstring for what it promises and its bounds)."""

    __slots__ = ("_known", "_max_outboxes", "_max_rows", "duplicates", "forgotten")

    def __init__(
        self, max_outboxes: int = REMEMBERED_OUTBOXES, max_rows: int = REMEMBERED_ROWS
    ) -> None:
        self._known: OrderedDict[int, _Rows] = OrderedDict()
        self._max_outboxes = max_outboxes
        self._max_rows = max_rows
        self.duplicates = 0  #: re-sends recognised and not delivered again
        self.forgotten = 0  #: ids dropped from memory for its bounds (a re-send would repeat)

    def __len__(self) -> int:
        return sum(len(known.rows) for known in self._known.values())

    def seen(self, outbox: int, row: int, floor: int) -> bool:
        """Whether ``(outbox, row)`` was delivered here before (or settled by its
        sender: below ``floor``). Learns the floor, forgetting what it settles."""
        known = self._known.get(outbox)
        if known is None:
            return False
        self._known.move_to_end(outbox)
        if floor > known.floor:
            known.floor = floor
            known.rows = {r for r in known.rows if r >= floor}
        if row < known.floor or row in known.rows:
            self.duplicates += 1
            return True
        return False

    def remember(self, outbox: int, row: int, floor: int) -> None:
        """``(outbox, row)`` was delivered (entered, or is held for, its mailbox)."""
        known = self._known.get(outbox)
        if known is None:
            if len(self._known) >= self._max_outboxes:
                _oldest, dropped = self._known.popitem(last=False)
                self.forgotten += len(dropped.rows)
            known = self._known[outbox] = _Rows()
            known.floor = floor
        else:
            self._known.move_to_end(outbox)
        if row < known.floor:
            return
        known.rows.add(row)
        if len(known.rows) > self._max_rows:
            known.rows.discard(min(known.rows))
            self.forgotten += 1

    def forget(self, outbox: int, row: int) -> None:
        """``(outbox, row)`` never made it in after all (a parked message discarded, a
        commit failed): a re-send must be delivered."""
        known = self._known.get(outbox)
        if known is not None:
            known.rows.discard(row)
