"""``rmsg bench --rpc``: no-op remote calls per second and their latency, rmsg's RPC
beside the standard library's xmlrpc (HTTP on loopback) and grpcio when installed.

Each server runs in its own process on loopback; this process makes no-op
calls for ``duration`` seconds per transport (after a short warm-up), one at a
time and then from ``THREADS`` threads at once (asyncio: as many concurrent
tasks), rounds interleaved, and reports calls/s and p50/p99 latency (medians
over rounds), and the CPU time per call of the calling process and of the
server's (``os.times`` around each measurement, warm-up included): on a loaded
machine the wall-clock figures mostly measure the scheduler, the CPU figures
what each side costs. A last row times an rmsg request and its echo without
the RPC layer, the floor under any RPC over rmsg. The header says whether the
rmsg core ran compiled or pure. No target but beating xmlrpc; the figures are
what this machine did. (The stdlib's ``SimpleXMLRPCServer`` serves one request at a time; that
is what a Python user gets without extra packages.)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["THREADS", "RpcFigure", "format_rpc_report", "run_rpc_bench"]

#: Callers at once in the concurrent rows.
THREADS = 8
#: The row of an rmsg request and its echo without the RPC layer: what an RPC costs at least.
ECHO = "rmsg echo, no RPC"

_SERVER = r"""
import sys
kind = sys.argv[1]
if kind == "rmsg":
    from reliable import Node
    from reliable.rpc import Server
    class Noop:
        def noop(self):
            return None
    node = Node("127.0.0.1:0")
    server = Server(node, Noop(), max_concurrency=4)
    print(node.address[1], flush=True)
elif kind == "echo":
    import threading
    from reliable import Node, NodeClosed
    node = Node("127.0.0.1:0")
    port = node.create_mailbox("rpc", port=True)
    def echo():
        try:
            while True:
                msg = port.receive()
                node.send_nowait(msg.source, msg.data, mailbox="reply")
        except NodeClosed:
            pass  # the bench is over: the node was closed below
    echoing = threading.Thread(target=echo)
    echoing.start()
    print(node.address[1], flush=True)
