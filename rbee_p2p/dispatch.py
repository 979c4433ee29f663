"""Where a request runs: here or on a peer.  Asks the routing policy, then starts a job.

A *job* is a started generation with one interface whatever runs it: ``batches()`` yields
lists of text pieces and fills ``completion``; closing it stops the generation (a local
model within one token; a peer through a Cancel frame).  Failures before the first token
move on to the next candidate; what the client got wrong (400) does not.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any, AsyncIterator, Awaitable, Callable, Iterator, Literal, Protocol

import trio

from .api.schemas import ChatCall
from .engines.base import Completion, Prepared, TextEngine
from .engines.scheduler import Scheduler
from .errors import Busy, EngineFailure, Forbidden, ModelUnavailable, RequestError
from .routing import (Decision, ModelFacts, PeerFacts, Policy, Ranked, RequestFacts, Snapshot,
                      TenantFacts, decide, fastest)
from .store.writer import AuditWriter

__all__ = ["Job", "LocalJob", "Failover", "Remote", "PeerUnavailable", "Dispatcher", "Kind",
           "Stamp", "Router", "builtin_router", "request_facts"]

log = logging.getLogger(__name__)
Kind = Literal["chat", "completion"]


class PeerUnavailable(EngineFailure):
    """A peer could not be reached or stopped answering; the next candidate may be tried."""


@dataclass(frozen=True)
class Stamp:
    """What a request carries about its tenant: for peers a keyed hash (never the key or
    name) and the residency the executor must satisfy; for this node's routing policy the
    tenant's facts (name, tier, residency)."""

    tenant_ref: bytes | None = None
    tenant: TenantFacts | None = None

    @property
    def residency(self) -> str | None:
        return self.tenant.residency if self.tenant is not None else None


Router = Callable[[RequestFacts, Snapshot], Awaitable[Decision]]


def builtin_router(policy: Policy = fastest) -> Router:
    async def route(request: RequestFacts, snapshot: Snapshot) -> Decision:
        return decide(policy, request, snapshot, getattr(policy, "__name__", ""))

    return route


