"""netem's fault models: statistics with fixed seeds, netem's semantics, determinism."""

from __future__ import annotations

import itertools
import math
import random

import pytest

from netem import FaultModel, FourState, GilbertElliott, Impairment
from netem.models import DELAY_BUCKETS

N = 20_000


def run(
    imp: Impairment, n: int = N, seed: int = 1, size: int = 100
) -> tuple[FaultModel, list[list[tuple[float, bytes]]]]:
    model = FaultModel(imp, seed=seed, log=True)
    fates = [model.apply(bytes([i % 256]) * size, now=i * 0.001) for i in range(n)]
    return model, fates


def within_binomial(count: int, n: int, p: float, sigmas: float = 4.5) -> bool:
    mean = n * p
    return abs(count - mean) <= sigmas * math.sqrt(n * p * (1 - p)) + 1


def bursts(lost: list[bool]) -> list[int]:
    out, run_len = [], 0
    for x in lost:
        if x:
            run_len += 1
        elif run_len:
            out.append(run_len)
            run_len = 0
    return out


@pytest.mark.parametrize("p", [0.01, 0.1, 0.5])
def test_random_loss_rate_is_binomial(p: float) -> None:
    model, fates = run(Impairment(loss=p))
    dropped = sum(1 for f in fates if not f)
    assert dropped == model.counters.dropped == model.counters.dropped_loss
    assert within_binomial(dropped, N, p)


def test_correlated_loss_makes_a_loss_likelier_after_a_loss() -> None:
    """netem's correlation blends uniforms: weak, as its documentation warns, but real."""
    _, fates = run(Impairment(loss=0.3, loss_correlation=0.75), n=100_000)
    lost = [not f for f in fates]
    after_loss = [b for a, b in itertools.pairwise(lost) if a]
    after_pass = [b for a, b in itertools.pairwise(lost) if not a]
    assert sum(after_loss) / len(after_loss) > 1.2 * sum(after_pass) / len(after_pass)


def test_gilbert_elliott_mean_burst_is_one_over_r() -> None:
    r = 0.25
    _, fates = run(Impairment(loss_model=GilbertElliott(p=0.02, r=r)), n=100_000)
    lengths = bursts([not f for f in fates])
    assert len(lengths) > 1000
    assert sum(lengths) / len(lengths) == pytest.approx(1 / r, rel=0.1)


def test_gilbert_elliott_defaults_follow_tc() -> None:
    ge = GilbertElliott(p=0.1)
    assert (ge.r, ge.one_minus_h, ge.one_minus_k) == (pytest.approx(0.9), 1.0, 0.0)
    # with only p (r = 1 - p) the model is Bernoulli with loss rate p
    _, fates = run(Impairment(loss_model=ge))
    assert within_binomial(sum(1 for f in fates if not f), N, 0.1, sigmas=6)


def test_gilbert_elliott_loses_in_the_good_state_with_1_minus_k() -> None:
    _, fates = run(Impairment(loss_model=GilbertElliott(p=0.0, r=1.0, one_minus_k=0.05)))
    assert within_binomial(sum(1 for f in fates if not f), N, 0.05)


def test_four_state_bursts_and_isolated_losses() -> None:
    # only bursts: 1 -> 3 with p13, leave 3 with p31 (mean burst 1/p31)
    _, fates = run(Impairment(loss_model=FourState(p13=0.02, p31=0.2)), n=100_000)
    lengths = bursts([not f for f in fates])
    assert sum(lengths) / len(lengths) == pytest.approx(5.0, rel=0.1)
    # only isolated losses: 1 -> 4 with p14, always followed by a transmission
    _, fates = run(Impairment(loss_model=FourState(p13=0.0, p31=1.0, p14=0.05)))
    lengths = bursts([not f for f in fates])
    assert set(lengths) == {1}
    assert within_binomial(len(lengths), N, 0.05 * 0.95, sigmas=6)


def test_four_state_defaults_follow_tc() -> None:
    fs = FourState(p13=0.1)
    assert (fs.p31, fs.p32, fs.p23, fs.p14) == (pytest.approx(0.9), 0.0, 1.0, 0.0)