elif kind == "xmlrpc":
    import threading
    from xmlrpc.server import SimpleXMLRPCRequestHandler, SimpleXMLRPCServer
    class Quiet(SimpleXMLRPCRequestHandler):
        def log_message(self, *args):
            pass
    server = SimpleXMLRPCServer(("127.0.0.1", 0), requestHandler=Quiet, logRequests=False,
                                allow_none=True)
    server.register_function(lambda: None, "noop")
    print(server.server_address[1], flush=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
elif kind == "grpc":
    from concurrent import futures
    import grpc
    handler = grpc.method_handlers_generic_handler(
        "bench", {"noop": grpc.unary_unary_rpc_method_handler(lambda request, context: b"")}
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(port, flush=True)
import os
for line in sys.stdin:  # each line asks for this process's CPU seconds so far; EOF: exit
    times = os.times()
    print(times.user + times.system, flush=True)
if kind == "echo":  # closed, not torn down by the exit mid-receive (a traceback on stderr)
    node.close()
    echoing.join(5)
"""


_Result = tuple[float, list[float]]  # calls/s, latencies (s)


@dataclass(frozen=True, slots=True)
class RpcFigure:
    transport: str
    calls_per_s: float
    p50_us: float
    p99_us: float
    calls: int
    #: CPU time per call (user + system, medians over rounds) of the calling process
    #: and of the server's: on a loaded machine steadier than the wall-clock figures.
    client_cpu_us: float = 0.0
    server_cpu_us: float = 0.0


class _Server:
    """A server process: its port, and its CPU seconds so far on request."""

    def __init__(self, proc: subprocess.Popen[str], port: int) -> None:
        self._proc = proc
        self.port = port

    def cpu(self) -> float:
        assert self._proc.stdin is not None and self._proc.stdout is not None
        self._proc.stdin.write("cpu\n")
        self._proc.stdin.flush()
        return float(self._proc.stdout.readline())


def _own_cpu() -> float:
    times = os.times()
    return times.user + times.system


@contextlib.contextmanager
def _server(kind: str) -> Iterator[_Server]:
    proc = subprocess.Popen(
        [sys.executable, "-c", _SERVER, kind],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        if not line:
            raise RuntimeError(f"the {kind} server did not start")
        yield _Server(proc, int(line))
    finally:
        if proc.stdin is not None:
            proc.stdin.close()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


class _Window:
    """The CPU seconds this process and the server spent between :meth:`open` and
    :meth:`close`, and the calls made meanwhile (warm-up included)."""

    def __init__(self, server: _Server) -> None:
        self._server = server
        self._marks = (0.0, 0.0)
        self.client = self.server = 0.0
        self.calls = 0

    def open(self) -> None:
        self._marks = (_own_cpu(), self._server.cpu())

    def close(self, calls: int) -> None:
        self.client = _own_cpu() - self._marks[0]
        self.server = self._server.cpu() - self._marks[1]
        self.calls = calls


def _measure(call: Callable[[], Any], duration: float) -> tuple[float, list[float], int]:
    """Calls/s and latencies over ``duration`` after a short warm-up; and every call made."""
    warm_until = time.perf_counter() + min(0.2, duration / 4)
    warm = 0
    while time.perf_counter() < warm_until:
        call()
        warm += 1
    latencies: list[float] = []
    start = time.perf_counter()
    end = start + duration
    now = start
    while now < end:
        before = now
        call()
        now = time.perf_counter()
        latencies.append(now - before)
    return len(latencies) / (now - start), latencies, warm + len(latencies)


def _measure_threads(
    make_call: Callable[[], Callable[[], Any]], threads: int, duration: float, window: _Window
) -> tuple[float, list[float]]:
    """``threads`` threads, each with ``make_call()``'s call, calling at once."""
    calls = [make_call() for _ in range(threads)]
    window.open()
    if threads == 1:
        rate, latencies, made = _measure(calls[0], duration)
        window.close(made)
        return rate, latencies
    results: list[tuple[float, list[float], int]] = []
    lock = threading.Lock()

    def run(call: Callable[[], Any]) -> None:
        outcome = _measure(call, duration)
        with lock:
            results.append(outcome)

    workers = [threading.Thread(target=run, args=(c,)) for c in calls]
    for w in workers:
        w.start()
    for w in workers:
        w.join(duration + 60)
    window.close(sum(made for *_, made in results))
    return sum(r for r, *_ in results), [x for _, lat, _ in results for x in lat]


def _rmsg(server: _Server, duration: float, threads: int, window: _Window) -> _Result:
    from reliable import Node
    from reliable.rpc import Client

    with Node() as node, Client(node, timeout=10) as client:
        dest = f"127.0.0.1:{server.port}"
        return _measure_threads(
            lambda: lambda: client.call(dest, "noop"), threads, duration, window
        )


def _echo(server: _Server, duration: float, threads: int, window: _Window) -> _Result:
    """The floor under an RPC: an rmsg request and its echo, no RPC layer."""
    from reliable import Node

    with Node() as node:
        replies = node.create_mailbox("reply", port=True)
        dest = f"127.0.0.1:{server.port}"
        request = b"\x00" * 64

        def call() -> None:
            node.send_nowait(dest, request, mailbox="rpc")
            replies.receive(timeout=10)

        return _measure_threads(lambda: call, threads, duration, window)


def _rmsg_async(server: _Server, duration: float, tasks: int, window: _Window) -> _Result:
    from reliable import AsyncNode
    from reliable.rpc import AsyncClient

    async def main() -> _Result:
        async with AsyncNode() as node, AsyncClient(node, timeout=10) as client:
            dest = f"127.0.0.1:{server.port}"
            window.open()
            for _ in range(50):
                await client.call(dest, "noop")
            latencies: list[float] = []
            start = time.perf_counter()

            async def caller() -> None:
                now = time.perf_counter()
                while now < start + duration:
                    before = now
                    await client.call(dest, "noop")
                    now = time.perf_counter()
                    latencies.append(now - before)

            await asyncio.gather(*(caller() for _ in range(tasks)))
            rate = len(latencies) / (time.perf_counter() - start)
            window.close(50 + len(latencies))
            return rate, latencies

    return asyncio.run(main())


def _xmlrpc(server: _Server, duration: float, threads: int, window: _Window) -> _Result:
    import xmlrpc.client

    def make() -> Callable[[], Any]:  # a ServerProxy per thread: they are not thread-safe
        proxy = xmlrpc.client.ServerProxy(f"http://127.0.0.1:{server.port}/", allow_none=True)
        return proxy.noop

    return _measure_threads(make, threads, duration, window)


def _grpc(server: _Server, duration: float, threads: int, window: _Window) -> _Result:
    import grpc

    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        noop = channel.unary_unary("/bench/noop")
        return _measure_threads(lambda: lambda: noop(b"", timeout=10), threads, duration, window)


def _grpc_available() -> bool:
    try:
        import grpc  # noqa: F401
    except ImportError:
        return False
    return True


def run_rpc_bench(
    *,
    duration: float = 1.0,
    rounds: int = 3,
    threads: int = THREADS,
    progress: Callable[[str], None] | None = None,
) -> list[RpcFigure]:
    """Measure each transport ``rounds`` times for ``duration`` seconds, one call at a
    time and then ``threads`` at once (``threads=1``: only one at a time); medians."""
    runs: list[tuple[str, str, Callable[[_Server, float, int, _Window], _Result], int]] = [
        ("rmsg rpc (blocking)", "rmsg", _rmsg, 1),
        ("rmsg rpc (asyncio client)", "rmsg", _rmsg_async, 1),
        ("xmlrpc (stdlib, HTTP)", "xmlrpc", _xmlrpc, 1),
    ]
    grpc = _grpc_available()
    if grpc:
        runs.append(("grpcio", "grpc", _grpc, 1))
    runs.append((ECHO, "echo", _echo, 1))
    if threads > 1:
        runs += [
            (f"rmsg rpc (blocking) x{threads}", "rmsg", _rmsg, threads),
            (f"rmsg rpc (asyncio) x{threads}", "rmsg", _rmsg_async, threads),
            (f"xmlrpc (stdlib, HTTP) x{threads}", "xmlrpc", _xmlrpc, threads),
        ]
        if grpc:
            runs.append((f"grpcio x{threads}", "grpc", _grpc, threads))
    rates: dict[str, list[float]] = {name: [] for name, *_ in runs}
    samples: dict[str, list[float]] = {name: [] for name, *_ in runs}
    cpus: dict[str, list[tuple[float, float]]] = {name: [] for name, *_ in runs}
    for n in range(rounds):
        for name, kind, run, callers in runs:
            if progress is not None:
                progress(f"round {n + 1}/{rounds}: {name}")
            with _server(kind) as server:
                window = _Window(server)
                rate, latencies = run(server, duration, callers, window)
            rates[name].append(rate)
            samples[name].extend(latencies)
            made = max(1, window.calls)
            cpus[name].append((window.client / made, window.server / made))
    figures = []
    for name, *_ in runs:
        ordered = sorted(samples[name])
        figures.append(
            RpcFigure(
                transport=name,
                calls_per_s=statistics.median(rates[name]),
                p50_us=ordered[len(ordered) // 2] * 1e6,
                p99_us=ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1e6,
                calls=len(ordered),
                client_cpu_us=statistics.median(c for c, _ in cpus[name]) * 1e6,
                server_cpu_us=statistics.median(s for _, s in cpus[name]) * 1e6,
            )
        )
    return figures


def format_rpc_report(figures: list[RpcFigure], as_json: bool = False) -> str:
    if as_json:
        return json.dumps([asdict(f) for f in figures], indent=2)
    import reliable

    core = "compiled (mypyc)" if reliable.__compiled__ else "pure Python"
    lines = [
        "no-op calls on loopback, one at a time, then xN from N threads (asyncio: tasks);"
        f" servers in their own processes; rmsg core: {core}",
        f"{'transport':<28}{'calls/s':>10}{'p50 µs':>10}{'p99 µs':>10}{'calls':>9}"
        f"{'CPU µs/call: client':>21}{'server':>8}",
    ]
    for f in figures:
        lines.append(
            f"{f.transport:<28}{f.calls_per_s:>10.0f}{f.p50_us:>10.0f}{f.p99_us:>10.0f}{f.calls:>9}"
            f"{f.client_cpu_us:>21.0f}{f.server_cpu_us:>8.0f}"
        )
    if not any(f.transport == "grpcio" for f in figures):
        lines.append("(grpcio not installed: pip install grpcio to compare with it)")
    return "\n".join(lines)