def request_facts(call: ChatCall, tenant: TenantFacts | None,
                  modality: str = "text") -> RequestFacts:
    """Facts for the policy; the prompt's size is estimated (4 characters a token) because
    it is tokenized only where it runs."""
    r = call.request
    chars = len(r.prompt or "") + sum(len(m.get("content") or "") for m in r.messages or ())
    return RequestFacts(model=call.model, modality=modality, max_tokens=r.max_tokens,
                        prompt_tokens=chars // 4, tenant=tenant)


class Job(Protocol):
    completion: Completion
    where: bytes | None  # the executing peer, None for this node
    request_id: bytes

    def batches(self) -> AsyncIterator[list[str]]: ...


class Remote(Protocol):
    """What dispatching needs from the mesh."""

    async def candidates(self, model: str, modality: str) -> tuple[PeerFacts, ...]:
        """The peers to rank for ``model``: all live ones, or in a large swarm a few
        sampled and probed for their current load."""
        ...

    def serves(self, model: str) -> bool: ...

    async def start(self, peer_id: str, call: ChatCall, kind: Kind, stamp: Stamp) -> Job:
        """Open a job on ``peer_id`` and wait for its first frame.  Raises
        :class:`PeerUnavailable` (try elsewhere) or a :class:`RequestError` (the peer's
        verdict on the request)."""
        ...

    def report_failure(self, peer_id: str) -> None: ...

    async def embeddings(self, model: str, body: dict[str, Any],
                         n: int) -> tuple[list[list[float]], int]:
        """(vectors, prompt tokens) from a peer serving ``model``.  Raises RequestError."""
        ...


class LocalJob:
    """A job on this node's engine, admitted by the scheduler (FIFO per model).  When it
    ends it leaves an "entry" audit record (this node both took and ran it)."""

    where = None

    def __init__(self, dispatcher: Dispatcher, engine: TextEngine, prepared: Prepared,
                 stamp: Stamp = Stamp()) -> None:
        self.dispatcher = dispatcher
        self.engine = engine
        self.prepared = prepared
        self.stamp = stamp
        self.completion = Completion()
        self.request_id = os.urandom(16)

    async def batches(self) -> AsyncIterator[list[str]]:
        completion = self.completion
        started = time.perf_counter()
        first: float | None = None
        outcome = "error"
        try:
            async with self.dispatcher.scheduler.admit(self.engine):
                try:
                    async with aclosing(self.engine.stream(self.prepared, completion)) as stream:
                        async for batch in stream:
                            if first is None:
                                first = time.perf_counter()
                            yield batch
                    outcome = "ok"
                finally:
                    self.dispatcher.account(self.engine.card.name, completion, first)
        except BaseException as exc:
            if _cancelled(exc):
                outcome = "cancelled"
            raise
        finally:
            await self.dispatcher.record_entry(
                self, outcome, model_digest=self.engine.card.digest,
                ttft_ms=int(((first or time.perf_counter()) - started) * 1000),
                total_ms=int((time.perf_counter() - started) * 1000))


def _cancelled(exc: BaseException) -> bool:
    return isinstance(exc, (GeneratorExit, trio.Cancelled)) or (
        isinstance(exc, BaseExceptionGroup) and all(_cancelled(e) for e in exc.exceptions))


class Dispatcher:
    def __init__(self, scheduler: Scheduler, remote: Remote | None = None, *,
                 local_id: str = "local", jurisdiction: str = "",
                 router: Router | None = None, audit: AuditWriter | None = None,
                 peer: bytes | None = None) -> None:
        self.scheduler = scheduler
        self.audit = audit
        self.peer = peer  # this node's peer id (bytes), for audit records
        self.remote = remote
        self.local_id = local_id
        self.jurisdiction = jurisdiction
        self.router = router or builtin_router()
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

    async def record_entry(self, job: LocalJob, outcome: str, **fields: Any) -> None:
        """The audit record of a request this node took and ran itself."""
        if self.audit is None:
            return
        c = job.completion
        with trio.CancelScope(shield=True):
            await self.audit.record(
                "entry", outcome, request_id=job.request_id, tenant_ref=job.stamp.tenant_ref,
                model=job.engine.card.name, entry_peer=self.peer, exec_peer=self.peer,
                jurisdiction=self.jurisdiction or None, tokens_in=c.prompt_tokens,
                tokens_out=c.completion_tokens, **fields)

    def local_facts(self, engine: TextEngine) -> PeerFacts:
        name = engine.card.name
        load = self.scheduler.load(name)
        return PeerFacts(id=self.local_id, local=True, models=(ModelFacts(
            name, engine.card.modality, self.tokens_per_s.get(name, 0.0)),),
            queue_depth=load.queue_depth, active_jobs=load.active,
            max_queue=self.scheduler.max_queue, jurisdiction=self.jurisdiction)

    async def plan(self, facts: RequestFacts) -> tuple[TextEngine | None, Ranked]:
        """Where ``facts`` may run, best first.  Raises ModelNotFound, Forbidden or Busy."""
        engine = self.scheduler.find(facts.model)
        if engine is not None and engine.card.name != facts.model:  # an alias
            facts = dataclasses.replace(facts, model=engine.card.name)
        local = self.local_facts(engine) if engine is not None else None
        peers = await self.remote.candidates(facts.model, facts.modality) \
            if self.remote is not None else ()
        if local is None and not (self.remote is not None and self.remote.serves(facts.model)):
            self.scheduler.lookup(facts.model)  # raises ModelNotFound with the usual message
        decision = await self.router(facts, Snapshot(local, peers, int(time.time() * 1000)))
        if isinstance(decision, Ranked):
            return engine, decision
        if decision.kind == "busy":
            raise Busy(decision.reason, retry_after=1)
        if decision.kind == "unavailable":
            raise ModelUnavailable(decision.reason)
        raise Forbidden(decision.reason)

    async def start(self, call: ChatCall, kind: Kind, stamp: Stamp = Stamp()) -> Job:
        """Pick where ``call`` runs and start it there.

        Raises :class:`InvalidRequest` (the request is wrong: no retry elsewhere),
        :class:`ModelNotFound`, :class:`Forbidden` (residency or policy), :class:`Busy`
        (every candidate is full) or :class:`EngineFailure` (no candidate could be reached).
        """
        local = self.scheduler.find(call.model)
        if local is not None and local.card.modality != "text":
            local.prepare(call.request)  # raises InvalidRequest naming the right route
        engine, ranked = await self.plan(request_facts(call, stamp.tenant))
        candidates = iter(ranked.candidates)
        job = await self.start_next(candidates, engine, call, kind, stamp)
        return job if isinstance(job, LocalJob) else Failover(
            job, lambda: self.start_next(candidates, engine, call, kind, stamp))

    async def start_next(self, candidates: Iterator[str], engine: TextEngine | None,
                         call: ChatCall, kind: Kind, stamp: Stamp) -> Job:
        """Start ``call`` on the first of ``candidates`` that takes it (consuming them)."""
        failure: RequestError | None = None
        for pid in candidates:
            if pid == self.local_id:
                assert engine is not None
                prepared = engine.prepare(call.request)
                self.scheduler.check(engine)
                return LocalJob(self, engine, prepared, stamp)
            assert self.remote is not None
            try:
                return await self.remote.start(pid, call, kind, stamp)
            except PeerUnavailable as exc:
                log.warning("peer unavailable, trying the next one: %s", exc)
                self.remote.report_failure(pid)
                failure = exc
            except Busy as exc:
                failure = exc
        if failure is not None:
            raise failure
        raise Busy(f"every node serving {call.model} is busy; retry later", retry_after=1)


class Failover:
    """A job on a peer that, until its first token, can still move: a peer accepts a job
    at once (so the answer can start) but may die before producing anything; then the
    next candidate takes over and the client never notices."""

    def __init__(self, job: Job, start_next: Callable[[], Awaitable[Job]]) -> None:
        self.job = job
        self.start_next = start_next

    @property
    def completion(self) -> Completion:
        return self.job.completion

    @property
    def where(self) -> bytes | None:
        return self.job.where

    @property
    def request_id(self) -> bytes:
        return self.job.request_id

    async def batches(self) -> AsyncIterator[list[str]]:
        while True:
            try:
                async with aclosing(self.job.batches()) as batches:
                    async for batch in batches:
                        yield batch
                return
            except PeerUnavailable as exc:  # raised only before the first token
                log.warning("%s; trying the next candidate", exc)
                self.job = await self.start_next()
