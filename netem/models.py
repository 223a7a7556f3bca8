"""Pure, seeded fault models for one direction of a datagram link.

A :class:`FaultModel` turns one datagram sent at ``now`` into zero or more
``(release_time, datagram)`` pairs. It never sleeps or touches a socket: the
carriers (socket wrapper, proxy, simulated network) decide what "release"
means. With the same seed and the same input sequence it makes the same
decisions, corruption positions included, because every random draw comes
from its own ``random.Random`` in a fixed order.

Per-packet decision order follows Linux ``sch_netem``: duplication is decided
first (the copies share the original's fate), then loss, then corruption (of
one copy), then delay and reordering.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["FaultCounters", "FaultModel", "Impairment"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Impairment:
    """What a link does to datagrams. Probabilities in [0, 1], times in seconds."""

    loss: float = 0.0
    """Probability a datagram is dropped."""

    loss_correlation: float = 0.0
    """Weight of the previous loss decision in the next (netem's correlation): bursts."""

    duplicate: float = 0.0
    """Probability a datagram is sent ``duplicate_copies`` extra times."""

    duplicate_copies: int = 1

    corrupt: float = 0.0
    """Probability one copy has ``corrupt_bits`` random bits flipped."""

    corrupt_bits: int = 1

    delay: float = 0.0
    """Constant one-way delay."""

    jitter: float = 0.0
    """Uniform jitter added to ``delay`` (+/-); jitter larger than gaps reorders."""

    reorder: float = 0.0
    """netem-style reordering: this fraction skips ``delay`` and overtakes the rest."""

    corrupt_fn: Callable[[bytes, random.Random], bytes] | None = None
    """Optional targeted corruption applied instead of bit flips."""

    def __post_init__(self) -> None:
        for name in ("loss", "loss_correlation", "duplicate", "corrupt", "reorder"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be a probability between 0 and 1, got {value}")
        for name in ("delay", "jitter"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number of seconds >= 0, got {value}")
        if self.duplicate_copies < 1 or self.corrupt_bits < 1:
            raise ValueError("duplicate_copies and corrupt_bits must be at least 1")

    @property
    def is_clean(self) -> bool:
        return (
            self.loss == self.duplicate == self.corrupt == self.reorder == 0.0
            and self.delay == self.jitter == 0.0
        )


@dataclass(slots=True)
class FaultCounters:
    """What a model did, for tests to assert on."""

    seen: int = 0
    dropped: int = 0
    duplicated: int = 0
    corrupted: int = 0
    reordered: int = 0
    delivered: int = 0
    delays: list[float] = field(default_factory=list)


class FaultModel:
    """Applies an :class:`Impairment` to a stream of datagrams, deterministically."""

    def __init__(self, impairment: Impairment, *, seed: int | None = 0) -> None:
        self.impairment = impairment
        self.rng = random.Random(seed)
        self.counters = FaultCounters()
        self._last_loss_draw = 0.0

    def apply(self, data: bytes, now: float) -> list[tuple[float, bytes]]:
        """Fate of one datagram sent at ``now``: ``(release_time, bytes)`` pairs."""
        imp = self.impairment
        c = self.counters
        c.seen += 1
        rng = self.rng
        copies = 1
        if imp.duplicate and rng.random() < imp.duplicate:
            copies += imp.duplicate_copies
            c.duplicated += imp.duplicate_copies
        if imp.loss and self._lost(rng):
            c.dropped += 1
            return []
        out: list[tuple[float, bytes]] = []
        for i in range(copies):
            datagram = data
            if i == 0 and imp.corrupt and rng.random() < imp.corrupt:
                datagram = self._corrupt(data, rng)
                c.corrupted += 1
            delay = imp.delay
            if imp.jitter:
                delay = max(0.0, delay + rng.uniform(-imp.jitter, imp.jitter))
            if imp.reorder and imp.delay and rng.random() < imp.reorder:
                delay = 0.0
                c.reordered += 1
            c.delays.append(delay)
            c.delivered += 1
            out.append((now + delay, datagram))
        return out

    def _lost(self, rng: random.Random) -> bool:
        imp = self.impairment
        draw = rng.random()
        if imp.loss_correlation:
            # netem's correlated uniform: blend the fresh draw with the previous one
            draw = draw * (1 - imp.loss_correlation) + self._last_loss_draw * imp.loss_correlation
            self._last_loss_draw = draw
        return draw < imp.loss

    def _corrupt(self, data: bytes, rng: random.Random) -> bytes:
        imp = self.impairment
        if imp.corrupt_fn is not None:
            return imp.corrupt_fn(data, rng)
        if not data:
            return data
        buf = bytearray(data)
        for _ in range(imp.corrupt_bits):
            bit = rng.randrange(len(buf) * 8)
            buf[bit >> 3] ^= 1 << (bit & 7)
        return bytes(buf)
