"""Pure, seeded fault models for one direction of a datagram link.

A :class:`FaultModel` turns one datagram sent at ``now`` into zero or more
``(release_time, datagram)`` pairs. It never sleeps or touches a socket: the
carriers (socket wrapper, proxy, simulated network) decide what "release"
means. Every random draw comes from the model's own ``random.Random`` in a
fixed order, so the same seed and the same input sequence give the same
decisions — corruption positions included.

Semantics follow Linux ``sch_netem`` (``netem_enqueue``), in its order:

1. **duplicate** is drawn first; the copy is sent through the whole model
   again with duplication disabled (netem re-enqueues it at the root), so it
   gets its own loss, corruption and delay decisions;
2. **loss** removes one copy (a duplicated packet that is "lost" still
   arrives once, as in netem); random loss may be correlated, or come from
   the 4-state Markov model (``loss state``) or Gilbert-Elliott
   (``loss gemodel``) with netem's parameter meanings;
3. **corrupt** alters the original: bit flips, or a user function; our
   extensions ``truncate`` and ``garbage`` follow;
4. the **queue limit** tail-drops when ``limit`` datagrams are already held;
5. **reorder** sends a packet at once, ahead of the delayed ones, with
   netem's ``gap`` rule; everything else gets the **delay** (constant plus
   jitter from a uniform, normal, pareto or paretonormal distribution,
   optionally correlated), serialised behind earlier packets by **rate**.

Delay is drawn with the kernel's arithmetic (``tabledist``): integer
nanoseconds, a 32-bit correlated random number (``get_crandom``) taken modulo
``2 * jitter`` (uniform) or the table size (the others), and iproute2's
4096-entry tables (:func:`distribution_table`), which are clipped to +/-4
sigma — or a custom table from an iproute2 ``.dist`` file
(:func:`load_distribution`), as ``tc`` reads ``/usr/lib/tc/NAME.dist``.
Taking the correlated number modulo the range scrambles it, so, as in the
kernel, delay "correlation" barely correlates anything. Rate charges the
datagram plus the headers the kernel would count (``rate_headers``) plus
``tc``'s packet overhead and cell rounding.

**Slotting** (``slot``) holds datagrams that are due and releases them in
bursts when a slot opens, as ``netem_dequeue`` does: a slot allows
``slot_packets`` datagrams and ``slot_bytes`` bytes (each charged with its
``rate_headers``), then the next opens a gap later — uniform between
``slot_min`` and ``slot_max`` (the kernel's ``get_slot_next``) or drawn from a
distribution table like the delay. A slot that opened before a datagram was
due is stale and is redrawn from the moment the queue looks at that datagram
(its arrival, or the release of the one before), and once more from its due
time if the new slot still opens too early. The kernel gates its time-ordered
queue at dequeue time; the model gates datagrams in arrival order, when they
are offered — the same when jitter does not reorder them. Reordered datagrams
skip the slot, as they skip netem's time-ordered queue.

**Corruption** ``where="payload"`` (the default) flips bits in the UDP payload
and delivers the damage; ``where="anywhere"`` flips bits anywhere in the IP
packet as the kernel's ``corrupt`` does — ``corrupt_headers`` bytes of IP and
UDP header, then the payload — and then, as the receiver's IP header and UDP
checksums would, drops the datagram (``dropped_checksum``) once it has
crossed the link (it still takes its share of the queue, the rate and its
slot).

Extensions beyond netem: ``mtu`` (datagrams above it vanish: an MTU black
hole) and ``replay`` (a copy is re-sent much later: a stale datagram).
"""

from __future__ import annotations

import bisect
import functools
import heapq
import math
import os
import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = [
    "CORRUPT_WHERE",
    "DELAY_BUCKETS",
    "DISTRIBUTIONS",
    "Decision",
    "FaultCounters",
    "FaultModel",
    "FourState",
    "GilbertElliott",
    "Impairment",
    "distribution_table",
    "load_distribution",
]

#: Delay distributions, as in ``tc netem ... distribution NAME``.
DISTRIBUTIONS = ("uniform", "normal", "pareto", "paretonormal")
#: Where ``corrupt`` flips bits: the payload only, or anywhere in the IP packet.
CORRUPT_WHERE = ("payload", "anywhere")
#: Upper bounds (seconds) of the delay histogram buckets in :class:`FaultCounters`.
DELAY_BUCKETS = (0.0, 1e-4, 5e-4, 1e-3, 2e-3, 5e-3, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, math.inf)


