import trio

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
