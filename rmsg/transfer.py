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
                                   "chunks": N}
    chunk:     b"RMSGCHNK" + id (8 bytes) + index (4 bytes, big-endian, from 0) + data

A chunk counts only after a manifest with its id from the same source. The
sender keeps a few chunks in flight (``WINDOW``), and its time limit scales
with the size unless given (:func:`default_timeout`). On a terminal both
sides draw a progress line (bytes, rate, retransmissions, ETA); piped, they
stay quiet.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import IO, Any, BinaryIO

from reliable import Node, Receipt, SendHandle, errors

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
_CHUNK_HEADER = len(CHUNK_MAGIC) + 8 + 4
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

    def encode(self) -> bytes:
        body = {
            "rmsg_file": 1,
            "id": self.transfer_id.hex(),
            "name": self.name,
            "size": self.size,
            "sha256": self.sha256,
            "chunk_size": self.chunk_size,
            "chunks": self.chunks,
        }
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
            )
        except (ValueError, KeyError, TypeError):
            return None
        if body.get("rmsg_file") != 1 or len(manifest.transfer_id) != 8 or manifest.size < 0:
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
        return cls(
            transfer_id=secrets.token_bytes(8),
            name=path.name,
            size=size,
            sha256=digest.hexdigest(),
            chunk_size=chunk_size,
            chunks=-(-size // chunk_size),
        )


def encode_chunk(transfer_id: bytes, index: int, data: bytes) -> bytes:
    return CHUNK_MAGIC + transfer_id + index.to_bytes(4, "big") + data


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

    def line(self, done: int, retransmissions: int) -> str:
        elapsed = max(self._clock() - self._start, 1e-9)
        rate = done / elapsed
        share = done / self.total if self.total else 1.0
        eta = (self.total - done) / rate if rate > 0 else None
        bar = "#" * int(share * 20)
        return (
            f"{self.label} [{bar:<20}] {share:4.0%} {_mib(done)}/{_mib(self.total)} "
            f"{rate / (1024 * 1024):.2f} MiB/s, {retransmissions} retransmitted, "
            f"ETA {'-' if eta is None else f'{eta:.0f}s'}"
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
    receipts: int  #: messages acknowledged: the manifest and every chunk

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
) -> SendOutcome:
    """Send the file at ``path`` to ``dest`` as a transfer; returns once every chunk is in
    the peer's mailbox. ``timeout`` (seconds) bounds the whole transfer; ``None``
    scales it with the size (:func:`default_timeout`). Raises the first
    ``DeliveryFailed`` (the transfer stops there; the receiver discards the part)."""
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

    in_flight.append((submit(manifest.encode()), 0))
    with path.open("rb") as f:
        for index in range(manifest.chunks):
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
    )


# -------------------------------------------------------------------- receive


@dataclass(frozen=True, slots=True)
class TransferDone:
    """A transfer that ended: saved and verified, or failed (``error`` says why)."""

    source: str
    manifest: Manifest
    saved_as: Path | None
    verified: bool
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "file": self.manifest.name,
            "size": self.manifest.size,
            "sha256": self.manifest.sha256,
            "verified": self.verified,
            "saved_as": None if self.saved_as is None else str(self.saved_as),
            "error": self.error,
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


class FileReceiver:
    """Reassembles the transfers among received messages.

    With ``folder``, each file goes to ``folder/.NAME.part`` while it arrives
    and is renamed to ``folder/NAME`` (never over an existing file: ``NAME-1``,
    ...) once its size and SHA-256 match the manifest; a failed one stays as
    the ``.part``. Without ``folder``, chunk data goes to ``sink`` as it comes
    (a pipe), and the check comes at the end.
    """

    def __init__(
        self,
        folder: Path | None,
        sink: BinaryIO | None = None,
        progress_stream: IO[str] | None = None,
    ) -> None:
        self.folder = folder
        self.sink = sink
        self.progress_stream = progress_stream
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
        part = out = None
        if self.folder is not None:
            part = self.folder / f".{_safe_name(manifest.name)}.{manifest.transfer_id.hex()}.part"
            out = part.open("wb")
        progress = None
        if self.progress_stream is not None:
            progress = Progress(self.progress_stream, manifest.size, f"recv {manifest.name}")
        incoming = _Incoming(manifest, out, part, progress=progress)
        self._incoming[key] = incoming
        if manifest.size == 0:
            return self._finish(source, incoming, None)
        return True

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
            else:
                saved = incoming.part  # kept, for a look: never under the real name
        return TransferDone(source, manifest, saved, error is None, error)

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
