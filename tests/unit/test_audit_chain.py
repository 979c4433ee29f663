import pytest
import samples

from rbee_p2p.protocol import audit
from rbee_p2p.protocol.audit import (
    GENESIS,
    ChainHead,
    append_record,
    cover_records,
    covers_digest,
    read_entry,
    record_hash,
    tombstone,
    verify_chain,
    walk_chain,
)
from rbee_p2p.protocol.envelope import seal
from rbee_p2p.protocol.errors import ChainBroken, InvalidSchema, ProtocolError
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


# ---- tombstones: erasure and retention keep the chain verifiable


def redact(raws, head, seqs, kind="redaction", key=A, **fields):
    """Replace records ``seqs`` by tombstones and append the cover records."""
    covered = [(s, record_hash(raws[s])) for s in sorted(seqs)]
    out = [tombstone(s, record_hash(r)) if s in seqs else r for s, r in enumerate(raws)]
    covers, head = cover_records(key, head, covered, now_ms=samples.NOW + 100, kind=kind,
                                 **fields)
    return out + covers, head


def test_tombstones_covered_by_a_redaction_verify_and_are_counted():
    raws, head = build(6)
    redacted, head = redact(raws, head, {1, 2, 4}, tenant_ref=samples.DIGEST)
    report = walk_chain(redacted, signer=A.peer_id, expected_head=head)
    assert report.head == head and (report.redacted, report.pruned) == (3, 0)
    assert [e.is_tombstone for e in report.entries] == [False, True, True, False, True, False,
                                                        False]
    assert report.entries[1].hash == record_hash(raws[1])
    cover = report.entries[-1].record
    assert cover.kind == "redaction" and cover.outcome == "redacted"
    assert cover.covers == (1, 2, 4) and cover.tenant_ref == samples.DIGEST
    got_head, records = verify_chain(redacted, signer=A.peer_id)
    assert got_head == head and [r.seq for r in records] == [0, 3, 5, 6]


def test_prunes_and_redactions_add_up_and_can_follow_each_other():
    raws, head = build(5)
    once, head = redact(raws, head, {0, 1}, kind="prune")
    twice, head = redact(once, head, {3}, tenant_ref=samples.DIGEST)
    report = walk_chain(twice, expected_head=head)
    assert (report.redacted, report.pruned) == (1, 2)


def test_large_erasures_are_split_into_several_cover_records(monkeypatch):
    monkeypatch.setattr(audit, "MAX_COVERS", 2)
    raws, head = build(6)
    redacted, head = redact(raws, head, {0, 1, 2, 3, 5})
    assert len(redacted) == 9
    assert [walk_chain(redacted).entries[i].record.covers for i in (6, 7, 8)] == [
        (0, 1), (2, 3), (5,)]


def test_a_tombstone_nobody_vouched_for_is_named():
    raws, head = build(4)
    unvouched = [raws[0], tombstone(1, record_hash(raws[1])), *raws[2:]]
    expect_break(unvouched, 1, "unvouched")
    # a cover for another seq does not vouch for it either
    redacted, _ = redact(raws, head, {2})
    expect_break([redacted[0], tombstone(1, record_hash(raws[1])), *redacted[2:]], 1,
                 "unvouched")


def test_a_cover_of_a_live_record_or_a_later_seq_is_refused():
    raws, head = build(4)
    cover, _ = cover_records(A, head, [(2, record_hash(raws[2]))], now_ms=samples.NOW,
                             kind="redaction")
    expect_break(raws + cover, 4, "cover")  # record 2 is still there
    forward, _ = append_record(A, head, now_ms=samples.NOW, kind="prune", outcome="pruned",
                               covers=(9,), covers_digest=bytes(32))
    expect_break(raws + [forward], 4, "cover")


def test_covering_a_tombstone_twice_is_refused():
    raws, head = build(3)
    redacted, head = redact(raws, head, {1})
    second, _ = cover_records(A, head, [(1, record_hash(raws[1]))], now_ms=samples.NOW,
                              kind="prune")
    expect_break(redacted + second, 4, "cover")


