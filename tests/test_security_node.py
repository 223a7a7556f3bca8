"""Security modes over real loopback UDP: blocking, asyncio and the CLI."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from reliable import AsyncNode, Node, errors
from reliable.peer import FIRST_CONTACT_DATAGRAMS
from reliable.security import Authenticated, Encrypted, write_keyfile
from rmsg.cli import main

from .conftest import free_port

pytestmark = pytest.mark.loopback

KEY = os.urandom(32)


@pytest.mark.parametrize("make", [Authenticated, Encrypted], ids=["mac", "aead"])
def test_sealed_nodes_talk(make) -> None:  # type: ignore[no-untyped-def]
    with Node(security=make(KEY)) as a, Node(security=make(KEY)) as b:
        receipts = [a.send(b.address, b"sealed %d" % i * 300) for i in range(50)]
        got = [b.receive(timeout=5).data for _ in range(50)]
        assert got == [b"sealed %d" % i * 300 for i in range(50)]
        first = receipts[0]  # it met the address check: PINGs went first (it is larger
        # than one ordinary datagram), each drew a CHALLENGE, then the message went once
        assert first.transmissions == first.fragments
        assert a.stats().dropped == {} and b.stats().challenges_sent == FIRST_CONTACT_DATAGRAMS


def test_a_wrong_key_is_a_clear_error_at_once() -> None:
    with Node(security=Authenticated(KEY)) as a, Node(security=Authenticated(os.urandom(32))) as b:
        start = time.monotonic()
        with pytest.raises(errors.AuthenticationFailed, match="keys differ"):
            a.send(b.address, b"hello", timeout=10)
        assert time.monotonic() - start < 1.0  # not the 5 s liveness timeout
        assert b.stats().dropped["security.bad_tag"] >= 1


def test_asyncio_with_encryption() -> None:
    async def main_() -> None:
        async with AsyncNode(security=Encrypted(KEY)) as a, AsyncNode(security=Encrypted(KEY)) as b:
            await a.send(b.address, b"quiet")
            assert (await b.receive(timeout=2)).data == b"quiet"
            async with AsyncNode() as plain:
                with pytest.raises(errors.AuthenticationFailed, match="requires"):
                    await plain.send(b.address, b"in clear", timeout=5)

    asyncio.run(asyncio.wait_for(main_(), 30))


def test_cli_keygen_and_authenticated_send_recv(tmp_path: Path) -> None:
    keyfile = tmp_path / "key"
    runner = CliRunner()
    made = runner.invoke(main, ["keygen", str(keyfile)])
    assert made.exit_code == 0, made.output
    assert oct(keyfile.stat().st_mode & 0o777) == "0o600"
    assert runner.invoke(main, ["keygen", str(keyfile)]).exit_code == 2  # never overwrites
    key = bytes.fromhex(keyfile.read_text())
    with Node(security=Authenticated(key)) as b:
        dest = f"127.0.0.1:{b.address[1]}"
        sent = runner.invoke(
            main, ["send", dest, "signed", "--security", "authenticated", "--keyfile", str(keyfile)]
        )
        assert sent.exit_code == 0, sent.output
        assert b.receive(timeout=2).data == b"signed"
        env = {"RMSG_KEY": key.hex(), "RMSG_SECURITY": "authenticated"}
        assert runner.invoke(main, ["send", dest, "via env"], env=env).exit_code == 0
        assert b.receive(timeout=2).data == b"via env"
        unsigned = runner.invoke(main, ["send", dest, "plain", "--timeout", "3s"])
        assert unsigned.exit_code == 1 and "requires authenticated" in unsigned.output
        stats = runner.invoke(main, ["stats", dest, "--json"], env=env)
        assert stats.exit_code == 0 and '"challenges_sent"' in stats.output


def test_cli_refuses_a_key_file_others_can_read(tmp_path: Path) -> None:
    keyfile = tmp_path / "key"
    write_keyfile(keyfile)
    keyfile.chmod(0o640)
    args = ["--security", "encrypted", "--keyfile", str(keyfile)]
    result = CliRunner().invoke(main, ["recv", "--bind", f"127.0.0.1:{free_port()}", *args])
    assert result.exit_code == 2 and f"chmod 600 {keyfile}" in result.output
    missing = CliRunner().invoke(
        main, ["recv", "--bind", f"127.0.0.1:{free_port()}", "--security", "encrypted"], env={}
    )
    assert missing.exit_code == 2 and "needs a key" in missing.output
