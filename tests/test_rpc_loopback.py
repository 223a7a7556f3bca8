"""RPC over real sockets on loopback: the blocking and asyncio adapters, statuses,
deadlines, cancellation, back-pressure, and processes killed mid-call."""

from __future__ import annotations

import asyncio
import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import threading
import time
from typing import Any, Protocol

import pytest

from reliable import AsyncNode, Config, Node
from reliable.rpc import (
    AsyncClient,
    AsyncServer,
    Client,
    MarshalError,
    RemoteError,
    RpcError,
    Server,
    Status,
    current_call,
)

pytestmark = pytest.mark.loopback


class Calc:
    def __init__(self) -> None:
        self.runs: list[str] = []
        self.release = threading.Event()

    def add(self, a: int, b: int) -> int:
        self.runs.append("add")
        return a + b

    def echo(self, value: Any) -> Any:
        return value

    def divide(self, a: float, b: float) -> float:
        return a / b

    def time_left(self) -> float | None:
        return current_call().time_remaining()

    def wait(self, seconds: float) -> str:
        self.runs.append("wait")
        call = current_call()
        if call.wait_cancelled(seconds):
            raise RpcError(Status.CANCELLED, "stopped early")
        return "finished"

    def block(self) -> str:
        self.runs.append("block")
        self.release.wait(10)
        return "released"


class CalcInterface(Protocol):
    def add(self, a: int, b: int) -> int: ...
    def echo(self, value: Any) -> Any: ...


def _dest(node: Node, service: str = "") -> str:
    return f"127.0.0.1:{node.address[1]}" + (f"/{service}" if service else "")


@pytest.fixture
def pair() -> Any:
    with Node() as server_node, Node() as client_node:
        calc = Calc()
        server = Server(server_node, calc, service="calc", max_concurrency=2, max_queued=1)
        client = Client(client_node, timeout=10, retry_interval=0.5)
        yield calc, server, client, _dest(server_node, "calc")
        client.close()
        server.close()


def test_calls_results_and_statuses(pair: Any) -> None:
    calc, _server, client, dest = pair
    assert client.call(dest, "add", 2, 3) == 5
    assert client.call(dest, "add", a=2, b=40) == 42
    value = {"bytes": b"\x00\xff", "nested": [1, 2.5, None, True, "x"], "$b": 1}
    assert client.call(dest, "echo", value) == value
    stub = client.stub(CalcInterface, dest)
    assert stub.add(1, b=2) == 3
    with pytest.raises(RemoteError) as remote:
        client.call(dest, "divide", 1, 0)
    assert remote.value.status is Status.INTERNAL and remote.value.executed is True
    assert remote.value.type_name == "ZeroDivisionError" and "division" in remote.value.details
    with pytest.raises(RpcError) as unknown:
        client.call(dest, "nope")
    assert unknown.value.status is Status.UNIMPLEMENTED and unknown.value.executed is False
    runs = len(calc.runs)
    with pytest.raises(RpcError) as bad:
        client.call(dest, "add", 1)
    assert bad.value.status is Status.INVALID_ARGUMENT and bad.value.executed is False
    assert len(calc.runs) == runs, "a call whose arguments do not bind is never started"
    with pytest.raises(RpcError) as missing:
        client.call(dest.replace("/calc", "/other"), "add", 1, 2)
    assert missing.value.status is Status.NOT_FOUND and missing.value.executed is False


def test_unmarshallable_arguments_fail_before_anything_is_sent(pair: Any) -> None:
    calc, _server, client, dest = pair
    sent = client.node.stats().peers
    with pytest.raises(MarshalError, match="argument 'b'"):
        client.stub(CalcInterface, dest).add(1, {1, 2})
    with pytest.raises(MarshalError, match="positional argument 0"):
        client.call(dest, "echo", object())
    with pytest.raises(MarshalError, match="not a finite number"):
        client.call(dest, "echo", [float("nan")])
    assert client.node.stats().peers == sent and calc.runs == []


