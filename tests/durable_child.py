"""A node hosting durable mailbox "jobs" at argv[1], for the SIGKILL crash tests.

Prints its port, then: ``hold`` keeps every message; ``receive`` takes them
as they come, printing each (flushed) once ``receive`` returned it; ``lock``
takes each under a lock, prints it, then acknowledges it; ``drain``
prints what the store held and exits.
"""

from __future__ import annotations

import sys

from reliable import Node, errors


def main() -> None:
    path, mode = sys.argv[1], sys.argv[2]
    with Node("127.0.0.1:0") as node:
        box = node.create_mailbox("jobs", durable=path)
        print(node.address[1], flush=True)
        if mode == "drain":
            while (msg := box.receive_nowait()) is not None:
                print(msg.data.decode(), flush=True)
            print("end", flush=True)
            return
        while True:
            if mode == "hold":
                sys.stdin.readline()  # until killed
                continue
            try:
                msg = box.receive(timeout=30, lock=30 if mode == "lock" else None)
            except errors.ReceiveTimeout:
                return
            print(msg.data.decode(), flush=True)
            if mode == "lock":
                box.ack(msg)


if __name__ == "__main__":
    main()
