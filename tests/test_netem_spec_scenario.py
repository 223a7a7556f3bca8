"""tc-netem spec strings and TOML timelines."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from netem import (
    FourState,
    GilbertElliott,
    Impairment,
    Link,
    Scenario,
    ScenarioError,
    SimNetwork,
    SpecError,
    format_spec,
    parse_spec,
)
from reliable import Config, Endpoint, events


def test_the_issue_example_parses() -> None:
    imp = parse_spec(
        "delay 20ms 5ms loss 10% 25% duplicate 1% corrupt 0.1% reorder 25% gap 5 rate 1mbit"
    )
    assert (imp.delay, imp.jitter, imp.loss, imp.loss_correlation) == (0.02, 0.005, 0.1, 0.25)
    assert (imp.duplicate, imp.corrupt, imp.reorder, imp.gap) == (0.01, 0.001, 0.25, 5)
    assert imp.rate == 1_000_000


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("loss state 1%", Impairment(loss_model=FourState(p13=0.01))),
        (
            "loss state 1% 30% 5% 40% 0.5%",
            Impairment(loss_model=FourState(0.01, 0.3, 0.05, 0.4, 0.005)),
        ),
        (
            "loss gemodel 1% 10% 70% 0.1%",
            Impairment(loss_model=GilbertElliott(0.01, 0.1, 0.7, 0.001)),
        ),
        ("loss random 5", Impairment(loss=0.05)),
        (
            "delay 1.5s 100ms 25% distribution pareto",
            Impairment(delay=1.5, jitter=0.1, delay_correlation=0.25, distribution="pareto"),
        ),
        ("rate 10mbps limit 50", Impairment(rate=80_000_000, limit=50)),
        ("rate 1kibit", Impairment(rate=1024)),
        (
            "duplicate 5% copies 3 corrupt 1% bits 4",
            Impairment(duplicate=0.05, duplicate_copies=3, corrupt=0.01, corrupt_bits=4),
        ),
        (
            "mtu 1280 truncate 1% garbage 2% 16 replay 1% 2s",
            Impairment(
                mtu=1280, truncate=0.01, garbage=0.02, garbage_max=16, replay=0.01, replay_delay=2.0
            ),
        ),
        ("", Impairment()),
    ],
)
def test_spec_forms(text: str, expected: Impairment) -> None:
    assert parse_spec(text) == expected


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("delay 20", "'20'"),
        ("delay 20ms loss lots", "'lots'"),
        ("loss 10% wibble", "'wibble'"),
        ("rate 3 furlongs", "'furlongs'"),
        ("gap -2 delay 1ms", "'-2'"),
        ("loss gemodel", "after 'gemodel'"),
        ("delay 5ms distribution cauchy", "'cauchy'"),
        ("loss 101%", "'101%'"),
    ],
)
def test_spec_errors_name_the_bad_token(text: str, named: str) -> None:
    with pytest.raises(SpecError) as info:
        parse_spec(text)
    assert named in str(info.value)


@given(
    st.builds(
        Impairment,
        loss=st.sampled_from([0.0, 0.01, 0.25]),
        duplicate=st.sampled_from([0.0, 0.05]),
        corrupt=st.sampled_from([0.0, 0.001]),
        delay=st.sampled_from([0.0, 0.02]),
        jitter=st.sampled_from([0.0, 0.005]),
        rate=st.sampled_from([0.0, 1e6]),
        mtu=st.sampled_from([0, 1400]),
        limit=st.sampled_from([1000, 20]),
    )
)
def test_format_spec_round_trips(imp: Impairment) -> None:
    assert parse_spec(format_spec(imp)) == imp


SCENARIO = """
seed = 11
[[phase]]
at = 0
spec = "loss 0%"
[[phase]]
at = 10
up = "loss 100%"
down = "delay 50ms"
[[partition]]
start = 2
end = 3
direction = "down"
[[flap]]
start = 20
end = 24
period = 2
down = 0.5
direction = "up"
"""


def test_toml_scenario_phases_partitions_and_flaps(tmp_path: Path) -> None:
    path = tmp_path / "flaky.toml"
    path.write_text(SCENARIO)
    scenario = Scenario.from_toml(path)
    up, down = scenario.links()
    up.start(0.0)
    down.start(0.0)
    assert up.apply(b"x", 1.0) and down.apply(b"x", 1.0)  # phase 1: clean
    assert up.apply(b"x", 2.5) and not down.apply(b"x", 2.5)  # partition, down only
    assert not up.apply(b"x", 11.0)  # phase 2: up loses everything
    assert down.apply(b"x", 11.0) == [(pytest.approx(11.05), b"x")]
    assert not up.apply(b"x", 20.2) and not up.apply(b"x", 22.4)  # flapping: down 0.5 s of 2 s
    assert down.counters.dropped_partition == 1
    assert up.counters.dropped_partition == 2 and up.counters.dropped_loss == 1
    assert scenario.seed == 11


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[[phase]]\nat = 1\nspec = 'loss ten'", "[[phase]] #1"),
        ("[[phase]]\nspec = 'loss 1%'\nup = 'loss 2%'", "either spec"),
        ("[[partition]]\nstart = 5\nend = 1", "start < end"),
        ("[[partition]]\nstart = 1\nend = 2\ndirection = 'sideways'", "direction"),
        ("[[flap]]\nstart = 0\nend = 10\nperiod = 1\ndown = 2", "down < period"),
        ("loss = 5", "unknown scenario key"),
        ("[[phase]]\nat = 'soon'", "at must be a number"),
        ("not toml at all [", "not valid TOML"),
    ],
)
def test_scenario_errors_say_where(text: str, message: str) -> None:
    with pytest.raises(ScenarioError, match=message.replace("[", r"\[").replace("#", "#")):
        Scenario.from_toml(text)


def test_link_decision_log_spans_phases_and_is_deterministic() -> None:
    def decisions() -> list[object]:
        link = Link([(0, "loss 30% corrupt 10%"), (0.05, "delay 5ms 2ms")], seed=9, log=True)
        for i in range(100):
            link.apply(b"x" * 64, i * 0.001)
        return list(link.decisions())

    first = decisions()
    assert len(first) == 100 and first == decisions()
    assert any(d.dropped == "loss" for d in first) and any(d.corruption for d in first)


def test_link_phases_from_python() -> None:
    link = Link([(0, "delay 10ms"), (5, "loss 100%")], seed=1)
    assert link.apply(b"a", 100.0) == [(pytest.approx(100.01), b"a")]
    assert link.apply(b"b", 106.0) == []
    assert link.impairment_at(1.0).delay == 0.01


def test_sim_partition_cuts_and_heals() -> None:
    net = SimNetwork(seed=3)
    a, b = ("a", 1), ("b", 2)
    ea, eb = (
        Endpoint(Config(peer_timeout=30), rng=random.Random(1), arrival_events=True),
        Endpoint(rng=random.Random(2), arrival_events=True),
    )
    net.add_host(a, ea)
    net.add_host(b, eb)
    net.partition(a, b, start=0.0, end=2.0)
    net.call_at(0.0, lambda: ea.send(b, b"through the partition", now=net.now), host=a)
    net.run(until=10.0)
    got = [e for e in iter(eb.next_event, None) if isinstance(e, events.MessageReceived)]
    assert [e.data for e in got] == [b"through the partition"]
    assert net.link(a, b).counters.dropped_partition > 0  # it was retransmitted across the heal


def test_sim_scenario_applies_both_directions() -> None:
    net = SimNetwork(seed=4)
    net.set_scenario(
        "a", "b", Scenario.from_toml("[[phase]]\nup = 'delay 10ms'\ndown = 'delay 30ms'")
    )
    assert net.link("a", "b").impairment_at(0).delay == 0.01
    assert net.link("b", "a").impairment_at(0).delay == 0.03


def test_sim_run_until_never_processes_a_later_event() -> None:
    """A superseded timer at the head of the queue, or a datagram to a host taken off the
    network, let run(until=...) process the next event whatever its time."""
    from netem import SimNetwork

    class Host:
        def __init__(self) -> None:
            self.timer: float | None = 1.0
            self.fired: list[float] = []
            self.out: list[tuple[bytes, object]] = []

        def receive_datagram(self, data: bytes, addr: object, now: float) -> None:
            pass

        def datagrams_to_send(self, now: float) -> list[tuple[bytes, object]]:
            out, self.out = self.out, []
            return out

        def get_timer(self) -> float | None:
            return self.timer

        def handle_timer(self, now: float) -> None:
            self.fired.append(now)
            self.timer = None

    net = SimNetwork()
    host, gone = Host(), Host()
    net.add_host("h", host)
    net.add_host("gone", gone)
    host.timer = 100.0  # re-armed later: the entry at 1.0 is superseded
    net.flush("h")
    host.out = [(b"x", "gone")]
    net.flush("h")
    net.remove_host("gone")  # its timer entry and the datagram to it become stale
    net.run(until=50.0)
    assert host.fired == [] and net.now == 50.0
    net.run(until=150.0)
    assert host.fired == [100.0]