def _probability(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and 0.0 <= value <= 1.0):
        raise ValueError(f"{name} must be a probability between 0 and 1, got {value!r}")


@dataclass(frozen=True, slots=True)
class FourState:
    """netem's 4-state Markov loss model (``loss state p13 p31 p32 p23 p14``).

    States: 1 = transmitting in a gap period, 2 = transmitting in a burst,
    3 = lost in a burst, 4 = isolated loss in a gap. Defaults as ``tc``:
    ``p31 = 1 - p13``, ``p32 = 0``, ``p23 = 1``, ``p14 = 0``.
    """

    p13: float
    p31: float | None = None
    p32: float = 0.0
    p23: float = 1.0
    p14: float = 0.0

    def __post_init__(self) -> None:
        if self.p31 is None:
            object.__setattr__(self, "p31", 1.0 - self.p13)
        for name in ("p13", "p31", "p32", "p23", "p14"):
            _probability(f"loss state {name}", getattr(self, name))


@dataclass(frozen=True, slots=True)
class GilbertElliott:
    """netem's Gilbert-Elliott loss model (``loss gemodel p r 1-h 1-k``).

    ``p``: good-to-bad transition; ``r``: bad-to-good; ``one_minus_h``: loss
    probability in the bad state; ``one_minus_k``: loss probability in the good
    state. Defaults as ``tc``: ``r = 1 - p``, ``1-h = 1``, ``1-k = 0`` (with
    only ``p`` this is a Bernoulli model; with ``p`` and ``r``, Simple Gilbert).
    Mean bad-state sojourn is ``1/r`` packets.
    """

    p: float
    r: float | None = None
    one_minus_h: float = 1.0
    one_minus_k: float = 0.0

    def __post_init__(self) -> None:
        if self.r is None:
            object.__setattr__(self, "r", 1.0 - self.p)
        for name in ("p", "r", "one_minus_h", "one_minus_k"):
            _probability(f"loss gemodel {name}", getattr(self, name))


