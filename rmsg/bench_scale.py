"""The scale figures of ``rmsg bench``: many peers, a simulated exchange, a slow receiver.

Why separate from the throughput matrix: these ask different questions.

* **Many peers.** One node receives from 1 peer and then from 1,000 peers
  sending the same total; the ratio of their aggregate rates says whether
  per-peer state or timers cost more as peers are added. The peers are
  sans-I/O endpoints on one thread and one socket each (a thousand ``Node``
  threads would measure the thread scheduler instead). The receiving node's
  resident memory before and after 1,000 peers have each sent one message
  and gone idle gives the memory an idle peer costs.
* **Simulated exchange.** 10,000 messages through :class:`netem.SimNetwork`
  at 10% loss, timed in CPU seconds: what a property test or a user's
  simulation pays per run.
* **Slow receiver.** A sender pushes a volume through a bounded mailbox
  that is drained slowly; its resident memory, sampled throughout, must
  stay flat: back-pressure, not buffering.
"""

from __future__ import annotations

import contextlib
import heapq
import multiprocessing
import random
import resource
import selectors
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from multiprocessing.connection import Connection
from typing import Any

from netem import Impairment, SimNetwork
from reliable import Config, Endpoint, Node, ReceiveTimeout, events
from reliable.driver import drain_socket, open_socket

__all__ = [
    "ScaleReport",
    "answer",
    "format_scale",
    "measure_peers",
    "measure_sim",
    "measure_slow_receiver",
    "run_scale",
]

_PAGE = 4096


@dataclass(slots=True)
class ScaleReport:
    peers: int = 0
    one_peer_msgs_per_s: float = 0.0
    many_peers_msgs_per_s: float = 0.0
    #: the receiving node's CPU per message: how it scales, apart from the senders' cost
    one_peer_receiver_us: float = 0.0
    many_peers_receiver_us: float = 0.0
    idle_peer_bytes: float = 0.0  #: receiving node's resident memory per idle peer
    sim_messages: int = 0
    sim_loss: float = 0.0
    sim_cpu_s: float = 0.0
    sim_virtual_s: float = 0.0
    slow_bytes: int = 0  #: passed through the slow receiver's mailbox
    slow_seconds: float = 0.0
    slow_rss_start_kib: int = 0  #: sender's resident memory after the first 10%
    slow_rss_peak_kib: int = 0  #: ... and the most it reached afterwards

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _rss_kib() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE // 1024


# ------------------------------------------------------------------ many peers


def _sink(conn: Connection) -> None:
    """A node that counts what it receives and reports its memory on request."""
    with Node("127.0.0.1:0", config=Config(max_peers=4096)) as node:
        conn.send(node.address)
        received = 0
        while True:
            if conn.poll():
                if conn.recv() == "stop":
                    return
                conn.send((received, _rss_kib(), _cpu()))
            try:
                node.receive(timeout=0.01)
                received += 1
            except ReceiveTimeout:
                pass


class _Peers:
    """``count`` sans-I/O endpoints, one UDP socket each, driven by one thread."""

    def __init__(self, count: int) -> None:
        self.endpoints = [Endpoint(Config(), rng=random.Random(i)) for i in range(count)]
        self.sockets = [open_socket("127.0.0.1:0") for _ in range(count)]
        self.delivered = [0] * count
        self.failed = 0
        self._selector = selectors.DefaultSelector()
        for i, sock in enumerate(self.sockets):
            self._selector.register(sock, selectors.EVENT_READ, i)
        self._timers: list[tuple[float, int]] = []
        self._dirty: set[int] = set()

    def send(self, index: int, dest: Any, data: bytes, now: float) -> None:
        self.endpoints[index].send(dest, data, now=now)
        self._dirty.add(index)

    def _flush(self, index: int, now: float) -> None:
        ep = self.endpoints[index]
        sock = self.sockets[index]
        for data, addr in ep.datagrams_to_send(now):
            try:
                sock.sendto(data, addr)
            except OSError:
                pass  # full or unroutable: the protocol retransmits
        while (event := ep.next_event()) is not None:
            if isinstance(event, events.MessageDelivered):
                self.delivered[index] += 1
            elif isinstance(event, events.MessageFailed):
                self.failed += 1
        timer = ep.get_timer()
        if timer is not None:
            heapq.heappush(self._timers, (timer, index))

    def run(self, done: Callable[[], bool], limit: float) -> bool:
        deadline = time.monotonic() + limit
        while not done():
            now = time.monotonic()
            if now > deadline:
                return False
            for index in self._dirty:
                self._flush(index, now)
            self._dirty.clear()
            timers = self._timers
            while timers and timers[0][0] <= now:
                _, index = heapq.heappop(timers)
                ep = self.endpoints[index]
                due = ep.get_timer()
                if due is not None and due <= now:
                    ep.handle_timer(now)
                self._dirty.add(index)
            wait = 0.01 if not timers else min(0.01, max(0.0, timers[0][0] - now))
            for key, _ in self._selector.select(wait if not self._dirty else 0):
                index = key.data
                now = time.monotonic()
                for data, addr in drain_socket(self.sockets[index]):
                    self.endpoints[index].receive_datagram(data, addr, now)
                self._dirty.add(index)
        return True

    def greet(self, dest: Any, limit: float) -> bool:
        """Each peer sends ``dest`` one message (first contact, address validation)."""
        now = time.monotonic()
        for i in range(len(self.endpoints)):
            self.send(i, dest, b"hello", now)
        count = len(self.endpoints)
        return self.run(lambda: sum(self.delivered) >= count, limit)

    def close(self) -> None:
        self._selector.close()
        for sock in self.sockets:
            sock.close()


