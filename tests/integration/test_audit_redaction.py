"""Erasure, retention and receipts in the audit store: rewrites are atomic and verified."""

import os

import pytest
import samples
from auditlogs import DAY_MS, REF_A, REF_B, add_request, fill, receipt_for

from rbee_p2p.errors import InvalidSchema, StorageError
from rbee_p2p.protocol import audit as chain
from rbee_p2p.protocol.audit import read_entry, walk_chain
from rbee_p2p.protocol.envelope import Limits, decode_envelope, seal
from rbee_p2p.store import audit as store
from rbee_p2p.store.audit import AuditLog, LogInUse, frame, read_frames, receipts_path
from rbee_p2p.store.audit_read import export_rows, verify_log

A = samples.key_a()


def entries(path):
    frames, _ = read_frames(path.read_bytes())
    return [read_entry(raw) for _, raw in frames]


def test_a_receipt_is_kept_and_its_signature_is_the_records_receipt_sig(tmp_path):
    path = tmp_path / "audit.log"
    with fill(path, a=1, b=0) as log:
        receipts = log.receipts()
    assert len(receipts) == 1 and receipts[0] == receipt_for(0)
    entry = next(e for e in entries(path) if e.record.kind == "entry")
    assert entry.record.receipt_sig == receipts[0][-64:]
    assert oct(receipts_path(path).stat().st_mode & 0o777) == "0o600"
    verdict = verify_log(path, signer=A.peer_id)
    assert verdict.ok and verdict.receipts == 1 and verdict.records == 3


def test_a_bad_receipt_writes_nothing(tmp_path):
    with AuditLog(tmp_path / "audit.log", A) as log:
        with pytest.raises(InvalidSchema):
            log.append(now_ms=1, kind="entry", outcome="ok", receipt=b"\x80" * 100)
        with pytest.raises(InvalidSchema):  # another envelope type
            log.append(now_ms=1, kind="entry", outcome="ok",
                       receipt=seal(samples.key_b(), samples.advert(), now_ms=samples.NOW))
        with pytest.raises(InvalidSchema):
            log.append(now_ms=1, kind="entry", outcome="ok", receipt=receipt_for(0),
                       receipt_sig=bytes(64))
        assert log.head.seq == 0 and log.receipts() == []


def test_receipts_are_written_after_their_records_at_sync(tmp_path):
    path = tmp_path / "audit.log"
    with AuditLog(path, A) as log:
        add_request(log, 0, REF_A, samples.NOW, sync=False)
        assert log.receipts() == []  # not before the record is durable
        log.sync()
        assert len(log.receipts()) == 1


def test_erase_redacts_one_tenant_and_the_chain_still_verifies(tmp_path):
    path = tmp_path / "audit.log"
    log = fill(path, a=3, b=2)
    before = entries(path)
    done = log.erase(REF_A, now_ms=samples.NOW + 5)
    assert (done.records, done.covers, done.receipts) == (6, 1, 3)
    after = entries(path)
    assert len(after) == len(before) + 1
    for old, new in zip(before, after):
        if old.record.tenant_ref == REF_A:
            assert new.is_tombstone and new.hash == old.hash
        else:
            assert new == old  # tenant B and the note are untouched
    cover = after[-1].record
    assert cover.kind == "redaction" and cover.tenant_ref == REF_A and len(cover.covers) == 6
    assert [decode_envelope(r, Limits())[1].request_id for r in log.receipts()] == [
        (100).to_bytes(16, "big"), (101).to_bytes(16, "big")]
    # the node goes on appending; a reopen verifies everything
    add_request(log, 7, REF_A, samples.NOW + 6)
    head = log.head
    log.close()
    with AuditLog(path, A) as reopened:
        assert reopened.head == head
    verdict = verify_log(path, signer=A.peer_id)
    assert verdict.ok and (verdict.redacted, verdict.pruned, verdict.receipts) == (6, 0, 3)
    assert [r["kind"] for r in export_rows(path, REF_A)] == ["redaction", "entry", "forward"]


