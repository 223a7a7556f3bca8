"""RPC over the simulated network: the sans-I/O RPC cores over real Endpoints, with
hypothesis choosing the calls, the link faults and the server crashes.

The invariant, stated once: every call gets exactly one outcome; no handler runs
twice for a call (across server restarts and anycast members); ``OK`` means it ran
exactly once and the result is its result; ``executed=True`` means it ran once,
``executed=False`` that it never ran (not even later), ``None`` at most once.
"""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from netem import Impairment, SimNetwork
from reliable import Config, Endpoint, errors, events
from reliable.rpc import Status
from reliable.rpc.codec import JsonCodec
from reliable.rpc.protocol import (
    CallDone,
    CallId,
    CancelCall,
    ClientCore,
    Outgoing,
    ServerCore,
    service_mailbox,
)

C = ("sim-client", 1)
SERVERS = [("sim-s1", 2), ("sim-s2", 3)]
MAILBOX = service_mailbox("calc")
CODEC = JsonCodec()

impairments = st.builds(
    Impairment,
    loss=st.floats(0, 0.3),
    duplicate=st.floats(0, 0.2),
    corrupt=st.floats(0, 0.1),
    delay=st.floats(0, 0.02),
    jitter=st.floats(0, 0.02),
    reorder=st.floats(0, 0.3),
)

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


class _Sends:
    """Glue shared by both sides: send a core's Outgoing through the endpoint."""

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self.tickets: dict[int, int] = {}  # endpoint ticket -> core key
        self.by_key: dict[int, int] = {}

    def send(self, out: Outgoing, now: float) -> BaseException | None:
        try:
            ticket = self.endpoint.send(
                out.dest, out.data, now=now, mailbox=out.mailbox, timeout=out.timeout
            )
        except errors.WouldBlock as exc:
            return exc
        self.tickets[ticket] = out.key
        self.by_key[out.key] = ticket
        return None


class ClientHost:
    """A client node: an Endpoint and a ClientCore, as the adapters join them."""

    def __init__(self, config: Config, seed: int, retry_interval: float) -> None:
        self.endpoint = Endpoint(config, rng=random.Random(seed))
        self.owner = self.endpoint.create_mailbox("reply", port=True, now=0.0)
        self.core = ClientCore(self.endpoint.incarnation, "reply", retry_interval=retry_interval)
        self.sends = _Sends(self.endpoint)
        self.done: dict[int, CallDone] = {}

    def pump(self, now: float) -> None:
        ep, core = self.endpoint, self.core
        for _ in range(100):
            progress = False
            while (e := ep.next_event()) is not None:
                if isinstance(e, (events.MessageDelivered, events.MessageFailed)):
                    key = self.sends.tickets.pop(e.ticket, None)
                    if key is None:
                        continue
                    self.sends.by_key.pop(key, None)
                    if isinstance(e, events.MessageDelivered):
                        core.sent(key, e.incarnation, now)
                    else:
                        core.send_failed(key, e.error, now)
                    progress = True
            while (m := ep.take("reply", owner=self.owner, now=now)) is not None:
                core.receive(m.data, m.source, now)
                progress = True
            for key in core.withdrawals():
                ticket = self.sends.by_key.get(key)
                if ticket is not None:
                    ep.withdraw(ticket, now)
                    progress = True
            for out in core.outgoing():
                error = self.sends.send(out, now)
                if error is not None:
                    core.send_failed(out.key, error, now)
                progress = True
            while (d := core.next_event()) is not None:
                assert d.counter not in self.done, "a call had two outcomes"
                self.done[d.counter] = d
                progress = True
            if not progress:
                return
        raise AssertionError("client pump did not settle")

    # the SansIOHost surface
    def receive_datagram(self, data: bytes, addr: Any, now: float) -> None:
        self.endpoint.receive_datagram(data, addr, now)
        self.pump(now)

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, Any]]:
        self.pump(now)
        return self.endpoint.datagrams_to_send(now)

    def get_timer(self) -> float | None:
        times = [t for t in (self.endpoint.get_timer(), self.core.get_timer()) if t is not None]
        return min(times) if times else None

    def handle_timer(self, now: float) -> None:
        t = self.endpoint.get_timer()
        if t is not None and t <= now:
            self.endpoint.handle_timer(now)
        t = self.core.get_timer()
        if t is not None and t <= now:
            self.core.handle_timer(now)
        self.pump(now)


