"""Marshalling: how arguments and results become bytes and back.

A codec turns a value into bytes that any platform can read back: JSON (the
default, standard library only) or MessagePack (``pip install rmsg[msgpack]``).
Both carry ``None``, booleans, integers, finite floats, strings, bytes, lists
(tuples arrive as lists) and dicts with string keys. JSON has no bytes, so
the JSON codec writes ``b"..."`` as ``{"$b": "<base64>"}`` (and a dict of
yours whose only key is ``"$b"`` or ``"$d"`` as ``{"$d": {...}}``, so nothing
is ever mistaken for bytes).

A value a codec cannot carry raises :class:`~reliable.rpc.MarshalError` (a
``UsageError``) naming the argument and the offending part, before anything
is sent. Decoding remote bytes never raises anything but ``ValueError``.
"""

from __future__ import annotations

import base64
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from ..errors import UsageError
from .status import MarshalError

__all__ = ["Codec", "JsonCodec", "MsgpackCodec", "available_codecs", "get_codec", "marshal_call"]


class Codec(Protocol):
    """What a codec provides: a ``name`` (sent with every call) and two functions."""

    name: str

    def encode(self, value: Any) -> bytes:
        """``value`` as bytes; raises :class:`MarshalError` naming what it cannot carry."""
        ...

    def decode(self, data: bytes) -> Any:
        """The value back; raises ``ValueError`` for bytes it cannot read."""
        ...


def _where(path: str) -> str:
    return f" at {path}" if path else ""


def _to_json(value: Any, path: str) -> Any:
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise MarshalError(
                f"{value!r}{_where(path)} is not a finite number; JSON cannot carry it"
            )
        return value
    if isinstance(value, (bytes, bytearray, memoryview)):
        return {"$b": base64.b64encode(bytes(value)).decode("ascii")}
    if isinstance(value, (list, tuple)):
        return [_to_json(item, f"{path}[{i}]") for i, item in enumerate(value)]
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise MarshalError(f"dict key {key!r}{_where(path)} is not a string")
            out[key] = _to_json(item, f"{path}[{key!r}]")
        if len(out) == 1 and next(iter(out)) in ("$b", "$d"):
            return {"$d": out}
        return out
    raise MarshalError(
        f"{type(value).__name__!r} value{_where(path)} cannot be marshalled "
        "(use None, bool, int, float, str, bytes, list, tuple or dict)"
    )


def _from_json(value: Any) -> Any:
    if isinstance(value, list):
        return [_from_json(item) for item in value]
    if isinstance(value, dict):
        if len(value) == 1:
            if "$b" in value:
                text = value["$b"]
                if not isinstance(text, str):
                    raise ValueError("malformed bytes in JSON")
                return base64.b64decode(text, validate=True)
            if "$d" in value:
                inner = value["$d"]
                if not isinstance(inner, dict):
                    raise ValueError("malformed escaped dict in JSON")
                return {k: _from_json(v) for k, v in inner.items()}
        return {k: _from_json(v) for k, v in value.items()}
    return value


# One encoder and one decoder for every call (json.dumps with options builds a new one
# each time).
_json_encode = json.JSONEncoder(separators=(",", ":"), allow_nan=False).encode
_json_decode = json.JSONDecoder().decode


_NO_ARGUMENTS = b"[[],{}]"  # a call without arguments, in JSON


class JsonCodec:
    """JSON (UTF-8), with bytes as ``{"$b": base64}``; the default codec."""

    name = "json"

    def encode(self, value: Any) -> bytes:
        if value is None:
            return b"null"  # the result of most procedures
        return _json_encode(_to_json(value, "")).encode()

    def decode(self, data: bytes) -> Any:
        if data == b"null":
            return None
        if data == _NO_ARGUMENTS:
            return [[], {}]  # a fresh list each time: the caller may keep it
        try:
            return _from_json(_json_decode(bytes(data).decode()))
        except (UnicodeDecodeError, RecursionError, TypeError) as exc:
            raise ValueError(f"undecodable JSON: {exc}") from None


