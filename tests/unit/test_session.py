import itertools

import pytest
import samples

from rbee_p2p.protocol.errors import IllegalTransition, Misdirected, Overrun
from rbee_p2p.protocol.messages import Cancel, ErrorMessage, ResultChunk, ResultEnd
from rbee_p2p.protocol.session import (MAX_ITEM_BYTES, MAX_TOKEN_BYTES, TRANSITIONS,
                                       InferenceSession, SessionState)

S = SessionState
REQ, EXE = samples.key_a().peer_id, samples.key_b().peer_id
RID = samples.RID


def chunk(seq, tokens=1):
    return ResultChunk(request_id=RID, seq=seq, text="t", tokens=tokens)


def end(seq, reason="stop"):
    return ResultEnd(request_id=RID, seq=seq, finish_reason=reason, receipt=b"r")


ERR = ErrorMessage(code="internal", message="boom", request_id=RID)
CANCEL = Cancel(request_id=RID)


def run(steps):
    session = InferenceSession(RID, REQ, EXE)
    for sender, message in steps:
        session.observe(sender, message)
    return session


@pytest.mark.parametrize(
    "steps, final",
    [
        ([(REQ, samples.request(EXE)), (EXE, chunk(0)), (EXE, chunk(1)), (EXE, end(2))], S.DONE),
        ([(REQ, samples.request(EXE)), (EXE, end(0))], S.DONE),
        ([(REQ, samples.request(EXE)), (EXE, ERR)], S.FAILED),
        ([(REQ, samples.request(EXE)), (EXE, chunk(0)), (EXE, ERR)], S.FAILED),
        ([(REQ, samples.request(EXE)), (REQ, CANCEL), (EXE, chunk(0)), (EXE, end(1, "cancelled"))],
         S.CANCELLED),
        ([(REQ, samples.request(EXE)), (EXE, chunk(0)), (REQ, CANCEL), (EXE, ERR)], S.CANCELLED),
    ],
)
def test_legal_sessions(steps, final):
    session = run(steps)
    assert session.state is final and session.finished


def test_token_count_and_seq_tracking():
    session = run([(REQ, samples.request(EXE)), (EXE, chunk(0, 3)), (EXE, chunk(1, 4))])
    assert session.tokens_out == 7 and session.next_seq == 2 and session.state is S.STREAMING


@pytest.mark.parametrize("state, message_type", [
    (state, mt)
    for state, mt in itertools.product(S, [type(samples.request()), ResultChunk, ResultEnd,
                                           ErrorMessage, Cancel])
    if (state, mt) not in TRANSITIONS
])
def test_every_move_missing_from_the_table_is_illegal(state, message_type):
    examples = {type(samples.request()): (REQ, samples.request(EXE)), ResultChunk: (EXE, chunk(0)),
                ResultEnd: (EXE, end(0)), ErrorMessage: (EXE, ERR), Cancel: (REQ, CANCEL)}
    session = InferenceSession(RID, REQ, EXE)
    session.state = state
    sender, message = examples[message_type]
    with pytest.raises(IllegalTransition):
        session.observe(sender, message)
    assert session.state is state  # unchanged


@pytest.mark.parametrize("bad_seq", [2, 5])
def test_sequence_gaps_and_repeats_are_illegal(bad_seq):
    session = run([(REQ, samples.request(EXE)), (EXE, chunk(0))])
    for message in (chunk(bad_seq), chunk(0), end(bad_seq)):
        with pytest.raises(IllegalTransition, match="seq"):
            session.observe(EXE, message)
    assert session.next_seq == 1


def test_wrong_sender_request_or_target():
    session = run([(REQ, samples.request(EXE))])
    with pytest.raises(Misdirected):
        session.observe(REQ, chunk(0))  # only the executor produces output
    with pytest.raises(Misdirected):
        session.observe(EXE, CANCEL)  # only the requester cancels
    with pytest.raises(Misdirected):
        session.observe(EXE, ResultChunk(request_id=bytes(16), seq=0))
    other = InferenceSession(RID, REQ, EXE)
    with pytest.raises(Misdirected):
        other.observe(REQ, samples.request(REQ))  # addressed to someone else


def test_a_cancel_crossing_the_last_frame_is_harmless():
    for last in (end(1), ERR):
        session = run([(REQ, samples.request(EXE)), (EXE, chunk(0)), (EXE, last)])
        final = session.state
        assert session.observe(REQ, CANCEL) is final


def test_error_seq_when_given_must_be_next():
    session = run([(REQ, samples.request(EXE)), (EXE, chunk(0))])
    bad = ErrorMessage(code="internal", message="x", request_id=RID, seq=5)
    with pytest.raises(IllegalTransition, match="seq"):
        session.observe(EXE, bad)
    good = ErrorMessage(code="internal", message="x", request_id=RID, seq=1)
    assert session.observe(EXE, good) is S.FAILED


def test_a_peer_sending_more_tokens_than_asked_for_is_cut_and_the_session_is_unchanged():
    session = run([(REQ, samples.request(EXE, max_tokens=4)), (EXE, chunk(0, 3))])
    with pytest.raises(Overrun, match="5 tokens for a request of max_tokens 4"):
        session.observe(EXE, chunk(1, 2))
    assert (session.tokens_out, session.next_seq) == (3, 1)
    session.observe(EXE, chunk(1, 1))  # up to the limit is fine
    assert session.tokens_out == 4


def test_text_is_bounded_whatever_the_token_counts_say():
    session = run([(REQ, samples.request(EXE, max_tokens=4))])
    big = ResultChunk(request_id=RID, seq=0, text="x" * (5 * MAX_TOKEN_BYTES + 1), tokens=0)
    with pytest.raises(Overrun, match="bytes of text"):
        session.observe(EXE, big)


def test_data_is_bounded_per_item_asked_for():
    request = samples.request(EXE, kind="image", max_tokens=1, messages=None, sampling=None,
                              prompt="a cat")
    session = run([(REQ, request)])
    part = ResultChunk(request_id=RID, seq=0, text="0", data=b"\0" * (768 * 1024))
    for seq in range(MAX_ITEM_BYTES["image"] // len(part.data)):
        session.observe(EXE, ResultChunk(request_id=RID, seq=seq, text="0", data=part.data))
    with pytest.raises(Overrun, match="bytes of data for 1 image"):
        session.observe(EXE, ResultChunk(request_id=RID, seq=session.next_seq, text="0",
                                         data=part.data))