def test_erase_of_an_unknown_tenant_changes_nothing(tmp_path):
    path = tmp_path / "audit.log"
    with fill(path) as log:
        data = path.read_bytes()
        assert log.erase(bytes(32), now_ms=samples.NOW) == store.Erased()
    assert path.read_bytes() == data


def test_a_large_erasure_takes_several_redaction_records(tmp_path, monkeypatch):
    monkeypatch.setattr(chain, "MAX_COVERS", 4)
    path = tmp_path / "audit.log"
    with fill(path, a=5, b=1) as log:
        assert log.erase(REF_A, now_ms=samples.NOW).covers == 3  # 10 records
    report = walk_chain([raw for _, raw in read_frames(path.read_bytes())[0]])
    assert report.redacted == 10
    assert [len(e.record.covers) for e in report.entries[-3:]] == [4, 4, 2]


def test_prune_by_age_keeps_cover_records(tmp_path):
    path = tmp_path / "audit.log"
    now = samples.NOW
    with fill(path, a=2, b=0, now_ms=now - 40 * DAY_MS) as log:
        add_request(log, 50, REF_B, now - 10 * DAY_MS)
        assert log.erase(REF_B, now_ms=now - 5 * DAY_MS).records == 2
        done = log.prune(now - 30 * DAY_MS, now_ms=now)
        assert (done.records, done.covers, done.receipts) == (5, 1, 2)
        # later, everything but the cover records is old: the redaction record is kept
        assert log.prune(now + DAY_MS, now_ms=now + DAY_MS).records == 0
    verdict = verify_log(path)
    assert verdict.ok and (verdict.redacted, verdict.pruned) == (2, 5)
    assert [e.record.kind for e in entries(path) if not e.is_tombstone] == ["redaction",
                                                                           "prune"]


def test_a_failed_rewrite_leaves_the_old_log(tmp_path, monkeypatch):
    path = tmp_path / "audit.log"
    log = fill(path)
    data, receipts = path.read_bytes(), receipts_path(path).read_bytes()
    calls = []
    real = store._replace_file

    def crash_on_the_log(target, content, *, lock):
        calls.append(target)
        if target == path:
            raise OSError("disk full")
        return real(target, content, lock=lock)

    monkeypatch.setattr(store, "_replace_file", crash_on_the_log)
    with pytest.raises(OSError):
        log.erase(REF_A, now_ms=samples.NOW)
    assert calls == [receipts_path(path), path]  # receipts go first
    assert path.read_bytes() == data and receipts_path(path).read_bytes() != receipts
    log.close()
    # records that lost their receipts are fine; erasing again finishes the job
    assert verify_log(path).ok
    monkeypatch.setattr(store, "_replace_file", real)
    with AuditLog(path, A) as log:
        assert log.erase(REF_A, now_ms=samples.NOW).records == 6
    assert verify_log(path).ok


def test_a_crash_inside_the_rename_leaves_the_old_log(tmp_path, monkeypatch):
    path = tmp_path / "audit.log"
    with fill(path, a=1, b=0) as log:
        data = path.read_bytes()
        monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(OSError("crash")))
        with pytest.raises(OSError):
            log.erase(REF_A, now_ms=samples.NOW)
        monkeypatch.undo()
        assert path.read_bytes() == data
        log.append(now_ms=samples.NOW, kind="note", outcome="ok")  # still the owner
    with AuditLog(path, A):
        pass


def test_the_rewritten_log_is_locked_from_the_start(tmp_path):
    path = tmp_path / "audit.log"
    with fill(path) as log:
        log.erase(REF_A, now_ms=samples.NOW)
        with pytest.raises(LogInUse, match="in use"):
            AuditLog(path, A)
        log.append(now_ms=samples.NOW, kind="note", outcome="ok")
        head = log.head
    with AuditLog(path, A) as again:
        assert again.head == head


def test_a_damaged_log_is_not_rewritten(tmp_path):
    path = tmp_path / "audit.log"
    log = fill(path)
    data = bytearray(path.read_bytes())
    frames, _ = read_frames(bytes(data))
    data[frames[2][0] + 40] ^= 1
    with open(path, "r+b") as f:  # damage behind the owner's back
        f.write(bytes(data))
    with pytest.raises(StorageError, match="not rewriting"):
        log.erase(REF_A, now_ms=samples.NOW)
    assert path.read_bytes() == bytes(data)
    log.close()


