"""How fast the netem proxy relays with no faults, as a ratio to raw loopback UDP.

Sender, receiver and proxy each run in their own process. Rounds alternate
raw / proxied so machine drift hits both alike; each figure is datagrams per
second *received*, over a fixed window, with the sender blasting 1 KiB
datagrams as fast as it can (bounded in count and time). Loopback only.

Two layouts are measured, because on a small machine they answer different
questions:

* **pinned** (when the machine has 2+ CPUs): sender and receiver share CPU 0
  in *both* runs, the proxy gets CPU 1 — as a separate network element would.
  The endpoints have the same budget either way, so the ratio says whether
  the proxy limits the flow ("must not be the bottleneck").
* **shared**: no pinning; on 2 cores the three processes of the proxied run
  contend, so this ratio mostly measures the scheduler.

It also prints the proxy's own CPU cost per relayed datagram.

    python tools/bench_proxy.py              # 3 rounds of 2 s each
    python tools/bench_proxy.py --quick      # a smoke run (CI)
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import time
from multiprocessing.connection import Connection

PAYLOAD = b"x" * 1024
MAX_DATAGRAMS = 5_000_000  # every load loop is bounded in count as well as time


def _pin(cpu: int | None) -> None:
    if cpu is not None and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {cpu})


def _receiver(conn: Connection, window: float, cpu: int | None) -> None:
    _pin(cpu)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
    sock.bind(("127.0.0.1", 0))
    conn.send(sock.getsockname()[1])
    sock.settimeout(5.0)
    count = 0
    try:
        sock.recv(2048)
    except TimeoutError:
        conn.send(0.0)
        return
    start = time.perf_counter()
    sock.settimeout(0.5)
    while time.perf_counter() - start < window:
        try:
            sock.recv(2048)
        except TimeoutError:
            break
        count += 1
    conn.send(count / (time.perf_counter() - start))


def _sender(port: int, seconds: float, cpu: int | None) -> None:
    _pin(cpu)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    target = ("127.0.0.1", port)
    deadline = time.perf_counter() + seconds
    for i in range(MAX_DATAGRAMS):
        sock.sendto(PAYLOAD, target)
        if i % 1024 == 0 and time.perf_counter() > deadline:
            break


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def measure(window: float, proxied: bool, pinned: bool) -> tuple[float, float | None]:
    """Received datagrams/s, and the proxy's CPU microseconds per relayed datagram."""
    endpoints_cpu = 0 if pinned else None
    parent, child = mp.Pipe()
    receiver = mp.Process(target=_receiver, args=(child, window, endpoints_cpu))
    receiver.start()
    port = parent.recv()
    proxy = None
    target = port
    if proxied:
        target = _free_port()
        command = [
            sys.executable,
            "-m",
            "rmsg",
            "netem",
            "--listen",
            f"127.0.0.1:{target}",
            "--forward",
            f"127.0.0.1:{port}",
            "--duration",
            f"{window + 10:g}s",
            "--json",
        ]
        if pinned:
            command = ["taskset", "-c", "1", *command]
        proxy = subprocess.Popen(command, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert proxy.stderr is not None
        for line in proxy.stderr:  # "netem: LISTEN -> FORWARD ..." once its socket is bound
            if line.startswith(f"netem: 127.0.0.1:{target} -> "):
                break
    sender = mp.Process(target=_sender, args=(target, window + 0.5, endpoints_cpu))
    sender.start()
    rate = float(parent.recv())
    sender.join(window + 5)
    receiver.join(5)
    cost = None
    if proxy is not None:
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        proxy.terminate()
        out, _ = proxy.communicate(timeout=10)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
        relayed = json.loads(out)["up_sent"] if out else 0
        cost = cpu / relayed * 1e6 if relayed else None
    for proc in (sender, receiver):
        if proc.is_alive():
            proc.terminate()
    return rate, cost


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--window", type=float, default=2.0, help="seconds measured per run")
    parser.add_argument("--quick", action="store_true", help="one short round (smoke test)")
    args = parser.parse_args()
    rounds, window = (1, 0.5) if args.quick else (args.rounds, args.window)
    can_pin = (os.cpu_count() or 1) >= 2 and hasattr(os, "sched_setaffinity")
    can_pin = can_pin and shutil.which("taskset") is not None
    layouts = ["pinned", "shared"] if can_pin else ["shared"]
    print(f"1 KiB datagrams on loopback, {rounds} round(s) of {window:g}s, {os.cpu_count()} CPUs")
    for layout in layouts:
        raw: list[float] = []
        proxied: list[float] = []
        costs: list[float] = []
        for _ in range(rounds):
            raw.append(measure(window, proxied=False, pinned=layout == "pinned")[0])
            rate, cost = measure(window, proxied=True, pinned=layout == "pinned")
            proxied.append(rate)
            if cost is not None:
                costs.append(cost)
        r, p = statistics.median(raw), statistics.median(proxied)
        print(f"[{layout}]")
        each_raw = ", ".join(f"{x:,.0f}" for x in raw)
        each_proxied = ", ".join(f"{x:,.0f}" for x in proxied)
        print(f"  raw UDP    {r:12,.0f} datagrams/s   rounds: {each_raw}")
        print(f"  via proxy  {p:12,.0f} datagrams/s   rounds: {each_proxied}")
        print(f"  ratio      {p / r if r else 0:12.2f}   (target >= 0.5)")
        if costs:
            c = statistics.median(costs)
            print(f"  proxy CPU  {c:12.2f} us per relayed datagram (one core: {1e6 / c:,.0f}/s)")


if __name__ == "__main__":
    main()
