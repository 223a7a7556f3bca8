"""Simulator faults that real clusters have: process pauses, clock skew, crash and restart.

A toy sans-I/O host makes every rule visible (what it is handed, when); rmsg's
own endpoints show the faults matter to a real protocol. All on virtual time.
"""

from __future__ import annotations

import random
from typing import Any

import pytest

from netem import SimNetwork
from reliable import Config, Endpoint, errors, events


class Recorder:
    """A sans-I/O host that logs what it is handed and can arm one timer (on its own clock)."""

    def __init__(self, name: str = "") -> None:
        self.name = name
        self.log: list[tuple[str, Any, float]] = []
        self.outbox: list[tuple[bytes, Any]] = []
        self.timer: float | None = None
        self.nows: list[float] = []

    def receive_datagram(self, data: bytes, addr: Any, now: float) -> None:
        self.nows.append(now)
        self.log.append(("recv", data, now))

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, Any]]:
        self.nows.append(now)
        out, self.outbox = self.outbox, []
        return out

    def get_timer(self) -> float | None:
        return self.timer

    def handle_timer(self, now: float) -> None:
        self.nows.append(now)
        self.log.append(("timer", self.timer, now))
        self.timer = None

    def send(self, data: bytes, to: Any) -> None:
        self.outbox.append((data, to))


def _pair(**options: Any) -> tuple[SimNetwork, Recorder, Recorder]:
    net = SimNetwork(seed=1, latency=0.001, **options)
    a, b = Recorder("a"), Recorder("b")
    net.add_host("a", a)
    net.add_host("b", b)
    return net, a, b


def _send_at(net: SimNetwork, host: Recorder, addr: str, when: float, data: bytes, to: str) -> None:
    net.call_at(when, lambda: host.send(data, to), host=addr)


# ------------------------------------------------------------------ pauses


def test_a_paused_host_reads_its_backlog_in_order_when_it_resumes() -> None:
    net, a, b = _pair()
    for i in range(5):
        _send_at(net, a, "a", 0.1 * (i + 1), b"%d" % i, "b")
    net.pause("b", start=0.15, end=1.0)
    net.run(until=2.0)
    got = [(data, now) for kind, data, now in b.log if kind == "recv"]
    # 0 arrived before the pause; 1..4 were held and read at the resume time, in order
    assert got == [(b"0", pytest.approx(0.101)), *[(b"%d" % i, 1.0) for i in range(1, 5)]]
    assert net.overflowed == 0 and not net.paused("b")


def test_a_paused_hosts_timer_and_steps_wait_until_it_resumes() -> None:
    net, a, b = _pair()
    b.timer = 0.5
    net.flush("b")
    net.pause("b", start=0.2, end=3.0)
    _send_at(net, b, "b", 1.0, b"late step", "a")  # the application is stopped too
    net.call_at(1.0, lambda: b.log.append(("step", None, net.now)), host="b")
    net.run(until=5.0)
    assert ("timer", 0.5, 3.0) in b.log  # overdue, fired at the resume time
    assert ("step", None, 3.0) in b.log
    (arrival,) = [entry for entry in a.log if entry[0] == "recv"]
    assert arrival == ("recv", b"late step", pytest.approx(3.001))


def test_a_paused_host_loses_what_its_backlog_cannot_hold() -> None:
    net, a, b = _pair()
    for i in range(6):
        _send_at(net, a, "a", 0.1 * (i + 1), b"%d" % i, "b")
    net.pause("b", backlog=2)  # from now, until resume()
    net.run(until=1.0)
    assert b.log == [] and net.paused("b")
    net.resume("b")
    assert [data for _, data, _ in b.log] == [b"0", b"1"]
    assert net.overflowed == 4


def test_pause_refuses_an_end_before_its_start() -> None:
    net, _, _ = _pair()
    with pytest.raises(ValueError, match="ends"):
        net.pause("b", start=2.0, end=1.0)