def test_a_tombstone_nobody_vouched_for_stops_the_log_from_opening(tmp_path):
    path = tmp_path / "audit.log"
    fill(path).close()
    frames, _ = read_frames(path.read_bytes())
    raws = [raw for _, raw in frames]
    raws[1] = chain.tombstone(1, chain.record_hash(raws[1]))
    path.write_bytes(b"".join(frame(r) for r in raws))
    with pytest.raises(StorageError, match="unvouched|covered by no"):
        AuditLog(path, A)
    assert not verify_log(path).ok


def test_verify_and_export_read_while_the_owner_writes_and_tolerate_a_torn_tail(tmp_path):
    path = tmp_path / "audit.log"
    with fill(path):  # the lock is held
        with open(path, "ab") as f:
            f.write(frame(receipt_for(1))[:60])  # an append in progress
        with open(receipts_path(path), "ab") as f:
            f.write(b"\x00\x00\x01")
        verdict = verify_log(path, signer=A.peer_id)
        assert verdict.ok and len(verdict.notes) == 2
        assert len(list(export_rows(path, REF_B))) == 4


def test_verify_names_forged_orphan_and_mismatched_receipts(tmp_path):
    path = tmp_path / "audit.log"
    fill(path, a=1, b=0).close()
    good = receipts_path(path).read_bytes()
    forged = bytearray(receipt_for(0))
    forged[-1] ^= 1
    other_executor = receipt_for(0, executor=samples.key_a())
    for bad, problem in [(bytes(forged), "bad_signature"),
                         (receipt_for(9), "no audit record"),
                         (b"\x80", "invalid")]:
        receipts_path(path).write_bytes(good + frame(bad))
        verdict = verify_log(path)
        assert not verdict.ok and problem in verdict.errors[0] and verdict.receipts == 2
    # a record that names another executor than the receipt's signer
    with AuditLog(path, A) as log:
        log.append(now_ms=1, kind="entry", outcome="ok", request_id=(0).to_bytes(16, "big"),
                   exec_peer=samples.key_b().peer_id, receipt=other_executor)
    verdict = verify_log(path)
    assert "names executor" in " ".join(verdict.errors)


def test_a_torn_receipt_is_cut_when_the_owner_opens_the_log(tmp_path):
    path = tmp_path / "audit.log"
    fill(path, a=1, b=0).close()
    with open(receipts_path(path), "ab") as f:
        f.write(frame(receipt_for(5))[:50])
    with AuditLog(path, A) as log:
        assert len(log.receipts()) == 1
    assert verify_log(path).ok and not verify_log(path).notes


def test_a_quick_prune_looks_from_the_oldest_record_to_the_first_one_to_keep(tmp_path):
    path = tmp_path / "audit.log"
    now = samples.NOW
    with AuditLog(path, A) as log:
        log.append(now_ms=now - 40 * DAY_MS, kind="note", outcome="ok")
        log.append(now_ms=now - 1 * DAY_MS, kind="note", outcome="ok")
        log.append(now_ms=now - 50 * DAY_MS, kind="note", outcome="ok")  # clock stepped back
        assert log.prune(now - 30 * DAY_MS, now_ms=now, quick=True).records == 2  # both
        log.append(now_ms=now - 60 * DAY_MS, kind="note", outcome="ok")
        # the oldest live record is young: the quick look stops there (until it ages) ...
        assert log.prune(now - 30 * DAY_MS, now_ms=now, quick=True).records == 0
        assert log.prune(now, now_ms=now, quick=True).records == 2
        log.append(now_ms=now - 1 * DAY_MS, kind="note", outcome="ok")
        log.append(now_ms=now - 60 * DAY_MS, kind="note", outcome="ok")
        # ... while a full prune (rbee-node audit prune) looks at every record
        assert log.prune(now - 30 * DAY_MS, now_ms=now).records == 1
