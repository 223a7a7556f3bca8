"""Files of any size: ``rmsg send --file`` streams a manifest and 1 MiB chunks, ``rmsg recv``
reassembles them, checks the SHA-256 and only then gives the file its name; a progress
line on a terminal, none in a pipe; a time limit that scales with the size."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from reliable import Node
from rmsg.cli import main
from rmsg.transfer import (
    CHUNK,
    FileReceiver,
    Manifest,
    Progress,
    TransferDone,
    decode_resume,
    default_timeout,
    encode_chunk,
    send_file,
)

from .conftest import free_port

RMSG = Path(sys.executable).parent / "rmsg"


def _messages(path: Path, chunk_size: int = 1000) -> list[bytes]:
    """What ``send --file`` sends for ``path``, in order."""
    manifest = Manifest.of_file(path, chunk_size)
    data = path.read_bytes()
    return [manifest.encode()] + [
        encode_chunk(manifest.transfer_id, i, data[i * chunk_size : (i + 1) * chunk_size])
        for i in range(manifest.chunks)
    ]


def _feed(receiver: FileReceiver, messages: list[bytes], source: str = "10.0.0.1:1") -> Any:
    results = [receiver.offer(source, m) for m in messages]
    assert all(r is True for r in results[:-1])
    return results[-1]


def test_a_transfer_is_reassembled_verified_and_named(tmp_path: Path) -> None:
    original = tmp_path / "report.pdf"
    original.write_bytes(os.urandom(10_500))
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    done = _feed(FileReceiver(inbox), _messages(original))
    assert isinstance(done, TransferDone) and done.verified and done.error is None
    assert done.saved_as == inbox / "report.pdf"
    assert (inbox / "report.pdf").read_bytes() == original.read_bytes()
    assert [p.name for p in inbox.iterdir()] == ["report.pdf"]  # no .part left behind
    again = _feed(FileReceiver(inbox), _messages(original))
    assert again.saved_as == inbox / "report-1.pdf"  # never over an existing file


def test_a_corrupted_transfer_never_gets_its_name(tmp_path: Path) -> None:
    original = tmp_path / "data.bin"
    original.write_bytes(os.urandom(5_000))
    messages = _messages(original)
    messages[2] = messages[2][:-1] + bytes([messages[2][-1] ^ 1])  # one bit, after rmsg's CRC
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    done = _feed(FileReceiver(inbox), messages)
    assert not done.verified and "SHA-256 mismatch" in done.error
    assert not (inbox / "data.bin").exists()
    assert done.saved_as is not None and done.saved_as.name.endswith(".failed")


def test_names_cannot_escape_the_folder_and_ordinary_messages_pass_through(
    tmp_path: Path,
) -> None:
    original = tmp_path / "x"
    original.write_bytes(b"secret")
    messages = _messages(original)
    evil = Manifest.decode(messages[0])
    assert evil is not None
    forged = Manifest(evil.transfer_id, "../../.bashrc", evil.size, evil.sha256, 1000, 1)
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    receiver = FileReceiver(inbox)
    assert receiver.offer("a:1", b"an ordinary message") is False
    assert receiver.offer("a:1", messages[1]) is False  # a chunk without its manifest
    done = _feed(receiver, [forged.encode(), messages[1]], source="a:1")
    assert done.saved_as == inbox / "bashrc"
    assert Manifest.decode(b"RMSGFILE{not json") is None


def test_without_a_folder_the_data_streams_to_the_sink(tmp_path: Path) -> None:
    original = tmp_path / "notes.txt"
    original.write_bytes(b"line\n" * 3000)
    sink = io.BytesIO()
    done = _feed(FileReceiver(None, sink=sink), _messages(original))
    assert done.verified and done.saved_as is None
    assert sink.getvalue() == original.read_bytes()


def test_progress_is_silent_in_a_pipe_and_says_bytes_rate_retransmissions_eta() -> None:
    pipe = io.StringIO()
    Progress(pipe, 100, "send x").update(50, 3, final=True)
    assert pipe.getvalue() == ""
    clock = iter([0.0, 2.0, 2.0]).__next__
    tty = io.StringIO()
    progress = Progress(tty, 4 * 1024 * 1024, "send x", clock=clock, force=True)
    progress.update(2 * 1024 * 1024, 7, final=True)
    line = tty.getvalue()
    assert line.startswith("\rsend x [##########          ]  50% 2.0 MiB/4.0 MiB")
    assert "1.00 MiB/s, 7 retransmitted, ETA 2s" in line and line.endswith("\n")


class _RecordingNode:
    """Stands in for a Node: records each send's time limit and acknowledges at once."""

    def __init__(self) -> None:
        self.timeouts: list[float] = []

    def send_nowait(self, dest: str, data: bytes, *, timeout: float, **_: Any) -> Any:
        from reliable import Receipt

        self.timeouts.append(timeout)
        receipt = Receipt(
            peer=("127.0.0.1", 1),
            size=len(data),
            fragments=1,
            transmissions=1,
            elapsed=0.0,
            incarnation=1,
        )

        class Handle:
            def result(self, timeout: float | None = None) -> Receipt:
                return receipt

        return Handle()