class ServerHost:
    """A server node: an Endpoint, a ServerCore, and handlers that take simulated time."""

    def __init__(
        self,
        config: Config,
        seed: int,
        executions: Counter[CallId],
        durations: list[float],
        *,
        max_concurrency: int,
        max_queued: int,
        cache_entries: int,
        cache_age: float = 5.0,
    ) -> None:
        self.endpoint = Endpoint(config, rng=random.Random(seed))
        self.owner = self.endpoint.create_mailbox(MAILBOX, port=True, now=0.0)
        self.core = ServerCore(
            lambda m: m == "square",
            max_concurrency=max_concurrency,
            max_queued=max_queued,
            cache_entries=cache_entries,
            cache_age=cache_age,
            incarnation=self.endpoint.incarnation,
        )
        self.sends = _Sends(self.endpoint)
        self.executions = executions
        self.durations = durations
        self.running: dict[CallId, tuple[float, int]] = {}  # ends at, argument

    def pump(self, now: float) -> None:
        ep, core = self.endpoint, self.core
        while ep.next_event() is not None:
            pass  # reply fates: a lost reply is fetched again by the client's retry
        while (m := ep.take(MAILBOX, owner=self.owner, now=now)) is not None:
            core.receive(m.data, m.source, now)
        while (start := core.start_next(now)) is not None:
            self.executions[start.call_id] += 1
            (args, _kwargs) = CODEC.decode(start.payload)
            took = self.durations[start.call_id[1] % len(self.durations)]
            self.running[start.call_id] = (now + took, args[0])
        while (c := core.next_event()) is not None:
            assert isinstance(c, CancelCall)
            if c.call_id in self.running:
                del self.running[c.call_id]
                core.finish(c.call_id, Status.CANCELLED, b'["CancelledError", ""]', now)
        for call_id, (ends, arg) in list(self.running.items()):
            if ends <= now:
                del self.running[call_id]
                core.finish(call_id, Status.OK, CODEC.encode(arg * arg), now)
        for out in core.outgoing():
            self.sends.send(out, now)

    def receive_datagram(self, data: bytes, addr: Any, now: float) -> None:
        self.endpoint.receive_datagram(data, addr, now)
        self.pump(now)

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, Any]]:
        self.pump(now)
        return self.endpoint.datagrams_to_send(now)

    def get_timer(self) -> float | None:
        times = [self.endpoint.get_timer(), self.core.get_timer()]
        times += [ends for ends, _ in self.running.values()]
        pending = [t for t in times if t is not None]
        return min(pending) if pending else None

    def handle_timer(self, now: float) -> None:
        t = self.endpoint.get_timer()
        if t is not None and t <= now:
            self.endpoint.handle_timer(now)
        t = self.core.get_timer()
        if t is not None and t <= now:
            self.core.handle_timer(now)
        self.pump(now)


def _stuck(client: ClientHost) -> str:
    """Why calls are still waiting: their RPC state and the transport's view of their sends."""
    lines = []
    for call in client.core._calls.values():
        sends = {key: (kind, key in client.sends.by_key) for key, kind in call.sends.items()}
        lines.append(f"call {call.counter}: reached={call.reached} sends={sends}")
    return "; ".join(lines) + f"; transport: {client.endpoint.stats().peers}"


