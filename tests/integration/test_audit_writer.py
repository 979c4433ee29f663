import pytest
import trio
import trio.testing

import samples
from rbee_p2p.protocol.audit import verify_chain
from rbee_p2p.store.audit import AuditLog
from rbee_p2p.store.writer import AuditWriter


async def test_records_are_batched_written_and_drained_on_close(tmp_path):
    log = AuditLog(tmp_path / "audit.log", samples.key_a())
    writer = AuditWriter(log, max_batch=10)
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        for i in range(25):
            await writer.record("execute", "ok", tokens_out=i)
        await writer.record("bogus-kind", "ok")  # refused, logged, the log goes on
        await writer.record("note", "ok")
        writer.close()
    head, records = verify_chain(log.records(), expected_head=log.head)
    assert [r.tokens_out for r in records[:25]] == list(range(25))
    assert records[-1].kind == "note" and head.seq == 26 and writer.written == 27
    log.close()


async def test_a_record_with_a_receipt_keeps_it_and_carries_its_signature(tmp_path):
    from auditlogs import receipt_for

    log = AuditLog(tmp_path / "audit.log", samples.key_a())
    writer = AuditWriter(log)
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        await writer.record("entry", "ok", request_id=bytes(16), receipt=receipt_for(0))
        await writer.record("entry", "ok", receipt=b"not a receipt")  # refused, logged
        writer.close()
    _, records = verify_chain(log.records(), expected_head=log.head)
    assert len(records) == 1 and records[0].receipt_sig == receipt_for(0)[-64:]
    assert log.receipts() == [receipt_for(0)]
    log.close()


@pytest.fixture
def lazy_clock():
    # virtual time that jumps only after the loop idled 20 ms of real time, so that the
    # writer's worker thread (invisible to autojump) usually finishes before an hour passes
    return trio.testing.MockClock(autojump_threshold=0.02)


async def test_retention_prunes_at_start_and_then_periodically(tmp_path, lazy_clock):
    from auditlogs import DAY_MS, REF_A, fill

    now = {"ms": samples.NOW}
    log = fill(tmp_path / "audit.log", a=2, b=0, now_ms=samples.NOW - 40 * DAY_MS)
    writer = AuditWriter(log, retention_days=30, prune_every=3600,
                         clock=lambda: now["ms"] / 1000)

    async def until(predicate):
        with trio.fail_after(100 * 3600):  # virtual time; extra hourly prunes are harmless
            while not predicate():
                await trio.sleep(600)

    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        await until(lambda: writer.pruned == 5)  # the note and 2 requests (4 records)
        await writer.record("entry", "ok", tenant_ref=REF_A)
        await until(lambda: writer.written == 1)
        now["ms"] += 31 * DAY_MS
        await until(lambda: writer.pruned == 6)  # an hour later, the new record is old
        writer.close()
    verdict = verify_chain(log.records(), expected_head=log.head)
    kinds = [r.kind for r in verdict[1]]
    assert kinds == ["prune", "prune"] and log.receipts() == []
    log.close()


async def test_a_durable_record_returns_once_fsynced_and_raises_if_refused(tmp_path):
    from rbee_p2p.errors import InvalidSchema

    log = AuditLog(tmp_path / "audit.log", samples.key_a())
    writer = AuditWriter(log)
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        async with trio.open_nursery() as callers:  # concurrent callers share fsyncs
            for i in range(20):
                callers.start_soon(lambda i=i: writer.record("execute", "ok", tokens_out=i,
                                                             durable=True))
        assert writer.written == 20 and log.head.seq == 20  # all on disk already
        with pytest.raises(InvalidSchema):
            await writer.record("bogus", "ok", durable=True)
        writer.close()
    assert sorted(r.tokens_out for r in verify_chain(log.records())[1]) == list(range(20))
    log.close()