def _aggregate_rate(
    count: int, messages: int, dest: Any, size: int, limit: float, sink: _ChildPipe
) -> tuple[float, float]:
    """Messages/s from ``count`` peers to the sink, and the sink's CPU us per message."""
    peers = _Peers(count)
    try:
        if not peers.greet(dest, limit):  # first contact stays outside the timing
            return 0.0, 0.0
        payload = b"x" * size
        sink.send("stat")
        cpu_before = sink.recv()[2]
        start = time.monotonic()
        for n in range(messages):
            peers.send(n % count, dest, payload, start)
        target = count + messages
        if not peers.run(lambda: sum(peers.delivered) == target, limit):
            return 0.0, 0.0
        rate = messages / (time.monotonic() - start)
        sink.send("stat")
        cpu_after = sink.recv()[2]
        return rate, (cpu_after - cpu_before) * 1e6 / messages
    finally:
        peers.close()


def answer(conn: Any, process: Any, limit: float, what: str) -> Any:
    """What ``process`` sends on ``conn``; a ``RuntimeError`` instead if it ends without
    sending, or sends nothing for ``limit`` seconds. The parent holds the child's end of
    the pipe too, so a child that died would never show as end-of-file: a bare
    ``recv()`` waited forever (``rmsg bench --veth`` was seen hanging so)."""
    deadline = time.monotonic() + limit
    while not conn.poll(0.2):
        if not process.is_alive():
            if conn.poll(0):  # it sent, then ended
                break
            raise RuntimeError(
                f"the bench's {what} process ended (exit code {process.exitcode}) "
                "without reporting; its error, if any, is above"
            )
        if time.monotonic() > deadline:
            raise RuntimeError(f"the bench's {what} process reported nothing in {limit:g} s")
    return conn.recv()


class _ChildPipe:
    """Our end of a child's pipe: every answer read through :func:`answer`, so a child
    that died makes the measurement fail instead of wait forever."""

    def __init__(self, conn: Connection, process: Any, what: str) -> None:
        self._conn = conn
        self._process = process
        self._what = what

    def send(self, obj: Any) -> None:
        self._conn.send(obj)

    def recv(self, limit: float = 120.0) -> Any:
        return answer(self._conn, self._process, limit, self._what)


@contextlib.contextmanager
def _child(target: Callable[..., None], *args: Any) -> Iterator[_ChildPipe]:
    """Run ``target(conn, *args)`` in a fresh process; yields our end of ``conn``.

    On exit the child is told to stop, and killed (by its handle) if it does not.
    """
    parent, child = multiprocessing.Pipe()
    process = multiprocessing.get_context("spawn").Process(
        target=target, args=(child, *args), daemon=True
    )
    process.start()
    try:
        yield _ChildPipe(parent, process, target.__name__.strip("_"))
    finally:
        parent.send("stop")
        process.join(10)
        if process.is_alive():
            process.kill()


def measure_peers(count: int, messages: int, size: int = 64, limit: float = 120.0) -> ScaleReport:
    report = ScaleReport(peers=count)
    with _child(_sink) as parent:
        dest = parent.recv()
        report.one_peer_msgs_per_s, report.one_peer_receiver_us = _aggregate_rate(
            1, messages, dest, size, limit, parent
        )
        parent.send("stat")
        after_one = parent.recv()[1]
        idle = _Peers(count)
        try:
            idle.greet(dest, limit)
            time.sleep(0.2)
            parent.send("stat")
            after_idle = parent.recv()[1]
            report.idle_peer_bytes = max(0, after_idle - after_one) * 1024 / count
        finally:
            idle.close()
        report.many_peers_msgs_per_s, report.many_peers_receiver_us = _aggregate_rate(
            count, messages, dest, size, limit, parent
        )
    return report


# ------------------------------------------------------------- simulated network


