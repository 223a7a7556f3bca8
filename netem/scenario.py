"""Time-varying links: phases of impairments, partitions and flapping, from Python or TOML.

A :class:`Link` is one direction of a path over time. Its clock starts at the
first datagram it sees (or at :meth:`Link.start`), so a scenario written as
"at 5 s, loss rises to 30%" means five seconds into the run, on real or
simulated time alike.

A link can also be changed while traffic flows: :meth:`Link.set` puts an
impairment in force from the next datagram on (overriding the timeline),
:meth:`Link.partition` cuts it until :meth:`Link.heal`, :meth:`Link.clear`
makes it clean and whole, and :meth:`Link.faults` does any of that for a
``with`` block and then puts back what was there. Each runtime impairment gets
a fresh model seeded from the link's seed and the number of changes so far, so
the same changes at the same points of the same traffic give the same
decisions. Links are not thread-safe; carriers serialise access.

A :class:`Scenario` holds both directions — *up* is client to server (the
direction of the first datagram through a proxy, or ``a -> b`` in a
simulation), *down* the reverse.

TOML scenario format::

    seed = 7                                   # optional; carriers may override
    [[phase]]
    at = 0                                     # seconds from the start
    spec = "delay 20ms 5ms loss 1%"            # both directions...
    [[phase]]
    at = 10
    up = "loss 30% delay 20ms"                 # ...or each on its own
    down = "delay 20ms"
    [[partition]]                              # nothing gets through
    start = 5.0
    end = 7.5
    direction = "both"                         # "up", "down" or "both"
    [[flap]]                                   # a flapping link
    start = 20
    end = 30
    period = 2.0                               # every period...
    down = 0.5                                 # ...the link is down this long, then up
    direction = "up"
"""

from __future__ import annotations

import bisect
import contextlib
import itertools
import pathlib
import tomllib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from .models import Decision, FaultCounters, FaultModel, Impairment
from .seeds import stream_seed
from .spec import SpecError, parse_spec

__all__ = ["Link", "LinkState", "Scenario", "ScenarioError", "Window", "as_impairment"]

_DIRECTIONS = ("up", "down", "both")
_MAX_FLAP_WINDOWS = 100_000


class ScenarioError(ValueError):
    """A scenario that cannot be used; the message names the table and key at fault."""


@dataclass(frozen=True, slots=True)
class Window:
    """A partition: nothing passes in ``[start, end)`` (seconds from the link's start)."""

    start: float
    end: float

    def __post_init__(self) -> None:
        if not (0 <= self.start < self.end):
            raise ScenarioError(f"a partition needs 0 <= start < end, got {self.start}..{self.end}")


def as_impairment(value: Impairment | str | None) -> Impairment:
    """Accept an :class:`Impairment`, a ``tc netem`` spec string, or ``None`` (clean)."""
    if value is None:
        return Impairment()
    if isinstance(value, Impairment):
        return value
    return parse_spec(value)


@dataclass(frozen=True, slots=True)
class LinkState:
    """What has been changed on a link at run time (see :meth:`Link.state`)."""

    impairment: Impairment | None = None
    """The impairment set at run time; ``None``: the timeline's phases are in force."""
    partitioned: bool = False
    """Cut at run time: nothing passes until healed."""