def test_an_edited_tombstone_hash_is_detected():
    raws, head = build(5)
    redacted, head = redact(raws, head, {1, 2})
    # last tombstone of a run: the next record's prev no longer links
    edited = [*redacted[:2], tombstone(2, bytes(32)), *redacted[3:]]
    expect_break(edited, 3, "link")
    # a tombstone inside a run: only the cover's covers_digest binds its hash
    edited = [redacted[0], tombstone(1, bytes(32)), *redacted[2:]]
    expect_break(edited, 5, "cover")


def test_malformed_misplaced_and_odd_tombstones():
    raws, head = build(3)
    redacted, head = redact(raws, head, {1})
    expect_break([redacted[0], tombstone(5, record_hash(raws[1])), *redacted[2:]], 1,
                 "sequence")
    truncated = bytearray(redacted[1])
    expect_break([redacted[0], bytes(truncated[:-1]), *redacted[2:]], 1, "unreadable")
    expect_break([redacted[0], bytes(truncated) + b"\x00", *redacted[2:]], 1, "unreadable")


def test_covers_belong_to_cover_records_only_and_must_ascend():
    raws, head = build(3)
    note, _ = append_record(A, head, now_ms=samples.NOW, kind="note", outcome="ok", covers=())
    expect_break(raws + [note], 3, "cover")
    wrong, _ = append_record(A, head, now_ms=samples.NOW, kind="redaction", outcome="pruned")
    expect_break(raws + [wrong], 3, "cover")
    hashes = [record_hash(r) for r in raws]
    desc, _ = append_record(A, head, now_ms=samples.NOW, kind="prune", outcome="pruned",
                            covers=(1, 0), covers_digest=covers_digest([hashes[1], hashes[0]]))
    expect_break([tombstone(0, hashes[0]), tombstone(1, hashes[1]), raws[2], desc], 3, "cover")
    with pytest.raises(ValueError):
        cover_records(A, head, [(1, hashes[1]), (0, hashes[0])], now_ms=0, kind="prune")
    with pytest.raises(ValueError):
        cover_records(A, head, [(0, hashes[0])], now_ms=0, kind="note")


def test_a_segment_may_cover_tombstones_before_its_start():
    raws, head = build(4)
    redacted, head = redact(raws, head, {0})
    start = ChainHead(2, record_hash(redacted[1]))
    report = walk_chain(redacted[2:], start=start, expected_head=head)
    assert report.head == head and report.redacted == 1


def test_read_entry_decodes_without_verifying():
    raws, _ = build(2)
    entry = read_entry(raws[1])
    assert entry.seq == 1 and entry.record.tokens_out == 1 and entry.issued_at == samples.NOW + 1
    assert entry.sender == A.peer_id and not entry.is_tombstone
    stone = read_entry(tombstone(7, bytes(32)))
    assert stone.is_tombstone and (stone.seq, stone.hash) == (7, bytes(32))
    with pytest.raises(ProtocolError):
        read_entry(b"\x83\x69tombstone\x00")


def test_a_trusted_head_verifies_without_signatures_and_still_catches_edits():
    raws, head = build(4)
    report = walk_chain(raws, expected_head=head, check_signatures=False)
    assert report.head == head
    record = AuditRecord(seq=1, prev=record_hash(raws[0]), kind="execute", outcome="error")
    resigned = seal(B, record, now_ms=samples.NOW, ttl_ms=0)  # even by another key
    with pytest.raises(ChainBroken) as info:
        walk_chain([raws[0], resigned, *raws[2:]], expected_head=head, check_signatures=False)
    assert (info.value.index, info.value.cause) in {(1, "foreign"), (2, "link")}
    with pytest.raises(ChainBroken) as info:  # the last record: only the head binds it
        walk_chain([*raws[:3], build(4)[0][3]], expected_head=head, check_signatures=False)
    with pytest.raises(ValueError):
        walk_chain(raws, check_signatures=False)
