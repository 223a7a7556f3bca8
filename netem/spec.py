"""Parse ``tc netem`` syntax into an :class:`~netem.models.Impairment`.

Accepted clauses (``tc-netem(8)`` spelling; percentages as ``10%`` or ``10``):

    delay TIME [JITTER [CORRELATION]] [distribution uniform|normal|pareto|paretonormal|FILE]
    loss [random] PERCENT [CORRELATION]       (``latency`` and ``drop`` are tc's synonyms)
    loss state P13 [P31 [P32 [P23 [P14]]]]
    loss gemodel P [R [1-H [1-K]]]
    duplicate PERCENT [CORRELATION] [copies N]
    corrupt PERCENT [CORRELATION] [bits N] [where payload|anywhere]
    reorder PERCENT [CORRELATION] [gap DISTANCE]
    rate RATE [PACKETOVERHEAD [CELLSIZE [CELLOVERHEAD]]]     limit PACKETS     seed N
    slot MIN_DELAY [MAX_DELAY] [packets N] [bytes N]
    slot distribution NAME DELAY JITTER [packets N] [bytes N]
    truncate PERCENT     garbage PERCENT [BYTES]     mtu BYTES     replay PERCENT [TIME]

The last row, ``bits``, ``copies`` and ``where`` are rmsg extensions. Times
need a unit (``20ms``, ``1.5s``, ``250us``) — ``tc`` reads a bare number as
microseconds, a classic trap, so we refuse it. Rates take ``bit``, ``kbit``,
``mbit``, ``gbit`` (powers of 1000), ``kibit``, ``mibit``, ``gibit`` (1024),
or ``bps``, ``kbps``, ``mbps``, ``gbps`` (bytes per second). Errors name the
token at fault and what was expected there. Like ``tc``, a ``gap`` without ``reorder`` and a
``distribution`` without jitter are refused rather than silently ignored.
``ecn`` is refused with the reason: rmsg's carriers see UDP payloads, not the
IP header's ECN field, so there is nothing they could mark.
"""

from __future__ import annotations

import re
from typing import Any

from .models import (
    CORRUPT_WHERE,
    DISTRIBUTIONS,
    FourState,
    GilbertElliott,
    Impairment,
    distribution_table,
)

__all__ = ["SpecError", "format_spec", "parse_spec"]

_NUMBER = re.compile(r"^[0-9]*\.?[0-9]+")
_TIME_UNITS = {
    "s": 1.0,
    "sec": 1.0,
    "secs": 1.0,
    "ms": 1e-3,
    "msec": 1e-3,
    "msecs": 1e-3,
    "us": 1e-6,
    "usec": 1e-6,
    "usecs": 1e-6,
}
_RATE_UNITS = {
    "bit": 1.0,
    "kbit": 1e3,
    "mbit": 1e6,
    "gbit": 1e9,
    "kibit": 1024.0,
    "mibit": 1024.0**2,
    "gibit": 1024.0**3,
    "bps": 8.0,
    "kbps": 8e3,
    "mbps": 8e6,
    "gbps": 8e9,
}
_SIZE_UNITS = {"": 1, "b": 1, "k": 1024, "kb": 1024, "m": 1024**2, "mb": 1024**2}

ECN_REFUSED = (
    "netem spec: 'ecn' is not supported: tc's ecn marks ECN-capable packets CE instead of "
    "dropping them, but rmsg impairs UDP payloads and never sees or writes the IP header's "
    "ECN bits (and datagrams from userspace are not ECN-capable unless the application "
    "sets IP_TOS) — so every loss would still be a drop. Leave 'ecn' out; losses are drops."
)


class SpecError(ValueError):
    """A netem spec string that does not parse; the message names the bad token."""


class _Tokens:
    def __init__(self, text: str) -> None:
        self.items = text.split()
        self.pos = 0

    def more(self) -> bool:
        return self.pos < len(self.items)

    def peek(self) -> str | None:
        return self.items[self.pos] if self.more() else None

    def next_is_number(self) -> bool:
        token = self.peek()
        return token is not None and bool(_NUMBER.match(token))

    def take(self, expected: str) -> str:
        if not self.more():
            last = self.items[-1] if self.items else ""
            raise SpecError(f"netem spec ends after {last!r}: expected {expected}")
        token = self.items[self.pos]
        self.pos += 1
        return token

    def fail(self, token: str, expected: str) -> SpecError:
        return SpecError(f"netem spec: bad token {token!r} (word {self.pos}): expected {expected}")