@dataclass(frozen=True, slots=True, kw_only=True)
class Impairment:
    """What a link does to datagrams. Probabilities in [0, 1], times in seconds."""

    loss: float = 0.0
    """Probability a datagram is dropped (netem's random loss)."""
    loss_correlation: float = 0.0
    """Weight of the previous loss draw in the next: bursty random loss."""
    loss_model: FourState | GilbertElliott | None = None
    """A Markov loss model instead of random loss."""

    duplicate: float = 0.0
    """Probability a datagram is sent ``duplicate_copies`` extra times."""
    duplicate_correlation: float = 0.0
    duplicate_copies: int = 1

    corrupt: float = 0.0
    """Probability the datagram has ``corrupt_bits`` random bits flipped (or ``corrupt_fn``)."""
    corrupt_correlation: float = 0.0
    corrupt_bits: int = 1
    corrupt_fn: Callable[[bytes, random.Random], bytes] | None = None
    """Targeted corruption (e.g. one header field) used instead of bit flips."""
    corrupt_where: str = "payload"
    """``"payload"``: flip bits in the payload and deliver the damage. ``"anywhere"``:
    flip bits anywhere in the IP packet (``corrupt_headers`` header bytes, then the
    payload), as ``tc``'s ``corrupt`` does, and drop the datagram as the receiver's
    checksums would (counted in ``dropped_checksum``)."""
    corrupt_headers: int = 28
    """IP and UDP header bytes ``corrupt_where="anywhere"`` can hit: 20 (IPv4) + 8 (UDP).
    Use 48 for IPv6."""
    truncate: float = 0.0
    """Probability the datagram is cut at a random length (extension)."""
    garbage: float = 0.0
    """Probability 1 to ``garbage_max`` random bytes are appended (extension)."""
    garbage_max: int = 64

    delay: float = 0.0
    """Constant one-way delay."""
    jitter: float = 0.0
    """Spread of the delay: +/- for uniform, the standard deviation otherwise."""
    delay_correlation: float = 0.0
    distribution: str = "uniform"
    """``uniform``, ``normal``, ``pareto`` or ``paretonormal`` (iproute2's tables), or a
    custom table: a ``.dist`` file's path, or a NAME found as ``NAME.dist`` in
    ``$TC_LIB_DIR``, ``/usr/lib/tc`` or ``/usr/lib64/tc`` (see :func:`load_distribution`)."""

    reorder: float = 0.0
    """Probability a datagram skips the delay and overtakes the queue (needs ``delay``)."""
    reorder_correlation: float = 0.0
    gap: int = 0
    """netem's gap: only every ``gap``-th datagram may be reordered (0: 1 if reorder is set)."""

    rate: float = 0.0
    """Link bandwidth in bits per second (0: unlimited); datagrams queue behind each other."""
    rate_headers: int = 42
    """Bytes the kernel's packet length adds to a UDP payload when charging ``rate``:
    8 (UDP) + 20 (IPv4) + 14 (Ethernet). Use 62 for IPv6 over Ethernet."""
    packet_overhead: int = 0
    """``tc``'s PACKETOVERHEAD: bytes added (or, negative, removed) per packet for ``rate``."""
    cell_size: int = 0
    """``tc``'s CELLSIZE: charge whole cells of this many bytes (0: no cells)."""
    cell_overhead: int = 0
    """``tc``'s CELLOVERHEAD: bytes added per cell."""
    seed: int | None = None
    """``tc``'s ``seed``: fixes this impairment's random stream whatever the carrier's seed."""

    slot_min: float = 0.0
    """``slot MIN [MAX]``: the shortest gap between two slots, in seconds."""
    slot_max: float = 0.0
    """The longest gap (uniform between ``slot_min`` and it; 0 means ``slot_min``)."""
    slot_distribution: str | None = None
    """``slot distribution NAME DELAY JITTER``: gaps from a delay table instead."""
    slot_delay: float = 0.0
    """Mean gap between slots with ``slot_distribution``, in seconds."""
    slot_jitter: float = 0.0
    """Spread of the gap with ``slot_distribution`` (must be > 0, as ``tc`` requires)."""
    slot_packets: int = 0
    """Datagrams a slot releases at most (0: no limit)."""
    slot_bytes: int = 0
    """Bytes a slot releases at most, each datagram charged with its ``rate_headers``
    as the kernel's packet length (0: no limit); the datagram that crosses the limit
    still goes."""
    limit: int = 1000
    """Most datagrams held (delayed or queued) at once; beyond it the tail is dropped."""

    mtu: int = 0
    """Datagrams larger than this many bytes silently vanish (0: no black hole)."""

    replay: float = 0.0
    """Probability an extra copy is re-sent ``replay_delay`` seconds later (stale replay)."""
    replay_delay: float = 1.0

    def __post_init__(self) -> None:
        for name in (
            "loss",
            "loss_correlation",
            "duplicate",
            "duplicate_correlation",
            "corrupt",
            "corrupt_correlation",
            "truncate",
            "garbage",
            "delay_correlation",
            "reorder",
            "reorder_correlation",
            "replay",
        ):
            _probability(name, getattr(self, name))
        for name in ("delay", "jitter", "replay_delay", "rate"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        for name in ("duplicate_copies", "corrupt_bits", "garbage_max", "limit"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.gap < 0 or self.mtu < 0:
            raise ValueError("gap and mtu must be >= 0")
        if self.distribution not in DISTRIBUTIONS:
            distribution_table(self.distribution)  # a custom table: loads, or says why not
        if self.loss_model is not None and self.loss:
            raise ValueError("give either a random loss percentage or a loss model, not both")
        if self.cell_size < 0 or self.rate_headers < 0:
            raise ValueError("cell_size and rate_headers must be >= 0")
        self._check_slot()
        if self.corrupt_where not in CORRUPT_WHERE:
            raise ValueError(
                f"corrupt_where must be one of {', '.join(CORRUPT_WHERE)}, "
                f"got {self.corrupt_where!r}"
            )
        if self.corrupt_where == "anywhere" and self.corrupt_fn is not None:
            raise ValueError(
                "corrupt_fn decides the damage itself; corrupt_where='anywhere' is for bit flips"
            )
        if self.corrupt_headers < 0:
            raise ValueError("corrupt_headers must be >= 0")

    def _check_slot(self) -> None:
        for name in ("slot_min", "slot_max", "slot_delay", "slot_jitter"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if self.slot_packets < 0 or self.slot_bytes < 0:
            raise ValueError("slot_packets and slot_bytes must be >= 0 (0: no limit)")
        if self.slot_distribution is not None:
            if self.slot_min or self.slot_max:
                raise ValueError("give a slot either MIN [MAX] or a distribution, not both")
            if not self.slot_jitter:
                raise ValueError("a slot distribution needs a jitter > 0 (tc refuses 0 too)")
            if self.slot_distribution not in DISTRIBUTIONS:
                distribution_table(self.slot_distribution)
        elif self.slot_jitter or self.slot_delay:
            raise ValueError("slot_delay and slot_jitter need a slot_distribution")
        elif self.slot_max and self.slot_max < self.slot_min:
            raise ValueError(
                f"slot max {self.slot_max}s is below slot min {self.slot_min}s (tc refuses it too)"
            )
        elif not self.slot_min and not self.slot_max and (self.slot_packets or self.slot_bytes):
            raise ValueError(
                "slot packets/bytes need a slot gap (slot 10ms packets 5); "
                "tc ignores them without one"
            )

    @property
    def slotted(self) -> bool:
        """Whether datagrams are released in slots (``slot ...``)."""
        return bool(self.slot_min or self.slot_max or self.slot_jitter)

    @property
    def is_clean(self) -> bool:
        """Whether this impairment never changes, drops, delays or reorders anything."""
        return self == Impairment(limit=self.limit)


@dataclass(slots=True)
class FaultCounters:
    """What a model did, for tests to assert on. ``dropped`` counts every reason.

    ``dropped`` has tc's meaning: copies removed, so a duplicated datagram that
    loses one copy counts although the other arrives. ``vanished`` counts the
    datagrams of which no copy at all got through.
    """

    seen: int = 0  #: datagrams offered to the link (duplicates not counted again)
    dropped: int = 0
    vanished: int = 0  #: datagrams lost outright: not one copy delivered
    dropped_loss: int = 0
    dropped_mtu: int = 0
    dropped_queue: int = 0
    dropped_partition: int = 0
    dropped_checksum: int = 0  #: corrupted anywhere: the receiver's checksum drops it
    duplicated: int = 0
    corrupted: int = 0
    reordered: int = 0
    replayed: int = 0
    delivered: int = 0
    delay_total: float = 0.0
    delay_max: float = 0.0
    delay_histogram: list[int] = field(default_factory=lambda: [0] * len(DELAY_BUCKETS))

    def drop(self, reason: str) -> None:
        """Count one datagram dropped, under ``dropped`` and ``dropped_<reason>``."""
        self.dropped += 1
        attr = f"dropped_{reason}"
        setattr(self, attr, getattr(self, attr) + 1)

    def add_delay(self, delay: float) -> None:
        """Count one datagram delivered after ``delay`` seconds (mean, max, histogram)."""
        self.delivered += 1
        self.delay_total += delay
        self.delay_max = max(self.delay_max, delay)
        self.delay_histogram[bisect.bisect_left(DELAY_BUCKETS, delay)] += 1

    @property
    def delay_mean(self) -> float:
        return self.delay_total / self.delivered if self.delivered else 0.0

    def merge(self, other: FaultCounters) -> FaultCounters:
        """The sum of two counter sets (e.g. the phases of a timeline)."""
        out = FaultCounters()
        for name in FaultCounters.__dataclass_fields__:
            if name == "delay_histogram":
                out.delay_histogram = [
                    a + b for a, b in zip(self.delay_histogram, other.delay_histogram, strict=True)
                ]
            elif name == "delay_max":
                out.delay_max = max(self.delay_max, other.delay_max)
            else:
                setattr(out, name, getattr(self, name) + getattr(other, name))
        return out

    def as_dict(self) -> dict[str, object]:
        """Every counter and ``delay_mean``, for JSON."""
        d = {name: getattr(self, name) for name in FaultCounters.__dataclass_fields__}
        d["delay_mean"] = self.delay_mean
        return d


@dataclass(frozen=True, slots=True)
class Decision:
    """The fate of one datagram, for the optional decision log."""

    index: int
    time: float
    size: int
    dropped: str | None  #: loss, mtu, queue, partition, checksum — or None
    copies: int  #: datagrams released for it (duplicates and replays included)
    corruption: tuple[str, ...]  #: e.g. ("bit 93", "truncate 40")
    releases: tuple[float, ...]  #: release times of the copies
    reordered: bool


@dataclass(slots=True)
class _Record:
    """Scratch notes about one datagram while the model decides its fate."""

    dropped: str | None = None
    corruption: list[str] = field(default_factory=list)
    reordered: bool = False


class _Correlated:
    """netem's correlated uniform: ``next = (1 - rho) * u + rho * last``."""

    __slots__ = ("last", "rho", "rng")

    def __init__(self, rng: random.Random, rho: float) -> None:
        self.rng = rng
        self.rho = rho
        self.last = rng.random() if rho else 0.0

    def draw(self) -> float:
        u = self.rng.random()
        if not self.rho:
            return u
        self.last = (1.0 - self.rho) * u + self.rho * self.last
        return self.last


class FaultModel:
    """Applies an :class:`Impairment` to a stream of datagrams, deterministically.

    ``log=True`` keeps a :class:`Decision` per datagram (the most recent
    ``log_limit``), so two runs can be compared decision by decision.
    """

    def __init__(
        self,
        impairment: Impairment,
        *,
        seed: int | None = 0,
        log: bool = False,
        log_limit: int = 100_000,
    ) -> None:
        self.impairment = impairment
        self.rng = random.Random(seed if impairment.seed is None else impairment.seed)
        rng = self.rng
        self.counters = FaultCounters()
        self.log: deque[Decision] | None = deque(maxlen=log_limit) if log else None
        self._dup = _Correlated(rng, impairment.duplicate_correlation)
        self._loss = _Correlated(rng, impairment.loss_correlation)
        self._corrupt = _Correlated(rng, impairment.corrupt_correlation)
        self._reorder = _Correlated(rng, impairment.reorder_correlation)
        self._delay_last = rng.getrandbits(32) if impairment.delay_correlation else 0
        self._state = 1  # 4-state: TX in gap; Gilbert-Elliott: good
        self._gap = impairment.gap or (1 if impairment.reorder else 0)
        self._counter = 0
        self._held: list[float] = []  # heap: release times of datagrams not yet released
        self._last_departure = -math.inf
        self._index = 0
        self._slot_next = -math.inf  # when the current slot opens (stale until drawn)
        self._slot_packets = 0
        self._slot_bytes = 0
        self._slot_last = -math.inf  # the last release through the slot gate

    # ------------------------------------------------------------------ public

    def apply(self, data: bytes, now: float) -> list[tuple[float, bytes]]:
        """Fate of one datagram sent at ``now``: ``(release_time, bytes)`` pairs."""
        out: list[tuple[float, bytes]] = []
        record = _Record() if self.log is not None else None
        self._apply(data, now, out, record, duplicate=True)
        if not out:
            self.counters.vanished += 1
        if self.log is not None and record is not None:
            self.log.append(
                Decision(
                    index=self._index,
                    time=now,
                    size=len(data),
                    dropped=record.dropped,
                    copies=len(out),
                    corruption=tuple(record.corruption),
                    releases=tuple(t for t, _ in out),
                    reordered=record.reordered,
                )
            )
        self._index += 1
        return out

    def drop_partitioned(self) -> None:
        """Count a datagram a partition swallowed (the timeline decides, the model counts)."""
        self.counters.seen += 1
        self.counters.drop("partition")
        self.counters.vanished += 1

    # ----------------------------------------------------------------- engine

    def _apply(
        self,
        data: bytes,
        now: float,
        out: list[tuple[float, bytes]],
        record: _Record | None,
        *,
        duplicate: bool,
    ) -> None:
        imp = self.impairment
        c = self.counters
        if duplicate:  # a clone re-entering the model is not a new datagram offered to the link
            c.seen += 1
        if imp.mtu and len(data) > imp.mtu:
            self._drop("mtu", record)
            return
        copies = 1
        if duplicate and imp.duplicate and self._dup.draw() < imp.duplicate:
            copies += imp.duplicate_copies
        if self._lost():
            copies -= 1
        if copies == 0:
            self._drop("loss", record)
            return
        for _ in range(copies - 1):  # clones go round again, as netem re-enqueues them
            c.duplicated += 1
            self._apply(data, now, out, None, duplicate=False)
        data, damaged = self._maybe_corrupt(data, record)
        self._prune(now)
        if len(self._held) >= imp.limit:
            self._drop("queue", record)
            return
        release = self._release_time(len(data), now, record)
        if release > now:
            heapq.heappush(self._held, release)
        if damaged:  # crossed the link, then failed the receiver's checksums
            self._drop("checksum", record)
            return
        out.append((release, data))
        c.add_delay(release - now)
        if imp.replay and self.rng.random() < imp.replay:
            c.replayed += 1
            out.append((release + imp.replay_delay, data))

    def _drop(self, reason: str, record: _Record | None) -> None:
        self.counters.drop(reason)
        if record is not None:
            record.dropped = reason

    def _lost(self) -> bool:
        imp = self.impairment
        model = imp.loss_model
        if model is None:
            return bool(imp.loss) and self._loss.draw() < imp.loss
        u = self.rng.random()
        if isinstance(model, FourState):
            return self._four_state(model, u)
        return self._gilbert_elliott(model, u)

    def _four_state(self, m: FourState, u: float) -> bool:
        assert m.p31 is not None
        state = self._state
        if state == 1:  # transmitting, gap period
            if u < m.p14:
                self._state = 4
                return True
            if u < m.p14 + m.p13:
                self._state = 3
                return True
            return False
        if state == 2:  # transmitting, burst period
            if u < m.p23:
                self._state = 3
                return True
            return False
        if state == 3:  # lost, burst period
            if u < m.p32:
                self._state = 2
                return False
            if u < m.p32 + m.p31:
                self._state = 1
                return False
            return True
        self._state = 1  # 4: an isolated loss is followed by a transmission
        return False

    def _gilbert_elliott(self, m: GilbertElliott, u: float) -> bool:
        assert m.r is not None
        if self._state == 1:  # good
            if u < m.p:
                self._state = 2
            return self.rng.random() < m.one_minus_k
        if u < m.r:  # bad
            self._state = 1
        return self.rng.random() < m.one_minus_h

    def _maybe_corrupt(self, data: bytes, record: _Record | None) -> tuple[bytes, bool]:
        """The datagram after corruption, and whether it is damaged where a checksum
        would catch it (``corrupt_where="anywhere"``)."""
        imp = self.impairment
        rng = self.rng
        notes: list[str] = []
        damaged = False
        if imp.corrupt and self._corrupt.draw() < imp.corrupt:
            if imp.corrupt_fn is not None:
                data = imp.corrupt_fn(data, rng)
                notes.append("custom")
            elif imp.corrupt_where == "anywhere":
                data, damaged = self._flip_anywhere(data, notes)
            elif data:
                buf = bytearray(data)
                for _ in range(imp.corrupt_bits):
                    bit = rng.randrange(len(buf) * 8)
                    buf[bit >> 3] ^= 1 << (bit & 7)
                    notes.append(f"bit {bit}")
                data = bytes(buf)
        if imp.truncate and rng.random() < imp.truncate and data:
            cut = rng.randrange(len(data))
            data = data[:cut]
            notes.append(f"truncate {cut}")
        if imp.garbage and rng.random() < imp.garbage:
            extra = rng.randbytes(rng.randint(1, imp.garbage_max))
            data = data + extra
            notes.append(f"garbage {len(extra)}")
        if notes:
            self.counters.corrupted += 1
            if record is not None:
                record.corruption = notes
        return data, damaged

    def _flip_anywhere(self, data: bytes, notes: list[str]) -> tuple[bytes, bool]:
        """``corrupt_bits`` flips over the IP packet: header bits, then payload bits."""
        head = self.impairment.corrupt_headers * 8
        buf = bytearray(data)
        flipped: set[int] = set()
        for _ in range(self.impairment.corrupt_bits):
            bit = self.rng.randrange(head + len(buf) * 8)
            flipped ^= {bit}
            if bit < head:
                notes.append(f"header bit {bit}")
            else:
                payload_bit = bit - head
                buf[payload_bit >> 3] ^= 1 << (payload_bit & 7)
                notes.append(f"bit {payload_bit}")
        return bytes(buf), bool(flipped)  # flips that cancel out leave nothing to catch

    def _release_time(self, size: int, now: float, record: _Record | None) -> float:
        imp = self.impairment
        reorder_now = (
            self._gap > 0
            and self._counter >= self._gap - 1
            and bool(imp.reorder)
            and self._reorder.draw() < imp.reorder
        )
        if reorder_now:
            self._counter = 0
            self.counters.reordered += 1
            if record is not None:
                record.reordered = True
            return now
        self._counter += 1
        delay = self._draw_delay()
        start = now
        if imp.rate:
            if self._last_departure > now:
                # queued behind the last datagram: its wait counts toward our delay
                delay = max(0.0, delay - (self._last_departure - now))
                start = self._last_departure
            delay += self._wire_bytes(size) * 8 / imp.rate
            self._last_departure = start + delay
        if imp.slotted:
            return self._slot_gate(start + delay, now, size)
        return start + delay

    def _slot_gate(self, due: float, now: float, size: int) -> float:
        """When the slot gate lets out a datagram that is due at ``due`` (``netem_dequeue``)."""
        if self._slot_next < due:
            # A stale slot (it opened before this datagram was due): the kernel draws the
            # next one when its queue looks at this datagram — on arrival, or when the
            # one before it left — and again when it falls due if that one opens too early.
            self._next_slot(max(now, self._slot_last))
            if self._slot_next < due:
                self._next_slot(due)
        release = self._slot_next
        self._slot_last = release
        self._slot_packets -= 1
        self._slot_bytes -= size + self.impairment.rate_headers
        if self._slot_packets <= 0 or self._slot_bytes <= 0:
            self._next_slot(release)  # this slot is used up
        return release

    def _next_slot(self, now: float) -> None:
        """The kernel's ``get_slot_next``: the next slot opens a drawn gap after ``now``."""
        imp = self.impairment
        if imp.slot_distribution is None:
            low = round(imp.slot_min * 1e9)
            high = max(low, round(imp.slot_max * 1e9))
            gap_ns = low + ((high - low) * self.rng.getrandbits(32) >> 32)
        else:
            mu = round(imp.slot_delay * 1e9)
            sigma = min(round(imp.slot_jitter * 1e9), _INT_MAX)
            gap_ns = _tabledist(mu, sigma, self.rng.getrandbits(32), imp.slot_distribution)
        self._slot_next = now + max(0, gap_ns) / 1e9
        self._slot_packets = imp.slot_packets or _INT_MAX
        self._slot_bytes = imp.slot_bytes or _INT_MAX

    def _wire_bytes(self, size: int) -> int:
        """What the kernel's ``packet_time_ns`` charges for a ``size``-byte payload."""
        imp = self.impairment
        length = max(0, size + imp.rate_headers + imp.packet_overhead)
        if imp.cell_size:
            cells = -(-length // imp.cell_size)
            length = cells * (imp.cell_size + imp.cell_overhead)
        return length

    def _draw_delay(self) -> float:
        imp = self.impairment
        mu = round(imp.delay * 1e9)
        sigma = min(round(imp.jitter * 1e9), _INT_MAX)  # the kernel caps jitter at INT_MAX ns
        if not sigma:
            return imp.delay
        value = _tabledist(mu, sigma, self._delay_crandom(), imp.distribution)
        return max(0.0, value / 1e9)

    def _delay_crandom(self) -> int:
        """The kernel's ``get_crandom``: a 32-bit number, correlated with the last by rho."""
        value = self.rng.getrandbits(32)
        rho = round(self.impairment.delay_correlation * 0xFFFFFFFF)
        if not rho:
            return value
        rho += 1
        answer = (value * ((1 << 32) - rho) + self._delay_last * rho) >> 32
        self._delay_last = answer
        return answer

    def _prune(self, now: float) -> None:
        held = self._held
        while held and held[0] <= now:
            heapq.heappop(held)


_INT_MAX = 2**31 - 1
_DIST_SCALE = 8192  # NETEM_DIST_SCALE: table entries are sigmas times this


def _tabledist(mu: int, sigma: int, rnd: int, distribution: str) -> int:
    """The kernel's ``tabledist``: nanoseconds around ``mu`` from a 32-bit random ``rnd``."""
    if distribution == "uniform":
        return rnd % (2 * sigma) + mu - sigma
    table = distribution_table(distribution)
    t = table[rnd % len(table)]
    x = (sigma % _DIST_SCALE) * t
    x += _DIST_SCALE // 2 if x >= 0 else -(_DIST_SCALE // 2)
    return int(x / _DIST_SCALE) + (sigma // _DIST_SCALE) * t + mu  # C: truncating /


_SHORT = (-32768, 32767)
_TABLE_POINTS = 16384  # the generators' resolution; every 4th point is kept


def _clip(value: int) -> int:
    return max(_SHORT[0], min(_SHORT[1], value))


@functools.cache
def _normal_points() -> tuple[float, ...]:
    """iproute2's normal grid: per CDF point (16385), the last x (step 5e-5) landing there."""
    points = [0.0] * (_TABLE_POINTS + 1)
    x = -10.0
    root2 = math.sqrt(2.0)
    while x < 10.05:  # the same float accumulation as the C loop
        points[round(_TABLE_POINTS * (0.5 + 0.5 * math.erf(x / root2)))] = x
        x += 0.00005
    return tuple(points)


def _pareto_value(i: int) -> int:
    """iproute2's alpha-3 Pareto inverse CDF at grid point ``i``, shifted and scaled, clipped."""
    p = i / 65536
    value: float = (1.0 / p ** (1.0 / 3.0) - 1.5) * (4.0 / 3.0) * _DIST_SCALE
    return round(min(value, 32767.0))


@functools.cache
def distribution_table(name: str) -> tuple[int, ...]:
    """The 4096-entry table iproute2 builds for ``normal``, ``pareto`` or ``paretonormal``.

    Entries are deviates in units of sigma times 8192, clipped to a signed
    16-bit range (so to about +/-4 sigma), as ``tc`` loads them into the kernel.
    ``paretonormal`` mixes the normal and pareto values at the same index.
    """
    if name == "pareto":
        return tuple(_pareto_value(i) for i in range(65536, 0, -16))
    points = _normal_points()
    if name == "normal":
        return tuple(_clip(round(points[i] * _DIST_SCALE)) for i in range(0, _TABLE_POINTS, 4))
    if name == "paretonormal":
        return tuple(
            _clip(int((round(points[i] * _DIST_SCALE) + 3 * _pareto_value(65536 - 4 * i)) / 4))
            for i in range(0, _TABLE_POINTS, 4)
        )
    return load_distribution(name)


#: Where ``tc`` looks for ``NAME.dist`` (after ``$TC_LIB_DIR``).
TC_LIB_DIRS = ("/usr/lib/tc", "/usr/lib64/tc")
MAX_DIST = 16 * 1024  # iproute2's limit on a table's entries


def load_distribution(name: str) -> tuple[int, ...]:
    """A custom delay table from an iproute2 ``.dist`` file, as ``tc`` loads it.

    ``name`` is a path (it contains a ``/`` or ends in ``.dist``), or a NAME
    looked up as ``NAME.dist`` in ``$TC_LIB_DIR``, then :data:`TC_LIB_DIRS`.
    The file holds whitespace-separated integers — deviates in units of sigma
    times 8192 (``NETEM_DIST_SCALE``), each a signed 16-bit value; ``#`` starts
    a comment. iproute2's ``maketable`` writes such files from measured
    delays. Raises ``ValueError`` naming the file and the problem.
    """
    if "/" in name or name.endswith(".dist"):
        candidates = [name]
    else:
        dirs = [os.environ["TC_LIB_DIR"]] if os.environ.get("TC_LIB_DIR") else []
        candidates = [os.path.join(d, f"{name}.dist") for d in (*dirs, *TC_LIB_DIRS)]
    for path in candidates:
        try:
            with open(path, encoding="ascii") as f:
                text = f.read()
        except FileNotFoundError:
            continue
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"distribution table {path}: cannot read it: {exc}") from None
        return _parse_dist(path, text)
    raise ValueError(
        f"distribution {name!r}: not one of {', '.join(DISTRIBUTIONS)}, and no table file "
        f"{' or '.join(candidates)}"
    )


def _parse_dist(path: str, text: str) -> tuple[int, ...]:
    values: list[int] = []
    for number, line in enumerate(text.splitlines(), 1):
        for word in line.split("#", 1)[0].split():
            try:
                value = int(word)
            except ValueError:
                raise ValueError(
                    f"distribution table {path} line {number}: {word!r} is not an integer"
                ) from None
            if not _SHORT[0] <= value <= _SHORT[1]:
                raise ValueError(
                    f"distribution table {path} line {number}: {value} is outside "
                    f"{_SHORT[0]}..{_SHORT[1]} (entries are sigmas times {_DIST_SCALE})"
                )
            values.append(value)
    if not values:
        raise ValueError(f"distribution table {path}: no entries")
    if len(values) > MAX_DIST:
        raise ValueError(f"distribution table {path}: {len(values)} entries, tc allows {MAX_DIST}")
    return tuple(values)
