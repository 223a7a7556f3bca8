"""The blocking Node over real UDP on 127.0.0.1."""

from __future__ import annotations

import asyncio
import errno
import threading
import time
from collections.abc import Callable

import pytest

import reliable
from reliable import (
    AddressError,
    AsyncNode,
    BindError,
    Config,
    MessageTooLarge,
    Node,
    NodeClosed,
    PeerUnreachable,
    ReceiveTimeout,
    SendTimeout,
    UsageError,
    errors,
    events,
)

from .conftest import free_port, ipv6_loopback_works

pytestmark = pytest.mark.loopback


@pytest.fixture
def pair():  # type: ignore[no-untyped-def]
    with Node() as a, Node() as b:
        yield a, b


def test_send_returns_a_receipt_and_receive_gets_the_message(pair) -> None:  # type: ignore[no-untyped-def]
    a, b = pair
    box = b.create_mailbox("box")
    receipt = a.send(b.address, b"hello", msg_type=5, priority=2, mailbox="box")
    assert receipt.peer == b.address and receipt.size == 5 and receipt.incarnation == b.incarnation
    assert receipt.mailbox == "box" and not receipt.deferred
    msg = box.receive(timeout=2)
    assert (msg.data, msg.source, msg.msg_type, msg.priority, msg.mailbox) == (
        b"hello",
        a.address,
        5,
        2,
        "box",
    )
    assert msg.sender == f"127.0.0.1:{a.address[1]}"


def test_string_addresses_work(pair) -> None:  # type: ignore[no-untyped-def]
    a, b = pair
    a.send(f"127.0.0.1:{b.address[1]}", b"by string")
    a.send(f"localhost:{b.address[1]}", b"by name")
    assert {b.receive(timeout=2).data, b.receive(timeout=2).data} == {b"by string", b"by name"}


def test_receive_timeout_and_nonblocking(pair) -> None:  # type: ignore[no-untyped-def]
    _, b = pair
    assert b.receive_nowait() is None
    with pytest.raises(ReceiveTimeout):
        b.receive(timeout=0)
    start = time.monotonic()
    with pytest.raises(ReceiveTimeout):
        b.receive(timeout=0.2)
    assert 0.15 < time.monotonic() - start < 1.0


def test_send_nowait_handle(pair) -> None:  # type: ignore[no-untyped-def]
    a, b = pair
    called = threading.Event()
    handle = a.send_nowait(b.address, b"async-ish")
    handle.add_done_callback(lambda h: called.set())
    assert handle.wait(2) and handle.done()
    assert handle.result().size == 9 and handle.exception() is None
    assert called.wait(1)
    assert b.receive(timeout=2).data == b"async-ish"


def test_many_pipelined_messages_arrive_once_in_order(pair) -> None:  # type: ignore[no-untyped-def]
    a, b = pair
    msgs = [b"%06d" % i * (i % 50) for i in range(3000)]
    handles = [a.send_nowait(b.address, m) for m in msgs]
    got = [b.receive(timeout=5).data for _ in msgs]
    assert got == msgs
    assert all(h.result(5) for h in handles)
    assert b.receive_nowait() is None


def test_selective_receive_by_source() -> None:
    with Node() as a, Node() as b, Node() as c:
        a.send(c.address, b"from a")
        b.send(c.address, b"from b")
        assert c.receive(source=b.address, timeout=2).data == b"from b"
        assert c.receive(source=f"127.0.0.1:{a.address[1]}", timeout=2).data == b"from a"