class MsgpackCodec:
    """MessagePack, through the ``msgpack`` package (``pip install rmsg[msgpack]``)."""

    name = "msgpack"

    def __init__(self) -> None:
        try:
            import msgpack  # type: ignore[import-not-found, import-untyped, unused-ignore]
        except ImportError:
            raise UsageError(
                "the msgpack codec needs the msgpack package: pip install 'rmsg[msgpack]'"
            ) from None
        self._msgpack: Any = msgpack

    def encode(self, value: Any) -> bytes:
        _check_msgpack(value, "")
        data: bytes = self._msgpack.packb(value, use_bin_type=True)
        return data

    def decode(self, data: bytes) -> Any:
        try:
            return self._msgpack.unpackb(data, raw=False)
        except Exception as exc:  # msgpack raises several types for garbage
            raise ValueError(f"undecodable msgpack: {exc}") from None


def _check_msgpack(value: Any, path: str) -> None:
    """Refuse what msgpack would refuse or silently change, naming where it is."""
    if value is None or isinstance(value, (bool, str, float, bytes, bytearray, memoryview)):
        return
    if isinstance(value, int):
        if not -(2**63) <= value < 2**64:
            raise MarshalError(f"integer{_where(path)} does not fit in 64 bits (msgpack)")
        return
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_msgpack(item, f"{path}[{i}]")
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise MarshalError(f"dict key {key!r}{_where(path)} is not a string")
            _check_msgpack(item, f"{path}[{key!r}]")
        return
    raise MarshalError(
        f"{type(value).__name__!r} value{_where(path)} cannot be marshalled "
        "(use None, bool, int, float, str, bytes, list, tuple or dict)"
    )


_CODECS: dict[str, Codec] = {"json": JsonCodec()}


def available_codecs() -> list[str]:
    """Names of the codecs this process can use (``msgpack`` when installed)."""
    names = ["json"]
    try:
        get_codec("msgpack")
        names.append("msgpack")
    except UsageError:
        pass
    return names


def get_codec(codec: str | Codec) -> Codec:
    """The codec called ``codec`` (or ``codec`` itself when given an object)."""
    if not isinstance(codec, str):
        return codec
    found = _CODECS.get(codec)
    if found is None:
        if codec == "msgpack":
            found = _CODECS["msgpack"] = MsgpackCodec()
        else:
            raise UsageError(f"unknown codec {codec!r}; use 'json' or 'msgpack'")
    return found


def marshal_call(
    codec: Codec,
    method: str,
    args: Sequence[Any],
    kwargs: Mapping[str, Any],
    names: Sequence[str] = (),
) -> bytes:
    """Encode a call's arguments as ``[args, kwargs]``.

    On failure, raises :class:`MarshalError` naming the argument (by parameter
    name when ``names`` gives them, else by position) and what in it failed.
    """
    if not args and not kwargs and isinstance(codec, JsonCodec):
        return _NO_ARGUMENTS
    try:
        return codec.encode([list(args), dict(kwargs)])
    except (MarshalError, TypeError, ValueError, OverflowError):  # a codec's own error too
        pass
    for i, arg in enumerate(args):
        label = f"argument {names[i]!r}" if i < len(names) else f"positional argument {i}"
        _probe(codec, method, label, arg)
    for key, arg in kwargs.items():
        _probe(codec, method, f"argument {key!r}", arg)
    raise MarshalError(f"{method}(): the arguments cannot be marshalled by {codec.name}")


def _probe(codec: Codec, method: str, label: str, value: Any) -> None:
    try:
        codec.encode(value)
    except (MarshalError, TypeError, ValueError, OverflowError) as exc:
        raise MarshalError(f"{method}(): {label} cannot be sent with {codec.name}: {exc}") from None