def measure_sim(messages: int = 10_000, loss: float = 0.1, size: int = 64) -> tuple[float, float]:
    """CPU seconds and virtual seconds for ``messages`` through a lossy simulated link."""
    net = SimNetwork(seed=1, default=Impairment(loss=loss))
    a, b = Endpoint(rng=random.Random(1)), Endpoint(rng=random.Random(2))
    net.add_host("a", a)
    net.add_host("b", b)
    payload = b"x" * size
    counts = {"taken": 0, "delivered": 0}

    def send_all() -> None:
        for _ in range(messages):
            a.send("b", payload, now=net.now)

    def finished() -> bool:
        while b.next_event() is not None:
            pass
        while b.take(now=net.now) is not None:
            counts["taken"] += 1
        while (event := a.next_event()) is not None:
            counts["delivered"] += isinstance(event, events.MessageDelivered)
        return counts["taken"] == messages and counts["delivered"] == messages

    net.call_at(0.0, send_all, host="a")
    start = time.process_time()
    net.run(until=3600.0, stop=finished)
    return time.process_time() - start, net.now


# ---------------------------------------------------------------- slow receiver


def _slow_sink(conn: Connection, capacity: int, pause: float) -> None:
    with Node("127.0.0.1:0") as node:
        box = node.create_mailbox("slow", capacity)
        conn.send(node.address)
        while not conn.poll():
            try:
                box.receive(timeout=0.05)
            except ReceiveTimeout:
                continue
            time.sleep(pause)


def measure_slow_receiver(total: int, size: int = 65536, pause: float = 0.0) -> ScaleReport:
    report = ScaleReport(slow_bytes=total)
    with _child(_slow_sink, 8, pause) as parent:
        host, port = parent.recv()
        payload = bytes(size)
        count = total // size
        start = time.monotonic()
        with Node("127.0.0.1:0") as node:
            for i in range(count):
                node.send(f"{host}:{port}/slow", payload, timeout=60)
                if i == count // 10:
                    report.slow_rss_start_kib = _rss_kib()
                elif i > count // 10:
                    report.slow_rss_peak_kib = max(report.slow_rss_peak_kib, _rss_kib())
        report.slow_seconds = time.monotonic() - start
    return report


def run_scale(*, quick: bool = False, progress: Callable[[str], None] | None = None) -> ScaleReport:
    """All three: ``quick`` shrinks each to a smoke run."""

    def say(text: str) -> None:
        if progress is not None:
            progress(text)

    peers = 50 if quick else 1000
    say(f"scale: 1 peer, then {peers} peers, to one node")
    report = measure_peers(peers, messages=2_000 if quick else 20_000)
    say("scale: simulated 10%-loss exchange")
    report.sim_messages = 1_000 if quick else 10_000
    report.sim_loss = 0.1
    report.sim_cpu_s, report.sim_virtual_s = measure_sim(report.sim_messages, 0.1)
    say("scale: slow receiver behind a bounded mailbox")
    slow = measure_slow_receiver((16 if quick else 1024) * 1024 * 1024, pause=0.0002)
    report.slow_bytes = slow.slow_bytes
    report.slow_seconds = slow.slow_seconds
    report.slow_rss_start_kib = slow.slow_rss_start_kib
    report.slow_rss_peak_kib = slow.slow_rss_peak_kib
    return report


def format_scale(report: ScaleReport) -> str:
    ratio = (
        report.many_peers_msgs_per_s / report.one_peer_msgs_per_s
        if report.one_peer_msgs_per_s
        else 0.0
    )
    return "\n".join(
        [
            "scale",
            f"  1 peer -> one node         {report.one_peer_msgs_per_s:>10,.0f} msgs/s"
            f"  (receiver CPU {report.one_peer_receiver_us:.1f} us/msg)",
            f"  {report.peers} peers -> one node  {report.many_peers_msgs_per_s:>10,.0f} msgs/s"
            f"  ({ratio:.2f}x one peer; receiver CPU {report.many_peers_receiver_us:.1f} us/msg;"
            " the peers share one sending thread)",
            f"  memory per idle peer       {report.idle_peer_bytes / 1024:>10.1f} KiB",
            f"  simulated {report.sim_messages:,} msgs, {report.sim_loss:.0%} loss: "
            f"{report.sim_cpu_s:.2f} s CPU for {report.sim_virtual_s:.1f} s simulated",
            f"  slow receiver: {report.slow_bytes / 2**20:,.0f} MiB "
            f"in {report.slow_seconds:.1f} s; "
            f"sender RSS {report.slow_rss_start_kib / 1024:.1f} MiB after 10%, "
            f"peak {report.slow_rss_peak_kib / 1024:.1f} MiB after",
        ]
    )


def _main() -> None:  # pragma: no cover - manual runs
    print(format_scale(run_scale(quick=True, progress=print)))


if __name__ == "__main__":  # pragma: no cover
    _main()
