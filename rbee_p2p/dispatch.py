"""Where a request runs: here or on a peer.  Asks the routing policy, then starts a job.

A *job* is a started generation with one interface whatever runs it: ``batches()`` yields
lists of text pieces and fills ``completion``; closing it stops the generation (a local
model within one token; a peer through a Cancel frame).  Failures before the first token
move on to the next candidate; what the client got wrong (400) does not.
"""

from __future__ import annotations

import logging
import time
from contextlib import aclosing
from typing import Any, AsyncIterator, Literal, Protocol

from .api.schemas import ChatCall
from .engines.base import Completion, Prepared, TextEngine
from .engines.scheduler import Scheduler
from .errors import Busy, EngineFailure, RequestError
from .routing import Offer, RouteRequest, fastest_expected_completion

__all__ = ["Job", "LocalJob", "Remote", "PeerUnavailable", "Dispatcher", "Kind"]

log = logging.getLogger(__name__)
Kind = Literal["chat", "completion"]


class PeerUnavailable(EngineFailure):
    """A peer could not be reached or stopped answering; the next candidate may be tried."""


class Job(Protocol):
    completion: Completion
    where: bytes | None  # the executing peer, None for this node

    def batches(self) -> AsyncIterator[list[str]]: ...


class Remote(Protocol):
    """What dispatching needs from the mesh."""

    def offers(self, model: str) -> list[Offer]: ...

    def serves(self, model: str) -> bool: ...

    async def start(self, peer_id: bytes, call: ChatCall, kind: Kind) -> Job:
        """Open a job on ``peer_id`` and wait for its first frame.  Raises
        :class:`PeerUnavailable` (try elsewhere) or a :class:`RequestError` (the peer's
        verdict on the request)."""
        ...

    def report_failure(self, peer_id: bytes) -> None: ...

    async def embeddings(self, model: str, body: dict[str, Any],
                         n: int) -> tuple[list[list[float]], int]:
        """(vectors, prompt tokens) from a peer serving ``model``.  Raises RequestError."""
        ...


class LocalJob:
    """A job on this node's engine, admitted by the scheduler (FIFO per model)."""

    where = None

    def __init__(self, dispatcher: Dispatcher, engine: TextEngine, prepared: Prepared) -> None:
        self.dispatcher = dispatcher
        self.engine = engine
        self.prepared = prepared
        self.completion = Completion()

    async def batches(self) -> AsyncIterator[list[str]]:
        completion = self.completion
        first: float | None = None
        async with self.dispatcher.scheduler.admit(self.engine):
            try:
                async with aclosing(self.engine.stream(self.prepared, completion)) as stream:
                    async for batch in stream:
                        if first is None:
                            first = time.perf_counter()
                        yield batch
            finally:
                self.dispatcher.account(self.engine.card.name, completion, first)


class Dispatcher:
    def __init__(self, scheduler: Scheduler, remote: Remote | None = None) -> None:
        self.scheduler = scheduler
        self.remote = remote
        self.tokens_generated: dict[str, int] = {}
        self.requests_served: dict[str, int] = {}
        self.tokens_per_s: dict[str, float] = {}  # measured decode speed (moving average)

    def account(self, model: str, completion: Completion, first: float | None) -> None:
        """Count a finished local job and update the model's measured decode speed."""
        self.tokens_generated[model] = self.tokens_generated.get(model, 0) + \
            completion.completion_tokens
        self.requests_served[model] = self.requests_served.get(model, 0) + 1
        if first is not None and completion.completion_tokens > 8:
            elapsed = time.perf_counter() - first
            if elapsed > 0:
                rate = (completion.completion_tokens - 1) / elapsed
                old = self.tokens_per_s.get(model)
                self.tokens_per_s[model] = rate if old is None else 0.8 * old + 0.2 * rate

    def local_offer(self, engine: TextEngine) -> Offer:
        load = self.scheduler.load(engine.card.name)
        return Offer(peer_id=None, tokens_per_s=self.tokens_per_s.get(engine.card.name, 0.0),
                     queue_depth=load.queue_depth, active_jobs=load.active,
                     max_queue=self.scheduler.max_queue)

    def plan(self, call: ChatCall) -> tuple[TextEngine | None, list[Offer]]:
        engine = self.scheduler.find(call.model)
        offers = [self.local_offer(engine)] if engine is not None else []
        if self.remote is not None:
            offers += self.remote.offers(call.model)
        if not offers and not (self.remote is not None and self.remote.serves(call.model)):
            self.scheduler.lookup(call.model)  # raises ModelNotFound with the usual message
        ranked = fastest_expected_completion(
            RouteRequest(model=call.model, max_tokens=call.request.max_tokens), offers)
        return engine, ranked

    async def start(self, call: ChatCall, kind: Kind) -> Job:
        """Pick where ``call`` runs and start it there.

        Raises :class:`InvalidRequest` (the request is wrong: no retry elsewhere),
        :class:`ModelNotFound`, :class:`Busy` (every candidate is full) or
        :class:`EngineFailure` (no candidate could be reached).
        """
        engine, ranked = self.plan(call)
        failure: RequestError | None = None
        for offer in ranked:
            if offer.local:
                assert engine is not None
                prepared = engine.prepare(call.request)
                self.scheduler.check(engine)
                return LocalJob(self, engine, prepared)
            assert self.remote is not None and offer.peer_id is not None
            try:
                return await self.remote.start(offer.peer_id, call, kind)
            except PeerUnavailable as exc:
                log.warning("peer unavailable, trying the next one: %s", exc)
                self.remote.report_failure(offer.peer_id)
                failure = exc
            except Busy as exc:
                failure = exc
        if failure is not None:
            raise failure
        raise Busy(f"every node serving {call.model} is busy; retry later", retry_after=1)
