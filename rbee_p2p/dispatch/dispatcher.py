"""The one request path: where a request runs, here or on a peer, for every modality.

``Dispatcher.start`` takes a typed :class:`Request` (chat, completion, embedding, image)
from any entry, asks the routing policy (built-in or Starlark, pins, residency) to rank
this node and the peers, and starts a job on the first candidate that takes it: a
:class:`LocalJob` on this node's engine or the mesh's remote job.  A peer that fails
before any output hands over to the next candidate (:class:`Failover`); what the client
got wrong (400) does not move.  ``Dispatcher.run_here`` is the same path's other end: a
peer's request admitted to this node's engines (the executor calls it).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from contextlib import aclosing
from typing import Any, AsyncIterator, Awaitable, Callable, Iterator, Protocol

import trio

from ..engines.base import Completion, TextEngine
from ..engines.scheduler import Scheduler
from ..errors import (Busy, Forbidden, InvalidRequest, ModelNotFound, ModelUnavailable,
                      PeerRefused, PeerUnavailable, RequestError, Unreachable)
from ..routing import (Decision, ModelFacts, PeerFacts, Policy, Ranked, RequestFacts, Snapshot,
                       TenantFacts, decide, expected_ms, fastest)
from ..routing.probing import refuses
from ..store.writer import AuditWriter
from .drain import Drain
from .local import LocalJob
from .request import Job, Request, Stamp

__all__ = ["Dispatcher", "Failover", "Remote", "Router", "builtin_router", "request_facts"]

log = logging.getLogger(__name__)
UNREACHABLE_RETRY_S = 5  # Retry-After when no node serving a model can be reached

Router = Callable[[RequestFacts, Snapshot], Awaitable[Decision]]


def builtin_router(policy: Policy = fastest) -> Router:
    async def route(request: RequestFacts, snapshot: Snapshot) -> Decision:
        return decide(policy, request, snapshot, getattr(policy, "__name__", ""))

    return route


def request_facts(request: Request, tenant: TenantFacts | None) -> RequestFacts:
    """Facts for the policy; the prompt's size is estimated (4 characters a token) because
    it is tokenized only where it runs."""
    return RequestFacts(model=request.model, modality=request.modality,
                        max_tokens=request.units, prompt_tokens=request.prompt_chars() // 4,
                        tenant=tenant, kind=request.kind)


class Remote(Protocol):
    """What dispatching needs from the mesh."""

    async def candidates(self, model: str, modality: str) -> tuple[PeerFacts, ...]:
        """The peers to rank for ``model``: all live ones, or in a large swarm a few
        sampled and probed for their current load."""
        ...

    def serves(self, model: str, modality: str) -> bool: ...

    async def start(self, peer_id: str, request: Request, stamp: Stamp) -> Job:
        """Open a job on ``peer_id`` and wait for its first frame.  Raises
        :class:`PeerUnavailable` (try elsewhere) or a :class:`RequestError` (the peer's
        verdict on the request)."""
        ...

    def report_failure(self, peer_id: str) -> None: ...

    def gone_since(self, model: str) -> float | None:
        """Seconds since the last peer serving ``model`` died or left, if that was recent
        (None: no peer served it lately)."""
        ...

    def models(self) -> list[tuple[str, str, str]]:
        """(model, modality, peer id) for every model a live peer advertises."""
        ...


class Dispatcher:
    def __init__(self, scheduler: Scheduler, remote: Remote | None = None, *,
                 local_id: str = "local", jurisdiction: str = "",
                 router: Router | None = None, audit: AuditWriter | None = None,
                 peer: bytes | None = None, capacity: Any = None) -> None:
        self.scheduler = scheduler
        self.drain = Drain()  # the node's way out: new work refused, running work drained
        self.capacity = capacity  # engines.admission.Capacity: per-device image slots
        self.audit = audit
        self.peer = peer  # this node's peer id (bytes), for audit records
        self.remote = remote
        self.local_id = local_id
        self.jurisdiction = jurisdiction
        self.router = router or builtin_router()
        self.tokens_generated: dict[str, int] = {}
        self.requests_served: dict[str, int] = {}
        self.images_generated: dict[str, int] = {}
        self.failures: dict[str, int] = {}
        self.tokens_per_s: dict[str, float] = {}  # measured decode speed (moving average)
        self._image_slot = trio.CapacityLimiter(1)  # without a Capacity: one image at a time

    # -- counting and auditing ------------------------------------------------------------

    def count(self, model: str) -> None:
        self.requests_served[model] = self.requests_served.get(model, 0) + 1

    def account(self, model: str, completion: Completion, first: float | None) -> None:
        """Count a finished local text job and update the model's measured decode speed."""
        self.tokens_generated[model] = self.tokens_generated.get(model, 0) + \
            completion.completion_tokens
        self.count(model)
        if first is not None and completion.completion_tokens > 8:
            elapsed = time.perf_counter() - first
            if elapsed > 0:
                rate = (completion.completion_tokens - 1) / elapsed
                old = self.tokens_per_s.get(model)
                self.tokens_per_s[model] = rate if old is None else 0.8 * old + 0.2 * rate

    def capacity_limiter(self, device: str, modality: str) -> trio.CapacityLimiter:
        if self.capacity is None:
            return self._image_slot
        return self.capacity.limiter(device, modality)  # type: ignore[no-any-return]

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

    # -- routing --------------------------------------------------------------------------

    def local_facts(self, engine: TextEngine) -> PeerFacts:
        name = engine.card.name
        load = self.scheduler.load(name)
        return PeerFacts(id=self.local_id, local=True, models=(ModelFacts(
            name, engine.card.modality, self.tokens_per_s.get(name, 0.0)),),
            queue_depth=load.queue_depth, active_jobs=load.active,
            max_queue=self.scheduler.max_queue, jurisdiction=self.jurisdiction)

    def engine_for(self, request: Request) -> TextEngine | None:
        """This node's engine for ``request``, or None.  Raises InvalidRequest when the
        model here is of another modality (an image model asked for text, ...)."""
        engine = self.scheduler.find(request.model)
        if engine is None:
            return None
        modality = engine.card.modality
        if request.kind == "image" and modality != "image":
            names = ", ".join(e.card.name for e in self.scheduler.engines
                              if e.card.modality == "image") or "none here"
            raise InvalidRequest(f"model '{request.model}' does not generate images; use an "
                                 f"image model ({names})", param="model")
        if request.kind != "image" and modality == "image":
            raise InvalidRequest(f"model '{request.model}' is an image model: use "
                                 "/v1/images/generations", param="model")
        return engine

    async def plan(self, request: Request, stamp: Stamp) -> tuple[TextEngine | None, Ranked]:
        """Where ``request`` may run, best first.  Raises ModelNotFound, ModelUnavailable,
        InvalidRequest (a model of the other modality), Forbidden or Busy."""
        engine = self.engine_for(request)
        facts = request_facts(request, stamp.tenant)
        if engine is not None and engine.card.name != facts.model:  # an alias
            facts = dataclasses.replace(facts, model=engine.card.name)
        local = self.local_facts(engine) if engine is not None else None
        remote = self.remote
        peers = await remote.candidates(facts.model, facts.modality) if remote else ()
        if local is None and not (remote is not None and
                                  remote.serves(facts.model, facts.modality)):
            ago = remote.gone_since(facts.model) if remote is not None else None
            if ago is not None and self.scheduler.find(facts.model) is None \
                    and facts.model not in self.scheduler.unavailable:
                raise Unreachable(f"model {facts.model} is served only by nodes that went "
                                  f"away {ago:.0f} s ago; retry when one is back",
                                  retry_after=UNREACHABLE_RETRY_S)
            self.scheduler.lookup(facts.model)  # raises ModelNotFound / ModelUnavailable
        decision = await self.router(facts, Snapshot(local, peers, int(time.time() * 1000)))
        if isinstance(decision, Ranked):
            return engine, decision
        if decision.kind == "busy":
            raise Busy(decision.reason, retry_after=1)
        if decision.kind == "unavailable":
            raise ModelUnavailable(decision.reason)
        raise Forbidden(decision.reason)

    async def start(self, request: Request, stamp: Stamp = Stamp()) -> Job:
        """Pick where ``request`` runs and start it there.

        Raises :class:`InvalidRequest` (the request is wrong: no retry elsewhere),
        :class:`ModelNotFound`, :class:`Forbidden` (residency or policy), :class:`Busy`
        (every candidate is full) or :class:`PeerUnavailable` (no candidate could be reached
        or would take it).
        """
        self.drain.check()
        if self.audit is not None:
            self.audit.check()
        engine, ranked = await self.plan(request, stamp)
        candidates = iter(ranked.candidates)
        job = await self._start_next(candidates, engine, request, stamp)
        return job if isinstance(job, LocalJob) else Failover(
            job, lambda failure: self._start_next(candidates, engine, request, stamp, failure))

    async def _start_next(self, candidates: Iterator[str], engine: TextEngine | None,
                          request: Request, stamp: Stamp,
                          failure: RequestError | None = None) -> Job:
        """Start ``request`` on the first of ``candidates`` that takes it (consuming them);
        when none does, raise the last candidate's refusal or failure (``failure``: that of
        the one before them)."""
        for pid in candidates:
            if pid == self.local_id:
                assert engine is not None
                return self._local_job(engine, request, stamp)
            assert self.remote is not None
            try:
                return await self.remote.start(pid, request, stamp)
            except PeerRefused as exc:  # it answered: no mark against it
                log.info("peer refused, trying the next one: %s", exc)
                failure = exc
            except PeerUnavailable as exc:
                log.warning("peer unavailable, trying the next one: %s", exc)
                self.remote.report_failure(pid)
                failure = exc
            except Busy as exc:
                failure = exc
        if isinstance(failure, PeerUnavailable) and not isinstance(failure, PeerRefused):
            # the details (the transport's) are in the log; the client gets a plain answer
            raise Unreachable(f"no node serving {request.model} can be reached right now; "
                              "retry in a few seconds", retry_after=UNREACHABLE_RETRY_S)
        if failure is not None:
            raise failure
        raise Busy(f"every node serving {request.model} is busy; retry later", retry_after=1)

    def _local_job(self, engine: TextEngine, request: Request, stamp: Stamp, *,
                   entry: bool = True, request_id: bytes | None = None) -> LocalJob:
        """Validate ``request`` for ``engine`` (raises InvalidRequest) and check its queue
        (raises Busy)."""
        if request.kind == "image":
            prepared: Any = engine.prepare(request.image)  # type: ignore[arg-type]
        elif request.kind == "embedding":
            prepared = None
        else:
            assert request.text is not None
            prepared = engine.prepare(request.text)
        self.scheduler.check(engine, remote=not entry)
        return LocalJob(self, engine, request, prepared, stamp, entry=entry,
                        request_id=request_id)

    # -- the executor's side ----------------------------------------------------------------

    def run_here(self, request: Request, *, model_digest: bytes | None = None,
                 admit_by_ms: int | None = None, now_ms: int = 0,
                 request_id: bytes | None = None) -> LocalJob:
        """Admit a peer's request to this node's engines (the executor records it, not
        this node's entry log).  Raises ModelNotFound (not here, or another digest),
        InvalidRequest or Busy (a full queue, or — deadline admission — this node would
        finish after ``admit_by_ms``)."""
        engine = self.engine_for(request)
        if engine is None:
            raise ModelNotFound(f"model {request.model} is not served here")
        if model_digest is not None and model_digest != engine.card.digest:
            raise ModelNotFound(f"model {request.model} here has another digest")
        job = self._local_job(engine, request, Stamp(), entry=False, request_id=request_id)
        facts = RequestFacts(engine.card.name, max_tokens=request.units)
        if refuses(now_ms, admit_by_ms, self.local_facts(engine), facts):
            late = now_ms + expected_ms(self.local_facts(engine), facts) - (admit_by_ms or 0)
            raise Busy(f"this node would finish {late:.0f} ms after the requester's estimate "
                       "(another job got here first)", retry_after=0.1)
        return job


class Failover:
    """A job on a peer that, until its first output, can still move: a peer accepts a job
    at once (so the answer can start) but may die before producing anything; then the
    next candidate takes over and the client never notices."""

    def __init__(self, job: Job,
                 start_next: Callable[[RequestError], Awaitable[Job]]) -> None:
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

    @property
    def items(self) -> list[bytes]:
        return self.job.items

    async def batches(self) -> AsyncIterator[list[str]]:
        while True:
            started = False
            try:
                async with aclosing(self.job.batches()) as batches:
                    async for batch in batches:
                        started = True
                        yield batch
                return
            except (PeerUnavailable, Busy) as exc:
                # before the first output (a peer lost, or whose queue filled after it
                # accepted) the next candidate takes over; after it, the client is told
                if started:
                    raise
                log.warning("%s; trying the next candidate", exc)
                self.job = await self.start_next(exc)