def _endpoints(config: Config) -> tuple[SimNetwork, Endpoint, Endpoint]:
    net = SimNetwork(seed=5, default="delay 5ms")
    a, b = (
        Endpoint(config, rng=random.Random(1), arrival_events=True),
        Endpoint(config, rng=random.Random(2), arrival_events=True),
    )
    net.add_host("a", a)
    net.add_host("b", b)
    return net, a, b


def _fates(endpoint: Endpoint) -> list[events.Event]:
    return [
        e
        for e in iter(endpoint.next_event, None)
        if isinstance(e, (events.MessageDelivered, events.MessageFailed))
    ]


@pytest.mark.parametrize(("pause", "survives"), [(2.0, True), (8.0, False)])
def test_rmsg_rides_out_a_pause_shorter_than_peer_timeout_but_not_a_longer_one(
    pause: float, survives: bool
) -> None:
    net, a, _ = _endpoints(Config(peer_timeout=5.0))
    net.call_at(0.0, lambda: a.send("b", b"warm-up", now=net.now), host="a")
    net.run(until=0.5)
    assert [type(e) for e in _fates(a)] == [events.MessageDelivered]
    net.pause("b", start=1.0, end=1.0 + pause)
    net.call_at(1.1, lambda: a.send("b", b"during the pause", now=net.now), host="a")
    net.run(until=12.0)
    (fate,) = _fates(a)
    if survives:
        assert isinstance(fate, events.MessageDelivered)
    else:
        assert isinstance(fate, events.MessageFailed)
        assert isinstance(fate.error, errors.PeerUnreachable)


# ------------------------------------------------------------------ clocks


def test_a_skewed_host_sees_its_own_time_and_its_deadlines_are_converted() -> None:
    net, a, b = _pair()
    net.run(until=1.0)
    net.set_clock("b", offset=1000.0, drift=0.5)  # at t=1 b reads 1001 and runs 1.5x fast
    assert net.clock("b") == 1001.0
    b.timer = 1001.0 + 3.0  # three of b's seconds from now: two of the network's
    net.flush("b")
    _send_at(net, a, "a", 2.0, b"ping", "b")
    net.run(until=10.0)
    assert ("recv", b"ping", pytest.approx(1001.0 + 1.001 * 1.5)) in b.log
    (timer,) = [entry for entry in b.log if entry[0] == "timer"]
    assert timer[2] == pytest.approx(1004.0) and timer[2] >= 1004.0
    assert net.now == 10.0
    assert net.clock("b") == pytest.approx(1001.0 + 9.0 * 1.5)


def test_a_hosts_clock_never_runs_backwards_unless_stepped_back() -> None:
    net, a, b = _pair()
    net.set_clock("b", offset=7.0, drift=1e-4)
    for i in range(200):
        _send_at(net, a, "a", 0.013 * i, b"x", "b")
    net.run(until=3.0)
    assert b.nows == sorted(b.nows) and b.nows[-1] > 7.0
    net.set_clock("b", offset=-1.0)  # a step back: the only way its time decreases
    assert net.clock("b") == pytest.approx(2.0)


def test_set_clock_refuses_a_clock_that_does_not_run() -> None:
    net, _, _ = _pair()
    with pytest.raises(ValueError, match="drift"):
        net.set_clock("a", drift=-1.0)


def test_rmsg_delivers_between_hosts_whose_clocks_disagree() -> None:
    """Each end measures RTTs on its own clock; an offset of days and drift of 1%
    must not confuse the retransmission timers (sans-I/O time is only ever compared
    with itself)."""
    net = SimNetwork(seed=3, default="delay 10ms 2ms loss 5%")
    a, b = (
        Endpoint(rng=random.Random(1), arrival_events=True),
        Endpoint(rng=random.Random(2), arrival_events=True),
    )
    net.add_host("a", a)
    net.add_host("b", b)
    net.set_clock("a", offset=-50.0, drift=-0.01)
    net.set_clock("b", offset=3 * 86400.0, drift=0.01)
    for i in range(300):
        net.call_at(
            i * 0.002, lambda i=i: a.send("b", b"%d" % i * 50, now=net.clock("a")), host="a"
        )
    net.run(until=20.0)
    fates = _fates(a)
    assert len(fates) == 300 and all(isinstance(e, events.MessageDelivered) for e in fates)
    got = [e.data for e in iter(b.next_event, None) if isinstance(e, events.MessageReceived)]
    assert got == [b"%d" % i * 50 for i in range(300)]
    srtt = a._peers["b"].sender.rtt.srtt
    assert 0.015 < srtt < 0.05  # ~20 ms round trip, measured on a's (1% slow) clock