def _percent(tokens: _Tokens, what: str) -> float:
    token = tokens.take(f"a percentage for {what}, like 10%")
    text = token[:-1] if token.endswith("%") else token
    try:
        value = float(text) / 100
    except ValueError:
        raise tokens.fail(token, f"a percentage for {what}, like 10%") from None
    if not 0 <= value <= 1:
        raise tokens.fail(token, f"a percentage between 0% and 100% for {what}")
    return value


def _time(tokens: _Tokens, what: str) -> float:
    token = tokens.take(f"a time for {what}, like 20ms")
    match = _NUMBER.match(token)
    unit = token[match.end() :].lower() if match else ""
    if not match or unit not in _TIME_UNITS:
        hint = " (tc reads a bare number as microseconds; say which you mean)" if match else ""
        raise tokens.fail(token, f"a time with a unit for {what}, like 20ms or 1.5s{hint}")
    return float(match.group()) * _TIME_UNITS[unit]


def _integer(tokens: _Tokens, what: str, minimum: int = 0) -> int:
    token = tokens.take(f"a whole number for {what}")
    try:
        value = int(token)
    except ValueError:
        raise tokens.fail(token, f"a whole number for {what}") from None
    if value < minimum:
        raise tokens.fail(token, f"a whole number >= {minimum} for {what}")
    return value


def _rate(tokens: _Tokens) -> float:
    token = tokens.take("a rate like 1mbit")
    match = _NUMBER.match(token)
    unit = token[match.end() :].lower() if match else ""
    if not match or (unit and unit not in _RATE_UNITS):
        raise tokens.fail(token, "a rate like 1mbit, 500kbit or 10mbps")
    return float(match.group()) * _RATE_UNITS.get(unit, 1.0)


def parse_spec(text: str) -> Impairment:
    """Parse a ``tc netem``-style string; raises :class:`SpecError` naming the bad token."""
    tokens = _Tokens(text)
    fields: dict[str, Any] = {}
    while tokens.more():
        word = tokens.take("a netem keyword").lower()
        word = {"latency": "delay", "drop": "loss"}.get(word, word)
        if word == "delay":
            fields["delay"] = _time(tokens, "delay")
            if tokens.next_is_number():
                fields["jitter"] = _time(tokens, "jitter")
                if tokens.next_is_number():
                    fields["delay_correlation"] = _percent(tokens, "delay correlation")
        elif word == "distribution":
            name = tokens.take("a distribution name")
            if name not in DISTRIBUTIONS:
                try:
                    distribution_table(name)  # a custom table, as tc reads NAME.dist
                except ValueError as exc:
                    raise tokens.fail(
                        name, f"one of {', '.join(DISTRIBUTIONS)} or a table file ({exc})"
                    ) from None
            fields["distribution"] = name
        elif word == "loss":
            _loss(tokens, fields)
        elif word in ("duplicate", "corrupt", "reorder"):
            # PERCENT [CORRELATION], as tc spells all three
            fields[word] = _percent(tokens, word)
            if tokens.next_is_number():
                fields[f"{word}_correlation"] = _percent(tokens, f"{word} correlation")
        elif word == "copies":
            fields["duplicate_copies"] = _integer(tokens, "copies", 1)
        elif word == "bits":
            fields["corrupt_bits"] = _integer(tokens, "bits", 1)
        elif word == "where":
            where = tokens.take("where the corruption lands: payload or anywhere")
            if where not in CORRUPT_WHERE:
                raise tokens.fail(where, "where the corruption lands: payload or anywhere")
            fields["corrupt_where"] = where
        elif word == "slot":
            _slot(tokens, fields)
        elif word == "ecn":
            raise SpecError(ECN_REFUSED)
        elif word == "gap":
            fields["gap"] = _integer(tokens, "gap", 1)
        elif word == "rate":
            fields["rate"] = _rate(tokens)
            for name in ("packet_overhead", "cell_size", "cell_overhead"):
                token = tokens.peek()
                if token is None or not re.fullmatch(r"-?[0-9]+", token):
                    break
                minimum = 0 if name == "cell_size" else -(2**31)
                fields[name] = _integer(tokens, name.replace("_", " "), minimum)
        elif word == "seed":
            fields["seed"] = _integer(tokens, "seed")
        elif word == "limit":
            fields["limit"] = _integer(tokens, "limit", 1)
        elif word == "truncate":
            fields["truncate"] = _percent(tokens, "truncate")
        elif word == "garbage":
            fields["garbage"] = _percent(tokens, "garbage")
            if tokens.next_is_number():
                fields["garbage_max"] = _integer(tokens, "garbage bytes", 1)
        elif word == "mtu":
            fields["mtu"] = _integer(tokens, "mtu", 1)
        elif word == "replay":
            fields["replay"] = _percent(tokens, "replay")
            if tokens.more() and tokens.next_is_number():
                fields["replay_delay"] = _time(tokens, "replay delay")
        else:
            raise tokens.fail(
                word,
                "a netem keyword: delay, distribution, loss, duplicate, corrupt, reorder, gap, "
                "rate, slot, limit, seed, truncate, garbage, mtu, replay",
            )
    if fields.get("reorder") and not fields.get("delay"):
        raise SpecError("netem spec: reorder needs a delay to reorder against (add 'delay 10ms')")
    if fields.get("gap") and not fields.get("reorder"):
        raise SpecError("netem spec: gap without reorder does nothing (tc refuses it too)")
    if "corrupt_where" in fields and not fields.get("corrupt"):
        raise SpecError("netem spec: 'where' says where corrupt lands; give corrupt P first")
    if "distribution" in fields and not fields.get("jitter"):
        raise SpecError(
            "netem spec: a distribution shapes the jitter; give one (delay 100ms 10ms "
            "distribution normal), as tc requires"
        )
    try:
        return Impairment(**fields)
    except ValueError as exc:
        raise SpecError(f"netem spec: {exc}") from None


