"""Security modes: how a packet body becomes a datagram, and back.

Three modes, chosen per node (both ends must agree):

* **integrity** (the default): a CRC-32 trailer. Catches corruption, not
  forgery: anyone who can send to the node can inject messages.
* **authenticated**: a pre-shared key; every datagram carries a 64-bit packet
  number and a 16-byte keyed BLAKE2b tag over all of it (standard library
  only). Forged or altered datagrams are dropped before any state is touched,
  and the packet number feeds a per-peer replay window.
* **encrypted**: the same, with ChaCha20-Poly1305 (from the optional
  ``cryptography`` package, ``pip install 'rmsg[crypto]'``): the header and
  packet number are authenticated in clear, everything after them is
  encrypted.

Sealed layout::

    header (32, flags carry AUTHENTICATED or ENCRYPTED) | packet number (8)
    | body (clear, or ciphertext) | tag (16) | CRC-32 (4)

The CRC is there so that a node can tell corruption (CRC fails: counted,
dropped, like any corrupt datagram) from a security failure (CRC fine, tag
wrong: the keys differ, or a forgery). Only the second is answered with
AUTH_FAILED — random bit errors never make a peer report "wrong key".

Keys: each datagram is sealed under a subkey derived from the pre-shared key
and the sender's 64-bit incarnation (keyed BLAKE2b with a per-mode
personalisation), and the AEAD nonce is the packet number, which counts up
from 0 in each incarnation. A nonce therefore never repeats under one key as
long as incarnations do not repeat — which is why an encrypted node draws
its incarnation from the operating system's CSPRNG (``secrets``), even when
a seeded generator drives everything else.

Pre-shared keys come from the API (bytes), the ``RMSG_KEY`` environment
variable (hex) or a key file (hex, written by :func:`write_keyfile` or
``rmsg keygen`` with mode 0600); never from a command-line argument, which
``ps`` shows to every user. A key file that others could read is refused.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import stat
import struct
from collections import OrderedDict
from pathlib import Path
from typing import Any, Protocol

from .errors import UsageError
from .wire import MODE_FLAGS, Flag, MalformedPacket, check_crc, with_crc

__all__ = [
    "ENV_KEY",
    "MODES",
    "Authenticated",
    "ReplayWindow",
    "Encrypted",
    "Integrity",
    "Security",
    "SecurityError",
    "generate_key",
    "key_from_env",
    "make_security",
    "read_keyfile",
    "write_keyfile",
]

#: Environment variable a node reads its pre-shared key from (hex).
ENV_KEY = "RMSG_KEY"
MODES = ("integrity", "authenticated", "encrypted")
MIN_KEY_BYTES = 16
KEY_BYTES = 32

_HEADER = 32
_PN = struct.Struct("!Q")
_TAG = 16
_CRC = struct.Struct("!I")
_FLAGS = struct.Struct("!H")
_FLAGS_AT = 4
_INCARNATION_AT = 8  # the sender's incarnation: header bytes [8, 16)
_SUBKEYS = 1024  # derived subkeys cached (one per peer incarnation seen)


class SecurityError(ValueError):
    """A datagram failed the node's security check. ``reason`` is a counter key;
    ``refusal`` is what an AUTH_FAILED reply would say (0: send none)."""

    def __init__(self, reason: str, refusal: int = 0) -> None:
        super().__init__(reason)
        self.reason = reason
        self.refusal = refusal


#: AUTH_FAILED refusal codes.
BAD_TAG = 1  #: the tag did not verify: the keys differ (or the datagram was forged)
UNSEALED = 2  #: this node requires a security mode the datagram lacks
WRONG_MODE = 3  #: the datagram is sealed in a mode this node does not use

REFUSAL_TEXT = {
    BAD_TAG: "it rejects our datagrams' tags: our keys differ",
    UNSEALED: "it requires authenticated or encrypted datagrams; give this node its key",
    WRONG_MODE: "it uses a different security mode; configure both ends alike",
}


class Security(Protocol):
    """Seals packet bodies into datagrams and opens them again."""

    mode: str
    #: The incarnation must come from a CSPRNG (nonce uniqueness depends on it).
    needs_unique_incarnation: bool

    def seal(self, body: bytes, incarnation: int, packet_number: int) -> bytes: ...

    def open(self, data: bytes) -> tuple[int | None, bytes | memoryview]:
        """``(packet number or None, body)``; raises :class:`SecurityError` or
        :class:`~reliable.wire.MalformedPacket`."""
        ...


class Integrity:
    """CRC-32 only: corruption is caught, forgery is not."""

    mode = "integrity"
    needs_unique_incarnation = False

    def seal(self, body: bytes, incarnation: int, packet_number: int) -> bytes:
        return with_crc(body)

    def open(self, data: bytes) -> tuple[int | None, bytes | memoryview]:
        end = check_crc(data)
        # the flags, read as two bytes rather than unpacked (intact, so it means it)
        if ((data[_FLAGS_AT] << 8) | data[_FLAGS_AT + 1]) & MODE_FLAGS:
            raise SecurityError("security.sealed", WRONG_MODE)
        return None, memoryview(data)[:end]  # a view: a 64 KiB datagram is not copied


class _Sealed:
    """What the two keyed modes share: layout, mode flag, subkeys."""

    mode: str
    flag: int
    needs_unique_incarnation = False
    _person: bytes

    def __init__(self, key: bytes) -> None:
        self._key = check_key(key)
        self._subkeys: OrderedDict[bytes, Any] = OrderedDict()

    def __repr__(self) -> str:  # never show the key
        return f"<{type(self).__name__} security>"

    def _subkey(self, incarnation: bytes) -> Any:
        cached = self._subkeys.get(incarnation)
        if cached is None:
            raw = hashlib.blake2b(
                incarnation, key=self._key, person=self._person, digest_size=32
            ).digest()
            cached = self._subkeys[incarnation] = self._prepare(raw)
            if len(self._subkeys) > _SUBKEYS:
                self._subkeys.popitem(last=False)
        else:
            self._subkeys.move_to_end(incarnation)
        return cached

    def _prepare(self, raw: bytes) -> Any:
        return raw

    def _head(self, body: bytes, packet_number: int) -> bytes:
        (flags,) = _FLAGS.unpack_from(body, _FLAGS_AT)
        return (
            body[:_FLAGS_AT]
            + _FLAGS.pack(flags | self.flag)
            + body[_FLAGS_AT + 2 : _HEADER]
            + _PN.pack(packet_number)
        )

    def _split(self, data: bytes) -> tuple[bytes, int, bytes]:
        """Check preamble, CRC and mode; returns (sealed head, packet number, incarnation)."""
        check_crc(data)  # both layouts end in a CRC
        (flags,) = _FLAGS.unpack_from(data, _FLAGS_AT)
        mode = flags & MODE_FLAGS
        if mode == 0:
            raise SecurityError("security.unsealed", UNSEALED)
        if mode != self.flag:
            raise SecurityError("security.wrong_mode", WRONG_MODE)
        if len(data) < _HEADER + _PN.size + _TAG + _CRC.size:
            raise MalformedPacket("short", f"{len(data)} bytes")
        (pn,) = _PN.unpack_from(data, _HEADER)
        # (bounds, not a slice object: mypyc compiles bytes[slice_object] as an int index)
        return data[: _HEADER + _PN.size], pn, data[_INCARNATION_AT : _INCARNATION_AT + 8]


class Authenticated(_Sealed):
    """A keyed BLAKE2b-128 tag on every datagram (integrity and authenticity, no secrecy)."""

    mode = "authenticated"
    flag = int(Flag.AUTHENTICATED)
    _person = b"rmsg1-mac"

    def seal(self, body: bytes, incarnation: int, packet_number: int) -> bytes:
        sealed = self._head(body, packet_number) + body[_HEADER:]
        subkey = self._subkey(incarnation.to_bytes(8, "big"))
        return with_crc(sealed + hashlib.blake2b(sealed, key=subkey, digest_size=_TAG).digest())

    def open(self, data: bytes) -> tuple[int | None, bytes | memoryview]:
        _, pn, incarnation = self._split(data)
        end = len(data) - _CRC.size - _TAG
        expected = hashlib.blake2b(
            memoryview(data)[:end], key=self._subkey(incarnation), digest_size=_TAG
        ).digest()
        if not hmac.compare_digest(expected, data[end : end + _TAG]):
            raise SecurityError("security.bad_tag", BAD_TAG)
        return pn, data[:_HEADER] + data[_HEADER + _PN.size : end]


class Encrypted(_Sealed):
    """ChaCha20-Poly1305 over everything after the header and packet number."""

    mode = "encrypted"
    flag = int(Flag.ENCRYPTED)
    needs_unique_incarnation = True
    _person = b"rmsg1-aead"

    def __init__(self, key: bytes) -> None:
        try:
            from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
        except ImportError:  # pragma: no cover - depends on the installation
            raise UsageError(
                "encrypted mode needs the 'cryptography' package: pip install 'rmsg[crypto]'"
            ) from None
        self._aead_type = ChaCha20Poly1305
        super().__init__(key)

    def _prepare(self, raw: bytes) -> Any:
        return self._aead_type(raw)

    def seal(self, body: bytes, incarnation: int, packet_number: int) -> bytes:
        head = self._head(body, packet_number)
        aead = self._subkey(incarnation.to_bytes(8, "big"))
        return with_crc(head + aead.encrypt(_nonce(packet_number), body[_HEADER:], head))

    def open(self, data: bytes) -> tuple[int | None, bytes | memoryview]:
        from cryptography.exceptions import InvalidTag

        head, pn, incarnation = self._split(data)
        sealed = data[len(head) : len(data) - _CRC.size]
        try:
            clear = self._subkey(incarnation).decrypt(_nonce(pn), sealed, head)
        except InvalidTag:
            raise SecurityError("security.bad_tag", BAD_TAG) from None
        return pn, data[:_HEADER] + clear


def _nonce(packet_number: int) -> bytes:
    return b"\0\0\0\0" + _PN.pack(packet_number)


# ------------------------------------------------------------------------ keys


def check_key(key: bytes) -> bytes:
    if not isinstance(key, (bytes, bytearray)):
        raise UsageError("a key is bytes (see generate_key, read_keyfile, key_from_env)")
    if len(key) < MIN_KEY_BYTES or len(key) > 64:
        raise UsageError(f"a key is {MIN_KEY_BYTES}-64 bytes, got {len(key)}")
    return bytes(key)


def generate_key() -> bytes:
    """A fresh random 32-byte key."""
    return secrets.token_bytes(KEY_BYTES)


def _parse_hex(text: str, where: str) -> bytes:
    try:
        key = bytes.fromhex(text.strip())
    except ValueError:
        raise UsageError(f"{where} holds no hex key (write one with 'rmsg keygen')") from None
    try:
        return check_key(key)
    except UsageError as exc:
        raise UsageError(f"{where}: {exc}") from None


def write_keyfile(path: str | os.PathLike[str], key: bytes | None = None) -> bytes:
    """Write ``key`` (default: a new one) to a new file readable by its owner only."""
    key = check_key(key) if key is not None else generate_key()
    target = Path(path)
    try:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise UsageError(f"{target} exists; remove it first or choose another path") from None
    with os.fdopen(fd, "w") as out:
        out.write(key.hex() + "\n")
    return key


def read_keyfile(path: str | os.PathLike[str]) -> bytes:
    """The key in ``path``; refuses a file that its group or others may read or write."""
    target = Path(path)
    try:
        info = target.stat()
        text = target.read_text()
    except OSError as exc:
        raise UsageError(f"cannot read key file {target}: {exc.strerror}") from None
    if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise UsageError(
            f"key file {target} is accessible to other users (mode "
            f"{stat.S_IMODE(info.st_mode):o}); restrict it with: chmod 600 {target}"
        )
    return _parse_hex(text, f"key file {target}")


def key_from_env(environ: dict[str, str] | None = None) -> bytes | None:
    """The key in ``$RMSG_KEY`` (hex), or None if it is not set."""
    text = (os.environ if environ is None else environ).get(ENV_KEY)
    return None if text is None else _parse_hex(text, f"${ENV_KEY}")


def make_security(
    mode: str = "integrity",
    *,
    key: bytes | None = None,
    keyfile: str | os.PathLike[str] | None = None,
    environ: dict[str, str] | None = None,
) -> Security:
    """The :class:`Security` for ``mode``, its key from ``key``, ``keyfile`` or ``$RMSG_KEY``."""
    if mode not in MODES:
        raise UsageError(f"security mode must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "integrity":
        if key is not None or keyfile is not None:
            raise UsageError("a key needs --security authenticated or encrypted")
        return Integrity()
    if key is not None and keyfile is not None:
        raise UsageError("give a key or a key file, not both")
    if keyfile is not None:
        key = read_keyfile(keyfile)
    elif key is None:
        key = key_from_env(environ)
    if key is None:
        raise UsageError(
            f"{mode} mode needs a key: a key file (rmsg keygen FILE) or ${ENV_KEY} in hex"
        )
    return Authenticated(key) if mode == "authenticated" else Encrypted(key)


class ReplayWindow:
    """Which packet numbers of one peer incarnation were already accepted.

    The highest number seen and a bitmap of the ``size`` below it (as IPsec
    and DTLS do): a number seen before, or older than the window, is a
    replay — harmless to refuse, since a retransmission always gets a new
    packet number.
    """

    __slots__ = ("_bits", "highest", "size")

    def __init__(self, size: int = 1024) -> None:
        self.size = size
        self.highest = -1
        self._bits = 0  # bit i: highest - i was seen

    def accept(self, pn: int) -> bool:
        """Record ``pn``; False if it is a replay (or too old to tell)."""
        if pn > self.highest:
            shift = pn - self.highest
            self._bits = ((self._bits << shift) | 1) & ((1 << self.size) - 1)
            self.highest = pn
            return True
        offset = self.highest - pn
        if offset >= self.size or self._bits >> offset & 1:
            return False
        self._bits |= 1 << offset
        return True
