import os

import pytest
import samples

from rbee_p2p.errors import InvalidSchema, StorageError
from rbee_p2p.protocol.audit import verify_chain
from rbee_p2p.store.audit import AuditLog, read_frames


def fill(path, n, key=None):
    with AuditLog(path, key or samples.key_a()) as log:
        for i in range(n):
            log.append(now_ms=samples.NOW + i, kind="execute", outcome="ok",
                       request_id=samples.RID, tokens_out=i)
        return log.head


def test_append_reopen_and_continue(tmp_path):
    path = tmp_path / "audit.log"
    head = fill(path, 3)
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    head2 = fill(path, 2)
    assert head2.seq == 5 and head.seq == 3
    with AuditLog(path, samples.key_a()) as log:
        got, records = verify_chain(log.records(), expected_head=head2)
    assert [r.tokens_out for r in records] == [0, 1, 2, 0, 1]


@pytest.mark.parametrize("cut", [1, 3, 4, 10, 60])
def test_torn_final_record_is_cut_and_the_rest_kept(tmp_path, cut):
    path = tmp_path / "audit.log"
    fill(path, 4)
    data = path.read_bytes()
    frames, _ = read_frames(data)
    path.write_bytes(data[: frames[-1][0] + cut])  # a crash during the 4th append
    with AuditLog(path, samples.key_a()) as log:
        assert log.head.seq == 3
        log.append(now_ms=samples.NOW, kind="note", outcome="ok")
        verify_chain(log.records(), expected_head=log.head)
    assert path.stat().st_size < len(data) + 1


def test_zero_filled_tail_is_cut(tmp_path):
    path = tmp_path / "audit.log"
    fill(path, 2)
    with open(path, "ab") as f:
        f.write(bytes(4096))
    with AuditLog(path, samples.key_a()) as log:
        assert log.head.seq == 2


def test_damage_before_the_tail_is_an_error_not_a_silent_cut(tmp_path):
    path = tmp_path / "audit.log"
    fill(path, 4)
    data = bytearray(path.read_bytes())
    frames, _ = read_frames(bytes(data))
    data[frames[1][0] + 30] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(StorageError, match="record 1"):
        AuditLog(path, samples.key_a())
    assert path.read_bytes() == bytes(data)  # nothing cut


@pytest.mark.parametrize("length", [10_000, 2**32 - 1])
def test_a_damaged_length_header_is_an_error_not_a_silent_cut(tmp_path, length):
    path = tmp_path / "audit.log"
    fill(path, 3)
    data = bytearray(path.read_bytes())
    frames, _ = read_frames(bytes(data))
    data[frames[1][0] : frames[1][0] + 4] = length.to_bytes(4, "big")
    path.write_bytes(bytes(data))
    with pytest.raises(StorageError, match="damaged record header"):
        AuditLog(path, samples.key_a())
    assert path.read_bytes() == bytes(data)


def test_a_log_of_another_node_is_refused(tmp_path):
    path = tmp_path / "audit.log"
    fill(path, 1, key=samples.key_b())
    with pytest.raises(StorageError, match="another node"):
        AuditLog(path, samples.key_a())
    assert len(read_frames(path.read_bytes())[0]) == 1


def test_one_writer_at_a_time(tmp_path):
    path = tmp_path / "audit.log"
    with AuditLog(path, samples.key_a()):
        with pytest.raises(StorageError, match="in use"):
            AuditLog(path, samples.key_a())


def test_bad_fields_write_nothing(tmp_path):
    path = tmp_path / "audit.log"
    with AuditLog(path, samples.key_a()) as log:
        with pytest.raises(InvalidSchema):
            log.append(now_ms=samples.NOW, kind="bogus", outcome="ok")
        assert log.head.seq == 0
    assert os.path.getsize(path) == 0


def test_a_full_disk_keeps_nothing_of_the_record_and_the_log_goes_on(tmp_path, monkeypatch):
    import errno

    from rbee_p2p.store import audit as store

    KEY, NOW = samples.key_a(), samples.NOW
    path = tmp_path / "audit.log"
    log = AuditLog(path, KEY)
    log.append(now_ms=NOW, kind="entry", outcome="ok")
    size = path.stat().st_size
    real_write = os.write
    calls = []

    def full_disk(fd, data):  # half the bytes fit, then the disk is full
        calls.append(len(data))
        if len(calls) == 1:
            return real_write(fd, bytes(data)[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store.os, "write", full_disk)
    with pytest.raises(StorageError, match="nothing was kept"):
        log.append(now_ms=NOW + 1, kind="entry", outcome="ok")
    assert path.stat().st_size == size and len(calls) == 2  # the half record was cut back
    monkeypatch.setattr(store.os, "write", real_write)  # space freed
    log.append(now_ms=NOW + 2, kind="entry", outcome="ok")
    log.close()
    again = AuditLog(path, KEY)  # the node starts again: the chain verifies
    assert len(list(again.records())) == 2
    again.close()
