"""A sender with a durable outbox at argv[1], for the SIGKILL crash test.

``send DEST FIRST``: opens the outbox (sending again what it holds), then sends
numbered messages FIRST, FIRST+1, ... to DEST through it, printing each number
(flushed) once its send was accepted, until killed. ``finish DEST``: opens the
outbox, waits for every send it held, prints ``done`` and closes.
"""

from __future__ import annotations

import sys
from collections import deque

from reliable import Node, errors


def main() -> None:
    path, mode, dest = sys.argv[1], sys.argv[2], sys.argv[3]
    with Node("127.0.0.1:0") as node:
        outbox = node.open_outbox(path)
        print(f"replaying {len(outbox.replayed)}", flush=True)
        if mode == "finish":
            for handle in outbox.replayed:
                handle.wait(30)
            print("done", flush=True)
            return
        n = int(sys.argv[4])
        pending: deque[object] = deque()
        while n < 1_000_000:
            try:
                handle = outbox.send_nowait(dest, str(n).encode())
            except errors.WouldBlock:
                if pending:
                    pending.popleft().wait(5)  # type: ignore[attr-defined]
                continue
            print(n, flush=True)
            pending.append(handle)
            if len(pending) > 64:
                pending.popleft().wait(5)  # type: ignore[attr-defined]
            n += 1


if __name__ == "__main__":
    main()