class Link:
    """One direction of a path: impairment phases over time, plus partition windows."""

    def __init__(
        self,
        phases: Impairment | str | Sequence[tuple[float, Impairment | str]] | None = None,
        *,
        partitions: Sequence[Window] = (),
        seed: int | None = 0,
        log: bool = False,
    ) -> None:
        if phases is None or isinstance(phases, (Impairment, str)):
            steps: list[tuple[float, Impairment]] = [(0.0, as_impairment(phases))]
        else:
            steps = sorted((float(at), as_impairment(imp)) for at, imp in phases)
            if not steps or steps[0][0] > 0:
                steps.insert(0, (0.0, Impairment()))
        self._starts = [at for at, _ in steps]
        self._impairments = [imp for _, imp in steps]
        self._models: list[FaultModel | None] = [None] * len(steps)
        self._windows = sorted(partitions, key=lambda w: w.start)
        self._window_starts = [w.start for w in self._windows]
        self._seed = seed
        self._log = log
        self.epoch: float | None = None
        self._override: Impairment | None = None
        self._override_model: FaultModel | None = None
        self._retired: list[FaultModel] = []  # models of runtime impairments since replaced
        self._changes = 0
        self._cut = False

    @property
    def is_clean(self) -> bool:
        """True if nothing is impaired now or later (carriers take a fast path)."""
        if self._cut:
            return False
        if self._override is not None:
            return self._override.is_clean
        return not self._windows and all(imp.is_clean for imp in self._impairments)

    # ------------------------------------------------------- runtime changes

    def set(self, impairment: Impairment | str | None) -> None:
        """Put ``impairment`` in force from the next datagram on, overriding the timeline."""
        imp = as_impairment(impairment)
        if self._override_model is not None:
            self._retired.append(self._override_model)
        self._changes += 1
        self._override = imp
        self._override_model = None  # built at the next datagram, seeded by _changes

    def resume(self) -> None:
        """Drop the impairment set at run time: the timeline's phases are in force again."""
        if self._override_model is not None:
            self._retired.append(self._override_model)
        self._override = None
        self._override_model = None

    def partition(self) -> None:
        """Cut the link now: nothing passes until :meth:`heal`."""
        self._cut = True

    def heal(self) -> None:
        """End a :meth:`partition` (timeline partition windows still apply)."""
        self._cut = False

    def clear(self) -> None:
        """Make the link clean and whole from now on: no impairment, no partition."""
        self.set(Impairment())
        self.heal()

    def state(self) -> LinkState:
        """What has been changed at run time, to give back to :meth:`restore`."""
        return LinkState(self._override, self._cut)

    def restore(self, state: LinkState) -> None:
        """Put back a :meth:`state`; a changed impairment gets a fresh model."""
        if state.impairment is None:
            if self._override is not None:
                self.resume()
        elif state.impairment is not self._override:
            self.set(state.impairment)
        self._cut = state.partitioned

    @contextlib.contextmanager
    def faults(
        self, impairment: Impairment | str | None = None, *, partition: bool = False
    ) -> Iterator[Link]:
        """Apply ``impairment`` (and/or a partition) for a ``with`` block, then restore."""
        before = self.state()
        if impairment is not None:
            self.set(impairment)
        if partition:
            self.partition()
        try:
            yield self
        finally:
            self.restore(before)

    def describe(self) -> dict[str, Any]:
        """What is in force now, for humans and the control endpoint."""
        from .spec import format_spec

        now = self._override if self._override is not None else None
        return {
            "spec": None if now is None else format_spec(now),
            "timeline": now is None,
            "partitioned": self._cut,
        }

    def add_partition(self, window: Window) -> None:
        """Add a partition window (seconds from the link's start)."""
        self._windows.append(window)
        self._windows.sort(key=lambda w: w.start)
        self._window_starts = [w.start for w in self._windows]

    def start(self, now: float) -> None:
        """Start the timeline's clock at ``now`` (otherwise: at the first datagram)."""
        self.epoch = now

    def impairment_at(self, t: float) -> Impairment:
        """The impairment in force ``t`` seconds after the start."""
        return self._impairments[max(0, bisect.bisect_right(self._starts, t) - 1)]

    def partitioned_at(self, t: float) -> bool:
        """Whether a partition window cuts the link ``t`` seconds after the start."""
        i = bisect.bisect_right(self._window_starts, t) - 1
        return i >= 0 and t < self._windows[i].end

    def apply(self, data: bytes, now: float) -> list[tuple[float, bytes]]:
        """Fate of one datagram sent at ``now``: ``(release_time, bytes)`` pairs."""
        if self.epoch is None:
            self.epoch = now
        t = now - self.epoch
        if self._override is not None:
            model = self._override_model
            if model is None:
                model = self._override_model = self._new_model(self._override, -self._changes)
        else:
            model = self._model(max(0, bisect.bisect_right(self._starts, t) - 1))
        if self._cut or (self._windows and self.partitioned_at(t)):
            model.drop_partitioned()
            return []
        return model.apply(data, now)

    def _new_model(self, impairment: Impairment, index: int) -> FaultModel:
        seed = None if self._seed is None else self._seed * 1_000_003 + index
        return FaultModel(impairment, seed=seed, log=self._log)

    def _model(self, index: int) -> FaultModel:
        model = self._models[index]
        if model is None:
            model = self._models[index] = self._new_model(self._impairments[index], index)
        return model

    def _all_models(self) -> list[FaultModel]:
        models = [m for m in self._models if m is not None] + self._retired
        if self._override_model is not None:
            models.append(self._override_model)
        return models

    @property
    def counters(self) -> FaultCounters:
        """Counters summed over every phase and runtime impairment that has seen traffic."""
        total = FaultCounters()
        for model in self._all_models():
            total = total.merge(model.counters)
        return total

    def decisions(self) -> Iterator[Decision]:
        """The decision log of every model, in datagram order (empty unless ``log=True``)."""
        logs = [m.log for m in self._all_models() if m.log is not None]
        return iter(sorted(itertools.chain.from_iterable(logs), key=lambda d: d.time))