@SETTINGS
@given(
    plan=st.lists(
        st.tuples(
            st.integers(-1000, 1000),  # argument
            st.floats(0, 0.2),  # gap before the call
            st.none() | st.floats(0.05, 6.0),  # deadline (seconds from start)
            st.none() | st.floats(0, 1.0),  # cancelled after
        ),
        min_size=1,
        max_size=12,
    ),
    durations=st.lists(st.floats(0, 1.5), min_size=1, max_size=5),
    to_server=impairments,
    to_client=impairments,
    # Crashes and partitions begin after the client's first contact: before it they trip a
    # core bug (tests/test_core_timeout_stall.py) that leaves later sends without a fate.
    crash=st.none() | st.tuples(st.floats(0.3, 1.5), st.floats(0, 4.0)),
    anycast=st.booleans(),
    max_concurrency=st.integers(1, 3),
    max_queued=st.integers(0, 2),
    cache_entries=st.sampled_from([2, 100]),
    cache_age=st.sampled_from([0.2, 5.0]),
    partition=st.none() | st.tuples(st.floats(0.3, 2.0), st.floats(0.1, 4.0)),
    seed=st.integers(0, 2**16),
)
@example(  # before the HELLO, a call's first request ran in two lives of a restarted server
    plan=[(0, 0.125, None, None)],
    durations=[0.0],
    to_server=Impairment(loss=0.125, duplicate=0.125, corrupt=0.0625),
    to_client=Impairment(loss=0.25, duplicate=0.125, corrupt=0.0625, jitter=0.015625),
    crash=(0.375, 0.0),
    anycast=False,
    max_concurrency=1,
    max_queued=0,
    cache_entries=2,
    cache_age=0.2,
    partition=None,
    seed=326,
)
def test_at_most_once_and_one_outcome_per_call(
    plan: list[tuple[int, float, float | None, float | None]],
    durations: list[float],
    to_server: Impairment,
    to_client: Impairment,
    crash: tuple[float, float] | None,
    anycast: bool,
    max_concurrency: int,
    max_queued: int,
    cache_entries: int,
    cache_age: float,
    partition: tuple[float, float] | None,
    seed: int,
) -> None:
    config = Config(peer_timeout=2.0)
    net = SimNetwork(seed=seed)
    servers = SERVERS if anycast else SERVERS[:1]
    for s in servers:
        net.set_link(C, s, to_server)
        net.set_link(s, C, to_client)
    executions: Counter[CallId] = Counter()

    def server(n: int, life: int) -> ServerHost:
        return ServerHost(
            config,
            seed * 7 + n * 101 + life,
            executions,
            durations,
            max_concurrency=max_concurrency,
            max_queued=max_queued,
            cache_entries=cache_entries,
            cache_age=cache_age,
        )

    client = ClientHost(config, seed, retry_interval=0.5)
    net.add_host(C, client)
    for n, s in enumerate(servers):
        net.add_host(s, server(n, 0))
        if partition is not None:
            net.partition(C, s, start=partition[0], end=partition[0] + partition[1])
    args: dict[int, int] = {}
    when = 0.0
    for arg, gap, deadline, cancel_after in plan:
        when += gap

        def call(
            arg: int = arg, deadline: float | None = deadline, cancel: float | None = cancel_after
        ) -> None:
            now = net.now
            counter = client.core.start(
                list(servers),
                MAILBOX,
                "square",
                "json",
                CODEC.encode([[arg], {}]),
                deadline=None if deadline is None else now + deadline,
                now=now,
                anycast=anycast,
            )
            args[counter] = arg
            if cancel is not None:
                net.call_at(now + cancel, lambda: client.core.cancel(counter, net.now), host=C)

        net.call_at(when, call, host=C)
    if crash is not None:
        at, downtime = crash
        net.call_at(at, lambda: net.remove_host(servers[0]))
        net.call_at(at + downtime, lambda: net.add_host(servers[0], server(0, 1)))

    def done() -> bool:
        return net.now > when and len(client.done) == len(plan)

    net.run(stop=done, until=600.0)
    assert len(client.done) == len(plan), f"every call gets one outcome: {_stuck(client)}"
    net.run(until=net.now + 10.0)  # anything that would still run late, runs now
    inc = client.endpoint.incarnation
    for counter, outcome in client.done.items():
        ran = executions[(inc, counter)]
        event(f"{outcome.status.name} executed={outcome.executed}")
        assert ran <= 1, f"call {counter} ran {ran} times"
        if outcome.status is Status.OK:
            assert ran == 1 and outcome.executed is True
            assert CODEC.decode(outcome.body) == args[counter] ** 2
        elif outcome.executed is True:
            assert ran == 1, f"{outcome} but it ran {ran} times"
        elif outcome.executed is False:
            assert ran == 0, f"{outcome} but it ran"
    assert sum(executions.values()) == sum(1 for k in executions if k[0] == inc)


