"""Audit log append rate (goal: >= 1,000 records/s with fsync) and the cost of the rest.

    python bench/audit.py [--records N] [--dir DIR]

Measures, on a real file system (DIR, default a temporary directory under the system's
temp dir; use the disk your $RBEE_HOME is on):
- AuditWriter: records handed to the writer task as the request path does (entry records
  with every field, half of them with a ~470-byte receipt), batched fsync, until every record
  is durable (close + drain); and with concurrent callers that each wait for their record's
  fsync (durable=True: group commit);
- AuditLog.append with one fsync per record (the strictest mode);
- verify (the CLI's read-only check), erase of one tenant (a quarter of the records) and a
  prune that finds nothing (the node's hourly check).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).parent))
from common import table  # noqa: E402

from rbee_p2p.protocol.envelope import seal  # noqa: E402
from rbee_p2p.protocol.identity import NodeKey  # noqa: E402
from rbee_p2p.protocol.messages import Receipt  # noqa: E402
from rbee_p2p.store.audit import AuditLog  # noqa: E402
from rbee_p2p.store.audit_read import verify_log  # noqa: E402
from rbee_p2p.store.writer import AuditWriter  # noqa: E402

GOAL = 1000.0
ENTRY, EXEC = NodeKey.generate(), NodeKey.generate()
REFS = [bytes([i]) * 32 for i in range(4)]


def fields(i: int) -> dict[str, object]:
    return dict(request_id=i.to_bytes(16, "big"), tenant_ref=REFS[i % 4], model="smollm2",
                model_digest=bytes(32), entry_peer=ENTRY.peer_id, exec_peer=EXEC.peer_id,
                jurisdiction="EU", tokens_in=120, tokens_out=256, ttft_ms=31, total_ms=2700)


def receipt(i: int) -> bytes:
    body = Receipt(request_id=i.to_bytes(16, "big"), request_digest=bytes(32),
                   requester=ENTRY.peer_id, model="smollm2", model_digest=bytes(32),
                   tokens_in=120, tokens_out=256, ttft_ms=31, total_ms=2700, price=0,
                   jurisdiction="EU", output_digest=bytes(32))
    return seal(EXEC, body, now_ms=int(time.time() * 1000), ttl_ms=0)


def bench_writer(path: Path, n: int, receipts: list[bytes], callers: int = 0) -> float:
    """``callers`` = 0: one producer queues everything (fire and forget); else that many
    concurrent callers, each waiting until its record is fsynced (durable=True)."""
    log = AuditLog(path, ENTRY)
    writer = AuditWriter(log)

    async def caller(indices: range) -> None:
        for i in indices:
            await writer.record("entry", "ok", receipt=receipts[i] if i % 2 else None,
                                durable=True, **fields(i))

    async def main() -> float:
        async with trio.open_nursery() as nursery:
            await nursery.start(writer.run)
            start = time.perf_counter()
            if callers:
                async with trio.open_nursery() as group:
                    for c in range(callers):
                        group.start_soon(caller, range(c, n, callers))
            else:
                for i in range(n):
                    await writer.record("entry", "ok", receipt=receipts[i] if i % 2 else None,
                                        **fields(i))
            writer.close()
        return time.perf_counter() - start

    seconds = trio.run(main)
    assert writer.written == n and log.head.seq == n
    log.close()
    return n / seconds


def bench_append(path: Path, n: int) -> float:
    with AuditLog(path, ENTRY) as log:
        start = time.perf_counter()
        for i in range(n):
            log.append(now_ms=int(time.time() * 1000), kind="entry", outcome="ok", **fields(i))
        return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--records", type=int, default=20_000)
    parser.add_argument("--dir", type=Path, help="where to write (default: a temp dir)")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="rbee-audit-bench-", dir=args.dir))
    try:
        n = args.records
        receipts = [receipt(i) for i in range(n)]
        rows: list[list[object]] = [["measure", "result", "goal"]]
        rate = bench_writer(root / "writer.log", n, receipts)
        rows.append([f"AuditWriter, batched fsync ({n} records, half with receipts)",
                     f"**{rate:,.0f} records/s** ({rate / GOAL:.1f}x goal)", ">= 1,000/s"])
        for callers in (16, 64):
            m = min(n, 5000)
            rate = bench_writer(root / f"durable{callers}.log", m, receipts, callers)
            rows.append([f"AuditWriter, {callers} concurrent callers each waiting for its "
                         f"fsync (durable=True, {m} records)",
                         f"**{rate:,.0f} records/s** ({rate / GOAL:.1f}x goal)", ">= 1,000/s"])
        m = min(n, 3000)
        rate = bench_append(root / "append.log", m)
        rows.append([f"AuditLog.append, one fsync per record ({m} records)",
                     f"**{rate:,.0f} records/s** ({rate / GOAL:.1f}x goal)", ">= 1,000/s"])
        path = root / "writer.log"
        start = time.perf_counter()
        verdict = verify_log(path, signer=ENTRY.peer_id)
        seconds = time.perf_counter() - start
        assert verdict.ok, verdict.errors
        rows.append([f"audit verify ({n} records, {verdict.receipts} receipts)",
                     f"{seconds:.2f} s ({n / seconds:,.0f} records/s)", ""])
        with AuditLog(path, ENTRY) as log:
            start = time.perf_counter()
            done = log.erase(REFS[1], now_ms=int(time.time() * 1000))
            seconds = time.perf_counter() - start
            rows.append([f"erase one tenant ({done.records} of {n} records, "
                         f"{done.receipts} receipts), atomic rewrite",
                         f"{seconds:.2f} s", ""])
            start = time.perf_counter()
            nothing = log.prune(0, now_ms=int(time.time() * 1000), quick=True)
            seconds = time.perf_counter() - start
            assert nothing.records == 0
            rows.append(["prune that finds nothing old (the node's hourly check)",
                         f"{seconds * 1000:.0f} ms", ""])
        print(table(rows))
    finally:
        shutil.rmtree(root)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    main()
