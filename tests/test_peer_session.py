"""A session answers instead of calling back (issue 18): ``PeerSession.on_packet``
returns the messages a packet completed, the caller's verdicts go back with
``took``, and ``delivered`` goes on with the rest of the packet. No endpoint here."""

from __future__ import annotations

import random

from reliable import Config, events
from reliable.peer import PeerSession
from reliable.wire import Flag, Fragment, Kind, Packet, Verdict

PEER = ("10.0.0.9", 9000)
NOW = 100.0


def _fragment(seq: int, data: bytes, *, for_node: bool = False) -> Fragment:
    return Fragment(
        seq=seq,
        base=1,
        msg_id=seq,
        index=0,
        count=1,
        total_len=len(data),
        msg_type=0,
        priority=0,
        mailbox="",
        payload=data,
        for_node=for_node,
    )


def _bundle(*frags: Fragment) -> Packet:
    return Packet(
        kind=Kind.DATA, src_incarnation=5, dst_incarnation=7, fragment=frags[0], bundle=frags[1:]
    )


def _session(config: Config | None = None) -> PeerSession:
    session = PeerSession(PEER, config or Config(), random.Random(1), NOW)
    session.incarnation = 5
    return session


def test_a_bundle_answers_one_message_at_a_time_and_the_verdicts_go_back() -> None:
    session = _session()
    pkt = _bundle(*(_fragment(seq, bytes([seq]) * 10) for seq in (1, 2, 3)))
    seen = []
    deliveries = session.on_packet(pkt, NOW, 7)
    while deliveries is not None:
        (d,) = deliveries  # the session stops after each fragment that completed one
        seen.append(d.data)
        if d.msg_id == 2:
            session.took(d, Verdict.DEFERRED)
        deliveries = session.delivered(NOW)
    assert seen == [b"\x01" * 10, b"\x02" * 10, b"\x03" * 10]
    assert session.messages_received == 3 and session.bytes_received == 30
    (notice,) = session.receiver.notices.items()  # the verdict rides on the next ack
    assert notice[0] == 2 and notice[1].reason is Verdict.DEFERRED


def test_a_parked_message_narrows_the_window_the_next_fragment_of_its_bundle_meets() -> None:
    """What the endpoint does with the first message (it parks, the backlog is full)
    decides whether the session takes the second: hence one message at a time."""
    config = Config()
    session = _session(config)
    pkt = _bundle(_fragment(1, b"a" * 10), _fragment(2, b"b" * 10))
    (first,) = session.on_packet(pkt, NOW, 7) or ()
    session.took(first, Verdict.DEFERRED)
    session.hold(config.receive_backlog)  # what the post office does for a parked message
    assert session.delivered(NOW) is None  # the second is turned away: no room
    assert session.receiver.no_room == 1 and session.messages_received == 1


def test_a_node_message_comes_back_marked_and_an_empty_packet_returns_none() -> None:
    session = _session()
    ping = Packet(kind=Kind.PING, flags=0, src_incarnation=5, dst_incarnation=7)
    assert session.on_packet(ping, NOW, 7) is None
    pkt = Packet(
        kind=Kind.DATA,
        flags=int(Flag.NODE),
        src_incarnation=5,
        dst_incarnation=7,
        fragment=_fragment(1, b"\x01ctl", for_node=True),
    )
    (d,) = session.on_packet(pkt, NOW, 7) or ()
    assert d.for_node and d.data == b"\x01ctl"
    assert session.delivered(NOW) is None


def test_what_a_session_settles_waits_in_its_events() -> None:
    session = _session()
    session.restart(6, NOW)
    (restarted,) = session.events
    assert isinstance(restarted, events.PeerRestarted) and restarted.new_incarnation == 6
