"""The audit writer: one task owns the audit log; requests hand it records.

Appends happen off the event loop (a worker thread) and in batches with one fsync each, so
a request never waits for the disk and the log keeps up with bursts.  ``record`` waits only
when the bounded queue is full (backpressure, nothing dropped).  Closing drains the queue.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import trio

from .audit import AuditLog

__all__ = ["AuditWriter"]

log = logging.getLogger(__name__)


class AuditWriter:
    def __init__(self, audit: AuditLog, max_pending: int = 4096, max_batch: int = 512) -> None:
        self.audit = audit
        self.max_batch = max_batch
        self._send, self._receive = trio.open_memory_channel[dict[str, Any]](max_pending)
        self.written = 0

    async def record(self, kind: str, outcome: str, **fields: Any) -> None:
        """Queue one record (metadata only; see AuditRecord).  Cancel-safe."""
        await self._send.send({"kind": kind, "outcome": outcome, **fields})

    def close(self) -> None:
        """No more records; :meth:`run` returns once the queue is written."""
        self._send.close()

    def _write(self, batch: list[dict[str, Any]]) -> None:
        now_ms = int(time.time() * 1000)
        for fields in batch:
            try:
                self.audit.append(now_ms=now_ms, sync=False, **fields)
            except Exception:  # a bad record must not stop the log
                log.exception("audit record refused: %s", fields.get("kind"))
        self.audit.sync()

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
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
                self.written += len(batch)