def test_the_time_limit_scales_with_the_size_unless_given(tmp_path: Path) -> None:
    assert default_timeout(0) == 10.0 and default_timeout(10 * 1024 * 1024) == 110.0
    big = tmp_path / "big"
    big.write_bytes(bytes(3 * CHUNK))
    node = _RecordingNode()
    outcome = send_file(node, "127.0.0.1:1", big, timeout=None)  # type: ignore[arg-type]
    assert outcome.manifest.chunks == 3 and outcome.receipts == 4
    assert 39.0 < node.timeouts[0] <= 40.0  # 10 s + 10 s per MiB
    node = _RecordingNode()
    send_file(node, "127.0.0.1:1", big, timeout=5.0)  # type: ignore[arg-type]
    assert 4.0 < node.timeouts[0] <= 5.0


@pytest.mark.loopback
def test_a_library_receiver_sees_a_manifest_then_chunks(tmp_path: Path) -> None:
    original = tmp_path / "blob.bin"
    original.write_bytes(os.urandom(CHUNK + 12345))
    with Node("127.0.0.1:0") as server:
        dest = f"127.0.0.1:{server.address[1]}"
        result = CliRunner().invoke(main, ["send", dest, "--file", str(original), "--json"])
        assert result.exit_code == 0, result.output
        record = json.loads(result.stdout)
        assert record["status"] == "delivered" and record["chunks"] == 2
        assert record["sha256"] == hashlib.sha256(original.read_bytes()).hexdigest()
        sink = io.BytesIO()
        receiver = FileReceiver(None, sink=sink)
        outcomes = [receiver.offer(m.sender, m.data) for m in (server.receive(2) for _ in "abc")]
        assert outcomes[:2] == [True, True] and outcomes[2].verified
        assert sink.getvalue() == original.read_bytes()


