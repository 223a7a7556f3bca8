"""Where a one-at-a-time stream's CPU goes: each side's CPU, system time, datagrams.

``rmsg bench`` prints the CPU per message of a 1 KiB stream sent one message
at a time (``send_nowait`` per message, at most 256 unconfirmed; the receiver
calls ``receive`` per message) and the share of it beyond the core alone.
This tool runs that same stream, two processes on loopback, and splits the
figure: sender and receiver apart, user and system time apart, how many DATA
records go out per message (``packets_sent``) and how many datagrams come
back (acknowledgements, ``packets_received``), and context switches per
message (voluntary: a thread slept; involuntary: it was preempted).

System calls are counted from outside, with the kernel's tracepoints::

    E=syscalls:sys_enter_
    perf stat -e ${E}sendto,${E}sendmsg,${E}recvmsg,${E}poll,${E}epoll_wait,${E}futex \\
        python tools/stream_cost.py --count 60000

Run it from a checkout (``--async`` for ``AsyncNode``; ``--profile tx`` or
``rx`` writes a cProfile of that side's sending or receiving loop)::

    python tools/stream_cost.py
    python tools/stream_cost.py --async --size 64
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import resource
import sys
import time
from collections import deque
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

sys.path.append(str(Path(__file__).resolve().parent.parent))  # (PYTHONPATH, an install first)

WINDOW = 256  #: unconfirmed sends, as rmsg bench's sender keeps
CHECK_EVERY = 64  #: the receiver asks the pipe for the final count this often


class Usage:
    """This process's CPU (user + system), system time and context switches, now."""

    def __init__(self) -> None:
        ru = resource.getrusage(resource.RUSAGE_SELF)
        self.cpu = ru.ru_utime + ru.ru_stime
        self.system = ru.ru_stime
        self.voluntary = ru.ru_nvcsw
        self.involuntary = ru.ru_nivcsw

    def since(self, start: Usage) -> dict[str, float]:
        return {
            "cpu": self.cpu - start.cpu,
            "system": self.system - start.system,
            "voluntary": self.voluntary - start.voluntary,
            "involuntary": self.involuntary - start.involuntary,
        }


def _profiler(side: str, wanted: str | None) -> Any:
    if side != wanted:
        return None
    import cProfile

    profile = cProfile.Profile()
    profile.enable()
    return profile


def _stop(profile: Any, side: str) -> None:
    if profile is not None:
        profile.disable()
        path = f"stream_cost.{side}.prof"
        profile.dump_stats(path)
        print(f"wrote {path}", file=sys.stderr)


def _socket() -> Any:
    from reliable.driver import open_socket

    return open_socket("127.0.0.1:0", offload=True)  # as rmsg bench's lossless cases


def _receiver(conn: Connection, use_async: bool, profile: str | None) -> None:
    from reliable import Config, Node, ReceiveTimeout
    from reliable.aio import AsyncNode

    config = Config(peer_timeout=30.0)
    state: dict[str, Any] = {"count": 0, "expected": None}

    def tick(timed_out: bool) -> bool:
        """Count a message (unless ``timed_out``); whether the stream is over."""
        if not timed_out:
            state["count"] += 1
        if timed_out or state["count"] % CHECK_EVERY == 0:
            if state["expected"] is None and conn.poll():
                state["expected"] = conn.recv()
            return state["expected"] is not None and state["count"] >= state["expected"]
        return False

    def report(node: Any, start: Usage) -> None:
        used = Usage().since(start)
        stats = node.stats()
        used["out"] = sum(p.packets_sent for p in stats.peers)
        conn.send((state["count"], used))

    if not use_async:
        with Node(sock=_socket(), config=config) as node:
            conn.send(node.address)
            start, prof = Usage(), _profiler("rx", profile)
            while True:
                try:
                    node.receive(timeout=0.1)
                    timed_out = False
                except ReceiveTimeout:
                    timed_out = True
                if tick(timed_out):
                    break
            _stop(prof, "rx")
            report(node, start)
        return

    async def run() -> None:
        async with AsyncNode(sock=_socket(), config=config) as node:
            conn.send(node.address)
            start, prof = Usage(), _profiler("rx", profile)
            while True:
                try:
                    await node.receive(timeout=0.1)
                    timed_out = False
                except ReceiveTimeout:
                    timed_out = True
                if tick(timed_out):
                    break
            _stop(prof, "rx")
            report(node, start)

    asyncio.run(run())


