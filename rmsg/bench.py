"""``rmsg bench``: rmsg side by side with raw UDP and length-framed TCP, in one run.

Every figure comes from two processes on loopback (a sender and a receiver,
or a client and an echo server), started fresh for each measurement. Rounds
are interleaved — each round measures every case once — so drift on a
shared machine hits every transport alike, and the report gives the median
over rounds. Ratios are to raw UDP and to TCP *of the same run*.

Measured, per message size (64 B, 1 KiB, 64 KiB, one 16 MiB message):

* messages/s and MB/s at the receiver (first to last message);
* CPU seconds per message (sender and receiver together) and peak RSS;
* for rmsg, the retransmission ratio, at 0/1/5/10% loss each way through
  netem (``FaultySocket`` on the receiver's socket);
* the batch API (``send_many``/``receive_many``, transports ``rmsg-batch`` and
  ``rmsg-async-batch``), without loss;

and request/reply round-trip time (64-byte ping-pong), p50 and p99, with both
processes pinned to one CPU and unpinned, with the CPU and datagrams each
round trip cost, beside the protocol core on a bare loop (row ``core``: no
adapter, the floor an adapter can reach; ``run_rr_bench`` measures these
rows alone, ``rmsg bench --rr``). Raw UDP is the ceiling (it may
lose datagrams: its loss is reported); TCP is what users would pick instead.

Every load loop is bounded in count and in time. Loopback only, except
``run_veth_bench`` (``rmsg bench --veth``): 1 KiB and 16 MiB rows between two
network namespaces joined by veth links (MTU 1500, addresses from the
benchmarking range 198.18.0.0/15, built by ``tools/testnet.py`` with unique
names and torn down afterwards), where datagrams are path-MTU sized and UDP
segmentation offload (``reliable.udpio``) matters.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing as mp
import os
import resource
import socket
import statistics
import struct
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection
from typing import Any

from .bench_scale import ScaleReport, answer, format_scale, run_scale

__all__ = [
    "BenchReport",
    "Latency",
    "Throughput",
    "format_report",
    "run_bench",
    "run_rr_bench",
    "run_veth_bench",
]

SIZES = (64, 1024, 64 * 1024)
BIG = 16 * 1024 * 1024
LOSSES = (0.0, 0.01, 0.05, 0.10)
MAX_MESSAGES = 2_000_000  # hard bound on any sending loop, on top of its time bound
_UDP_MAX = 65507
_FRAME = struct.Struct("!I")
_WINDOW = 256  # rmsg messages a benchmark sender keeps unconfirmed ...
_WINDOW_BYTES = 4 * 1024 * 1024  # ... and bytes, so large messages drain in bounded time
_LISTEN = "127.0.0.1"
_BATCH = 64  # messages per send_many / receive_many in the batch cases
_CHECK_EVERY = 64  # a receiver looks for the sender's final count every this many messages


@dataclass(frozen=True, slots=True)
class Throughput:
    transport: str  #: udp, tcp, rmsg, rmsg-async, rmsg-batch, rmsg-async-batch
    size: int
    loss: float
    messages: int  #: received
    seconds: float
    messages_per_s: float
    mb_per_s: float
    cpu_us_per_message: float
    peak_rss_kib: int
    retransmission_ratio: float | None = None  #: rmsg: retransmitted / sent packets
    lost: int = 0  #: udp: sent but never received


@dataclass(frozen=True, slots=True)
class Latency:
    transport: str  #: udp, tcp, core (the core on a bare loop), rmsg, rmsg-async
    pinned: bool
    p50_us: float
    p99_us: float
    samples: int
    #: CPU of both processes during the round trips, per round trip
    cpu_us_per_rt: float | None = None
    #: datagrams both ends sent per round trip (core, rmsg: 2 when every ack rides a message)
    datagrams_per_rt: float | None = None


@dataclass(slots=True)
class BenchReport:
    throughput: list[Throughput] = field(default_factory=list)
    latency: list[Latency] = field(default_factory=list)
    rounds: int = 0
    cpus: int = 0
    #: which protocol core ran: "pure" Python or "compiled" (mypyc), see docs/performance.md
    core: str = ""
    scale: ScaleReport | None = None
    #: size -> CPU microseconds per message of the protocol core alone (both ends)
    core_cpu_us: dict[int, float] = field(default_factory=dict)
    path: str = "loopback"  #: where sender and receiver ran
    #: CPU microseconds per 64 B request/reply of the protocol core alone (both ends)
    core_rr_us: float | None = None

    def find(self, transport: str, size: int, loss: float = 0.0) -> Throughput | None:
        for t in self.throughput:
            if (t.transport, t.size, t.loss) == (transport, size, loss):
                return t
        return None

    def as_dict(self) -> dict[str, Any]:
        return {
            "rounds": self.rounds,
            "cpus": self.cpus,
            "core": self.core,
            "throughput": [asdict(t) for t in self.throughput],
            "latency": [asdict(x) for x in self.latency],
            "scale": None if self.scale is None else self.scale.as_dict(),
            "core_cpu_us": self.core_cpu_us,
            "path": self.path,
            "core_rr_us": self.core_rr_us,
        }


# ------------------------------------------------------------------ processes


def _pin(cpu: int | None) -> None:
    if cpu is not None and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {cpu})


def _usage() -> tuple[float, int]:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime, ru.ru_maxrss


def _rmsg_socket(loss: float, seed: int) -> Any:
    from netem import Impairment
    from netem.socket import FaultySocket
    from reliable.driver import open_socket

    sock = open_socket(f"{_LISTEN}:0", offload=not loss)  # (a FaultySocket reads per datagram)
    if not loss:
        return sock
    return FaultySocket(sock, Impairment(loss=loss), incoming=Impairment(loss=loss), seed=seed)


def _receiver(conn: Connection, transport: str, size: int, loss: float, limit: float) -> None:
    """Receive until told how many were sent (and they arrived), or until idle."""
    cpu0, _ = _usage()
    count = 0
    first = last = 0.0
    expected: int | None = None
    deadline = time.monotonic() + limit

    def finished() -> bool:
        """Everything the sender reports having sent is here (or time is up)."""
        nonlocal expected
        if expected is None and conn.poll():
            expected = conn.recv()
        return (expected is not None and count >= expected) or time.monotonic() > deadline

    def tick() -> bool:
        nonlocal first, last, count
        now = time.monotonic()
        if count == 0:
            first = now
        count += 1
        last = now
        if expected is not None:
            return count >= expected or now > deadline
        # The pipe is asked every _CHECK_EVERY messages (and after every idle timeout),
        # not per message: a poll of it is a system call of about 3 us, as much as a
        # raw UDP receive, which every transport's CPU per message used to include.
        return count % _CHECK_EVERY == 0 and finished()

    if transport == "udp":
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 * 1024 * 1024)
        sock.bind((_LISTEN, 0))
        conn.send(sock.getsockname())
        sock.settimeout(0.5)
        with sock:
            while time.monotonic() < deadline:
                try:
                    sock.recv(_UDP_MAX)
                except TimeoutError:
                    finished()
                    if expected is not None:
                        break  # the sender is done and nothing more is coming
                    continue
                if tick():
                    break
    elif transport == "tcp":
        server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        server.bind((_LISTEN, 0))
        server.listen(1)
        conn.send(server.getsockname())
        peer, _ = server.accept()
        with server, peer:
            stream = peer.makefile("rb", buffering=1 << 20)
            while True:
                head = stream.read(4)
                if len(head) < 4:
                    break
                stream.read(_FRAME.unpack(head)[0])
                if tick():
                    break
    elif transport == "rmsg":
        from reliable import Config, Node, ReceiveTimeout

        config = Config(peer_timeout=30.0)
        with Node(sock=_rmsg_socket(loss, 1), config=config) as node:
            conn.send(node.address)
            while time.monotonic() < deadline:
                try:
                    node.receive(timeout=0.1)
                except ReceiveTimeout:
                    if finished():
                        break
                    continue
                if tick():
                    break
    elif transport == "rmsg-batch":
        from reliable import Config, Node

        with Node(sock=_rmsg_socket(loss, 1), config=Config(peer_timeout=30.0)) as node:
            conn.send(node.address)
            done = False
            while not done and time.monotonic() < deadline:
                got = node.receive_many(_BATCH, timeout=0.1)
                if not got and finished():
                    break
                for _ in got:
                    done = tick()
    else:
        batch = transport == "rmsg-async-batch"
        asyncio.run(_async_receiver(conn, loss, tick, finished, deadline, batch))
    cpu1, rss = _usage()
    conn.send((count, max(last - first, 1e-9), cpu1 - cpu0, rss))


async def _async_receiver(
    conn: Connection,
    loss: float,
    tick: Callable[[], bool],
    finished: Callable[[], bool],
    deadline: float,
    batch: bool,
) -> None:
    from reliable import Config, ReceiveTimeout
    from reliable.aio import AsyncNode

    config = Config(peer_timeout=30.0)
    async with AsyncNode(sock=_rmsg_socket(loss, 1), config=config) as node:
        conn.send(node.address)
        done = False
        while batch and not done and time.monotonic() < deadline:
            got = await node.receive_many(_BATCH, timeout=0.1)
            if not got and finished():
                break
            for _ in got:
                done = tick()
        while not batch and time.monotonic() < deadline:
            try:
                await node.receive(timeout=0.1)
            except ReceiveTimeout:
                if finished():
                    break
                continue
            if tick():
                break


def _sender(
    conn: Connection, transport: str, addr: Any, size: int, loss: float, duration: float, one: bool
) -> None:
    """Send ``size``-byte messages for ``duration`` seconds (or one, if ``one``)."""
    payload = b"\x5a" * (min(size, _UDP_MAX) if transport == "udp" else size)
    cpu0, _ = _usage()
    sent = 0
    retransmissions = packets = 0
    started = time.monotonic()
    end = started + duration
    budget = 1 if one else MAX_MESSAGES
    if transport == "udp":
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * 1024 * 1024)
            while sent < budget and time.monotonic() < end:
                with contextlib.suppress(BlockingIOError, OSError):
                    sock.sendto(payload, addr)
                    sent += 1
    elif transport == "tcp":
        frame = _FRAME.pack(len(payload)) + payload
        with socket.create_connection(addr) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            while sent < budget and time.monotonic() < end:
                sock.sendall(frame)
                sent += 1
            sock.shutdown(socket.SHUT_WR)
            sock.recv(1)  # wait until the receiver has read it all and closed
    elif transport == "rmsg":
        from reliable import Config, Node, WouldBlock

        with Node(sock=_rmsg_socket(loss, 2), config=Config(peer_timeout=30.0)) as node:
            outstanding: deque[Any] = deque()
            window = _window(len(payload))
            while sent < budget and time.monotonic() < end:
                if len(outstanding) >= window:
                    outstanding.popleft().result(60)
                try:
                    outstanding.append(node.send_nowait(addr, payload))
                except WouldBlock:
                    # The receiver's mailbox is full (it takes messages slower than they
                    # come): a blocking send waits for room, as an application would.
                    node.send(addr, payload, timeout=60)
                sent += 1
            for handle in outstanding:
                handle.result(120)
            stats = node.stats()
            retransmissions, packets = (
                stats.retransmissions,
                sum(p.packets_sent for p in stats.peers),
            )
    elif transport == "rmsg-batch":
        from reliable import Config, Node

        with Node(sock=_rmsg_socket(loss, 2), config=Config(peer_timeout=30.0)) as node:
            batches: deque[Any] = deque()
            window = max(1, _window(len(payload)) // _BATCH)
            chunk = [payload] * min(_BATCH, budget)
            while sent < budget and time.monotonic() < end:
                if len(batches) >= window:
                    batches.popleft().result(60)
                batches.append(node.send_many(addr, chunk))
                sent += len(chunk)
            for handle in batches:
                handle.result(120)
            stats = node.stats()
            retransmissions, packets = (
                stats.retransmissions,
                sum(p.packets_sent for p in stats.peers),
            )
    else:
        sent, retransmissions, packets = asyncio.run(
            _async_sender(addr, payload, loss, end, budget, transport == "rmsg-async-batch")
        )
    cpu1, rss = _usage()
    # until every message was confirmed (rmsg) or read (tcp): the time a single message takes
    elapsed = time.monotonic() - started
    conn.send((sent, cpu1 - cpu0, rss, retransmissions, packets, elapsed))


async def _async_sender(
    addr: Any, payload: bytes, loss: float, end: float, budget: int, batch: bool
) -> tuple[int, int, int]:
    from reliable import Config, WouldBlock
    from reliable.aio import AsyncNode

    sent = 0
    async with AsyncNode(sock=_rmsg_socket(loss, 2), config=Config(peer_timeout=30.0)) as node:
        outstanding: deque[asyncio.Future[Any]] = deque()
        window = _window(len(payload))
        chunk = [payload] * min(_BATCH, budget)
        while batch and sent < budget and time.monotonic() < end:
            if len(outstanding) >= max(1, window // _BATCH):
                await outstanding.popleft()
            outstanding.append(await node.send_many(addr, chunk))
            sent += len(chunk)
        while not batch and sent < budget and time.monotonic() < end:
            if len(outstanding) >= window:
                await outstanding.popleft()
            try:
                outstanding.append(node.send_nowait(addr, payload))
            except WouldBlock:  # the receiver's mailbox is full: wait for room (as above)
                await node.send(addr, payload, timeout=60)
            sent += 1
        await asyncio.gather(*outstanding)
        stats = node.stats()
        return sent, stats.retransmissions, sum(p.packets_sent for p in stats.peers)


def _window(size: int) -> int:
    return max(1, min(_WINDOW, _WINDOW_BYTES // max(size, 1)))


#: Linux's CLONE_NEWNET, for setns(2)
_CLONE_NEWNET = 0x40000000


def _in_netns(netns: str, listen: str, target: Callable[..., None], *args: Any) -> None:
    """Run ``target(*args)`` in network namespace ``netns``, binding to ``listen``.

    A process entry point: the spawned child moves itself into the namespace
    (``setns``, while it is still single-threaded) before anything opens a
    socket.
    """
    import ctypes

    global _LISTEN
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/run/netns/{netns}", os.O_RDONLY)
    try:
        if libc.setns(fd, _CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns {netns}: {os.strerror(err)}")
    finally:
        os.close(fd)
    _LISTEN = listen
    target(*args)


#: (network namespace, its address) of the receiver and of the sender, or None: loopback
Hosts = tuple[tuple[str, str], tuple[str, str]] | None


def _measure_throughput(
    transport: str, size: int, loss: float, duration: float, one: bool, hosts: Hosts = None
) -> Throughput:
    ctx = mp.get_context("spawn")
    rx_parent, rx_child = ctx.Pipe()
    tx_parent, tx_child = ctx.Pipe()
    limit = duration + (120.0 if one or loss else 30.0)
    rx_args: tuple[Any, ...] = (rx_child, transport, size, loss, limit)
    if hosts is None:
        receiver = ctx.Process(target=_receiver, args=rx_args)
    else:
        receiver = ctx.Process(target=_in_netns, args=(*hosts[0], _receiver, *rx_args))
    processes = [receiver]
    receiver.start()
    try:
        addr = answer(rx_parent, receiver, 60.0, "receiver")
        tx_args: tuple[Any, ...] = (tx_child, transport, addr, size, loss, duration, one)
        if hosts is None:
            sender = ctx.Process(target=_sender, args=tx_args)
        else:
            sender = ctx.Process(target=_in_netns, args=(*hosts[1], _sender, *tx_args))
        processes.append(sender)
        sender.start()
        sent, tx_cpu, tx_rss, retx, packets, tx_elapsed = answer(
            tx_parent, sender, limit + 60.0, "sender"
        )
        sender.join(30)
        rx_parent.send(sent)
        received, seconds, rx_cpu, rx_rss = answer(rx_parent, receiver, limit + 60.0, "receiver")
        receiver.join(30)
    finally:
        _reap(processes)
    messages = max(received, 1)
    if one:  # one message has no first-to-last interval: time it from send to confirmation
        seconds = tx_elapsed
    return Throughput(
        transport=transport,
        size=size,
        loss=loss,
        messages=received,
        seconds=seconds,
        messages_per_s=received / seconds if received > 1 or one else 0.0,
        mb_per_s=received * size / seconds / 1e6 if received > 1 or one else 0.0,
        cpu_us_per_message=(tx_cpu + rx_cpu) / messages * 1e6,
        peak_rss_kib=max(tx_rss, rx_rss),
        retransmission_ratio=(retx / packets if packets else None)
        if transport.startswith("rmsg")
        else None,
        lost=max(0, sent - received) if transport == "udp" else 0,
    )


def _reap(processes: list[Any]) -> None:
    """End only the processes this benchmark started (by handle), if still running."""
    for process in processes:
        if process.is_alive():
            process.kill()
            process.join(5)


# -------------------------------------------------------------------- latency

#: Request/reply transports: the baselines, the protocol core on a bare loop, the adapters.
RR_TRANSPORTS = ("udp", "tcp", "core", "rmsg", "rmsg-async")
_BARE_TICK = 0.002  # seconds the bare loop's blocking read waits before it runs the timers


def _echo(conn: Connection, transport: str, cpu: int | None, count: int) -> None:
    """Answer ``count`` 64-byte requests; then report (CPU seconds, datagrams sent)."""
    _pin(cpu)
    cpu0 = cpu1 = 0.0
    datagrams: int | None = None
    if transport == "udp":
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.bind((_LISTEN, 0))
            conn.send(sock.getsockname())
            sock.settimeout(10)
            cpu0, _ = _usage()
            for _ in range(count):
                data, peer = sock.recvfrom(256)
                sock.sendto(data, peer)
            cpu1, _ = _usage()
    elif transport == "tcp":
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
            server.bind((_LISTEN, 0))
            server.listen(1)
            conn.send(server.getsockname())
            peer, _ = server.accept()
            with peer:
                peer.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                cpu0, _ = _usage()
                for _ in range(count):
                    peer.sendall(_recv_exact(peer, 64))
                cpu1, _ = _usage()
    elif transport == "core":
        bare = _BareLoop(2)
        conn.send(bare.sock.getsockname())
        cpu0, _ = _usage()
        for _ in range(count):
            msg = bare.receive()
            bare.send(msg.source, msg.data)
        cpu1, _ = _usage()
        bare.linger(0.2)
        datagrams = bare.endpoint.datagrams_sent
    elif transport == "rmsg":
        from reliable import Node

        with Node() as node:
            conn.send(node.address)
            cpu0, _ = _usage()
            for _ in range(count):
                msg = node.receive(timeout=10)
                node.send_nowait(msg.source, msg.data)
            cpu1, _ = _usage()
            time.sleep(0.2)  # let the last reply's acknowledgement come back
            datagrams = node.stats().datagrams_sent
    else:

        async def serve() -> tuple[float, float, int]:
            from reliable.aio import AsyncNode

            async with AsyncNode() as node:
                conn.send(node.address)
                start, _ = _usage()
                for _ in range(count):
                    msg = await node.receive(timeout=10)
                    node.send_nowait(msg.source, msg.data)
                stop, _ = _usage()
                await asyncio.sleep(0.2)
                return start, stop, node.stats().datagrams_sent

        cpu0, cpu1, datagrams = asyncio.run(serve())
    conn.send((cpu1 - cpu0, datagrams))


class _BareLoop:
    """The protocol core on a bare loop: one blocking socket, no adapter, no thread.

    The floor any adapter can reach on this machine: a round trip of ``core``
    against one of ``rmsg`` is what the adapter adds. It reads with a short
    timeout and runs the core's due timers after every read; nothing else
    (no backlog, no batching, no events beyond the messages).
    """

    def __init__(self, seed: int) -> None:
        import random

        from reliable import Config, Endpoint, Selector, events

        self.taken = events.MessageTaken
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((_LISTEN, 0))
        self.sock.settimeout(_BARE_TICK)
        self.endpoint = Endpoint(Config(peer_timeout=30.0), rng=random.Random(seed))
        self.every = Selector.of(None, 0, False)

    def turn(self) -> float:
        """Read at most one datagram (or time out), run due timers; returns ``now``."""
        endpoint = self.endpoint
        try:
            data, addr = self.sock.recvfrom(65535)
        except TimeoutError:
            data = None
        now = time.monotonic()
        if data is not None:
            endpoint.receive_datagram(data, addr, now)
        timer = endpoint.get_timer()
        if timer is not None and timer <= now:
            endpoint.handle_timer(now)
        return now

    def flush(self, now: float) -> Any:
        """Send what the core has; the message a waiting receive was handed, if any."""
        got = None
        while (event := self.endpoint.next_event()) is not None:
            if isinstance(event, self.taken):
                got = event.message
        for data, addr in self.endpoint.datagrams_to_send(now):
            self.sock.sendto(data, addr)
        return got

    def receive(self, limit: float = 10.0) -> Any:
        """The next message. It waits as the adapters do (a waiting receive, so that
        the core may hold the ack back for the reply to carry it)."""
        endpoint = self.endpoint
        now = time.monotonic()
        msg = endpoint.take("", self.every, now=now)
        if msg is not None:
            return msg
        endpoint.wait_for_message("", self.every, receiver="bench", now=now)
        give_up = now + limit
        while True:
            now = self.turn()
            msg = self.flush(now)
            if msg is not None:
                return msg
            if now > give_up:
                raise TimeoutError("no message")

    def send(self, dest: Any, data: bytes) -> None:
        now = time.monotonic()
        self.endpoint.send(dest, data, now=now)
        self.flush(now)

    def linger(self, seconds: float) -> None:
        """Keep answering (acks) for ``seconds``, then close the socket."""
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self.flush(self.turn())
        self.sock.close()


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
    return data


def _ping(conn: Connection, transport: str, addr: Any, cpu: int | None, count: int) -> None:
    """``count`` timed round trips; reports (samples, CPU seconds, datagrams sent)."""
    _pin(cpu)
    payload = b"p" * 64
    samples: list[float] = []
    cpu0 = cpu1 = 0.0
    datagrams: int | None = None
    if transport == "udp":
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.settimeout(10)
            cpu0, _ = _usage()
            for _ in range(count):
                start = time.perf_counter()
                sock.sendto(payload, addr)
                sock.recv(256)
                samples.append(time.perf_counter() - start)
            cpu1, _ = _usage()
    elif transport == "tcp":
        with socket.create_connection(addr) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            cpu0, _ = _usage()
            for _ in range(count):
                start = time.perf_counter()
                sock.sendall(payload)
                _recv_exact(sock, 64)
                samples.append(time.perf_counter() - start)
            cpu1, _ = _usage()
    elif transport == "core":
        bare = _BareLoop(1)
        cpu0, _ = _usage()
        for _ in range(count):
            start = time.perf_counter()
            bare.send(addr, payload)
            bare.receive()
            samples.append(time.perf_counter() - start)
        cpu1, _ = _usage()
        datagrams = bare.endpoint.datagrams_sent
        bare.linger(0.05)
    elif transport == "rmsg":
        from reliable import Node

        with Node() as node:
            cpu0, _ = _usage()
            for _ in range(count):
                start = time.perf_counter()
                node.send_nowait(addr, payload)
                node.receive(timeout=10)
                samples.append(time.perf_counter() - start)
            cpu1, _ = _usage()
            datagrams = node.stats().datagrams_sent
    else:

        async def ping() -> tuple[float, float, int]:
            from reliable.aio import AsyncNode

            async with AsyncNode() as node:
                start_cpu, _ = _usage()
                for _ in range(count):
                    start = time.perf_counter()
                    node.send_nowait(addr, payload)
                    await node.receive(timeout=10)
                    samples.append(time.perf_counter() - start)
                stop_cpu, _ = _usage()
                return start_cpu, stop_cpu, node.stats().datagrams_sent

        cpu0, cpu1, datagrams = asyncio.run(ping())
    conn.send((samples, cpu1 - cpu0, datagrams))


def _measure_latency(transport: str, pinned: bool, count: int) -> Latency:
    ctx = mp.get_context("spawn")
    echo_parent, echo_child = ctx.Pipe()
    ping_parent, ping_child = ctx.Pipe()
    cpu = 0 if pinned else None
    echo = ctx.Process(target=_echo, args=(echo_child, transport, cpu, count))
    processes = [echo]
    echo.start()
    try:
        addr = answer(echo_parent, echo, 60.0, "echo")
        pinger = ctx.Process(target=_ping, args=(ping_child, transport, addr, cpu, count))
        processes.append(pinger)
        pinger.start()
        samples, ping_cpu, ping_sent = answer(ping_parent, pinger, 600.0, "ping")
        echo_cpu, echo_sent = answer(echo_parent, echo, 60.0, "echo")
        samples.sort()
        pinger.join(30)
        echo.join(30)
    finally:
        _reap(processes)
    sent = None if ping_sent is None or echo_sent is None else (ping_sent + echo_sent) / count
    return Latency(
        transport=transport,
        pinned=pinned,
        p50_us=statistics.median(samples) * 1e6,
        p99_us=samples[min(len(samples) - 1, int(len(samples) * 0.99))] * 1e6,
        samples=len(samples),
        cpu_us_per_rt=(ping_cpu + echo_cpu) / count * 1e6,
        datagrams_per_rt=sent,
    )


def measure_core_rr(count: int) -> float:
    """CPU seconds per 64-byte request/reply of the protocol core alone, both ends.

    Two endpoints on a perfect link in virtual time (0.4 ms a round trip, so
    a reply's ack rides on the next request as in ``rmsg bench``), no
    sockets: the request is sent, delivered and taken, the reply likewise.
    Marginal cost, as :func:`measure_core`. A round trip on loopback costs
    more than this even with no adapter at all (the ``core`` row of the
    request/reply block): each process runs on a CPU the other one just
    used, with cold caches.
    """
    import random

    from reliable import Config, Endpoint, Selector

    every = Selector.of(None, 0, False)
    payload = b"p" * 64

    def run(n: int) -> float:
        config = Config(peer_timeout=30.0)
        a = Endpoint(config, rng=random.Random(1))
        b = Endpoint(config, rng=random.Random(2))
        addr_a, addr_b = ("127.0.0.1", 1), ("127.0.0.1", 2)
        now = 0.0

        def pump() -> None:
            for data, _ in a.datagrams_to_send(now):
                b.receive_datagram(data, addr_a, now)
            for data, _ in b.datagrams_to_send(now):
                a.receive_datagram(data, addr_b, now)

        def take(end: Any) -> Any:
            for _ in range(20):  # bounded: the first exchange also opens the session
                msg = end.take("", every, now=now)
                if msg is not None:
                    return msg
                pump()
            raise RuntimeError("the core did not deliver over a perfect link")

        start = time.process_time()
        for _ in range(n):
            now += 0.0004
            a.send(addr_b, payload, now=now)
            pump()
            request = take(b)
            b.send(addr_a, request.data, now=now)
            pump()
            take(a)
            for end in (a, b):
                while end.next_event() is not None:
                    pass
                timer = end.get_timer()
                if timer is not None and timer <= now:
                    end.handle_timer(now)
        return time.process_time() - start

    first = run(count)
    return max(0.0, (run(2 * count) - first) / count)


def run_rr_bench(
    *,
    rounds: int = 3,
    count: int = 3000,
    progress: Callable[[str], None] | None = None,
) -> BenchReport:
    """Request/reply only (``rmsg bench --rr``): every :data:`RR_TRANSPORTS` row,
    pinned to one CPU and unpinned, in interleaved rounds (medians by p50), and
    the core's own CPU per round trip measured in every round (median)."""
    lat: dict[tuple[str, bool], list[Latency]] = {}
    core: list[float] = []
    pinned_options = (True, False) if (os.cpu_count() or 1) > 1 else (False,)
    for r in range(rounds):
        for transport in RR_TRANSPORTS:
            for pinned in pinned_options:
                if progress is not None:
                    where = "pinned" if pinned else "unpinned"
                    progress(f"round {r + 1}/{rounds}: {transport} request/reply, {where}")
                lat.setdefault((transport, pinned), []).append(
                    _measure_latency(transport, pinned, count)
                )
        if progress is not None:
            progress(f"round {r + 1}/{rounds}: the core alone, request/reply")
        core.append(measure_core_rr(max(200, count // 3)) * 1e6)
    import reliable

    report = BenchReport(
        rounds=rounds,
        cpus=os.cpu_count() or 1,
        core="compiled" if reliable.__compiled__ else "pure",
        core_rr_us=statistics.median(core),
    )
    for results in lat.values():
        report.latency.append(_median(results, "p50_us"))
    return report


# ---------------------------------------------------------------------- runner


def _cases(quick: bool) -> Iterator[tuple[str, int, float, bool]]:
    sizes = (64, 1024) if quick else SIZES
    losses = (0.0, 0.05) if quick else LOSSES
    for size in sizes:
        yield "udp", size, 0.0, False
        yield "tcp", size, 0.0, False
        for loss in losses:
            yield "rmsg", size, loss, False
            yield "rmsg-async", size, loss, False
        yield "rmsg-batch", size, 0.0, False
        yield "rmsg-async-batch", size, 0.0, False
    if not quick:
        yield "tcp", BIG, 0.0, True
        yield "rmsg", BIG, 0.0, True
        yield "rmsg-async", BIG, 0.0, True


def run_bench(
    *,
    quick: bool = False,
    rounds: int | None = None,
    duration: float | None = None,
    progress: Callable[[str], None] | None = None,
    scale: bool = False,
) -> BenchReport:
    """Measure everything; ``quick`` is a smoke run (small matrix, short windows)."""
    rounds = rounds if rounds is not None else (1 if quick else 3)
    duration = duration if duration is not None else (0.3 if quick else 1.5)
    pings = 200 if quick else 3000
    cases = list(_cases(quick))
    seen: dict[tuple[str, int, float], list[Throughput]] = {}
    lat: dict[tuple[str, bool], list[Latency]] = {}
    core_cpu: dict[int, list[float]] = {}
    core_rr: list[float] = []
    pinned_options = (True, False) if (os.cpu_count() or 1) > 1 else (False,)
    for r in range(rounds):
        for transport, size, loss, one in cases:
            if progress is not None:
                progress(f"round {r + 1}/{rounds}: {transport} {size} B, {loss:.0%} loss")
            result = _measure_throughput(transport, size, loss, duration, one)
            seen.setdefault((transport, size, loss), []).append(result)
        for transport in RR_TRANSPORTS:
            for pinned in pinned_options:
                if progress is not None:
                    where = "pinned" if pinned else "unpinned"
                    progress(f"round {r + 1}/{rounds}: {transport} request/reply, {where}")
                lat.setdefault((transport, pinned), []).append(
                    _measure_latency(transport, pinned, pings)
                )
        # The core alone, in every round: the adapters' share compares figures of the
        # same rounds, so the machine's load weighs on both sides of the ratio alike.
        for size in (64, 1024):
            if progress is not None:
                progress(f"round {r + 1}/{rounds}: the core alone, {size} B messages")
            core_cpu.setdefault(size, []).append(measure_core(size, 2000 if quick else 20000) * 1e6)
        core_rr.append(measure_core_rr(200 if quick else 1000) * 1e6)
    import reliable

    core = "compiled" if reliable.__compiled__ else "pure"
    report = BenchReport(
        rounds=rounds,
        cpus=os.cpu_count() or 1,
        core=core,
        core_rr_us=statistics.median(core_rr),
    )
    for results in seen.values():
        report.throughput.append(_median(results, "messages_per_s"))
    for results_l in lat.values():
        report.latency.append(_median(results_l, "p50_us"))
    for size, figures in core_cpu.items():
        report.core_cpu_us[size] = statistics.median(figures)
    if scale:
        report.scale = run_scale(quick=quick, progress=progress)
    return report


#: The veth matrix: 1 KiB messages and one 16 MiB message, against TCP (and raw UDP).
VETH_CASES = (
    ("udp", 1024, False),
    ("tcp", 1024, False),
    ("rmsg", 1024, False),
    ("tcp", BIG, True),
    ("rmsg", BIG, True),
)


def _testnet() -> Any:
    """``tools/testnet.py`` (a source checkout's), imported by path if need be."""
    try:
        from tools import testnet
    except ImportError:
        import importlib.util
        import pathlib
        import sys

        path = pathlib.Path(__file__).resolve().parents[1] / "tools" / "testnet.py"
        spec = importlib.util.spec_from_file_location("rmsg_testnet", path)
        if spec is None or spec.loader is None or not path.exists():
            raise RuntimeError(
                "rmsg bench --veth needs tools/testnet.py (a source checkout)"
            ) from None
        testnet = importlib.util.module_from_spec(spec)
        sys.modules["rmsg_testnet"] = testnet
        spec.loader.exec_module(testnet)
    return testnet


def veth_unavailable() -> str | None:
    """Why ``run_veth_bench`` cannot run here, or None."""
    try:
        testnet = _testnet()
    except RuntimeError as exc:
        return str(exc)
    reason: str | None = testnet.available()
    if reason is None and not os.path.isdir("/run/netns") and os.geteuid() != 0:
        reason = "network namespaces need root"
    return reason


def run_veth_bench(
    *,
    rounds: int = 3,
    duration: float = 1.5,
    progress: Callable[[str], None] | None = None,
) -> BenchReport:
    """The veth matrix (:data:`VETH_CASES`), interleaved rounds, medians.

    Sender and receiver run in two network namespaces of a fresh test
    network (two hosts on a bridge, veth links, MTU 1500), deleted when the
    run ends, however it ends. Raises ``RuntimeError`` when namespaces
    cannot be built here (see :func:`veth_unavailable`).
    """
    testnet = _testnet()
    seen: dict[tuple[str, int, float], list[Throughput]] = {}
    with testnet.TestNetwork(hosts=2) as net:
        rx, tx = net.hosts
        hosts: Hosts = ((rx.name, rx.address), (tx.name, tx.address))
        for r in range(rounds):
            for transport, size, one in VETH_CASES:
                if progress is not None:
                    progress(f"round {r + 1}/{rounds}: {transport} {_size(size)} over veth")
                result = _measure_throughput(transport, size, 0.0, duration, one, hosts)
                seen.setdefault((transport, size, 0.0), []).append(result)
    import reliable

    report = BenchReport(
        rounds=rounds,
        cpus=os.cpu_count() or 1,
        path="veth",
        core="compiled" if reliable.__compiled__ else "pure",
    )
    for results in seen.values():
        report.throughput.append(_median(results, "messages_per_s"))
    return report


def measure_core(size: int, messages: int) -> float:
    """CPU seconds per message of the protocol core alone, sender and receiver together.

    Two endpoints on a perfect link in virtual time, no sockets and no
    adapter: the sender queues 16 messages at a time (as ``Node`` holds sends
    to a busy peer), at most ``_WINDOW`` unconfirmed, and the receiver takes
    each. Marginal cost: the difference between ``messages`` and twice that,
    so start-up cancels out. What ``rmsg``'s CPU per message exceeds this by
    is the adapters' and the kernel's share.
    """
    import random

    from reliable import Config, Endpoint, Selector

    payload = b"\x5a" * size
    every = Selector.of(None, 0, False)

    def run(n: int) -> float:
        config = Config(peer_timeout=30.0)
        a = Endpoint(config, rng=random.Random(1))
        b = Endpoint(config, rng=random.Random(2))
        addr_a, addr_b = ("127.0.0.1", 1), ("127.0.0.1", 2)
        now = 0.0
        sent = got = confirmed = 0
        start = time.process_time()
        for _ in range(20 * n):  # bounded: each turn moves at least one message
            if got >= n:
                break
            for _ in range(16):
                if sent < n and sent - confirmed < _WINDOW:
                    a.send(addr_b, payload, now=now)
                    sent += 1
            for data, _ in a.datagrams_to_send(now):
                b.receive_datagram(data, addr_a, now)
            while b.take("", every, now=now) is not None:
                got += 1
            while b.next_event() is not None:
                pass
            for data, _ in b.datagrams_to_send(now):
                a.receive_datagram(data, addr_b, now)
            while a.next_event() is not None:
                confirmed += 1
            now += 0.0002
            for end in (a, b):
                timer = end.get_timer()
                if timer is not None and timer <= now:
                    end.handle_timer(now)
        return time.process_time() - start

    first = run(messages)
    return max(0.0, (run(2 * messages) - first) / messages)


def _median(results: list[Any], key: str) -> Any:
    ordered = sorted(results, key=lambda r: getattr(r, key))
    return ordered[len(ordered) // 2]


# ------------------------------------------------------------------- display


def _size(n: int) -> str:
    return (
        f"{n // (1024 * 1024)} MiB"
        if n >= 1024 * 1024
        else f"{n // 1024} KiB"
        if n >= 1024
        else f"{n} B"
    )


_PATHS = {"veth": "two network namespaces over veth (MTU 1500)"}


def format_report(report: BenchReport) -> str:
    lines = [
        f"rmsg bench: {_PATHS.get(report.path, report.path)}, {report.core or 'pure'} core, "
        f"{report.cpus} CPUs, "
        f"median of {report.rounds} round(s)",
    ]
    if report.throughput:
        lines += [
            "",
            f"{'size':>7}  {'transport':<17}{'loss':>5}  {'msgs/s':>10}  {'MB/s':>8}  "
            f"{'x UDP':>6}  {'x TCP':>6}  {'CPU us/msg':>10}  {'RSS MiB':>7}  {'retx':>6}",
        ]
    for t in sorted(
        report.throughput,
        key=lambda t: (t.size, t.transport != "udp", t.transport != "tcp", t.transport, t.loss),
    ):
        udp = report.find("udp", t.size)
        tcp = report.find("tcp", t.size)
        x_udp = (
            f"{t.messages_per_s / udp.messages_per_s:.2f}" if udp and udp.messages_per_s else "-"
        )
        x_tcp = (
            f"{t.messages_per_s / tcp.messages_per_s:.2f}" if tcp and tcp.messages_per_s else "-"
        )
        if t.size == BIG and tcp and tcp.mb_per_s:
            x_tcp = f"{t.mb_per_s / tcp.mb_per_s:.2f}"
        retx = "-" if t.retransmission_ratio is None else f"{t.retransmission_ratio:.1%}"
        lost = f" (lost {t.lost})" if t.lost else ""
        lines.append(
            f"{_size(t.size):>7}  {t.transport:<17}{t.loss:>5.0%}  {t.messages_per_s:>10,.0f}  "
            f"{t.mb_per_s:>8.1f}  {x_udp:>6}  {x_tcp:>6}  {t.cpu_us_per_message:>10.1f}  "
            f"{t.peak_rss_kib / 1024:>7.1f}  {retx:>6}{lost}"
        )
    if report.latency:
        lines += [
            "",
            f"request/reply, 64 B  {'':<9}{'p50 us':>9}  {'p99 us':>9}  {'p50 x UDP':>9}"
            f"  {'CPU us/rt':>9}  {'dgrams/rt':>9}",
        ]
    order = {t: i for i, t in enumerate(RR_TRANSPORTS)}
    for x in sorted(report.latency, key=lambda x: (not x.pinned, order.get(x.transport, 9))):
        base = next(
            (b for b in report.latency if b.transport == "udp" and b.pinned == x.pinned), None
        )
        ratio = f"{x.p50_us / base.p50_us:.2f}" if base else "-"
        where = "pinned" if x.pinned else "unpinned"
        cpu = "-" if x.cpu_us_per_rt is None else f"{x.cpu_us_per_rt:.1f}"
        sent = "-" if x.datagrams_per_rt is None else f"{x.datagrams_per_rt:.2f}"
        lines.append(
            f"{x.transport:<11}{where:<18}{x.p50_us:>9.1f}  {x.p99_us:>9.1f}  {ratio:>9}"
            f"  {cpu:>9}  {sent:>9}"
        )
    if report.latency:
        lines.append(
            "  (core: the protocol core on a bare loop, no adapter: the floor an adapter can reach)"
        )
    if report.core_rr_us is not None:
        lines.append(
            f"  the core alone, both ends, per round trip (virtual time, no sockets): "
            f"{report.core_rr_us:.1f} us of CPU"
        )
    if report.core_cpu_us:
        lines += ["", "CPU per message, sender + receiver: the core alone, and the adapters' share"]
        for size, core in sorted(report.core_cpu_us.items()):
            shares = []
            for transport in ("rmsg", "rmsg-async", "rmsg-batch", "rmsg-async-batch"):
                row = report.find(transport, size)
                if row is not None and row.cpu_us_per_message > 0:
                    share = max(0.0, 1 - core / row.cpu_us_per_message)
                    shares.append(f"{transport} {row.cpu_us_per_message:.1f} us ({share:.0%})")
            lines.append(f"{_size(size):>7}  core {core:.1f} us; " + ", ".join(shares))
    if report.scale is not None:
        lines += ["", format_scale(report.scale)]
    return "\n".join(lines)


def plot_report(report: BenchReport, path: str) -> None:
    """Draw the figures to the PNG ``path`` (see ``rmsg.plots.plot_bench``; needs rmsg[plot])."""
    from .plots import plot_bench

    plot_bench(report.as_dict(), path)