def test_duplicates_are_extra_copies_with_their_own_fate() -> None:
    model, fates = run(Impairment(duplicate=0.1, duplicate_copies=2))
    extra = sum(len(f) - 1 for f in fates if len(f) > 1)
    assert extra == model.counters.duplicated
    assert within_binomial(extra // 2, N, 0.1)


def test_a_duplicated_packet_survives_one_loss_as_in_netem() -> None:
    _model, fates = run(Impairment(duplicate=1.0, loss=1.0), n=100)
    assert all(len(f) == 1 for f in fates)  # count = 1 + 1 - 1


def test_reorder_without_gap_sends_a_fraction_at_once() -> None:
    model, fates = run(Impairment(delay=0.05, reorder=0.25))
    immediate = sum(1 for i, f in enumerate(fates) if f[0][0] == pytest.approx(i * 0.001))
    assert immediate == model.counters.reordered
    assert within_binomial(immediate, N, 0.25)


def test_reorder_gap_follows_netem() -> None:
    _, fates = run(Impairment(delay=0.05, reorder=1.0, gap=5), n=50)
    immediate = [i for i, f in enumerate(fates) if f[0][0] == pytest.approx(i * 0.001)]
    assert immediate == list(range(4, 50, 5))  # every 5th datagram jumps the queue


@pytest.mark.parametrize("distribution", ["uniform", "normal", "pareto", "paretonormal"])
def test_delay_distributions(distribution: str) -> None:
    imp = Impairment(delay=0.1, jitter=0.01, distribution=distribution)
    model, fates = run(imp)
    delays = [f[0][0] - i * 0.001 for i, f in enumerate(fates)]
    mean = sum(delays) / len(delays)
    sd = math.sqrt(sum((d - mean) ** 2 for d in delays) / len(delays))
    assert mean == pytest.approx(0.1, abs=0.002)
    if distribution == "uniform":
        assert min(delays) >= 0.09 - 1e-9 and max(delays) <= 0.11 + 1e-9
        assert sd == pytest.approx(0.01 / math.sqrt(3), rel=0.05)
    elif distribution == "normal":
        assert sd == pytest.approx(0.01, rel=0.05)
    else:
        assert max(delays) > 0.1 + 3 * 0.01  # a heavy right tail
    assert sum(model.counters.delay_histogram) == model.counters.delivered == N
    assert model.counters.delay_mean == pytest.approx(mean)


def test_rate_serialises_datagrams() -> None:
    # 1 Mbit/s: 1250 bytes take 10 ms (headers not charged here: rate_headers=0)
    model = FaultModel(Impairment(rate=1_000_000, rate_headers=0))
    releases = [model.apply(b"x" * 1250, now=0.0)[0][0] for _ in range(5)]
    assert releases == pytest.approx([0.01, 0.02, 0.03, 0.04, 0.05])


def test_queue_limit_tail_drops() -> None:
    model = FaultModel(Impairment(delay=1.0, limit=5))
    fates = [model.apply(b"x", now=0.0) for _ in range(10)]
    assert [bool(f) for f in fates] == [True] * 5 + [False] * 5
    assert model.counters.dropped_queue == 5
    assert model.apply(b"x", now=2.0)  # the queue drained


def test_mtu_black_hole() -> None:
    model = FaultModel(Impairment(mtu=1000))
    assert model.apply(b"x" * 1000, 0.0) and not model.apply(b"x" * 1001, 0.0)
    assert model.counters.dropped_mtu == 1


def test_corruption_flips_the_asked_number_of_bits() -> None:
    model = FaultModel(Impairment(corrupt=1.0, corrupt_bits=3), seed=5, log=True)
    data = bytes(200)
    ((_release, out),) = model.apply(data, 0.0)
    flipped = sum(bin(a ^ b).count("1") for a, b in zip(data, out, strict=True))
    assert 1 <= flipped <= 3 and flipped % 2 == 1  # three flips (two may cancel)
    decision = model.log[0] if model.log else None
    assert decision is not None and len(decision.corruption) == 3


def test_truncation_garbage_and_custom_corruption() -> None:
    model = FaultModel(Impairment(truncate=1.0), seed=2)
    assert len(model.apply(bytes(100), 0.0)[0][1]) < 100
    model = FaultModel(Impairment(garbage=1.0, garbage_max=8), seed=2)
    assert 100 < len(model.apply(bytes(100), 0.0)[0][1]) <= 108

    def zero_first_byte(data: bytes, rng: random.Random) -> bytes:
        return b"\0" + data[1:]

    model = FaultModel(Impairment(corrupt=1.0, corrupt_fn=zero_first_byte))
    assert model.apply(b"\xffabc", 0.0)[0][1] == b"\0abc"


def test_stale_replay_sends_a_late_copy() -> None:
    model = FaultModel(Impairment(replay=1.0, replay_delay=3.0))
    assert model.apply(b"old", 1.0) == [(1.0, b"old"), (4.0, b"old")]
    assert model.counters.replayed == 1


def test_same_seed_same_decisions_different_seed_different() -> None:
    imp = Impairment(
        loss=0.1,
        duplicate=0.05,
        corrupt=0.05,
        corrupt_bits=2,
        delay=0.01,
        jitter=0.005,
        reorder=0.1,
        truncate=0.01,
        garbage=0.01,
        replay=0.01,
    )
    a, _ = run(imp, n=5000, seed=42)
    b, _ = run(imp, n=5000, seed=42)
    c, _ = run(imp, n=5000, seed=43)
    assert a.log is not None and b.log is not None and c.log is not None
    assert list(a.log) == list(b.log)
    assert list(a.log) != list(c.log)


def test_bad_parameters_are_refused() -> None:
    with pytest.raises(ValueError, match="loss"):
        Impairment(loss=1.5)
    with pytest.raises(ValueError, match="distribution"):
        Impairment(distribution="cauchy")
    with pytest.raises(ValueError, match="either"):
        Impairment(loss=0.1, loss_model=GilbertElliott(p=0.1))
    with pytest.raises(ValueError, match="gemodel"):
        GilbertElliott(p=2.0)


def test_histogram_buckets_cover_every_delay() -> None:
    assert DELAY_BUCKETS[0] == 0.0 and DELAY_BUCKETS[-1] == math.inf