def _sender(
    conn: Connection,
    addr: Any,
    use_async: bool,
    size: int,
    count: int,
    seconds: float,
    profile: str | None,
) -> None:
    from reliable import Config, Node, WouldBlock
    from reliable.aio import AsyncNode

    payload = b"\x5a" * size
    config = Config(peer_timeout=30.0)

    def report(node: Any, start: Usage, sent: int) -> None:
        used = Usage().since(start)
        stats = node.stats()
        used["out"] = sum(p.packets_sent for p in stats.peers)
        used["in"] = sum(p.packets_received for p in stats.peers)
        conn.send((sent, used))

    if not use_async:
        with Node(sock=_socket(), config=config) as node:
            start, prof = Usage(), _profiler("tx", profile)
            sent, end = 0, time.monotonic() + seconds
            handles: deque[Any] = deque()
            while sent < count and time.monotonic() < end:
                if len(handles) >= WINDOW:
                    handles.popleft().result(60)
                try:
                    handles.append(node.send_nowait(addr, payload))
                except WouldBlock:
                    node.send(addr, payload, timeout=60)
                sent += 1
            for handle in handles:
                handle.result(120)
            _stop(prof, "tx")
            report(node, start, sent)
        return

    async def run() -> None:
        async with AsyncNode(sock=_socket(), config=config) as node:
            start, prof = Usage(), _profiler("tx", profile)
            sent, end = 0, time.monotonic() + seconds
            futures: deque[Any] = deque()
            while sent < count and time.monotonic() < end:
                if len(futures) >= WINDOW:
                    await futures.popleft()
                try:
                    futures.append(node.send_nowait(addr, payload))
                except WouldBlock:
                    await node.send(addr, payload, timeout=60)
                sent += 1
            await asyncio.gather(*futures)
            _stop(prof, "tx")
            report(node, start, sent)

    asyncio.run(run())


def measure(
    *,
    use_async: bool = False,
    size: int = 1024,
    count: int = 60_000,
    seconds: float = 1.5,
    profile: str | None = None,
) -> dict[str, Any]:
    """Run one stream; returns per-message figures for each side (``tx``, ``rx``)."""
    ctx = mp.get_context("spawn")
    rx_parent, rx_child = ctx.Pipe()
    tx_parent, tx_child = ctx.Pipe()
    receiver = ctx.Process(target=_receiver, args=(rx_child, use_async, profile))
    receiver.start()
    sender = None
    try:
        if not rx_parent.poll(60):
            raise RuntimeError("the receiver did not start")
        addr = rx_parent.recv()
        sender = ctx.Process(
            target=_sender, args=(tx_child, addr, use_async, size, count, seconds, profile)
        )
        sender.start()
        if not tx_parent.poll(seconds + 180):
            raise RuntimeError("the sender did not finish")
        sent, tx = tx_parent.recv()
        rx_parent.send(sent)
        if not rx_parent.poll(180):
            raise RuntimeError("the receiver did not finish")
        received, rx = rx_parent.recv()
    finally:
        for process in (sender, receiver):
            if process is not None:
                process.join(30)
                if process.is_alive():
                    process.kill()
    n = max(received, 1)
    return {
        "messages": received,
        "sent": sent,
        "tx": {k: v / n for k, v in tx.items()},
        "rx": {k: v / n for k, v in rx.items()},
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--async", dest="use_async", action="store_true", help="AsyncNode")
    parser.add_argument("--size", type=int, default=1024, help="bytes per message")
    parser.add_argument("--count", type=int, default=60_000, help="most messages to send")
    parser.add_argument("--seconds", type=float, default=1.5, help="longest sending window")
    parser.add_argument("--profile", choices=("tx", "rx"), help="cProfile one side's loop")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    got = measure(
        use_async=args.use_async,
        size=args.size,
        count=args.count,
        seconds=args.seconds,
        profile=args.profile,
    )
    tx, rx = got["tx"], got["rx"]
    kind = "AsyncNode" if args.use_async else "Node"
    print(f"{kind}, {args.size} B, {got['messages']:,} messages (pid {os.getpid()})")
    for side, used in (("sender", tx), ("receiver", rx)):
        print(
            f"  {side:8}  CPU {used['cpu'] * 1e6:5.1f} us/msg (system {used['system'] * 1e6:4.1f})"
            f"  context switches {used['voluntary']:.3f} + {used['involuntary']:.3f} per msg"
        )
    print(
        f"  records out per message {tx['out']:.3f}; datagrams back (acks) {tx['in']:.3f}"
        f"; both sides' CPU {(tx['cpu'] + rx['cpu']) * 1e6:.1f} us/msg"
    )
    return 0 if got["messages"] >= got["sent"] else 1


if __name__ == "__main__":
    sys.exit(main())
