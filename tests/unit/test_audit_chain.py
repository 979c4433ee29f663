import pytest
import samples

from rbee_p2p.protocol.audit import GENESIS, ChainHead, append_record, record_hash, verify_chain
from rbee_p2p.protocol.envelope import seal
from rbee_p2p.protocol.errors import ChainBroken, InvalidSchema
from rbee_p2p.protocol.messages import AuditRecord

A, B = samples.key_a(), samples.key_b()


def build(n, key=A):
    head, raws = ChainHead(), []
    for i in range(n):
        raw, head = append_record(key, head, now_ms=samples.NOW + i, kind="execute",
                                  outcome="ok", request_id=samples.RID, tokens_out=i)
        raws.append(raw)
    return raws, head


def test_valid_chain_verifies_and_links():
    raws, head = build(5)
    got_head, records = verify_chain(raws, signer=A.peer_id, expected_head=head)
    assert got_head == head == ChainHead(5, record_hash(raws[-1]))
    assert [r.seq for r in records] == [0, 1, 2, 3, 4]
    assert records[0].prev == GENESIS and records[1].prev == record_hash(raws[0])


def expect_break(raws, index, cause, **kwargs):
    with pytest.raises(ChainBroken) as info:
        verify_chain(raws, **kwargs)
    assert (info.value.index, info.value.cause) == (index, cause)
    assert f"record {index}" in str(info.value)


def test_edit_is_detected_at_the_edited_record():
    raws, _ = build(5)
    edited = bytearray(raws[2])
    edited[-70] ^= 1  # inside the payload: signature no longer verifies
    expect_break(raws[:2] + [bytes(edited)] + raws[3:], 2, "forged")


def test_resigned_edit_breaks_the_next_link():
    raws, _ = build(5)
    # an edit re-signed with the node's own key (an insider) still breaks the next link
    record = AuditRecord(seq=2, prev=record_hash(raws[1]), kind="execute", outcome="error")
    forged = seal(A, record, now_ms=samples.NOW, ttl_ms=0)
    expect_break(raws[:2] + [forged] + raws[3:], 3, "link")


def test_deletion_reorder_and_truncation():
    raws, head = build(5)
    expect_break(raws[:2] + raws[3:], 2, "sequence")
    expect_break([raws[0], raws[2], raws[1], *raws[3:]], 1, "sequence")
    expect_break(raws[:4], 4, "truncated", expected_head=head)
    expect_break(raws[1:], 0, "sequence")


def test_foreign_and_unreadable_records():
    raws, _ = build(3)
    other, _ = build(3, key=B)
    expect_break([raws[0], other[1], raws[2]], 1, "foreign", signer=A.peer_id)
    expect_break([raws[0], b"\x00garbage"], 1, "unreadable")
    expect_break([seal(A, samples.advert(), now_ms=samples.NOW)], 0, "unreadable")


def test_segment_verifies_from_a_known_start():
    raws, head = build(6)
    start = ChainHead(3, record_hash(raws[2]))
    assert verify_chain(raws[3:], start=start, expected_head=head)[0] == head


def test_records_are_metadata_only():
    with pytest.raises(TypeError):
        append_record(A, ChainHead(), now_ms=samples.NOW, kind="entry", outcome="ok",
                      prompt="secret text")
    with pytest.raises(InvalidSchema):
        append_record(A, ChainHead(), now_ms=samples.NOW, kind="gossip", outcome="ok")


def test_records_with_a_validity_window_are_invalid():
    raws, _ = build(1)
    record = AuditRecord(seq=1, prev=record_hash(raws[0]), kind="note", outcome="ok")
    windowed = seal(A, record, now_ms=samples.NOW, ttl_ms=1000)
    expect_break([raws[0], windowed], 1, "invalid")
