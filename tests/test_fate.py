"""A sent message's fate machine: the table itself, and the session feeding it."""

from __future__ import annotations

import ast
import itertools
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from reliable import events, fate, wire
from reliable.fate import TERMINAL, TRANSITIONS, Fate, FateError, FateInput, advance
from reliable.node_messages import Admitted
from reliable.peer import Withdrawal

from .harness import B, Pair

LEGAL = [(s, i, n) for s, moves in TRANSITIONS.items() for i, n in moves.items()]
ILLEGAL = [(s, i) for s, i in itertools.product(Fate, FateInput) if i not in TRANSITIONS.get(s, {})]
LIVE = [s for s in Fate if s not in TERMINAL]
#: What the peer (or its silence) decides: legal in every live state, so remote garbage
#: can never drive the machine into an illegal pair.
REMOTE = [
    FateInput.ACKED,
    FateInput.DEFER,
    FateInput.ADMIT,
    FateInput.REFUSE,
    FateInput.RECLAIMED,
    FateInput.LOST,
]


def test_every_state_has_a_row() -> None:
    assert set(TRANSITIONS) == set(Fate)
    assert {Fate.DELIVERED, Fate.REFUSED, Fate.TIMED_OUT, Fate.CANCELLED, Fate.LOST} == TERMINAL


@pytest.mark.parametrize(("state", "event", "target"), LEGAL)
def test_every_legal_pair_leads_where_the_table_says(
    state: Fate, event: FateInput, target: Fate
) -> None:
    assert advance(state, event) is target


@pytest.mark.parametrize(("state", "event"), ILLEGAL)
def test_every_illegal_pair_raises(state: Fate, event: FateInput) -> None:
    with pytest.raises(FateError, match=state.name):
        advance(state, event)


def test_terminal_states_are_exactly_the_ones_with_no_way_out() -> None:
    assert all(not TRANSITIONS[s] for s in TERMINAL)
    assert all(TRANSITIONS[s] for s in LIVE)
    for state in TERMINAL:
        for event in FateInput:
            with pytest.raises(FateError):
                advance(state, event)


@pytest.mark.parametrize("state", LIVE)
def test_whatever_the_peer_says_is_legal_in_every_live_state(state: Fate) -> None:
    assert all(event in TRANSITIONS[state] for event in REMOTE)


def test_every_terminal_state_is_reachable_from_a_new_send() -> None:
    seen = {Fate.SENDING}
    frontier = [Fate.SENDING]
    while frontier:
        for target in TRANSITIONS[frontier.pop()].values():
            if target not in seen:
                seen.add(target)
                frontier.append(target)
    assert seen == set(Fate)


@given(st.lists(st.sampled_from(list(FateInput)), max_size=40))
def test_any_history_reaches_at_most_one_fate_and_stays_there(inputs: list[FateInput]) -> None:
    state = Fate.SENDING
    fates = 0
    for event in inputs:
        try:
            nxt = advance(state, event)
        except FateError:
            continue  # the session never feeds an illegal pair; the machine refuses it
        assert state not in TERMINAL, "nothing leaves a fate"
        fates += nxt in TERMINAL
        state = nxt
    assert fates <= 1


def test_the_docstring_table_is_the_table() -> None:
    # From the source: a compiled (mypyc) module keeps no docstring, its .py ships beside it.
    doc = ast.get_docstring(ast.parse((Path(fate.__file__).parent / "fate.py").read_text()))
    assert doc is not None
    rendered = "\n".join("    " + line for line in fate.describe().splitlines())
    assert rendered in "\n" + doc


def test_the_protocol_doc_table_is_the_table() -> None:
    doc = (Path(__file__).resolve().parent.parent / "docs" / "protocol.md").read_text()
    header = "| state | " + " | ".join(i.name for i in FateInput) + " |"
    assert header in doc
    for state in LIVE:
        cells = [TRANSITIONS[state][i].name if i in TRANSITIONS[state] else "—" for i in FateInput]
        assert f"| {state.name} | " + " | ".join(cells) + " |" in doc, state


def test_an_outcome_that_overtakes_its_acknowledgement_settles_the_send_at_once() -> None:
    """The peer's Admitted proves it judged the whole message: no waiting for the ack."""
    p = Pair(release=False)
    p.connect()
    p.b.create_mailbox("meet", capacity=0)
    ticket = p.a.endpoint.send(B, b"hello", now=p.now, mailbox="meet")
    p.deliver(p.b, p.outgoing(p.a))  # parked at B; its DEFERRED notice not back yet
    session = p.a.endpoint._peers[B]
    (msg,) = session.sender.by_msg_id.values()
    assert msg.fate is Fate.SENDING
    # B's receipt, as if the acknowledgement carrying the notice were still on its way.
    p.a.endpoint._handle_outcome(session, Admitted(msg.msg_id, taken=True, receiver="alice"), p.now)
    (done,) = p.a.of(events.MessageDelivered)
    assert (done.ticket, done.deferred, done.receiver) == (ticket, True, "alice")
    assert msg.fate is Fate.DELIVERED and not session.sender.by_msg_id
    assert p.b.endpoint.take("meet", receiver="alice", now=p.now) is not None
    p.settle()  # the acknowledgement, its notice and the real receipt: nothing more to say
    assert len(p.a.of(events.MessageDelivered)) == 1 and not p.a.of(events.MessageFailed)


def test_a_deferred_notice_for_a_message_not_wholly_sent_is_counted_garbage() -> None:
    """Only a whole message can be parked: a forged DEFERRED notice for one still
    being sent is counted and ignored, and withdrawing it then still withdraws it."""
    p = Pair()
    p.connect()
    ticket = p.a.endpoint.send(B, b"x" * 500_000, now=p.now)
    p.outgoing(p.a)  # the first flight leaves (and is lost); the rest waits for the window
    session = p.a.endpoint._peers[B]
    (msg,) = session.sender.by_msg_id.values()
    assert msg.started and not msg.fully_sent
    forged = wire.Packet(
        kind=wire.Kind.ACK,
        flags=int(wire.Flag.ACK),
        window=64,
        src_incarnation=session.incarnation or 1,
        dst_incarnation=p.a.endpoint.incarnation,
        ack=session.sender.cum_ack & 0xFFFFFFFF,
        notices=((msg.msg_id & 0xFFFFFFFF, int(wire.Verdict.DEFERRED)),),
    )
    session.on_packet(forged, p.now, p.a.endpoint.incarnation)
    assert msg.fate is Fate.SENDING and session.bogus_outcomes == 1
    assert p.a.endpoint.withdraw(ticket, p.now) is Withdrawal.WITHDRAWN
    (failed,) = p.a.of(events.MessageFailed)
    assert failed.ticket == ticket and failed.error.delivered is False
