"""Files of any size over rmsg: ``rmsg send --file`` and ``rmsg recv`` (``--output-dir``).

A message is capped (``Config.max_message_size``, 16 MiB), so a file goes as
a *transfer*: a manifest message, then the file in chunk messages of
``CHUNK`` bytes, all to the same mailbox. rmsg delivers one sender's
messages exactly once and in order, so the receiver appends chunk after
chunk, hashing as it goes, and checks the total against the manifest's
SHA-256 before the file gets its name. Nothing here is below the public
API: a transfer is ordinary messages sent with ``Node.send_nowait``.

Wire format of the two message kinds (everything else is an ordinary
message)::

    manifest:  b"RMSGFILE" + JSON {"rmsg_file": 1, "id": HEX16, "name": NAME,
                                   "size": BYTES, "sha256": HEX, "chunk_size": BYTES,
                                   "chunks": N[, "resume_to": MAILBOX]}
    chunk:     b"RMSGCHNK" + id (8 bytes) + index (4 bytes, big-endian, from 0) + data
    resume:    b"RMSGRSUM" + id (8 bytes) + first chunk wanted (4 bytes, big-endian)

A chunk counts only after a manifest with its id from the same source. The
sender keeps a few chunks in flight (``WINDOW``), and its time limit scales
with the size unless given (:func:`default_timeout`). On a terminal both
sides draw a progress line (bytes, rate, retransmissions, ETA); piped, they
stay quiet.

**Resuming.** A transfer's id is derived from the file (its name, size,
SHA-256 and chunk size), so sending the same file again names the same
``.NAME.ID.part`` the receiver kept when an earlier attempt broke off. A
sender that asks to resume (``send_file(..., resume=True)``, ``rmsg send
--file F --resume``) names a mailbox of its own in the manifest
(``resume_to``) and waits a moment (:data:`RESUME_WAIT`) for the receiver's
``resume`` answer: the first chunk it still needs, after it kept the whole
chunks already on disk (re-hashed, so the final SHA-256 check still covers
every byte) and truncated a torn last one. No answer (a receiver without a
folder, or one that predates resuming) means chunk 0: the whole file, as
without ``--resume``. A transfer that fails its check is renamed
``.NAME.ID.failed``, so a later resume never builds on bad bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import IO, Any, BinaryIO

from reliable import Mailbox, Node, Receipt, SendHandle, errors

__all__ = [
    "CHUNK",
    "WINDOW",
    "FileReceiver",
    "Manifest",
    "Progress",
    "TransferDone",
    "default_timeout",
    "send_file",
]

CHUNK = 1024 * 1024  #: bytes of file per chunk message
WINDOW = 4  #: chunks in flight at once (4 MiB: well inside the default send buffer)
MANIFEST_MAGIC = b"RMSGFILE"
CHUNK_MAGIC = b"RMSGCHNK"
RESUME_MAGIC = b"RMSGRSUM"
_CHUNK_HEADER = len(CHUNK_MAGIC) + 8 + 4
RESUME_WAIT = 5.0  #: seconds a resuming sender waits for the receiver's answer
BASE_TIMEOUT = 10.0  #: seconds a transfer always gets ...
SECONDS_PER_MIB = 10.0  #: ... plus this per MiB (a floor of 100 KiB/s)


def default_timeout(size: int) -> float:
    """The whole transfer's time limit when none is given: 10 s plus 10 s per MiB."""
    return BASE_TIMEOUT + SECONDS_PER_MIB * size / (1024 * 1024)