def test_a_restarted_client_is_not_answered_with_its_previous_lifes_replies() -> None:
    """Call ids carry the client node's incarnation: after a restart the counter starts
    again at 1, and the server, which still caches the old life's call 1, must run the
    new call 1 rather than answer it with the old reply."""
    config = Config(peer_timeout=2.0)
    net = SimNetwork(seed=5)
    executions: Counter[CallId] = Counter()
    server = ServerHost(
        config, 7, executions, [0.0], max_concurrency=1, max_queued=1, cache_entries=100
    )
    net.add_host(SERVERS[0], server)
    results = []
    for life, arg in enumerate((3, 4)):
        client = ClientHost(config, 100 + life, retry_interval=0.5)
        net.add_host(C, client)  # the same address: the client restarted
        counter = client.core.start(
            [SERVERS[0]],
            MAILBOX,
            "square",
            "json",
            CODEC.encode([[arg], {}]),
            deadline=net.now + 5.0,
            now=net.now,
        )
        net.flush(C)
        net.run(stop=lambda c=client: bool(c.done), until=net.now + 10.0)
        results.append((counter, client.done[counter]))
        net.remove_host(C)
    assert [counter for counter, _ in results] == [1, 1]
    assert [CODEC.decode(done.body) for _, done in results] == [9, 16]
    assert sum(executions.values()) == 2


# ------------------------------------------------------------- the cores by hand


def _connect(client: ClientCore, server: ServerCore, now: float) -> list[Outgoing]:
    """Deliver everything the client sent to the server (receipts naming its incarnation);
    returns the server's replies."""
    for out in client.outgoing():
        server.receive(out.data, C, now)
        client.sent(out.key, server.incarnation, now)
    return server.outgoing()


def test_a_call_cancelled_while_running_ends_cancelled_whatever_the_handler_answers() -> None:
    """The handler ignored the cancellation and returned a result: the client, which
    cancelled, still sees CANCELLED (executed: it ran), never a result after cancel()."""
    client = ClientCore(7, "reply", retry_interval=1.0)
    server = ServerCore(lambda m: True, max_concurrency=1, max_queued=1, incarnation=99)
    counter = client.start(
        [SERVERS[0]], MAILBOX, "square", "json", CODEC.encode([[3], {}]), deadline=None, now=0.0
    )
    _connect(client, server, 0.0)  # the HELLO
    _connect(client, server, 0.0)  # the call
    start = server.start_next(0.0)
    assert start is not None
    client.cancel(counter, 0.1)
    _connect(client, server, 0.1)  # the CANCEL
    assert server.next_event() == CancelCall(call_id=start.call_id, reason="cancelled")
    server.finish(start.call_id, Status.OK, CODEC.encode(9), 0.2)  # it ran to the end anyway
    for out in server.outgoing():
        client.receive(out.data, SERVERS[0], 0.2)
    done = client.next_event()
    assert done is not None and client.next_event() is None
    assert (done.status, done.executed) == (Status.CANCELLED, True)
    assert "answered OK" in done.details