def _recv(args: list[str]) -> subprocess.Popen[bytes]:
    if not RMSG.exists():
        pytest.skip("the rmsg script is not installed beside this interpreter")
    return subprocess.Popen(
        [str(RMSG), "recv", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )


def _wait_listening(proc: subprocess.Popen[bytes]) -> None:
    assert proc.stderr is not None
    line = proc.stderr.readline().decode()
    assert line.startswith("listening on"), line


@pytest.mark.loopback
def test_send_file_through_loss_to_recv_output_dir(tmp_path: Path) -> None:
    """Bigger than a message (the 16 MiB cap), through 5% loss each way."""
    original = tmp_path / "video.bin"
    original.write_bytes(os.urandom(17 * 1024 * 1024))
    port = free_port()
    inbox = tmp_path / "inbox"
    proc = _recv(
        [
            "--bind",
            f"127.0.0.1:{port}",
            "--output-dir",
            str(inbox),
            "--count",
            "1",
            "--json",
            "--netem",
            "loss 5%",
            "--timeout",
            "60",
        ]
    )
    try:
        _wait_listening(proc)
        result = CliRunner().invoke(
            main,
            ["send", f"127.0.0.1:{port}", "--file", str(original), "--netem", "loss 5%"],
        )
        assert result.exit_code == 0, result.output
        assert result.stdout.startswith("delivered video.bin (17,825,792 bytes")
        assert result.stderr == ""  # no progress line: not a terminal
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    record = json.loads(out)
    assert record["verified"] and record["file"] == "video.bin"
    assert (inbox / "video.bin").read_bytes() == original.read_bytes()


@pytest.mark.loopback
def test_send_file_to_recv_on_stdout_writes_the_file_itself(tmp_path: Path) -> None:
    original = tmp_path / "notes.txt"
    original.write_bytes(b"no newline added at the end")
    port = free_port()
    proc = _recv(["--bind", f"127.0.0.1:{port}", "--count", "1", "--timeout", "30"])
    try:
        _wait_listening(proc)
        result = CliRunner().invoke(
            main, ["send", f"127.0.0.1:{port}", "--file", str(original), "-q"]
        )
        assert result.exit_code == 0 and result.output == ""
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert out == original.read_bytes()
    assert b"SHA-256 verified" in err


def test_send_file_that_does_not_exist_is_a_usage_error(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["send", "127.0.0.1:7", "--file", str(tmp_path / "no")])
    assert result.exit_code == 2 and "cannot read" in result.output


# ------------------------------------------------------------------ resuming


def _resuming(path: Path, chunk_size: int = 1000) -> list[bytes]:
    """What ``send --file --resume`` sends: the manifest names the sender's answer mailbox."""
    messages = _messages(path, chunk_size)
    manifest = Manifest.decode(messages[0])
    assert manifest is not None
    fields = {f: getattr(manifest, f) for f in Manifest.__dataclass_fields__}
    messages[0] = Manifest(**{**fields, "resume_to": "answers"}).encode()
    return messages


def _answering(folder: Path) -> tuple[FileReceiver, list[tuple[str, str, int]]]:
    answers: list[tuple[str, str, int]] = []

    def reply(source: str, mailbox: str, data: bytes) -> None:
        decoded = decode_resume(data)
        assert decoded is not None
        answers.append((source, mailbox, decoded[1]))

    return FileReceiver(folder, reply=reply), answers


def test_the_same_file_gets_the_same_transfer_id(tmp_path: Path) -> None:
    one = tmp_path / "a" / "f.bin"
    two = tmp_path / "b" / "f.bin"
    for p in (one, two):
        p.parent.mkdir()
        p.write_bytes(b"same bytes" * 500)
    assert Manifest.of_file(one).transfer_id == Manifest.of_file(two).transfer_id
    two.write_bytes(b"other bytes" * 500)
    assert Manifest.of_file(one).transfer_id != Manifest.of_file(two).transfer_id


def test_an_interrupted_transfer_resumes_from_the_whole_chunks_it_kept(tmp_path: Path) -> None:
    original = tmp_path / "disk.img"
    original.write_bytes(os.urandom(10_500))  # 11 chunks of 1000
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    messages = _resuming(original)
    first = FileReceiver(inbox)  # a receiver process that dies after 4 chunks and a half
    assert all(first.offer("10.0.0.1:1", m) is True for m in messages[:5])
    first.close()
    (part,) = inbox.iterdir()
    with part.open("ab") as f:
        f.write(b"torn")  # the fifth chunk was being written when it died
    receiver, answers = _answering(inbox)
    assert receiver.offer("10.0.0.2:2", messages[0]) is True  # a new sender, same file
    assert answers == [("10.0.0.2:2", "answers", 4)]  # chunks 0-3 are kept
    done = _feed(receiver, messages[5:], source="10.0.0.2:2")
    assert isinstance(done, TransferDone) and done.verified, done
    assert done.resumed == 4000 and done.as_dict()["resumed_bytes"] == 4000
    assert (inbox / "disk.img").read_bytes() == original.read_bytes()
    assert [p.name for p in inbox.iterdir()] == ["disk.img"]


def test_a_sender_that_missed_the_answer_starts_over_and_still_verifies(tmp_path: Path) -> None:
    original = tmp_path / "f.bin"
    original.write_bytes(os.urandom(5_000))
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    messages = _resuming(original)
    first = FileReceiver(inbox)
    assert all(first.offer("10.0.0.1:1", m) is True for m in messages[:3])
    first.close()
    receiver, answers = _answering(inbox)
    receiver.offer("10.0.0.1:9", messages[0])
    assert answers[0][2] == 2
    done = _feed(receiver, messages[1:], source="10.0.0.1:9")  # from chunk 0 after all
    assert done.verified and done.resumed == 0
    assert (inbox / "f.bin").read_bytes() == original.read_bytes()


def test_a_part_with_bad_bytes_fails_once_and_is_never_resumed_from(tmp_path: Path) -> None:
    original = tmp_path / "f.bin"
    original.write_bytes(os.urandom(5_000))
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    messages = _resuming(original)
    first = FileReceiver(inbox)
    assert all(first.offer("10.0.0.1:1", m) is True for m in messages[:3])
    first.close()
    (part,) = inbox.iterdir()
    part.write_bytes(b"X" + part.read_bytes()[1:])  # the disk lied
    receiver, answers = _answering(inbox)
    receiver.offer("10.0.0.1:2", messages[0])
    done = _feed(receiver, messages[3:], source="10.0.0.1:2")
    assert not done.verified and "SHA-256 mismatch" in done.error
    assert done.saved_as is not None and done.saved_as.suffix == ".failed"
    again, answers = _answering(inbox)
    again.offer("10.0.0.1:3", messages[0])
    assert answers[0][2] == 0  # nothing kept: the whole file comes again
    done = _feed(again, messages[1:], source="10.0.0.1:3")
    assert done.verified and (inbox / "f.bin").read_bytes() == original.read_bytes()


def test_without_a_folder_a_resuming_sender_is_told_to_send_everything(tmp_path: Path) -> None:
    original = tmp_path / "f.bin"
    original.write_bytes(os.urandom(2_500))
    sink = io.BytesIO()
    answers: list[bytes] = []
    receiver = FileReceiver(None, sink=sink, reply=lambda s, m, d: answers.append(d))
    done = _feed(receiver, _resuming(original))
    assert done.verified and sink.getvalue() == original.read_bytes()
    assert [decode_resume(a) for a in answers] == [
        (Manifest.of_file(original, 1000).transfer_id, 0)
    ]


@pytest.mark.loopback
def test_send_file_resume_carries_on_after_an_interrupted_sender(tmp_path: Path) -> None:
    """A sender dies after some chunks; ``rmsg send --file --resume`` from a new process
    (a new source port) sends only the rest, and the receiver verifies the whole file."""
    original = tmp_path / "disk.img"
    original.write_bytes(os.urandom(5 * CHUNK + 1234))
    port = free_port()
    inbox = tmp_path / "inbox"
    args = ["--bind", f"127.0.0.1:{port}", "--output-dir", str(inbox), "--count", "1"]
    proc = _recv([*args, "--json", "--timeout", "60"])
    try:
        _wait_listening(proc)
        manifest = Manifest.of_file(original)
        data = original.read_bytes()
        with Node() as crashed:  # the first attempt: manifest and three chunks, then gone
            crashed.send(f"127.0.0.1:{port}", manifest.encode(), timeout=10)
            for i in range(3):
                chunk = data[i * CHUNK : (i + 1) * CHUNK]
                crashed.send(
                    f"127.0.0.1:{port}", encode_chunk(manifest.transfer_id, i, chunk), timeout=10
                )
        result = CliRunner().invoke(
            main, ["send", f"127.0.0.1:{port}", "--file", str(original), "--resume", "--json"]
        )
        assert result.exit_code == 0, result.output
        sent = json.loads(result.stdout)
        assert sent["resumed_bytes"] == 3 * CHUNK
        assert sent["messages"] == 1 + 3  # the manifest and chunks 3, 4 and 5
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    record = json.loads(out)
    assert record["verified"] and record["resumed_bytes"] == 3 * CHUNK
    assert (inbox / "disk.img").read_bytes() == original.read_bytes()


def test_resume_needs_a_file_to_one_node() -> None:
    result = CliRunner().invoke(main, ["send", "127.0.0.1:7", "hello", "--resume"])
    assert result.exit_code == 2 and "--resume goes with --file PATH" in result.output
