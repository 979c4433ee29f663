"""A request running on this node's engines: text, embeddings or images, one job shape.

The job waits in the model's FIFO (the scheduler: bounded, 503 + Retry-After when full),
image jobs then for their device's image slot (text never waits for images), and counts
what it did.  A job this node took itself leaves an ``entry`` audit record; a job run for
a peer is recorded by the executor (``execute``).
"""

from __future__ import annotations

import logging
import os
import struct
import time
from contextlib import aclosing
from typing import TYPE_CHECKING, Any, AsyncIterator

import trio

from ..engines.base import Completion, TextEngine
from ..trace import mark
from .request import Request, Stamp

if TYPE_CHECKING:
    from .dispatcher import Dispatcher

__all__ = ["LocalJob", "cancelled"]

log = logging.getLogger(__name__)


class LocalJob:
    """``prepared`` is the engine's own form of the request (tokenized text, a resolved
    image job; unused for embeddings), made before the job is queued so that a bad
    request fails before anything starts."""

    where = None

    def __init__(self, dispatcher: Dispatcher, engine: TextEngine, request: Request,
                 prepared: Any, stamp: Stamp = Stamp(), *, entry: bool = True,
                 request_id: bytes | None = None) -> None:
        self.dispatcher = dispatcher
        self.engine = engine
        self.request = request
        self.prepared = prepared
        self.stamp = stamp
        self.entry = entry  # leave the entry record (False: run for a peer)
        self.completion = Completion()
        self.request_id = request_id or os.urandom(16)  # a peer's job keeps the peer's id
        self.items: list[bytes] = []
        self.first: float | None = None  # when the first output was ready (perf_counter)

    @property
    def model_digest(self) -> bytes:
        return self.engine.card.digest

    async def batches(self) -> AsyncIterator[list[str]]:
        started = time.perf_counter()
        outcome = "error"
        try:
            async with self.dispatcher.scheduler.admit(self.engine, remote=not self.entry):
                if self.request.kind == "embedding":
                    await self._embed()
                elif self.request.kind == "image":
                    await self._images()
                else:
                    async with aclosing(self._text()) as text:
                        async for batch in text:
                            yield batch
            outcome = "ok"
        except BaseException as exc:
            if cancelled(exc):
                outcome = "cancelled"
            raise
        finally:
            if self.entry:
                await self.dispatcher.record_entry(
                    self, outcome, model_digest=self.engine.card.digest,
                    ttft_ms=int(((self.first or time.perf_counter()) - started) * 1000),
                    total_ms=int((time.perf_counter() - started) * 1000))

    async def _text(self) -> AsyncIterator[list[str]]:
        completion = self.completion
        try:
            async with aclosing(self.engine.stream(self.prepared, completion)) as stream:
                async for batch in stream:
                    if self.first is None:
                        self.first = time.perf_counter()
                        mark("engine_first", self.request_id)
                    yield batch
        finally:
            self.dispatcher.account(self.engine.card.name, completion, self.first)

    async def _embed(self) -> None:
        result = await self.engine.embed(list(self.request.inputs))
        self.first = time.perf_counter()
        self.items = [struct.pack(f"<{len(v)}f", *v) for v in result.vectors]
        self.completion.prompt_tokens = result.prompt_tokens
        self.completion.finish_reason = "stop"
        self.dispatcher.count(self.engine.card.name)

    async def _images(self) -> None:
        engine, job, name = self.engine, self.prepared, self.engine.card.name
        counters = self.dispatcher
        async with counters.capacity_limiter(engine.card.device, "image"):
            started = time.perf_counter()
            try:
                result = await engine.generate(job)  # type: ignore[attr-defined]
            except BaseException:
                counters.failures[name] = counters.failures.get(name, 0) + 1
                raise
        self.first = time.perf_counter()
        self.items = list(result.images)
        self.completion.completion_tokens = len(self.items)  # an image counts as a token
        self.completion.finish_reason = "stop"
        counters.count(name)
        counters.images_generated[name] = counters.images_generated.get(name, 0) + \
            len(self.items)
        log.info("%s: %d image(s) %dx%d, %d steps in %.2fs", name, len(self.items),
                 job.width, job.height, job.steps, self.first - started)


def cancelled(exc: BaseException) -> bool:
    """Whether ``exc`` is the job being stopped (client gone, cancel) rather than failing."""
    return isinstance(exc, (GeneratorExit, trio.Cancelled)) or (
        isinstance(exc, BaseExceptionGroup) and all(cancelled(e) for e in exc.exceptions))