@dataclass(frozen=True, slots=True)
class Manifest:
    transfer_id: bytes  #: 8 random bytes, naming this transfer's chunks
    name: str  #: the file's base name, as the sender had it
    size: int  #: bytes
    sha256: str  #: hex digest of the whole file
    chunk_size: int
    chunks: int
    resume_to: str | None = None  #: the sender's mailbox for a resume answer, if it asks

    def encode(self) -> bytes:
        body: dict[str, Any] = {
            "rmsg_file": 1,
            "id": self.transfer_id.hex(),
            "name": self.name,
            "size": self.size,
            "sha256": self.sha256,
            "chunk_size": self.chunk_size,
            "chunks": self.chunks,
        }
        if self.resume_to is not None:
            body["resume_to"] = self.resume_to
        return MANIFEST_MAGIC + json.dumps(body).encode("utf-8")

    @classmethod
    def decode(cls, data: bytes) -> Manifest | None:
        """The manifest in ``data``, or ``None`` if it is not one (an ordinary message)."""
        if not data.startswith(MANIFEST_MAGIC):
            return None
        try:
            body = json.loads(data[len(MANIFEST_MAGIC) :])
            manifest = cls(
                transfer_id=bytes.fromhex(body["id"]),
                name=str(body["name"]),
                size=int(body["size"]),
                sha256=str(body["sha256"]),
                chunk_size=int(body["chunk_size"]),
                chunks=int(body["chunks"]),
                resume_to=None if body.get("resume_to") is None else str(body["resume_to"]),
            )
        except (ValueError, KeyError, TypeError, AttributeError):
            return None
        if (
            body.get("rmsg_file") != 1
            or len(manifest.transfer_id) != 8
            or manifest.size < 0
            or manifest.chunk_size <= 0
            or manifest.chunks != -(-manifest.size // manifest.chunk_size)
        ):
            return None
        return manifest

    @classmethod
    def of_file(cls, path: Path, chunk_size: int = CHUNK) -> Manifest:
        """Read ``path`` once for its size and SHA-256."""
        digest = hashlib.sha256()
        size = 0
        with path.open("rb") as f:
            while block := f.read(chunk_size):
                digest.update(block)
                size += len(block)
        sha256 = digest.hexdigest()
        return cls(
            transfer_id=transfer_id(path.name, size, sha256, chunk_size),
            name=path.name,
            size=size,
            sha256=sha256,
            chunk_size=chunk_size,
            chunks=-(-size // chunk_size),
        )


def transfer_id(name: str, size: int, sha256: str, chunk_size: int) -> bytes:
    """The 8-byte id of a file's transfer: the same file sent again gets the same id, so
    the receiver finds the part an interrupted attempt left (and only that part)."""
    key = json.dumps([name, size, sha256, chunk_size]).encode("utf-8")
    return hashlib.sha256(b"rmsg transfer\0" + key).digest()[:8]


def encode_chunk(transfer_id: bytes, index: int, data: bytes) -> bytes:
    return CHUNK_MAGIC + transfer_id + index.to_bytes(4, "big") + data


def encode_resume(transfer_id: bytes, first_chunk: int) -> bytes:
    return RESUME_MAGIC + transfer_id + first_chunk.to_bytes(4, "big")


def decode_resume(data: bytes) -> tuple[bytes, int] | None:
    """``(transfer id, first chunk wanted)`` from a resume answer, or ``None``."""
    if len(data) != len(RESUME_MAGIC) + 12 or not data.startswith(RESUME_MAGIC):
        return None
    start = len(RESUME_MAGIC)
    return data[start : start + 8], int.from_bytes(data[start + 8 :], "big")


def decode_chunk(data: bytes) -> tuple[bytes, int, memoryview] | None:
    if len(data) < _CHUNK_HEADER or not data.startswith(CHUNK_MAGIC):
        return None
    start = len(CHUNK_MAGIC)
    index = int.from_bytes(data[start + 8 : _CHUNK_HEADER], "big")
    return data[start : start + 8], index, memoryview(data)[_CHUNK_HEADER:]


# ------------------------------------------------------------------- progress


class Progress:
    """One self-rewriting line on a terminal (bytes, rate, retransmissions, ETA); silent
    when ``stream`` is not a TTY, so pipes and logs get no carriage returns."""

    def __init__(
        self,
        stream: IO[str],
        total: int,
        label: str,
        *,
        clock: Callable[[], float] = time.monotonic,
        force: bool = False,
    ) -> None:
        self.stream = stream
        self.total = total
        self.label = label
        self.enabled = force or stream.isatty()
        self._clock = clock
        self._start = clock()
        self._last = -1.0
        self.base = 0  #: bytes that were there before this run (a resumed transfer)

    def line(self, done: int, retransmissions: int) -> str:
        elapsed = max(self._clock() - self._start, 1e-9)
        rate = (done - self.base) / elapsed  # of this run: kept bytes took no time
        share = done / self.total if self.total else 1.0
        eta = (self.total - done) / rate if rate > 0 else None
        bar = "#" * int(share * 20)
        resumed = f", resumed at {_mib(self.base)}" if self.base else ""
        return (
            f"{self.label} [{bar:<20}] {share:4.0%} {_mib(done)}/{_mib(self.total)} "
            f"{rate / (1024 * 1024):.2f} MiB/s, {retransmissions} retransmitted, "
            f"ETA {'-' if eta is None else f'{eta:.0f}s'}{resumed}"
        )

    def update(self, done: int, retransmissions: int = 0, *, final: bool = False) -> None:
        if not self.enabled:
            return
        now = self._clock()
        if not final and now - self._last < 0.2:
            return
        self._last = now
        self.stream.write("\r" + self.line(done, retransmissions) + ("\n" if final else ""))
        self.stream.flush()


def _mib(n: int) -> str:
    return f"{n / (1024 * 1024):.1f} MiB"


# ----------------------------------------------------------------------- send


@dataclass(slots=True)
class SendOutcome:
    manifest: Manifest
    elapsed: float  #: seconds from the manifest's send to the last chunk's receipt
    retransmissions: int  #: datagrams resent for this transfer (all of its messages)
    receipts: int  #: messages acknowledged: the manifest and every chunk sent
    resumed: int = 0  #: bytes the receiver already had (a resumed transfer), not sent again

    def as_dict(self, peer: str) -> dict[str, Any]:
        return {
            "status": "delivered",
            "peer": peer,
            "file": self.manifest.name,
            "size": self.manifest.size,
            "sha256": self.manifest.sha256,
            "chunks": self.manifest.chunks,
            "messages": self.receipts,
            "retransmissions": self.retransmissions,
            "elapsed": self.elapsed,
            "resumed_bytes": self.resumed,
        }


def send_file(
    node: Node,
    dest: str,
    path: Path,
    *,
    timeout: float | None,
    msg_type: int = 0,
    priority: int = 0,
    mailbox: str | None = None,
    progress: Progress | None = None,
    chunk_size: int = CHUNK,
    window: int = WINDOW,
    resume: bool = False,
) -> SendOutcome:
    """Send the file at ``path`` to ``dest`` as a transfer; returns once every chunk is in
    the peer's mailbox. ``timeout`` (seconds) bounds the whole transfer; ``None``
    scales it with the size (:func:`default_timeout`). Raises the first
    ``DeliveryFailed`` (the transfer stops there; a receiver with a folder keeps the
    part, for a later ``resume=True`` send of the same file to carry on from)."""
    manifest = Manifest.of_file(path, chunk_size)
    budget = default_timeout(manifest.size) if timeout is None else timeout
    start = time.monotonic()
    deadline = start + budget
    options: dict[str, Any] = {"msg_type": msg_type, "priority": priority, "mailbox": mailbox}

    def remaining() -> float:
        left = deadline - time.monotonic()
        if left <= 0:
            raise errors.SendTimeout(dest, budget)
        return left

    in_flight: deque[tuple[SendHandle, int]] = deque()
    receipts: list[Receipt] = []
    confirmed = 0

    def settle_oldest() -> None:
        nonlocal confirmed
        handle, size = in_flight.popleft()
        receipt = handle.result(timeout=remaining() + 1.0)
        assert isinstance(receipt, Receipt)
        receipts.append(receipt)
        confirmed += size
        if progress is not None:
            progress.update(confirmed, sum(r.retransmissions for r in receipts))

    def submit(message: bytes) -> SendHandle:
        """Queue ``message``; while the send buffer or the peer's mailbox is full, wait
        for the oldest chunk in flight (or a moment) and try again, within the budget."""
        while True:
            try:
                return node.send_nowait(dest, message, timeout=remaining(), **options)
            except errors.WouldBlock:
                if in_flight:
                    settle_oldest()
                else:
                    time.sleep(min(0.05, remaining()))

    answers = None
    if resume:
        # A mailbox of our own for the receiver's answer: nothing else is taken from it.
        answers = node.create_mailbox(f"rmsg-resume-{os.urandom(6).hex()}", capacity=4)
        manifest = Manifest(**{**_fields(manifest), "resume_to": answers.name})
    first = 0
    try:
        in_flight.append((submit(manifest.encode()), 0))
        if answers is not None:
            settle_oldest()  # the manifest is in the receiver's mailbox: it answers now
            first = _resume_point(answers, manifest, min(RESUME_WAIT, remaining()))
            confirmed = first * chunk_size
            if progress is not None:
                progress.base = confirmed
    finally:
        if answers is not None:
            answers.delete()
    with path.open("rb") as f:
        f.seek(first * chunk_size)
        for index in range(first, manifest.chunks):
            data = f.read(chunk_size)
            while len(in_flight) >= window:
                settle_oldest()
            message = encode_chunk(manifest.transfer_id, index, data)
            in_flight.append((submit(message), len(data)))
    while in_flight:
        settle_oldest()
    if progress is not None:
        progress.update(confirmed, sum(r.retransmissions for r in receipts), final=True)
    return SendOutcome(
        manifest=manifest,
        elapsed=time.monotonic() - start,
        retransmissions=sum(r.retransmissions for r in receipts),
        receipts=len(receipts),
        resumed=first * chunk_size,
    )


def _fields(manifest: Manifest) -> dict[str, Any]:
    return {f: getattr(manifest, f) for f in Manifest.__dataclass_fields__}


def _resume_point(answers: Mailbox, manifest: Manifest, wait: float) -> int:
    """The first chunk the receiver asks for, 0 if it does not answer within ``wait``."""
    deadline = time.monotonic() + wait
    while (left := deadline - time.monotonic()) > 0:
        try:
            msg = answers.receive(timeout=left)
        except errors.ReceiveTimeout:
            break
        answer = decode_resume(msg.data)
        if answer is not None and answer[0] == manifest.transfer_id:
            first = answer[1]
            return first if 0 <= first < max(manifest.chunks, 1) else 0
    return 0


# -------------------------------------------------------------------- receive


@dataclass(frozen=True, slots=True)
class TransferDone:
    """A transfer that ended: saved and verified, or failed (``error`` says why)."""

    source: str
    manifest: Manifest
    saved_as: Path | None
    verified: bool
    error: str | None = None
    resumed: int = 0  #: bytes kept from an earlier, interrupted attempt

    def as_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "file": self.manifest.name,
            "size": self.manifest.size,
            "sha256": self.manifest.sha256,
            "verified": self.verified,
            "saved_as": None if self.saved_as is None else str(self.saved_as),
            "error": self.error,
            "resumed_bytes": self.resumed,
        }


@dataclass(slots=True)
class _Incoming:
    manifest: Manifest
    out: BinaryIO | None
    part: Path | None
    digest: Any = field(default_factory=hashlib.sha256)
    received: int = 0
    next_index: int = 0
    progress: Progress | None = None
    resumed: int = 0  #: bytes kept from an earlier attempt (chunks ``0..next_index-1``)


class FileReceiver:
    """Reassembles the transfers among received messages.

    With ``folder``, each file goes to ``folder/.NAME.ID.part`` while it
    arrives and is renamed to ``folder/NAME`` (never over an existing file:
    ``NAME-1``, ...) once its size and SHA-256 match the manifest; a failed
    one is renamed ``.NAME.ID.failed``. A part left by an interrupted attempt
    stays: a sender that asks to resume is told (through ``reply``, which
    sends ``data`` to ``mailbox`` on the node at ``source``) where to carry
    on. Without ``folder``, chunk data goes to ``sink`` as it comes (a pipe),
    and the check comes at the end.
    """

    def __init__(
        self,
        folder: Path | None,
        sink: BinaryIO | None = None,
        progress_stream: IO[str] | None = None,
        reply: Callable[[str, str, bytes], object] | None = None,
    ) -> None:
        self.folder = folder
        self.sink = sink
        self.progress_stream = progress_stream
        self.reply = reply
        self._incoming: dict[tuple[str, bytes], _Incoming] = {}

    def offer(self, source: str, data: bytes) -> TransferDone | bool:
        """Feed one received message. ``False``: not part of a transfer (an ordinary
        message); ``True``: taken, the transfer goes on; a :class:`TransferDone` when
        this message ended one."""
        manifest = Manifest.decode(data)
        if manifest is not None:
            return self._start(source, manifest)
        chunk = decode_chunk(data)
        if chunk is None:
            return False
        transfer_id, index, payload = chunk
        incoming = self._incoming.get((source, transfer_id))
        if incoming is None:
            return False  # no manifest from this source: an ordinary message after all
        if index == 0 and incoming.resumed and incoming.received == incoming.resumed:
            self._restart(incoming)  # the sender did not hear our answer: from the top
        if (
            index != incoming.next_index
            or incoming.received + len(payload) > incoming.manifest.size
        ):
            return self._finish(source, incoming, f"chunk {index} out of place")
        incoming.next_index += 1
        incoming.received += len(payload)
        incoming.digest.update(payload)
        out = incoming.out if incoming.out is not None else self.sink
        if out is not None:
            out.write(payload)
        if incoming.progress is not None:
            incoming.progress.update(incoming.received)
        if incoming.received == incoming.manifest.size:
            return self._finish(source, incoming, None)
        return True

    def _start(self, source: str, manifest: Manifest) -> TransferDone | bool:
        key = (source, manifest.transfer_id)
        if key in self._incoming:
            return True  # a repeated manifest (cannot happen over rmsg): nothing new
        for (other, tid), stale in list(self._incoming.items()):
            if tid == manifest.transfer_id:  # the same file, resent from a new sender
                del self._incoming[(other, tid)]  # (socket): its part is taken over below
                if stale.out is not None:
                    stale.out.close()
        part = out = None
        if self.folder is not None:
            part = self.folder / f".{_safe_name(manifest.name)}.{manifest.transfer_id.hex()}.part"
        incoming = _Incoming(manifest, out, part)
        if part is not None:
            if manifest.resume_to is not None and part.exists():
                self._reopen(incoming, part)
            else:
                incoming.out = part.open("wb")
        if manifest.resume_to is not None and self.reply is not None:
            answer = encode_resume(manifest.transfer_id, incoming.next_index)
            try:
                self.reply(source, manifest.resume_to, answer)
            except (errors.ReliableError, OSError):
                self._restart(incoming)  # unanswered: the sender starts from chunk 0
        if self.progress_stream is not None:
            incoming.progress = Progress(
                self.progress_stream, manifest.size, f"recv {manifest.name}"
            )
            incoming.progress.base = incoming.resumed
        self._incoming[key] = incoming
        if manifest.size == 0:
            return self._finish(source, incoming, None)
        return True

    def _reopen(self, incoming: _Incoming, part: Path) -> None:
        """Keep the whole chunks an earlier attempt left in ``part`` (never the last one,
        so the transfer ends the usual way), re-hashed for the final check."""
        manifest = incoming.manifest
        out = part.open("r+b")
        keep = min(part.stat().st_size // manifest.chunk_size, max(manifest.chunks - 1, 0))
        out.truncate(keep * manifest.chunk_size)
        for _ in range(keep):
            incoming.digest.update(out.read(manifest.chunk_size))
        incoming.out = out
        incoming.next_index = keep
        incoming.received = incoming.resumed = keep * manifest.chunk_size

    @staticmethod
    def _restart(incoming: _Incoming) -> None:
        """Forget the kept chunks: the sender sends the whole file."""
        if incoming.out is not None:
            incoming.out.seek(0)
            incoming.out.truncate(0)
        incoming.digest = hashlib.sha256()
        incoming.next_index = incoming.received = incoming.resumed = 0
        if incoming.progress is not None:
            incoming.progress.base = 0

    def _finish(self, source: str, incoming: _Incoming, error: str | None) -> TransferDone:
        manifest = incoming.manifest
        del self._incoming[(source, manifest.transfer_id)]
        if incoming.progress is not None:
            incoming.progress.update(incoming.received, final=True)
        if incoming.out is not None:
            incoming.out.close()
        if error is None and incoming.digest.hexdigest() != manifest.sha256:
            error = "SHA-256 mismatch: the file is not what was sent"
        saved: Path | None = None
        if incoming.part is not None and self.folder is not None:
            if error is None:
                saved = _free_name(self.folder, _safe_name(manifest.name))
                os.replace(incoming.part, saved)
            else:  # kept for a look, never under the real name, never resumed from
                saved = incoming.part.with_suffix(".failed")
                os.replace(incoming.part, saved)
        return TransferDone(source, manifest, saved, error is None, error, incoming.resumed)

    def unfinished(self) -> list[tuple[str, Manifest, int]]:
        """Transfers still open: (source, manifest, bytes received so far)."""
        return [(s, i.manifest, i.received) for (s, _), i in self._incoming.items()]

    def close(self) -> None:
        for incoming in self._incoming.values():
            if incoming.out is not None:
                incoming.out.close()


def _safe_name(name: str) -> str:
    """The sender's file name as a plain name in our folder: no path, no leading dots."""
    base = PurePath(name.replace("\\", "/")).name.lstrip(".")
    return base or "file"


def _free_name(folder: Path, name: str) -> Path:
    target = folder / name
    stem, suffix = os.path.splitext(name)
    n = 1
    while target.exists():
        target = folder / f"{stem}-{n}{suffix}"
        n += 1
    return target
