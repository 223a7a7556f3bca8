"""The demo: two loopback nodes talking through a lossy, duplicating, reordering, corrupting link.

Both nodes' sockets are wrapped in :class:`netem.socket.FaultySocket`, so both
directions (data and acknowledgements) suffer the impairment. Every message
carries its index and a CRC of its body, so the receiver checks that each one
arrives exactly once, intact and in order — the demo's verdict is measured,
not assumed.
"""

from __future__ import annotations

import random
import struct
import threading
import time
import zlib
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from netem.models import Impairment
from netem.socket import FaultySocket
from reliable import Config, Node, ReceiveTimeout, ReliableError, SendHandle, WouldBlock
from reliable.driver import open_socket

__all__ = ["DemoProgress", "DemoResult", "run_demo"]

_HEADER = struct.Struct("!QI")  # index, crc32 of the body
_WINDOW = 512  # messages the sender keeps outstanding


@dataclass(frozen=True, slots=True)
class DemoProgress:
    elapsed: float
    sent: int
    acknowledged: int
    received: int
    retransmissions: int


@dataclass(frozen=True, slots=True)
class DemoResult:
    messages: int
    size: int
    acknowledged: int
    failed: int
    received: int
    intact: int
    in_order: bool
    duplicates_delivered: int
    retransmissions: int
    duplicate_datagrams_dropped: int
    corrupt_datagrams_dropped: int
    link_datagrams: int  #: datagrams the link carried, both directions, before its faults
    link_dropped: int
    link_duplicated: int
    link_corrupted: int
    link_reordered: int
    elapsed: float
    timed_out: bool

    @property
    def messages_per_second(self) -> float:
        return self.received / self.elapsed if self.elapsed else 0.0

    @property
    def megabytes_per_second(self) -> float:
        return self.received * self.size / self.elapsed / 1e6 if self.elapsed else 0.0

    @property
    def ok(self) -> bool:
        return (
            not self.timed_out
            and self.failed == 0
            and self.received == self.intact == self.messages
            and self.in_order
            and self.duplicates_delivered == 0
        )

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(
            ok=self.ok,
            messages_per_second=round(self.messages_per_second, 1),
            megabytes_per_second=round(self.megabytes_per_second, 3),
        )
        return d


def _payload(index: int, size: int, rng: random.Random) -> bytes:
    body = rng.randbytes(max(0, size - _HEADER.size))
    return _HEADER.pack(index, zlib.crc32(body)) + body


def run_demo(
    *,
    messages: int = 2000,
    size: int = 1024,
    impairment: Impairment | None = None,
    seed: int = 1,
    timeout: float = 60.0,
    config: Config | None = None,
    progress: Callable[[DemoProgress], None] | None = None,
    progress_interval: float = 0.25,
) -> DemoResult:
    """Send ``messages`` messages of ``size`` bytes over a lossy loopback link and verify them."""
    if messages < 1:
        raise ValueError("messages must be at least 1")
    if size < _HEADER.size:
        raise ValueError(f"size must be at least {_HEADER.size} bytes (the demo's own header)")
    impairment = impairment if impairment is not None else Impairment()
    config = config or Config()
    rng = random.Random(seed)
    rx_sock = FaultySocket(open_socket("127.0.0.1:0"), impairment, seed=seed * 2 + 1)
    tx_sock = FaultySocket(open_socket("127.0.0.1:0"), impairment, seed=seed * 2 + 2)
    receiver = Node(sock=rx_sock, config=config, rng=random.Random(seed * 2 + 3))
    sender = Node(sock=tx_sock, config=config, rng=random.Random(seed * 2 + 4))
    dest = receiver.address
    state = {"received": 0, "intact": 0, "dups": 0, "in_order": True}
    seen: set[int] = set()
    stop = threading.Event()

    def consume() -> None:
        expected = 0
        while state["received"] < messages and not stop.is_set():
            try:
                msg = receiver.receive(timeout=0.1)
            except ReceiveTimeout:
                continue
            except ReliableError:
                return
            index, crc = _HEADER.unpack_from(msg.data)
            if index in seen:
                state["dups"] += 1
                continue
            seen.add(index)
            state["received"] += 1
            if index != expected:
                state["in_order"] = False
            expected = index + 1
            if len(msg.data) == size and zlib.crc32(msg.data[_HEADER.size :]) == crc:
                state["intact"] += 1

    consumer = threading.Thread(target=consume, name="rmsg-demo-receiver", daemon=True)
    start = time.monotonic()
    deadline = start + timeout
    consumer.start()
    outstanding: deque[SendHandle] = deque()
    acknowledged = failed = sent = 0
    next_report = start
    timed_out = False

    def settle(handle: SendHandle) -> None:
        nonlocal acknowledged, failed
        if handle.exception(0) is None:
            acknowledged += 1
        else:
            failed += 1

    def report(now: float) -> None:
        nonlocal next_report
        if progress is not None and now >= next_report:
            next_report = now + progress_interval
            stats = sender.stats()
            progress(
                DemoProgress(
                    now - start, sent, acknowledged, state["received"], stats.retransmissions
                )
            )

    try:
        pending: bytes | None = None
        while (sent < messages or outstanding) and not timed_out:
            while sent < messages and len(outstanding) < _WINDOW:
                if pending is None:
                    pending = _payload(sent, size, rng)
                try:
                    outstanding.append(sender.send_nowait(dest, pending))
                except WouldBlock:
                    break  # send buffer (or the receiver's mailbox) full: wait for the oldest
                pending = None
                sent += 1
            while outstanding and outstanding[0].done():
                settle(outstanding.popleft())
            if outstanding and not outstanding[0].done():
                outstanding[0].wait(min(progress_interval, max(0.0, deadline - time.monotonic())))
            now = time.monotonic()
            report(now)
            timed_out = now >= deadline
        while consumer.is_alive() and time.monotonic() < deadline:
            consumer.join(0.05)
            report(time.monotonic())
        timed_out = timed_out or consumer.is_alive()
        elapsed = time.monotonic() - start
        tx_stats = sender.stats()
        rx_stats = receiver.stats()
    finally:
        stop.set()
        sender.close(timeout=1.0)
        receiver.close(timeout=1.0)
        consumer.join(1.0)
    links = (tx_sock.counters, rx_sock.counters)
    return DemoResult(
        messages=messages,
        size=size,
        acknowledged=acknowledged,
        failed=failed + len(outstanding),
        received=state["received"],
        intact=state["intact"],
        in_order=bool(state["in_order"]),
        duplicates_delivered=state["dups"],
        retransmissions=tx_stats.retransmissions + rx_stats.retransmissions,
        duplicate_datagrams_dropped=tx_stats.duplicates + rx_stats.duplicates,
        corrupt_datagrams_dropped=tx_stats.corrupt + rx_stats.corrupt,
        link_datagrams=sum(c.seen for c in links),
        link_dropped=sum(c.dropped for c in links),
        link_duplicated=sum(c.duplicated for c in links),
        link_corrupted=sum(c.corrupted for c in links),
        link_reordered=sum(c.reordered for c in links),
        elapsed=elapsed,
        timed_out=timed_out,
    )