def _size(tokens: _Tokens, what: str) -> int:
    token = tokens.take(f"a size in bytes for {what}, like 1500 or 64kb")
    match = re.fullmatch(r"([0-9]+)([a-z]*)", token.lower())
    if not match or match.group(2) not in _SIZE_UNITS:
        raise tokens.fail(token, f"a size in bytes for {what}, like 1500 or 64kb")
    return int(match.group(1)) * _SIZE_UNITS[match.group(2)]


def _slot(tokens: _Tokens, fields: dict[str, Any]) -> None:
    """``slot MIN [MAX]`` or ``slot distribution NAME DELAY JITTER``, then
    ``[packets N] [bytes N]`` — iproute2's grammar."""
    if tokens.next_is_number():
        fields["slot_min"] = _time(tokens, "slot min delay")
        if tokens.next_is_number():
            fields["slot_max"] = _time(tokens, "slot max delay")
            if fields["slot_max"] < fields["slot_min"]:
                raise SpecError(
                    "netem spec: slot max delay is below its min delay (tc refuses it too)"
                )
        if not fields["slot_min"] and not fields.get("slot_max"):
            raise SpecError("netem spec: a slot of 0 does nothing (tc ignores it); give a gap")
    else:
        word = tokens.take("a slot gap like 10ms, or 'distribution'")
        if word != "distribution":
            raise tokens.fail(word, "a slot gap like 10ms, or 'distribution NAME DELAY JITTER'")
        name = tokens.take("a slot distribution name")
        if name not in DISTRIBUTIONS:
            try:
                distribution_table(name)
            except ValueError as exc:
                raise tokens.fail(
                    name, f"one of {', '.join(DISTRIBUTIONS)} or a table file ({exc})"
                ) from None
        fields["slot_distribution"] = name
        fields["slot_delay"] = _time(tokens, "slot delay")
        fields["slot_jitter"] = _time(tokens, "slot jitter")
        if not fields["slot_jitter"]:
            raise SpecError("netem spec: a slot distribution needs a jitter > 0, as tc requires")
    if tokens.peek() == "packets":
        tokens.take("packets")
        fields["slot_packets"] = _integer(tokens, "slot packets", 1)
    if tokens.peek() == "bytes":
        tokens.take("bytes")
        fields["slot_bytes"] = _size(tokens, "slot bytes")
        if not fields["slot_bytes"]:
            raise SpecError("netem spec: slot bytes must be at least 1")