def test_the_deadline_travels_and_an_expired_call_is_not_started(pair: Any) -> None:
    calc, _server, client, dest = pair
    left = client.invoke(dest, "time_left", timeout=4.0).result()
    assert 3.0 < left <= 4.0
    assert client.invoke(dest, "time_left", timeout=None).result() is None
    # Two workers busy, the one queue slot taken by a call that expires while it waits.
    blockers = [client.invoke(dest, "block") for _ in range(2)]
    _await(lambda: calc.runs.count("block") == 2)
    late = client.invoke(dest, "add", [1, 1], timeout=0.3)
    time.sleep(0.6)
    calc.release.set()
    with pytest.raises(RpcError) as expired:
        late.result(5)
    assert expired.value.status is Status.DEADLINE_EXCEEDED
    assert [b.result(5) for b in blockers] == ["released"] * 2
    assert "add" not in calc.runs, "a call whose deadline passed in the queue never starts"


def test_back_pressure_answers_resource_exhausted(pair: Any) -> None:
    calc, _server, client, dest = pair
    running = [client.invoke(dest, "block") for _ in range(3)]  # 2 run, 1 waits
    _await(lambda: calc.runs.count("block") == 2)
    with pytest.raises(RpcError) as busy:
        client.call(dest, "add", 1, 2)
    assert busy.value.status is Status.RESOURCE_EXHAUSTED and busy.value.executed is False
    calc.release.set()
    assert [c.result(5) for c in running] == ["released"] * 3


def test_cancelling_a_call_cancels_it_on_the_server(pair: Any) -> None:
    calc, _server, client, dest = pair
    call = client.invoke(dest, "wait", [10.0])
    _await(lambda: "wait" in calc.runs)
    started = time.monotonic()
    call.cancel()
    with pytest.raises(RemoteError) as cancelled:
        call.result(5)
    assert cancelled.value.status is Status.CANCELLED and cancelled.value.executed is True
    assert time.monotonic() - started < 2, "the handler saw the cancellation"


def test_closing_the_server_answers_queued_calls_not_executed() -> None:
    """A call still waiting for a worker when the server closes is answered UNAVAILABLE,
    not executed (so its client may call again); the running one finishes."""
    with Node() as server_node, Node() as client_node:
        calc = Calc()
        server = Server(server_node, calc, max_concurrency=1, max_queued=1)
        with Client(client_node, timeout=10, retry_interval=0.5) as client:
            running = client.invoke(_dest(server_node), "block")
            _await(lambda: calc.runs == ["block"])
            queued = client.invoke(_dest(server_node), "add", [1, 2])
            _await(lambda: server.core.cached() == 2)
            closer = threading.Thread(target=server.close)
            closer.start()
            with pytest.raises(RpcError) as refused:
                queued.result(5)
            assert refused.value.status is Status.UNAVAILABLE
            assert refused.value.executed is False
            calc.release.set()
            assert running.result(5) == "released"
            closer.join(5)
            assert not closer.is_alive()
            assert calc.runs == ["block"]


def test_the_cancelled_call_ends_cancelled_though_its_handler_returned(pair: Any) -> None:
    calc, _server, client, dest = pair
    call = client.invoke(dest, "block")  # a handler that does not watch for cancellation
    _await(lambda: "block" in calc.runs)
    call.cancel()
    time.sleep(0.2)  # the CANCEL reaches the server first
    calc.release.set()
    with pytest.raises(RpcError) as cancelled:
        call.result(5)
    assert cancelled.value.status is Status.CANCELLED and cancelled.value.executed is True


