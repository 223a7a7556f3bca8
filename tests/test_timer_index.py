"""The endpoint answers timer queries from each session's deadline as last computed
(``PeerSession.filed_deadline``): that is only right if every change to a session
marks it dirty. Checked between every two simulated events, through parking,
takes, cancels, send timeouts, loss and reordering."""

from __future__ import annotations

import random

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from netem import Impairment, SimNetwork
from reliable import Config, Endpoint, errors

A = ("sim-a", 1)
B = ("sim-b", 2)


def _stale(ep: Endpoint) -> list[tuple[object, float | None, float | None]]:
    """Sessions not marked dirty whose filed deadline is not their real one."""
    return [
        (addr, s.filed_deadline, s.deadline())
        for addr, s in ep._peers.items()
        if addr not in ep._dirty and s.filed_deadline != s.deadline()
    ]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    plan=st.lists(
        st.tuples(
            st.integers(0, 3000) | st.integers(20_000, 60_000),  # size
            st.floats(0, 0.05),  # gap before it is sent
            st.none() | st.floats(0, 0.3),  # cancelled after
            st.none() | st.floats(0.05, 1.0),  # send timeout
        ),
        min_size=1,
        max_size=15,
    ),
    capacity=st.sampled_from([0, 1, None]),
    takes=st.lists(st.floats(0, 2.0), max_size=6),
    loss=st.floats(0, 0.3),
    reorder=st.floats(0, 0.3),
    seed=st.integers(0, 2**16),
)
def test_a_session_not_marked_dirty_has_its_real_deadline_filed(
    plan: list[tuple[int, float, float | None, float | None]],
    capacity: int | None,
    takes: list[float],
    loss: float,
    reorder: float,
    seed: int,
) -> None:
    config = Config(peer_timeout=3.0, max_datagram_size=1200)
    net = SimNetwork(seed=seed, default=Impairment(loss=loss, reorder=reorder, delay=0.002))
    a = Endpoint(config, rng=random.Random(seed))
    b = Endpoint(config, rng=random.Random(seed + 1))
    b.create_mailbox("q", capacity=capacity, now=0.0)
    net.add_host(A, a)
    net.add_host(B, b)
    when = 0.0
    for size, gap, cancel_after, timeout in plan:
        when += gap

        def send(
            size: int = size,
            cancel_after: float | None = cancel_after,
            timeout: float | None = timeout,
        ) -> None:
            try:
                ticket = a.send(B, bytes(size), now=net.now, mailbox="q", timeout=timeout)
            except errors.MailboxFull:
                return
            if cancel_after is not None:
                net.call_at(net.now + cancel_after, lambda: a.withdraw(ticket, net.now), host=A)

        net.call_at(when, send, host=A)

    def take() -> None:
        while b.take("q", now=net.now) is not None:
            pass

    for t in [*takes, when + 2.0]:
        net.call_at(t, take, host=B)

    def check() -> bool:
        for ep in (a, b):
            while ep.next_event() is not None:
                pass
            assert not _stale(ep), _stale(ep)
        return False

    net.run(stop=check, until=when + 6.0, max_events=200_000)
