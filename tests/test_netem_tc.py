"""tc-netem to the letter: iproute2's tables, the kernel's delay and rate arithmetic, tc's rules."""

from __future__ import annotations

import itertools
import math
import statistics

import pytest

from netem.models import FaultModel, Impairment, distribution_table
from netem.spec import SpecError, parse_spec

N = 200_000


def delays(spec: str, n: int = N, seed: int = 1) -> list[float]:
    model = FaultModel(parse_spec(spec), seed=seed)
    return [model.apply(b"x", float(i))[0][0] - i for i in range(n)]  # 1 s apart: no queue


def test_tables_are_iproute2s() -> None:
    for name in ("normal", "pareto", "paretonormal"):
        table = distribution_table(name)
        assert len(table) == 4096 and list(table) == sorted(table)  # an inverse CDF
        assert min(table) >= -32768 and max(table) <= 32767  # s16: about +/-4 sigma
    pareto = distribution_table("pareto")
    assert pareto[0] == round(-0.5 * 4 / 3 * 8192)  # p = 1: (1 - 1.5) * 4/3 sigmas
    assert pareto[-1] == 32767  # the tail is clipped at 4 sigma
    normal = distribution_table("normal")
    assert normal[2048] == 0  # Phi^-1(1/2)
    # point 0 collects every x with Phi(x) < 0.5/16384, the last being ~ -4.01: clipped
    assert normal[0] == -32768
    assert normal[1024] == round(-0.6745 * 8192) or abs(normal[1024] / 8192 + 0.6745) < 1e-3


@pytest.mark.parametrize(
    ("name", "p999_ms", "max_ms"),
    [("pareto", 140.0, 140.0), ("paretonormal", None, 139.0)],  # tc's tables, as the issue measured
)
def test_pareto_tails_stop_where_tcs_tables_stop(
    name: str, p999_ms: float | None, max_ms: float
) -> None:
    got = sorted(delays(f"delay 100ms 10ms distribution {name}"))
    # every deviate is at most 32767/8192 = 4.0 sigma: never beyond 100 ms + 4 * 10 ms
    assert max(got) <= 0.140 + 1e-6
    # the table's top entry is hit with probability 1/4096 per draw: over 200k draws the
    # chance of missing it is (1 - 1/4096)^200000 ~ e^-49, so the max IS the table's top
    assert max(got) == pytest.approx(max_ms / 1000, abs=1e-3)
    if p999_ms is not None:  # pareto clips its top ~10 entries (> 0.1%) at 4 sigma
        assert got[int(0.999 * len(got))] == pytest.approx(p999_ms / 1000, abs=1e-3)


def test_delay_correlation_is_scrambled_as_in_the_kernel() -> None:
    got = delays("delay 100ms 10ms 50%")
    # uniform +/-10 ms: sd = 10/sqrt(3) = 5.77 ms. Over N = 200k draws the sample sd's
    # relative standard error is about sqrt((kurtosis - 1) / (4N)) = sqrt(0.8/800000) = 0.1%,
    # so 2% is > 10 standard errors: the correlation must not shrink the spread.
    assert statistics.pstdev(got) == pytest.approx(0.01 / math.sqrt(3), rel=0.02)
    # lag-1 autocorrelation of independent draws has standard error 1/sqrt(N) = 0.0022;
    # 0.02 is 9 standard errors (the old, unscrambled model gave 0.50)
    mean = statistics.fmean(got)
    num = sum((a - mean) * (b - mean) for a, b in itertools.pairwise(got))
    den = sum((a - mean) ** 2 for a in got)
    assert abs(num / den) < 0.02


def test_rate_charges_headers_overhead_and_cells_like_the_kernel() -> None:
    # 100 B payload + 42 B (UDP, IPv4, Ethernet) = 142 B at 1 Mbit/s: 1136 us each, 880/s
    model = FaultModel(parse_spec("rate 1mbit"))
    releases = [model.apply(b"x" * 100, 0.0)[0][0] for _ in range(880)]
    assert releases[-1] == pytest.approx(880 * 142 * 8 / 1e6)
    # overhead 20, cells of 48 bytes with 5 bytes each: 162 B -> 4 cells -> 4 * 53 = 212 B
    model = FaultModel(parse_spec("rate 1mbit 20 48 5"))
    assert model.apply(b"x" * 100, 0.0)[0][0] == pytest.approx(212 * 8 / 1e6)


