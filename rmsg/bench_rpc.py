"""``rmsg bench --rpc``: no-op remote calls per second and their latency, rmsg's RPC
beside the standard library's xmlrpc (HTTP on loopback) and grpcio when installed.

Each server runs in its own process on loopback; this process makes no-op
calls for ``duration`` seconds per transport (after a short warm-up), one at a
time and then from ``THREADS`` threads at once (asyncio: as many concurrent
tasks), rounds interleaved, and reports calls/s and p50/p99 latency (medians
over rounds). No target but beating xmlrpc; the figures are what this machine
did. (The stdlib's ``SimpleXMLRPCServer`` serves one request at a time; that
is what a Python user gets without extra packages.)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
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

_SERVER = r"""
import sys
kind = sys.argv[1]
if kind == "rmsg":
    import time
    from reliable import Node
    from reliable.rpc import Server
    class Noop:
        def noop(self):
            return None
    node = Node("127.0.0.1:0")
    server = Server(node, Noop(), max_concurrency=4)
    print(node.address[1], flush=True)
    sys.stdin.read()
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
    sys.stdin.read()
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
    sys.stdin.read()
"""


@dataclass(frozen=True, slots=True)
class RpcFigure:
    transport: str
    calls_per_s: float
    p50_us: float
    p99_us: float
    calls: int


@contextlib.contextmanager
def _server(kind: str) -> Iterator[int]:
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
        yield int(line)
    finally:
        if proc.stdin is not None:
            proc.stdin.close()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def _measure(call: Callable[[], Any], duration: float) -> tuple[float, list[float]]:
    warm_until = time.perf_counter() + min(0.2, duration / 4)
    while time.perf_counter() < warm_until:
        call()
    latencies: list[float] = []
    start = time.perf_counter()
    end = start + duration
    now = start
    while now < end:
        before = now
        call()
        now = time.perf_counter()
        latencies.append(now - before)
    return len(latencies) / (now - start), latencies


def _measure_threads(
    make_call: Callable[[], Callable[[], Any]], threads: int, duration: float
) -> tuple[float, list[float]]:
    """``threads`` threads, each with ``make_call()``'s call, calling at once."""
    if threads == 1:
        return _measure(make_call(), duration)
    calls = [make_call() for _ in range(threads)]
    results: list[tuple[float, list[float]]] = []
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
    return sum(r for r, _ in results), [x for _, lat in results for x in lat]


def _rmsg(port: int, duration: float, threads: int) -> tuple[float, list[float]]:
    from reliable import Node
    from reliable.rpc import Client

    with Node() as node, Client(node, timeout=10) as client:
        dest = f"127.0.0.1:{port}"
        return _measure_threads(lambda: lambda: client.call(dest, "noop"), threads, duration)


def _rmsg_async(port: int, duration: float, tasks: int) -> tuple[float, list[float]]:
    from reliable import AsyncNode
    from reliable.rpc import AsyncClient

    async def main() -> tuple[float, list[float]]:
        async with AsyncNode() as node, AsyncClient(node, timeout=10) as client:
            dest = f"127.0.0.1:{port}"
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
            return len(latencies) / (time.perf_counter() - start), latencies

    return asyncio.run(main())


def _xmlrpc(port: int, duration: float, threads: int) -> tuple[float, list[float]]:
    import xmlrpc.client

    def make() -> Callable[[], Any]:  # a ServerProxy per thread: they are not thread-safe
        proxy = xmlrpc.client.ServerProxy(f"http://127.0.0.1:{port}/", allow_none=True)
        return proxy.noop

    return _measure_threads(make, threads, duration)


def _grpc(port: int, duration: float, threads: int) -> tuple[float, list[float]]:
    import grpc

    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        noop = channel.unary_unary("/bench/noop")
        return _measure_threads(lambda: lambda: noop(b"", timeout=10), threads, duration)


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
    runs: list[tuple[str, str, Callable[[int, float, int], tuple[float, list[float]]], int]] = [
        ("rmsg rpc (blocking)", "rmsg", _rmsg, 1),
        ("rmsg rpc (asyncio client)", "rmsg", _rmsg_async, 1),
        ("xmlrpc (stdlib, HTTP)", "xmlrpc", _xmlrpc, 1),
    ]
    grpc = _grpc_available()
    if grpc:
        runs.append(("grpcio", "grpc", _grpc, 1))
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
    for n in range(rounds):
        for name, kind, run, callers in runs:
            if progress is not None:
                progress(f"round {n + 1}/{rounds}: {name}")
            with _server(kind) as port:
                rate, latencies = run(port, duration, callers)
            rates[name].append(rate)
            samples[name].extend(latencies)
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
            )
        )
    return figures


def format_rpc_report(figures: list[RpcFigure], as_json: bool = False) -> str:
    if as_json:
        return json.dumps([asdict(f) for f in figures], indent=2)
    lines = [
        "no-op calls on loopback, one at a time, then xN from N threads (asyncio: tasks);"
        " servers in their own processes",
        f"{'transport':<28}{'calls/s':>10}{'p50 µs':>10}{'p99 µs':>10}{'calls':>9}",
    ]
    for f in figures:
        lines.append(
            f"{f.transport:<28}{f.calls_per_s:>10.0f}{f.p50_us:>10.0f}{f.p99_us:>10.0f}{f.calls:>9}"
        )
    if not any(f.transport == "grpcio" for f in figures):
        lines.append("(grpcio not installed: pip install grpcio to compare with it)")
    return "\n".join(lines)