def test_idle_adapters_do_not_poll() -> None:
    """With nothing to do, neither the server's reader nor the client's background
    thread wakes: they wait on the port up to the core's next timer, and it has none."""
    waits: list[float | None] = []
    with Node() as server_node, Node() as client_node:
        server = Server(server_node, Calc())
        client = Client(client_node)
        assert client.call(_dest(server_node), "add", 1, 2) == 3
        for port in (server._port, client._port):
            receive, receive_many = port.receive, port.receive_many

            def counted(timeout: float | None = None, _receive: Any = receive, **kw: Any) -> Any:
                waits.append(timeout)
                return _receive(timeout, **kw)

            def counted_many(
                count: int, timeout: float | None = None, _many: Any = receive_many, **kw: Any
            ) -> Any:
                waits.append(timeout)
                return _many(count, timeout, **kw)

            port.receive = counted  # type: ignore[method-assign]
            port.receive_many = counted_many  # type: ignore[method-assign]
        time.sleep(0.6)
        client.close()
        server.close()
    assert len(waits) <= 2, f"woke {len(waits)} times in 0.6 s with nothing to do: {waits}"


def test_a_port_deleted_before_a_receive_ends_the_workers_quietly(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """close() may delete the port between a worker taking the reading role and its
    receive (UnknownMailbox, not MailboxDeleted): the worker must leave, not die, and
    a client whose reply port is gone reports its calls UNAVAILABLE."""
    died: list[BaseException] = []
    monkeypatch.setattr(threading, "excepthook", lambda args: died.append(args.exc_value))
    with Node() as server_node, Node() as client_node:
        server = Server(server_node, Calc())
        client = Client(client_node, timeout=5)
        receive_many = server._port.receive_many

        def deleted_first(count: int, timeout: float | None = None, **kw: Any) -> Any:
            server._port.delete()
            return receive_many(count, timeout, **kw)

        assert client.call(_dest(server_node), "add", 1, 2) == 3
        server._port.receive_many = deleted_first  # type: ignore[method-assign]
        try:  # the next receive deletes the port first: before or after this call came
            assert client.call(_dest(server_node), "add", 2, 2) == 4
        except RpcError as exc:
            assert exc.status is Status.NOT_FOUND and exc.executed is False
        _await(lambda: not any(t.is_alive() for t in server._threads))
        server.close()
        client._port.delete()
        with pytest.raises(RpcError) as gone:
            client.call(_dest(server_node), "add", 1, 1)
        assert gone.value.status is Status.UNAVAILABLE
        client.close()
    assert died == []


def test_msgpack_codec() -> None:
    pytest.importorskip("msgpack")
    with (
        Node() as server_node,
        Node() as client_node,
        Server(server_node, Calc()),
        Client(client_node, codec="msgpack") as client,
    ):
        value = {"b": b"\x01", "l": [1, "two", 3.0]}
        assert client.call(_dest(server_node), "echo", value) == value


def test_asyncio_client_and_server() -> None:
    class AsyncCalc:
        def __init__(self) -> None:
            self.cancelled = asyncio.Event()

        async def add(self, a: int, b: int) -> int:
            return a + b

        async def hang(self) -> None:
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                self.cancelled.set()
                raise

        def blocking_echo(self, value: Any) -> Any:
            return value

    async def main() -> None:
        calc = AsyncCalc()
        async with AsyncNode() as server_node, AsyncNode() as client_node:
            dest = f"127.0.0.1:{server_node.address[1]}/calc"
            async with (
                AsyncServer(server_node, calc, service="calc"),
                AsyncClient(client_node, timeout=5) as client,
            ):
                assert await client.call(dest, "add", 1, 2) == 3
                assert await client.call(dest, "blocking_echo", b"x") == b"x"
                stub = client.stub(CalcInterface, dest)
                assert await stub.add(2, 2) == 4  # type: ignore[misc]
                task = asyncio.create_task(client.call(dest, "hang"))
                await asyncio.sleep(0.3)
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
                await asyncio.wait_for(calc.cancelled.wait(), 3)
                with pytest.raises(RpcError) as deadline:
                    await client.invoke(dest, "hang", timeout=0.3)
                assert deadline.value.status is Status.DEADLINE_EXCEEDED

    asyncio.run(main())


def _await(condition: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


# ------------------------------------------------------------ processes killed mid-call

_SERVER = textwrap.dedent(
    """
    import sys, time
    from reliable import Node
    from reliable.rpc import Server

    log = sys.argv[2]

    class Service:
        def slow(self, tag: str, seconds: float) -> str:
            with open(log, "a") as f:
                f.write(tag + "\\n")
            time.sleep(seconds)
            return tag

    node = Node("127.0.0.1:" + sys.argv[1])
    Server(node, Service(), service="svc")
    print("ready", flush=True)
    time.sleep(60)
    """
)

_CLIENT = textwrap.dedent(
    """
    import json, sys
    from reliable import Node
    from reliable.rpc import Client

    node = Node("127.0.0.1:" + sys.argv[1])
    client = Client(node, timeout=10)
    print(json.dumps([client.call(sys.argv[2], "slow", sys.argv[3], 0.0), node.incarnation]))
    """
)


def _start(script: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", script, *args],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(pathlib.Path(__file__).parent.parent)},
    )


def _free_port() -> int:
    with Node() as probe:
        return int(probe.address[1])


def test_server_killed_and_restarted_mid_call_runs_it_at_most_once(tmp_path: pathlib.Path) -> None:
    port = _free_port()
    log = tmp_path / "executions"
    server = _start(_SERVER, str(port), str(log))
    restarted = None
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "ready"
        # os_errors="ignore": the client rides out the refusals while the server is down,
        # so its retries reach the restarted server (which must not run the call again).
        with (
            Node(config=Config(os_errors="ignore")) as node,
            Client(node, timeout=20, retry_interval=0.3) as client,
        ):
            dest = f"127.0.0.1:{port}/svc"
            call = client.invoke(dest, "slow", ["first", 5.0])
            _await(lambda: log.exists() and log.read_text() == "first\n")
            os.kill(server.pid, signal.SIGKILL)
            server.wait(5)
            restarted = _start(_SERVER, str(port), str(log))
            assert restarted.stdout is not None and restarted.stdout.readline().strip() == "ready"
            with pytest.raises(RpcError) as lost:
                call.result(15)
            # The server that ran it is gone: the client cannot know whether it finished.
            assert lost.value.status is Status.UNAVAILABLE and lost.value.executed is None
            # A call racing the client's discovery of the restart may fail as unknown too
            # (rmsg: PeerRestarted with the request in flight); a new call then works.
            tags = [f"second-{n}" for n in range(3)]
            for tag in tags:
                try:
                    assert client.call(dest, "slow", tag, 0.0) == tag
                    break
                except RpcError as exc:
                    assert exc.status is Status.UNAVAILABLE
            else:
                raise AssertionError("the restarted server never answered")
            time.sleep(1.0)  # the old call's retries had every chance to run it again
            lines = log.read_text().split()
            assert lines[0] == "first" and lines.count("first") == 1, "it never ran twice"
            assert lines[-1] == tag and len(lines) == len(set(lines))
    finally:
        for proc in (server, restarted):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait(5)


def test_a_restarted_client_gets_its_own_replies(tmp_path: pathlib.Path) -> None:
    """A client process restarted on the same port makes call 1 again; the server,
    which still caches the first life's call 1, runs it and answers it afresh."""
    port, client_port = _free_port(), _free_port()
    log = tmp_path / "executions"
    server = _start(_SERVER, str(port), str(log))
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "ready"
        outputs = []
        for tag in ("life-1", "life-2"):
            client = _start(_CLIENT, str(client_port), f"127.0.0.1:{port}/svc", tag)
            out, _ = client.communicate(timeout=30)
            outputs.append(out)
        import json

        (first, inc1), (second, inc2) = (json.loads(o) for o in outputs)
        assert (first, second) == ("life-1", "life-2") and inc1 != inc2
        assert log.read_text() == "life-1\nlife-2\n"
    finally:
        server.kill()
        server.wait(5)


def test_anycast_moves_on_only_when_the_call_provably_did_not_run() -> None:
    """A busy member answers RESOURCE_EXHAUSTED (not run): the call goes to the other.
    A member without the service (NOT_FOUND: not run) is skipped the same way."""
    with (
        Node() as busy_node,
        Node() as free_node,
        Node() as bare_node,
        Node() as client_node,
    ):
        busy, free = Calc(), Calc()
        with (
            Server(busy_node, busy, service="calc", max_concurrency=1, max_queued=0),
            Server(free_node, free, service="calc"),
            Client(client_node, timeout=10) as client,
        ):
            blocker = client.invoke(_dest(busy_node, "calc"), "block")
            _await(lambda: busy.runs == ["block"])
            client_node.add_service_members("calc", [busy_node.address, bare_node.address])
            client_node.add_service_members("calc", [free_node.address])
            for _ in range(3):  # whichever member the turn starts at, free runs it
                assert client.call("anycast://calc", "add", 1, 2) == 3
            assert free.runs == ["add"] * 3 and busy.runs == ["block"]
            busy.release.set()
            assert blocker.result(5) == "released"


def test_many_threads_share_one_client() -> None:
    """One thread reads for all; each caller gets its own result, whoever read it."""
    with (
        Node() as server_node,
        Node() as client_node,
        Server(server_node, Calc(), max_concurrency=4),
        Client(client_node) as client,
    ):
        dest = _dest(server_node)
        wrong: list[tuple[int, int, Any]] = []

        def caller(n: int) -> None:
            for i in range(40):
                got = client.call(dest, "add", n, i)
                if got != n + i:
                    wrong.append((n, i, got))

        threads = [threading.Thread(target=caller, args=(n * 1000,)) for n in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not any(t.is_alive() for t in threads) and wrong == []


def test_short_calls_in_a_row_wake_no_other_server_thread() -> None:
    """The worker that reads a call runs it; the standby worker takes over reading only
    if a handler runs on (HANDOVER): back-to-back short calls notify nobody."""
    with Node() as server_node, Node() as client_node:
        server = Server(server_node, Calc(), max_concurrency=4)
        with Client(client_node) as client:
            dest = _dest(server_node)
            assert client.call(dest, "add", 0, 0) == 0
            notified: list[int] = []
            notify = server._idle.notify

            def counted(n: int = 1) -> None:
                notified.append(n)
                notify(n)

            server._idle.notify = counted  # type: ignore[method-assign]
            for i in range(30):
                assert client.call(dest, "add", i, 1) == i + 1
        server.close()
    assert len(notified) <= 10, f"{len(notified)} wake-ups for 30 short calls"


def test_a_destination_name_is_resolved_once_per_client(monkeypatch: pytest.MonkeyPatch) -> None:
    """A lookup per call would cost more than the call: a client resolves each
    destination text once, in a table bounded by RESOLVED_MAX."""
    from reliable.rpc import client as client_module

    looked_up: list[Any] = []
    real = client_module.resolve_address

    def counted(text: Any, **kw: Any) -> Any:
        looked_up.append(text)
        return real(text, **kw)

    monkeypatch.setattr(client_module, "resolve_address", counted)
    with Node() as server_node, Node() as client_node:
        Server(server_node, Calc())
        client = Client(client_node, timeout=5)
        port = server_node.address[1]
        by_name, by_number = f"localhost:{port}", f"127.0.0.1:{port}"
        for i in range(3):
            assert client.call(by_name, "add", i, 1) == i + 1
        assert looked_up == [by_name]
        monkeypatch.setattr(client_module, "RESOLVED_MAX", 1)
        assert client.call(by_number, "add", 1, 1) == 2  # the table was full: emptied
        assert client.call(by_name, "add", 2, 2) == 4
        assert looked_up == [by_name, by_number, by_name]
        client.close()


def test_calls_without_arguments_get_their_own_lists() -> None:
    """The codec's shortcut for an argument-less call hands out fresh containers."""
    from reliable.rpc.codec import get_codec, marshal_call

    codec = get_codec("json")
    payload = marshal_call(codec, "noop", (), {})
    first = codec.decode(payload)
    assert first == [[], {}]
    first[0].append(1)
    assert codec.decode(payload) == [[], {}]
