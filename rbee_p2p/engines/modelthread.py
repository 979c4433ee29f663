"""One long-lived OS thread per model.

llama.cpp (OpenMP) keeps a worker team per calling OS thread; calling a model from changing
threads oversubscribes the cores and makes requests 1.5-3x slower (DESIGN.md, engine notes).
So every call into a model runs on the one thread this class owns, in submission order.
Results come back to trio through its token (``run_sync_soon``): no thread per call.
"""

from __future__ import annotations

import queue
import threading
from typing import Any, Callable

import outcome
import trio

__all__ = ["ModelThread"]


class ModelThread:
    def __init__(self, name: str) -> None:
        self._jobs: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name=f"model:{name}", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while (job := self._jobs.get()) is not None:
            job()

    def submit(self, job: Callable[[], None]) -> None:
        """Queue ``job`` (it must not raise; report failures through your own channel)."""
        self._jobs.put(job)

    async def call(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the model thread and return its result (or raise its exception).

        Cancelling the caller stops the wait, not ``fn``: it still runs to completion.
        """
        token = trio.lowlevel.current_trio_token()
        done = trio.Event()
        box: list[outcome.Outcome[Any]] = []

        def job() -> None:
            box.append(outcome.capture(fn))
            try:
                token.run_sync_soon(done.set)
            except trio.RunFinishedError:
                pass

        self.submit(job)
        await done.wait()
        return box[0].unwrap()

    def close(self, timeout: float = 5.0) -> None:
        """Stop after the queued jobs; wait up to ``timeout`` seconds for the thread."""
        self._jobs.put(None)
        self._thread.join(timeout)