def test_a_result_that_arrived_before_cancel_is_kept() -> None:
    client = ClientCore(7, "reply", retry_interval=1.0)
    server = ServerCore(lambda m: True, incarnation=99)
    counter = client.start(
        [SERVERS[0]], MAILBOX, "square", "json", CODEC.encode([[3], {}]), deadline=None, now=0.0
    )
    _connect(client, server, 0.0)
    _connect(client, server, 0.0)
    start = server.start_next(0.0)
    assert start is not None
    server.finish(start.call_id, Status.OK, CODEC.encode(9), 0.1)
    for out in server.outgoing():
        client.receive(out.data, SERVERS[0], 0.1)
    client.cancel(counter, 0.2)  # too late: it has its outcome
    done = client.next_event()
    assert done is not None and done.status is Status.OK and CODEC.decode(done.body) == 9


def test_closing_answers_queued_calls_not_executed_and_lets_running_ones_finish() -> None:
    client = ClientCore(7, "reply", retry_interval=1.0)
    server = ServerCore(lambda m: True, max_concurrency=1, max_queued=2, incarnation=99)

    def call(arg: int, now: float) -> int:
        return client.start(
            [SERVERS[0]],
            MAILBOX,
            "square",
            "json",
            CODEC.encode([[arg], {}]),
            deadline=None,
            now=now,
        )

    running = call(2, 0.0)
    _connect(client, server, 0.0)  # the HELLO
    _connect(client, server, 0.0)
    start = server.start_next(0.0)
    assert start is not None
    queued = call(3, 0.1)
    _connect(client, server, 0.1)
    assert server.start_next(0.1) is None  # it waits for the worker
    server.close(0.2)
    late = call(4, 0.3)
    replies = _connect(client, server, 0.3)  # after close(): refused, not run
    assert server.start_next(0.3) is None
    server.finish(start.call_id, Status.OK, CODEC.encode(4), 0.4)
    replies += server.outgoing()
    for out in replies:
        client.receive(out.data, SERVERS[0], 0.4)
    outcomes = {}
    while (done := client.next_event()) is not None:
        outcomes[done.counter] = done
    assert (outcomes[running].status, CODEC.decode(outcomes[running].body)) == (Status.OK, 4)
    for counter in (queued, late):
        assert (outcomes[counter].status, outcomes[counter].executed) == (
            Status.UNAVAILABLE,
            False,
        )
    assert server.stats.started == 1


def test_anycast_moves_on_from_a_closing_member_which_did_not_run_it() -> None:
    """A member that is closing answers 'not executed': provably not run there, so the
    call may go to the next member (and runs once, there)."""
    client = ClientCore(7, "reply", retry_interval=1.0)
    closing = ServerCore(lambda m: True, incarnation=98)
    other = ServerCore(lambda m: True, incarnation=99)
    closing.close(0.0)
    client.start(
        list(SERVERS),
        MAILBOX,
        "square",
        "json",
        CODEC.encode([[5], {}]),
        deadline=None,
        now=0.0,
        anycast=True,
    )
    _connect(client, closing, 0.0)  # HELLO
    for out in _connect(client, closing, 0.0):  # the call: refused, not executed
        client.receive(out.data, SERVERS[0], 0.0)
    _connect(client, other, 0.1)  # HELLO to the next member
    _connect(client, other, 0.1)  # the call
    start = other.start_next(0.1)
    assert start is not None and closing.stats.started == 0
    other.finish(start.call_id, Status.OK, CODEC.encode(25), 0.2)
    for out in other.outgoing():
        client.receive(out.data, SERVERS[1], 0.2)
    done = client.next_event()
    assert done is not None and done.status is Status.OK and CODEC.decode(done.body) == 25
    assert client.stats.failovers == 1