@pytest.mark.parametrize(
    ("spec", "why"),
    [
        ("delay 10ms gap 5", "gap"),
        ("delay 10ms distribution normal", "jitter"),
        ("distribution pareto", "jitter"),
    ],
)
def test_specs_tc_rejects_are_rejected(spec: str, why: str) -> None:
    with pytest.raises(SpecError, match=why):
        parse_spec(spec)


def test_tc_synonyms_and_seed() -> None:
    assert parse_spec("latency 10ms 2ms drop 5%") == parse_spec("delay 10ms 2ms loss 5%")
    imp = parse_spec("loss 50% seed 42")
    assert imp.seed == 42
    a = FaultModel(imp, seed=1)
    b = FaultModel(imp, seed=2)  # the spec's seed wins over the carrier's
    assert [bool(a.apply(b"x", 0.0)) for _ in range(50)] == [
        bool(b.apply(b"x", 0.0)) for _ in range(50)
    ]


def test_vanished_counts_datagrams_lost_outright() -> None:
    model = FaultModel(Impairment(loss=0.3, duplicate=0.3), seed=3)
    lost = sum(not model.apply(b"x", 0.0) for _ in range(20_000))
    c = model.counters
    assert c.vanished == lost
    assert c.dropped > c.vanished  # tc's count includes copies of datagrams that still arrived


# ------------------------------------------------- custom tables (tc's NAME.dist files)


def _write_dist(path: object, values: list[int]) -> None:
    lines = ["# a table in iproute2's .dist format: sigmas times 8192, 8 to a line"]
    lines += [" ".join(str(v) for v in values[i : i + 8]) for i in range(0, len(values), 8)]
    with open(str(path), "w", encoding="ascii") as f:
        f.write("\n".join(lines) + "\n")


def test_a_table_file_equal_to_the_normal_table_draws_the_same_delays(tmp_path: object) -> None:
    path = f"{tmp_path}/mine.dist"
    _write_dist(path, list(distribution_table("normal")))
    n = 5000
    assert delays(f"delay 100ms 10ms distribution {path}", n) == delays(
        "delay 100ms 10ms distribution normal", n
    )


def test_a_two_point_table_gives_mu_plus_or_minus_sigma_half_the_time(tmp_path: object) -> None:
    path = f"{tmp_path}/twopoint.dist"
    _write_dist(path, [-8192, 8192])  # -1 and +1 sigma
    n = 20_000
    got = delays(f"delay 100ms 10ms distribution {path}", n)
    assert {round(d, 9) for d in got} == {0.090, 0.110}
    high = sum(d > 0.1 for d in got)
    # Binomial(n, 1/2): sd = sqrt(n)/2 ~ 71; 5 sd is a 1-in-3.5-million miss for a fair table
    assert abs(high - n / 2) < 5 * math.sqrt(n) / 2


def test_a_table_name_is_looked_up_as_tc_does(
    tmp_path: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    _write_dist(f"{tmp_path}/flat.dist", [0])
    monkeypatch.setenv("TC_LIB_DIR", str(tmp_path))
    imp = parse_spec("delay 50ms 10ms distribution flat")
    assert imp.distribution == "flat"
    assert {round(d, 9) for d in delays("delay 50ms 10ms distribution flat", 100)} == {0.05}
    from netem.spec import format_spec

    assert parse_spec(format_spec(imp)) == imp


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("1 2 x 3\n", "line 1: 'x' is not an integer"),
        ("# fine\n0 40000\n", "line 2: 40000 is outside"),
        ("# nothing\n", "no entries"),
    ],
)
def test_a_bad_table_file_is_refused_naming_file_and_line(
    tmp_path: object, content: str, message: str
) -> None:
    path = f"{tmp_path}/bad.dist"
    with open(path, "w", encoding="ascii") as f:
        f.write(content)
    with pytest.raises(SpecError, match=message) as caught:
        parse_spec(f"delay 10ms 1ms distribution {path}")
    assert path in str(caught.value)


def test_an_unknown_distribution_names_where_it_looked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TC_LIB_DIR", raising=False)
    with pytest.raises(SpecError, match=r"/usr/lib/tc/lognormal\.dist"):
        parse_spec("delay 10ms 1ms distribution lognormal")
    with pytest.raises(ValueError, match="lognormal"):
        Impairment(delay=0.01, jitter=0.001, distribution="lognormal")
