"""The audit writer: one task owns the audit log; requests hand it records.

Appends happen off the event loop (a worker thread) and in batches with one fsync each, so
a request never waits for the disk and the log keeps up with bursts.  ``record`` waits only
when the bounded queue is full (backpressure, nothing dropped) — or, with ``durable=True``,
until the record's batch is fsynced (group commit: concurrent callers share one fsync).
Closing drains the queue.

A record the disk refuses (full) is lost, never half-written (the log truncates back), and
from then on :meth:`check` refuses new work -- nothing is served that could not be recorded
-- until the log's file system has room again (:data:`ROOM_BYTES`) and the next record is
written.

Retention: with ``retention_days``, the writer prunes records older than that at start and
then every ``prune_every`` seconds, in the same worker thread, between batches (it owns the
log's lock, so nobody else may rewrite the file while the node runs).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import trio

from ..errors import AuditUnavailable, StorageError
from .audit import AuditLog

__all__ = ["AuditWriter"]

log = logging.getLogger(__name__)
DAY_MS = 86_400_000
ROOM_BYTES = 1 << 20
"""Free space on the log's file system after which a failing log is tried again."""


@dataclass
class _Item:
    fields: dict[str, Any] = field(default_factory=dict)  # empty: a prune, not a record
    done: trio.Event | None = None  # set once fsynced (durable callers)
    error: Exception | None = None


class AuditWriter:
    def __init__(self, audit: AuditLog, max_pending: int = 4096, max_batch: int = 512, *,
                 retention_days: float | None = None, prune_every: float = 3600.0,
                 clock: Callable[[], float] = time.time) -> None:
        self.audit = audit
        self.max_batch = max_batch
        self.retention_days = retention_days
        self.prune_every = prune_every
        self.clock = clock  # wall-clock seconds (records' times, the retention cut-off)
        self._send, self._receive = trio.open_memory_channel[_Item](max_pending)
        self.written = 0
        self.pruned = 0
        self.failing: str | None = None  # why the last record could not be written
        self.lost = 0  # records the disk refused

    async def record(self, kind: str, outcome: str, *, receipt: bytes | None = None,
                     durable: bool = False, **fields: Any) -> None:
        """Queue one record (metadata only; see AuditRecord).  ``receipt``: the executor's
        signed receipt envelope, kept in the receipts file (the record gets its signature
        as ``receipt_sig``).  ``durable``: return only once the record is fsynced, and
        raise the append's error (e.g. InvalidSchema) if it was refused; otherwise a
        refused record is logged.  Cancel-safe: a cancelled durable wait still writes."""
        item = _Item({"kind": kind, "outcome": outcome, "receipt": receipt, **fields},
                     trio.Event() if durable else None)
        await self._send.send(item)
        if item.done is not None:
            await item.done.wait()
            if item.error is not None:
                raise item.error

    def check(self) -> None:
        """Raise AuditUnavailable (503) while the log cannot be written: its last record
        failed and its file system still has less than ROOM_BYTES free."""
        if self.failing is None:
            return
        try:
            stat = os.statvfs(os.path.dirname(self.audit.path) or ".")
            if stat.f_bavail * stat.f_frsize >= ROOM_BYTES:
                self.failing = None  # room again: the next record will say
                return
        except OSError:
            pass
        raise AuditUnavailable(f"this node cannot write its audit log ({self.failing}); "
                               "it serves nothing it could not record until there is room",
                               retry_after=5.0)

    def close(self) -> None:
        """No more records; :meth:`run` returns once the queue is written."""
        self._send.close()

    def _write(self, batch: list[_Item]) -> None:
        now_ms = int(self.clock() * 1000)
        for item in batch:
            if not item.fields:
                self.audit.sync()
                self._prune(now_ms)
                continue
            try:
                self.audit.append(now_ms=now_ms, sync=False, **item.fields)
                self.failing = None
            except StorageError as exc:  # the disk refused it: nothing of it was kept
                item.error = exc
                self.lost += 1
                if self.failing is None:
                    log.error("audit log: %s; refusing requests until it can be written", exc)
                self.failing = str(exc)
            except Exception as exc:  # a bad record must not stop the log
                item.error = exc
                if item.done is None:
                    log.exception("audit record refused: %s", item.fields.get("kind"))
        self.audit.sync()

    def _prune(self, now_ms: int) -> None:
        assert self.retention_days is not None
        try:
            done = self.audit.prune(now_ms - int(self.retention_days * DAY_MS), now_ms=now_ms,
                                    quick=True)
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
                await self._send.send(_Item())
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
                for item in batch:
                    if item.done is not None:
                        item.done.set()
                self.written += sum(bool(item.fields) for item in batch)