@dataclass(slots=True)
class Scenario:
    """Both directions of a path over time."""

    up: list[tuple[float, Impairment]] = field(default_factory=lambda: [(0.0, Impairment())])
    down: list[tuple[float, Impairment]] = field(default_factory=lambda: [(0.0, Impairment())])
    up_partitions: list[Window] = field(default_factory=list)
    down_partitions: list[Window] = field(default_factory=list)
    seed: int | None = None

    def links(
        self, seed: int | None = 0, *, client: int = 0, log: bool = False
    ) -> tuple[Link, Link]:
        """Fresh ``(up, down)`` links for conversation ``client`` (see :mod:`netem.seeds`).

        The scenario's own seed wins over ``seed``.
        """
        base = self.seed if self.seed is not None else seed
        up_seed = stream_seed(base, "up", client)
        down_seed = stream_seed(base, "down", client)
        return (
            Link(self.up, partitions=self.up_partitions, seed=up_seed, log=log),
            Link(self.down, partitions=self.down_partitions, seed=down_seed, log=log),
        )

    @classmethod
    def from_toml(cls, source: str | pathlib.Path) -> Scenario:
        """Load a scenario from a TOML file path, or TOML text."""
        if isinstance(source, pathlib.Path) or ("\n" not in source and source.endswith(".toml")):
            path = pathlib.Path(source)
            try:
                text = path.read_text()
            except OSError as exc:
                raise ScenarioError(f"cannot read scenario {path}: {exc.strerror}") from None
        else:
            text = str(source)
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ScenarioError(f"scenario is not valid TOML: {exc}") from None
        return cls.from_dict(data)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Scenario:
        """The scenario a parsed TOML (or JSON) document describes.

        Raises :class:`ScenarioError` naming an unknown or malformed key."""
        unknown = set(data) - {"seed", "phase", "partition", "flap"}
        if unknown:
            raise ScenarioError(
                f"unknown scenario key(s) {sorted(unknown)}: use seed, [[phase]], "
                "[[partition]], [[flap]]"
            )
        scenario = cls(up=[], down=[])
        seed = data.get("seed")
        if seed is not None and not isinstance(seed, int):
            raise ScenarioError(f"seed must be an integer, got {seed!r}")
        scenario.seed = seed
        for i, phase in enumerate(_tables(data, "phase")):
            where = f"[[phase]] #{i + 1}"
            at = _number(phase, "at", where, default=0.0)
            extra = set(phase) - {"at", "spec", "up", "down"}
            if extra:
                raise ScenarioError(f"{where}: unknown key(s) {sorted(extra)}")
            if "spec" in phase and ("up" in phase or "down" in phase):
                raise ScenarioError(f"{where}: give either spec (both ways) or up/down, not both")
            both = phase.get("spec")
            up = _spec(phase.get("up", both), f"{where} up")
            down = _spec(phase.get("down", both), f"{where} down")
            scenario.up.append((at, up))
            scenario.down.append((at, down))
        if not scenario.up:
            scenario.up = [(0.0, Impairment())]
            scenario.down = [(0.0, Impairment())]
        for i, part in enumerate(_tables(data, "partition")):
            where = f"[[partition]] #{i + 1}"
            window = Window(_number(part, "start", where), _number(part, "end", where))
            scenario._add(window, _direction(part, where))
        for i, flap in enumerate(_tables(data, "flap")):
            where = f"[[flap]] #{i + 1}"
            start, end = _number(flap, "start", where), _number(flap, "end", where)
            period, outage = _number(flap, "period", where), _number(flap, "down", where)
            if not (0 < outage < period) or end <= start:
                raise ScenarioError(f"{where}: need start < end and 0 < down < period")
            if (end - start) / period > _MAX_FLAP_WINDOWS:
                raise ScenarioError(
                    f"{where}: more than {_MAX_FLAP_WINDOWS} flaps; lengthen period"
                )
            direction = _direction(flap, where)
            t = start
            while t < end:
                scenario._add(Window(t, min(t + outage, end)), direction)
                t += period
        return scenario

    def _add(self, window: Window, direction: str) -> None:
        if direction in ("up", "both"):
            self.up_partitions.append(window)
        if direction in ("down", "both"):
            self.down_partitions.append(window)


def _tables(data: dict[str, Any], key: str) -> list[dict[str, Any]]:
    value = data.get(key, [])
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        raise ScenarioError(f"{key} must be an array of tables: write [[{key}]]")
    return value


def _number(table: dict[str, Any], key: str, where: str, default: float | None = None) -> float:
    value = table.get(key, default)
    if value is None:
        raise ScenarioError(f"{where}: missing {key} (seconds)")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ScenarioError(f"{where}: {key} must be a number of seconds >= 0, got {value!r}")
    return float(value)


def _spec(value: Any, where: str) -> Impairment:
    if value is None:
        return Impairment()
    if not isinstance(value, str):
        raise ScenarioError(f'{where}: expected a netem spec string like "delay 20ms loss 1%"')
    try:
        return parse_spec(value)
    except SpecError as exc:
        raise ScenarioError(f"{where}: {exc}") from None


def _direction(table: dict[str, Any], where: str) -> str:
    direction = table.get("direction", "both")
    if direction not in _DIRECTIONS:
        raise ScenarioError(f"{where}: direction must be up, down or both, got {direction!r}")
    return str(direction)