def test_concurrent_senders_keep_per_thread_order(pair) -> None:  # type: ignore[no-untyped-def]
    a, b = pair

    def blast(tag: int) -> None:
        for i in range(300):
            a.send_nowait(b.address, b"%d:%d" % (tag, i))

    threads = [threading.Thread(target=blast, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    got = [b.receive(timeout=5).data.split(b":") for _ in range(1200)]
    for tag in range(4):
        seq = [int(i) for t, i in got if int(t) == tag]
        assert seq == list(range(300))


def test_unreachable_peer_fails_the_send_naming_it() -> None:
    dead = free_port()
    with Node(config=Config(peer_timeout=0.5, initial_rto=0.05)) as a:
        start = time.monotonic()
        with pytest.raises(PeerUnreachable, match=f"127.0.0.1:{dead}"):
            a.send(f"127.0.0.1:{dead}", b"anyone?")
        assert time.monotonic() - start < 3


def test_receive_from_a_dead_source_raises_instead_of_hanging() -> None:
    dead = free_port()
    config = Config(peer_timeout=0.5, initial_rto=0.05)
    with Node(config=config) as a, pytest.raises(PeerUnreachable):
        a.receive(source=f"127.0.0.1:{dead}", timeout=10)


def test_send_timeout_abandons_the_message() -> None:
    dead = free_port()
    # Ride out the OS's "port unreachable", or the send fails at once, before its timeout.
    with Node(config=Config(os_errors="ignore")) as a, pytest.raises(SendTimeout, match=r"0\.3s"):
        a.send(f"127.0.0.1:{dead}", b"x", timeout=0.3)


def test_close_flushes_pending_sends() -> None:
    with Node() as b:
        a = Node()
        handles = [a.send_nowait(b.address, b"m%d" % i * 500) for i in range(200)]
        a.close(timeout=5)
        assert all(h.done() and h.exception() is None for h in handles)
        assert [b.receive(timeout=2).data for _ in handles] == [
            b"m%d" % i * 500 for i in range(200)
        ]
        with pytest.raises(NodeClosed):
            a.send(b.address, b"after close")


def test_peer_close_is_observed() -> None:
    seen: list[events.Event] = []
    with Node(on_event=seen.append) as a:
        b = Node()
        a.send(b.address, b"hi")
        b.close()
        deadline = time.monotonic() + 2
        while not any(isinstance(e, events.PeerClosed) for e in seen):
            assert time.monotonic() < deadline
            time.sleep(0.01)


def test_local_misuse_fails_before_sending(pair) -> None:  # type: ignore[no-untyped-def]
    a, b = pair
    small = Node(config=Config(max_message_size=1000, send_buffer=1 << 20))
    try:
        with pytest.raises(MessageTooLarge, match="max_message_size"):
            small.send(b.address, b"x" * 1001)
        assert small.stats().datagrams_sent == 0
    finally:
        small.close()
    for bad in ["nohost.invalid:7000", "127.0.0.1", "127.0.0.1:0", "127.0.0.1:99999", "::1:7000"]:
        with pytest.raises(AddressError):
            a.send(bad, b"x")
    with pytest.raises(UsageError, match="timeout"):
        a.send(b.address, b"x", timeout=-1)
    with pytest.raises(UsageError, match="timeout"):
        b.receive(timeout=-0.5)
    with pytest.raises(BindError, match=r"cannot bind .*in use") as taken:
        Node(f"127.0.0.1:{b.address[1]}")  # taken
    # the OS's error, errno and all, not misuse of the API
    assert isinstance(taken.value, OSError) and taken.value.errno == errno.EADDRINUSE
    assert not isinstance(taken.value, UsageError)


@pytest.mark.skipif(not ipv6_loopback_works(), reason="no IPv6 loopback here")
def test_ipv6_loopback() -> None:
    with Node("[::1]:0") as a, Node("[::1]:0") as b:
        a.send(f"[::1]:{b.address[1]}", b"six")
        msg = b.receive(timeout=2)
        assert msg.data == b"six" and msg.sender.startswith("[::1]:")
        with pytest.raises(AddressError, match="IPv6"):
            a.send("127.0.0.1:9", b"x")


def test_stats_are_typed_and_count(pair) -> None:  # type: ignore[no-untyped-def]
    a, b = pair
    for _ in range(10):
        a.send(b.address, b"s")
    stats = a.stats()
    (peer,) = stats.peers
    assert peer.messages_sent == 10 and peer.srtt is not None and peer.srtt < 0.5
    assert stats.as_dict()["peers"][0]["messages_sent"] == 10


def test_a_slow_receiver_back_pressures_the_sender() -> None:
    limit = 64 * 1024
    config = Config(receive_backlog=limit, inbox_bytes=limit)
    with Node(config=config) as b, Node() as a:
        handles = []
        for i in range(100):
            try:
                handles.append(a.send_nowait(b.address, bytes([i]) * 8000))
            except errors.MailboxFull:  # a deferral came back while we were still queueing
                break
        time.sleep(0.5)  # the application is not reading
        (inbox,) = b.stats().mailboxes
        assert inbox.bytes <= limit and inbox.parked > 0  # full: later arrivals wait
        held = inbox.bytes + inbox.parked_bytes
        assert held <= 2 * limit + 16 * 8000  # bounded: parking closed the window
        assert len(handles) > 9 and sum(h.done() for h in handles) < len(handles)
        with pytest.raises(errors.MailboxFull):  # a non-blocking send now says "would block"
            a.send_nowait(b.address, b"more")
        start = time.monotonic()
        got = [b.receive(timeout=5).data for _ in handles]
        assert got == [bytes([i]) * 8000 for i in range(len(handles))]
        receipts = [h.result(5) for h in handles]
        assert any(r.deferred for r in receipts) and not receipts[0].deferred
        # window updates go out as the application reads, not at the next probe
        assert time.monotonic() - start < 2.0


@pytest.mark.parametrize(
    ("loopback_size", "fragments"), [(65000, range(251, 300)), (None, range(15_000, 17_000))]
)
def test_a_sixteen_mebibyte_message_crosses_loopback(
    loopback_size: int | None, fragments: range
) -> None:
    data = bytes(range(256)) * (16 * 1024 * 1024 // 256)  # exactly the default max_message_size
    config = Config(loopback_datagram_size=loopback_size)
    with Node(config=config) as a, Node(config=config) as b:
        start = time.monotonic()
        receipt = a.send(b.address, data, timeout=60)
        msg = b.receive(timeout=10)
        elapsed = time.monotonic() - start
    assert msg.data == data
    # loopback datagrams carry up to Config.loopback_datagram_size, or 1200 bytes without it
    assert receipt.fragments in fragments and receipt.size == len(data)
    print(f"16 MiB over loopback in {elapsed:.2f}s ({len(data) / elapsed / 1e6:.1f} MB/s)")


def test_a_bad_message_argument_raises_usage_error_before_anything_is_sent() -> None:
    with Node() as node:
        with pytest.raises(UsageError, match="encode text first"):
            node.send(node.address, "text")  # type: ignore[arg-type]
        with pytest.raises(UsageError, match="msg_type"):
            # checked before the group is opened (which would send a SOLICIT)
            node.send_group_nowait("multicast://239.1.2.3:7400", b"x", msg_type=True)
        assert node.stats().datagrams_sent == 0
        assert node.stats().groups == ()


def test_a_group_goes_through_send_group_and_nothing_else() -> None:
    """send/send_nowait are typed to return a Receipt, so a group (whose outcome is a
    GroupReceipt) is refused there, before anything is sent, naming the method to use;
    send_group refuses what is not a group the same way."""
    with Node() as node:
        with pytest.raises(UsageError, match=r"call send_group\(\) for it"):
            node.send("multicast://239.1.2.3:7400/news", b"x")
        with pytest.raises(UsageError, match=r"call send_group_nowait\(\) for it"):
            node.send_nowait("broadcast://:7401", b"x")
        with pytest.raises(UsageError, match="send_group takes multicast://"):
            node.send_group(node.address, b"x")  # type: ignore[arg-type]
        with pytest.raises(UsageError, match="send_group takes multicast://"):
            node.send_group_nowait("anycast://printer", b"x")
        assert node.stats().datagrams_sent == 0
        assert node.stats().groups == ()


def test_async_group_sends_are_refused_by_send_too() -> None:
    async def main() -> None:
        async with AsyncNode() as node:
            with pytest.raises(UsageError, match=r"call send_group\(\) for it"):
                await node.send("multicast://239.1.2.3:7400", b"x")
            with pytest.raises(UsageError, match=r"call send_group_nowait\(\) for it"):
                node.send_nowait("multicast://239.1.2.3:7400", b"x")
            with pytest.raises(UsageError, match="send_group takes multicast://"):
                await node.send_group("127.0.0.1:9", b"x")
            assert node.stats().datagrams_sent == 0

    asyncio.run(main())


def test_a_receipt_is_made_when_asked_and_is_the_same_every_time() -> None:
    """A confirmation reaches the handle as the core's event; the first result() makes
    the Receipt from it (nobody asked for most sends), every later one returns it,
    and a done-callback sees the same."""
    seen: list[object] = []
    with Node() as a, Node() as b:
        handle = a.send_nowait(b.address, b"x" * 100, msg_type=2)
        handle.add_done_callback(lambda h: seen.append(h.result()))
        assert b.receive(timeout=5).data == b"x" * 100
        assert handle.wait(5)
        receipt = handle.result()
        assert receipt.peer == b.address and receipt.size == 100
        assert receipt.incarnation == b.incarnation and receipt.fragments == 1
        assert handle.result() is receipt and handle.exception() is None
        give_up = time.monotonic() + 5  # the callback runs on whichever thread drove
        while not seen and time.monotonic() < give_up:
            time.sleep(0.01)
        assert seen == [receipt]
        batch = a.send_many(b.address, [b"1", b"22"])
        assert [r.size for r in batch.result(5)] == [1, 2]


def test_an_interrupted_receive_does_not_swallow_the_next_message() -> None:
    """A receive interrupted while it waits (KeyboardInterrupt, or any exception a
    signal handler raises in the waiting thread) withdraws its wait. It used to stay
    registered, and the core handed the next message to it: acknowledged to its
    sender, lost to the application."""
    import os
    import signal

    class Interrupted(Exception):
        pass

    def interrupt(signum: int, frame: object) -> None:
        raise Interrupted

    previous = signal.signal(signal.SIGUSR1, interrupt)
    try:
        with Node() as a, Node() as b:
            timer = threading.Timer(0.1, os.kill, (os.getpid(), signal.SIGUSR1))
            timer.start()
            with pytest.raises(Interrupted):
                b.receive(timeout=5)  # the main thread: the handler runs here
            timer.join()
            a.send(b.address, b"after the interruption", timeout=2)
            assert b.receive(timeout=2).data == b"after the interruption"
            assert not b._taken
    finally:
        signal.signal(signal.SIGUSR1, previous)


@pytest.mark.skipif(
    reliable.__compiled__,
    reason="forces the race by replacing a method on the Node instance, which a compiled "
    "(mypyc) class does not allow; the same code runs in the pure suite",
)
def test_a_receive_interrupted_as_its_message_arrives_puts_the_message_back() -> None:
    """An interruption (KeyboardInterrupt) in the waiting thread right after the
    core handed the receive its message, before the receive returned: the message
    goes back to its mailbox, not away with the interrupted receive. Forced
    deterministically by wrapping the node's wait: first after the answer was
    routed, then with the answer still in the core's events."""
    with Node() as b:
        wait = b._wait

        def answered_then_interrupted(ready: Callable[[], bool], deadline: float | None) -> bool:
            b.post("", b"routed")
            wait(ready, deadline)  # the post is admitted and handed to the receive
            assert b._taken, "answered"
            raise KeyboardInterrupt

        b._wait = answered_then_interrupted  # type: ignore[method-assign]
        with pytest.raises(KeyboardInterrupt):
            b.receive(timeout=5)
        del b._wait
        assert b.receive(timeout=2).data == b"routed"

        box = b.create_mailbox("jobs")

        def handed_then_interrupted(ready: Callable[[], bool], deadline: float | None) -> bool:
            b.post("jobs", b"unrouted")
            b._posts.admit(b._endpoint, b.address, time.monotonic())  # the core hands it
            raise KeyboardInterrupt

        b._wait = handed_then_interrupted  # type: ignore[method-assign]
        with pytest.raises(KeyboardInterrupt):
            box.receive(timeout=5, lock=30.0)
        del b._wait
        assert b.stats().mailbox("jobs").locked == 0, "its lock released"
        again = box.receive(timeout=2, lock=30.0)
        assert again.data == b"unrouted"
        assert box.ack(again)
        assert not b._taken
