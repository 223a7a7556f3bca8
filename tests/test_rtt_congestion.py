"""RFC 6298 estimator and NewReno window, checked against the RFCs' arithmetic."""

from __future__ import annotations

import pytest

from reliable.congestion import NewReno
from reliable.rtt import RttEstimator


def estimator(**kw: float) -> RttEstimator:
    args = dict(initial_rto=1.0, min_rto=0.01, max_rto=10.0, max_ack_delay=0.0, granularity=0.001)
    args.update(kw)
    return RttEstimator(**args)


def test_initial_rto_before_any_sample() -> None:
    assert estimator().rto == 1.0


def test_first_sample_sets_srtt_and_half_rttvar() -> None:  # RFC 6298 (2.2)
    rtt = estimator()
    rtt.on_sample(0.1)
    assert rtt.srtt == pytest.approx(0.1)
    assert rtt.rttvar == pytest.approx(0.05)
    assert rtt.rto == pytest.approx(0.1 + 4 * 0.05)


def test_later_samples_use_alpha_and_beta() -> None:  # RFC 6298 (2.3)
    rtt = estimator()
    rtt.on_sample(0.1)
    rtt.on_sample(0.2)
    assert rtt.rttvar == pytest.approx(0.75 * 0.05 + 0.25 * 0.1)
    assert rtt.srtt == pytest.approx(0.875 * 0.1 + 0.125 * 0.2)


def test_rto_is_clamped_and_backs_off_to_the_ceiling() -> None:
    rtt = estimator(min_rto=0.2, max_rto=1.0)
    rtt.on_sample(0.001)
    assert rtt.rto == 0.2
    assert rtt.backed_off(1) == 0.4
    assert rtt.backed_off(2) == 0.8
    assert rtt.backed_off(10) == 1.0


def test_ack_delay_is_subtracted_only_above_min_rtt() -> None:
    rtt = estimator(max_ack_delay=0.025)
    rtt.on_sample(0.05)
    rtt.on_sample(0.07, ack_delay=0.02)  # 0.07 - 0.02 = 0.05 >= min_rtt: adjusted
    assert rtt.srtt == pytest.approx(0.05)
    rtt.on_sample(0.06, ack_delay=0.02)  # 0.04 < min_rtt 0.05: not adjusted
    assert rtt.latest == 0.06


def test_ack_delay_is_capped_by_max_ack_delay() -> None:
    rtt = estimator(max_ack_delay=0.005)
    rtt.on_sample(0.01)
    rtt.on_sample(0.5, ack_delay=0.4)  # a peer may not claim more than max_ack_delay
    assert rtt.srtt == pytest.approx(0.875 * 0.01 + 0.125 * 0.495)


def test_negative_samples_are_ignored() -> None:
    rtt = estimator()
    rtt.on_sample(-1)
    assert rtt.srtt is None


def test_slow_start_then_congestion_avoidance() -> None:
    cc = NewReno(initial_cwnd=10, min_cwnd=2)
    cc.on_acked(10, newest_sent_time=1.0)
    assert cc.window == 20
    cc.on_lost(newest_lost_sent_time=1.0, now=2.0)
    assert cc.window == 10
    cc.on_acked(10, newest_sent_time=2.5)  # one window acked in avoidance: +1
    assert cc.window == 11


def test_one_reduction_per_recovery_period() -> None:
    cc = NewReno(initial_cwnd=40, min_cwnd=2)
    cc.on_lost(newest_lost_sent_time=1.0, now=2.0)
    cc.on_lost(newest_lost_sent_time=1.5, now=2.1)  # sent before recovery began
    assert cc.window == 20
    cc.on_acked(5, newest_sent_time=1.9)  # no growth while recovering
    assert cc.window == 20
    cc.on_lost(newest_lost_sent_time=2.5, now=3.0)  # a new loss after recovery
    assert cc.window == 10


def test_timeout_collapses_to_min_cwnd() -> None:
    cc = NewReno(initial_cwnd=40, min_cwnd=2)
    cc.on_timeout(now=1.0)
    assert cc.window == 2
    assert cc.ssthresh == 20


def test_undo_takes_back_the_reduction_of_the_current_recovery_only() -> None:
    """Losses proven spurious (reordering) give the window back (Eifel, RFC 4015), once;
    a timeout's collapse is never undone."""
    cc = NewReno(initial_cwnd=40, min_cwnd=2)
    cc.on_acked(40, newest_sent_time=1.0)  # slow start: 80
    cc.on_lost(newest_lost_sent_time=1.0, now=2.0)
    assert (cc.window, cc.ssthresh) == (40, 40)
    cc.undo()
    assert cc.window == 80 and cc.ssthresh == float("inf")  # as before the loss
    cc.on_lost(newest_lost_sent_time=1.5, now=2.1)  # the same recovery: no new reduction
    cc.undo()  # nothing left to undo
    assert cc.window == 80
    cc.on_lost(newest_lost_sent_time=2.5, now=3.0)
    cc.on_timeout(now=4.0)
    cc.undo()
    assert cc.window == 2


def test_the_window_counts_bytes_and_grows_one_datagram_per_window() -> None:
    cc = NewReno(initial_cwnd=10 * 1200, min_cwnd=2 * 1200, max_datagram=1200)
    cc.on_lost(newest_lost_sent_time=0.5, now=1.0)  # out of slow start at 6,000 bytes
    assert cc.window == 6000
    cc.on_acked(6000, newest_sent_time=1.5)  # a window's worth acknowledged: +1 datagram
    assert cc.window == 7200
    for t in range(8):
        cc.on_lost(newest_lost_sent_time=2.0 + t, now=2.5 + t)
    assert cc.window == 2400  # never below min_cwnd bytes


def test_a_datagram_larger_than_any_timed_is_allowed_its_serialisation() -> None:
    """A sample of t seconds on an s-byte datagram shows the path carries s/t bytes per
    second at least: S bytes cross within t * (1 + S/s). At 8 Mbit/s a 60-byte datagram
    takes about 1 ms there and back, a 64 KiB one 65 ms more."""
    rtt = estimator(initial_rto=1.0)
    assert rtt.serialization_bound(65000) == 0.0  # no sample: the initial RTO rules anyway
    rtt.on_sample(0.001, size=60)
    assert rtt.serialization_bound(60) == 0.0  # timed: two RTTs cover it
    assert rtt.serialization_bound(600) == pytest.approx(0.011)
    assert rtt.serialization_bound(65000) == 1.0  # never longer than knowing nothing
    rtt.on_sample(0.07, size=65000)
    assert rtt.sampled_size == 65000 and rtt.serialization_bound(65000) == 0.0
    rtt.on_sample(0.001, size=60)
    assert rtt.sampled_size == 65000  # the largest datagram timed
