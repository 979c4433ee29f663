"""The audit writer: one task owns the audit log; requests hand it records.

Appends happen off the event loop (a worker thread) and in batches with one fsync each, so
a request never waits for the disk and the log keeps up with bursts.  ``record`` waits only
when the bounded queue is full (backpressure, nothing dropped).  Closing drains the queue.

Retention: with ``retention_days``, the writer prunes records older than that at start and
then every ``prune_every`` seconds, in the same worker thread, between batches (it owns the
log's lock, so nobody else may rewrite the file while the node runs).
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

import trio

from .audit import AuditLog

__all__ = ["AuditWriter"]

log = logging.getLogger(__name__)
DAY_MS = 86_400_000
_PRUNE: dict[str, Any] = {"kind": "<prune>"}  # a queue item that is no record


class AuditWriter:
    def __init__(self, audit: AuditLog, max_pending: int = 4096, max_batch: int = 512, *,
                 retention_days: float | None = None, prune_every: float = 3600.0,
                 clock: Callable[[], float] = time.time) -> None:
        self.audit = audit
        self.max_batch = max_batch
        self.retention_days = retention_days
        self.prune_every = prune_every
        self.clock = clock  # wall-clock seconds (records' times, the retention cut-off)
        self._send, self._receive = trio.open_memory_channel[dict[str, Any]](max_pending)
        self.written = 0
        self.pruned = 0

    async def record(self, kind: str, outcome: str, *, receipt: bytes | None = None,
                     **fields: Any) -> None:
        """Queue one record (metadata only; see AuditRecord).  ``receipt``: the executor's
        signed receipt envelope, kept in the receipts file (the record gets its signature
        as ``receipt_sig``).  Cancel-safe."""
        item = {"kind": kind, "outcome": outcome, **fields}
        if receipt is not None:
            item["receipt"] = receipt
        await self._send.send(item)

    def close(self) -> None:
        """No more records; :meth:`run` returns once the queue is written."""
        self._send.close()

    def _write(self, batch: list[dict[str, Any]]) -> None:
        now_ms = int(self.clock() * 1000)
        for fields in batch:
            if fields is _PRUNE:
                self.audit.sync()
                self._prune(now_ms)
                continue
            try:
                self.audit.append(now_ms=now_ms, sync=False, **fields)
            except Exception:  # a bad record must not stop the log
                log.exception("audit record refused: %s", fields.get("kind"))
        self.audit.sync()

    def _prune(self, now_ms: int) -> None:
        assert self.retention_days is not None
        try:
            done = self.audit.prune(now_ms - int(self.retention_days * DAY_MS), now_ms=now_ms)
        except Exception:  # a failed prune must not stop the log; it is retried later
            log.exception("audit retention: prune failed")
            return
        if done.records:
            log.info("audit retention: pruned %d record(s) older than %g day(s)",
                     done.records, self.retention_days)
        self.pruned += done.records

    async def _prune_periodically(self) -> None:
        while True:
            try:
                await self._send.send(_PRUNE)
            except trio.ClosedResourceError:
                return
            await trio.sleep(self.prune_every)

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            if self.retention_days is not None:
                nursery.start_soon(self._prune_periodically)
            task_status.started()
            await self._drain()
            nursery.cancel_scope.cancel()

    async def _drain(self) -> None:
        async with self._receive:
            async for first in self._receive:
                batch = [first]
                while len(batch) < self.max_batch:
                    try:
                        batch.append(self._receive.receive_nowait())
                    except (trio.WouldBlock, trio.EndOfChannel):
                        break
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(self._write, batch)
                self.written += sum(item is not _PRUNE for item in batch)