def _loss(tokens: _Tokens, fields: dict[str, Any]) -> None:
    kind = tokens.peek()
    if kind == "random":
        tokens.take("random")
        kind = tokens.peek()
    if kind == "state":
        tokens.take("state")
        values = [_percent(tokens, "loss state p13")]
        for name in ("p31", "p32", "p23", "p14"):
            if not tokens.next_is_number():
                break
            values.append(_percent(tokens, f"loss state {name}"))
        state_names = ("p13", "p31", "p32", "p23", "p14")
        fields["loss_model"] = FourState(**dict(zip(state_names, values, strict=False)))
    elif kind == "gemodel":
        tokens.take("gemodel")
        values = [_percent(tokens, "loss gemodel p")]
        for name in ("r", "1-h", "1-k"):
            if not tokens.next_is_number():
                break
            values.append(_percent(tokens, f"loss gemodel {name}"))
        ge_names = ("p", "r", "one_minus_h", "one_minus_k")
        fields["loss_model"] = GilbertElliott(**dict(zip(ge_names, values, strict=False)))
    else:
        fields["loss"] = _percent(tokens, "loss")
        if tokens.next_is_number():
            fields["loss_correlation"] = _percent(tokens, "loss correlation")


def _pct(value: float) -> str:
    return f"{value * 100:g}%"


def _ms(value: float) -> str:
    return f"{value * 1000:g}ms"


def format_spec(imp: Impairment) -> str:
    """The ``tc netem``-style spelling of ``imp`` (``parse_spec`` reads it back; "" if clean)."""
    parts: list[str] = []
    if imp.delay or imp.jitter:
        parts += ["delay", _ms(imp.delay)]
        if imp.jitter:
            parts.append(_ms(imp.jitter))
            if imp.delay_correlation:
                parts.append(_pct(imp.delay_correlation))
        if imp.distribution != "uniform":
            parts += ["distribution", imp.distribution]
    model = imp.loss_model
    if isinstance(model, FourState):
        parts += ["loss", "state"] + [
            _pct(v) for v in (model.p13, model.p31 or 0.0, model.p32, model.p23, model.p14)
        ]
    elif isinstance(model, GilbertElliott):
        parts += ["loss", "gemodel"] + [
            _pct(v) for v in (model.p, model.r or 0.0, model.one_minus_h, model.one_minus_k)
        ]
    elif imp.loss:
        parts += ["loss", _pct(imp.loss)]
        if imp.loss_correlation:
            parts.append(_pct(imp.loss_correlation))
    for name in ("duplicate", "corrupt", "reorder"):
        value = getattr(imp, name)
        if value:
            parts += [name, _pct(value)]
            corr = getattr(imp, f"{name}_correlation")
            if corr:
                parts.append(_pct(corr))
    if imp.duplicate_copies != 1:
        parts += ["copies", str(imp.duplicate_copies)]
    if imp.corrupt_bits != 1:
        parts += ["bits", str(imp.corrupt_bits)]
    if imp.corrupt and imp.corrupt_where != "payload":
        parts += ["where", imp.corrupt_where]
    if imp.gap:
        parts += ["gap", str(imp.gap)]
    if imp.rate:
        parts += ["rate", f"{imp.rate:.15g}bit"]
        cells = [imp.packet_overhead, imp.cell_size, imp.cell_overhead]
        while cells and not cells[-1]:
            cells.pop()
        parts += [str(v) for v in cells]
    if imp.slotted:
        if imp.slot_distribution is None:
            parts += ["slot", _ms(imp.slot_min)]
            if imp.slot_max and imp.slot_max != imp.slot_min:
                parts.append(_ms(imp.slot_max))
        else:
            parts += ["slot", "distribution", imp.slot_distribution]
            parts += [_ms(imp.slot_delay), _ms(imp.slot_jitter)]
        if imp.slot_packets:
            parts += ["packets", str(imp.slot_packets)]
        if imp.slot_bytes:
            parts += ["bytes", str(imp.slot_bytes)]
    if imp.seed is not None:
        parts += ["seed", str(imp.seed)]
    if imp.limit != 1000:
        parts += ["limit", str(imp.limit)]
    if imp.truncate:
        parts += ["truncate", _pct(imp.truncate)]
    if imp.garbage:
        parts += ["garbage", _pct(imp.garbage), str(imp.garbage_max)]
    if imp.mtu:
        parts += ["mtu", str(imp.mtu)]
    if imp.replay:
        parts += ["replay", _pct(imp.replay), _ms(imp.replay_delay)]
    return " ".join(parts)