# ------------------------------------------------------------- crash and restart


def test_a_scripted_crash_loses_datagrams_until_the_restart() -> None:
    net, a, _ = _pair()
    net.crash("b", at=1.0)
    net.restart("b", lambda: Recorder("b2"), at=2.0)
    for when in (0.5, 1.5, 2.5):
        _send_at(net, a, "a", when, b"%.1f" % when, "b")
    net.run(until=3.0)
    first, second = net.lives("b")
    assert [d for _, d, _ in first.log] == [b"0.5"]  # type: ignore[attr-defined]
    assert [d for _, d, _ in second.log] == [b"2.5"]  # type: ignore[attr-defined]
    assert net.undeliverable == 1 and net.crashes == 1


def test_a_crash_kills_the_hosts_timers_and_what_its_buffer_held() -> None:
    net, a, b = _pair()
    b.timer = 2.0
    net.flush("b")
    net.pause("b", start=0.0, end=5.0)
    _send_at(net, a, "a", 0.5, b"held", "b")
    net.crash("b", at=1.0)
    net.run(until=10.0)
    assert b.log == [] and net.undeliverable == 1 and not net.paused("b")


def test_rmsg_reports_the_restart_and_a_resend_reaches_the_new_incarnation() -> None:
    config = Config(peer_timeout=5.0)
    net, a, _ = _endpoints(config)
    net.call_at(0.0, lambda: a.send("b", b"to the first life", now=net.now), host="a")
    net.crash("b", at=1.0)
    net.restart("b", lambda: Endpoint(config, rng=random.Random(9), arrival_events=True), at=1.5)
    net.call_at(2.0, lambda: a.send("b", b"to the second life", now=net.now), host="a")
    net.run(until=6.0)
    seen = list(iter(a.next_event, None))
    assert any(isinstance(e, events.PeerRestarted) for e in seen)
    delivered, failed = [
        e for e in seen if isinstance(e, (events.MessageDelivered, events.MessageFailed))
    ]
    assert isinstance(delivered, events.MessageDelivered)
    assert isinstance(failed, events.MessageFailed)  # sent before a knew of the restart
    assert isinstance(failed.error, errors.PeerRestarted)
    net.call_at(6.0, lambda: a.send("b", b"to the second life", now=net.now), host="a")
    net.run(until=8.0)
    assert [type(e) for e in _fates(a)] == [events.MessageDelivered]
    first, second = net.lives("b")
    assert isinstance(first, Endpoint) and isinstance(second, Endpoint)
    taken = second.take("", now=net.now)
    assert taken is not None and taken.data == b"to the second life"


# ------------------------------------------------------------------ determinism


def _story(seed: int) -> list[Any]:
    net = SimNetwork(seed=seed, default="delay 5ms 3ms loss 20%")
    a, b = Recorder("a"), Recorder("b")
    net.add_host("a", a)
    net.add_host("b", b)
    net.set_clock("b", offset=5.0, drift=0.02)
    net.pause("b", start=0.3, end=0.6, backlog=10)
    net.crash("a", at=0.8)
    net.restart("a", Recorder, at=0.9)
    for i in range(100):
        _send_at(net, a, "a", 0.01 * i, b"%d" % i, "b")
    net.run(until=2.0)
    return [b.log, net.overflowed, net.undeliverable]


def test_pauses_skew_and_crashes_replay_exactly_from_the_seed() -> None:
    assert _story(4) == _story(4)
    assert _story(4) != _story(5)
