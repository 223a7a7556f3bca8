"""The blocking Node and the asyncio AsyncNode offer the same public API (issue 19):
the surfaces are compared method by method, and the methods AsyncNode gained for
parity (manage, transfer) are exercised on loopback."""

from __future__ import annotations

import asyncio
import inspect
import socket

import pytest

import reliable
from reliable import AsyncNode, Mailbox, Node, RemoteMailbox, errors
from reliable.aio import AsyncMailbox, AsyncRemoteMailbox

# What only one side has, and why.
ONLY_BLOCKING: set[str] = set()
ONLY_ASYNC = {"start"}  # an AsyncNode opens its socket on the running loop; a Node in __init__

# Compiled (mypyc), Node's properties are getset descriptors and its methods carry no
# signature for inspect; the surfaces are the sources', which the pure run compares.
from_sources = pytest.mark.skipif(
    reliable.__compiled__, reason="introspects the sources' classes: the pure run checks them"
)


def _public(cls: type) -> dict[str, object]:
    return {
        name: member
        for name, member in inspect.getmembers(cls)
        if not name.startswith("_") and (callable(member) or isinstance(member, property))
    }


@pytest.mark.parametrize(
    ("blocking", "asyncio_side"),
    [(Node, AsyncNode), (Mailbox, AsyncMailbox), (RemoteMailbox, AsyncRemoteMailbox)],
)
@from_sources
def test_every_public_method_exists_on_both_adapters(blocking: type, asyncio_side: type) -> None:
    ours, theirs = _public(blocking), _public(asyncio_side)
    assert set(ours) - set(theirs) == ONLY_BLOCKING, "Node has it, AsyncNode does not"
    assert set(theirs) - set(ours) == ONLY_ASYNC & set(theirs), "AsyncNode has it, Node does not"


@pytest.mark.parametrize(
    ("blocking", "asyncio_side"),
    [(Node, AsyncNode), (Mailbox, AsyncMailbox), (RemoteMailbox, AsyncRemoteMailbox)],
)
@from_sources
def test_shared_methods_take_the_same_keyword_arguments(blocking: type, asyncio_side: type) -> None:
    ours, theirs = _public(blocking), _public(asyncio_side)
    for name in sorted(set(ours) & set(theirs)):
        if isinstance(ours[name], property) or name in {"__init__"}:
            continue
        a = inspect.signature(ours[name])  # type: ignore[arg-type]
        b = inspect.signature(theirs[name])  # type: ignore[arg-type]
        assert list(a.parameters) == list(b.parameters), name


pytestmark_loopback = pytest.mark.loopback


@pytestmark_loopback
def test_asyncnode_manage_inspects_sets_limits_grants_and_deletes() -> None:
    with Node() as owner:
        owner.create_mailbox("jobs", capacity=5)

        async def main() -> None:
            async with AsyncNode() as ctl:
                info = await ctl.manage(owner.address, "inspect", "jobs")
                assert (info["name"], info["capacity"], info["messages"]) == ("jobs", 5, 0)
                info = await ctl.manage(owner.address, "set_limits", "jobs", capacity=9)
                assert info["capacity"] == 9
                info = await ctl.manage(owner.address, "grant", "jobs", node="127.0.0.1:9")
                assert info["granted"] == ["127.0.0.1:9"]
                assert (await ctl.manage(owner.address, "delete", "jobs"))["deleted"]
                with pytest.raises(errors.UsageError, match="no mailbox"):
                    await ctl.manage(owner.address, "inspect", "jobs")
                with pytest.raises(errors.UsageError, match="action must be one of"):
                    await ctl.manage(owner.address, "explode", "jobs")

        asyncio.run(main())
        assert "jobs" not in [m.name for m in owner.stats().mailboxes]


@pytestmark_loopback
def test_asyncnode_manage_times_out_when_nobody_answers() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:  # bound, never reads
        silent.bind(("127.0.0.1", 0))

        async def main() -> None:
            async with AsyncNode() as ctl:
                with pytest.raises(errors.ReceiveTimeout, match="did not answer"):
                    await ctl.manage(silent.getsockname(), "inspect", "jobs", timeout=0.3)

        asyncio.run(main())


@pytestmark_loopback
def test_asyncmailbox_transfer_moves_the_messages_to_the_new_owner() -> None:
    with Node() as new, Node() as sender:

        async def main() -> list[bytes]:
            async with AsyncNode() as old:
                jobs = old.create_mailbox("jobs")
                here = f"127.0.0.1:{old.address[1]}/jobs"
                for i in range(3):
                    await asyncio.to_thread(sender.send, here, b"%d" % i)
                new.create_mailbox("jobs")  # consent
                moved = await jobs.transfer(new.address)
                assert moved == {
                    "mailbox": "jobs",
                    "owner": f"127.0.0.1:{new.address[1]}",
                    "moved": 3,
                }
                assert "jobs" not in [m.name for m in old.stats().mailboxes]
            box = new.mailbox("jobs")
            return [box.receive(timeout=5).data for _ in range(3)]

        assert asyncio.run(main()) == [b"0", b"1", b"2"]


@pytestmark_loopback
def test_asyncmailbox_transfer_without_consent_changes_nothing() -> None:
    with Node() as other:

        async def main() -> None:
            async with AsyncNode() as old:
                jobs = old.create_mailbox("jobs")
                with pytest.raises(errors.UsageError, match="create it there"):
                    await jobs.transfer(other.address)
                assert "jobs" in [m.name for m in old.stats().mailboxes]

        asyncio.run(main())
