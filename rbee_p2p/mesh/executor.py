"""Forwarding inference over ``/rbee/infer/1.0.0``: the executor's handler (the
requester's side is remote.py's RemoteJob).

One stream per job.  The requester writes a signed InferenceRequest, later maybe Cancel
frames; the executor answers with ResultChunk frames (a batch of tokens each; an empty one
as a heartbeat while there is nothing to send) and exactly one ResultEnd (carrying its
signed receipt) or ErrorMessage.  A stream that ends without one failed: a SIGKILLed peer
looks like a clean EOF.  The requester treats ``frame_timeout`` without any frame as a
dead or frozen peer.  Both ends check every frame with the protocol's session machine.
"""

from __future__ import annotations

import logging
import time
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Protocol

import trio

from ..dispatch.drain import Drain
from ..dispatch.request import Job, Limits, Request
from ..errors import Busy, QuotaExceeded, RequestError, spec
from ..protocol.envelope import Verifier, seal
from ..protocol.errors import ProtocolError
from ..protocol.identity import NodeKey, peer_id_to_str
from ..protocol.messages import Cancel, ErrorMessage, InferenceRequest, Receipt, ResultEnd
from ..protocol.messages import ResultChunk
from ..protocol.receipts import OutputDigest, digest
from ..protocol.session import InferenceSession
from ..routing import charge, satisfies
from ..store.writer import AuditWriter
from ..trace import mark
from .frames import ByteStream, FrameStream, StreamGone
from .wire import from_wire

__all__ = ["PROTOCOL_ID", "Timing", "Executor", "Runner", "now_ms", "DATA_CHUNK"]

log = logging.getLogger(__name__)
PROTOCOL_ID = "/rbee/infer/1.0.0"
DATA_CHUNK = 512 * 1024  # a data item (an image, a vector) goes in chunks of at most this
REFUSALS_RECORDED = 10
"""Refused jobs audited per peer a minute; the rest are only counted."""
MAX_TRACKED = 4096  # peers whose refusals are counted at once


def now_ms() -> int:
    return int(time.time() * 1000)


@dataclass(frozen=True)
class Timing:
    heartbeat_s: float = 1.0  # executor: send an empty chunk after this long without a frame
    frame_timeout_s: float = 5.0  # requester: no frame for this long = the peer is gone
    request_timeout_s: float = 30.0  # executor: the request frame must arrive by then
    warm_stream_s: float = 20.0  # requester: a pre-opened stream is used only this young
    deadline_s: float = 600.0  # requester: the job is useless after this long


Runner = Callable[..., Job]
"""``run(request, model_digest=, admit_by_ms=, now_ms=, request_id=)``: the node's
dispatcher admitting a peer's request to its own engines (``Dispatcher.run_here``).
Returns the job unstarted; raises RequestError (not here, bad request, busy)."""


class PeerAdmission(Protocol):
    """Per-peer limits on peers' jobs (the node's ``tenancy.peers.PeerGate``)."""

    def admit(self, peer: bytes, model: str, reserve: int, tenant_ref: bytes | None,
              prompt: int = 0) -> Any:
        """Raises RequestError (Forbidden, QuotaExceeded)."""

    def finish(self, admitted: Any, tokens: int) -> None: ...


class _Reply:
    """The executor's side of one stream: numbered frames, heartbeats, the output digest."""

    def __init__(self, executor: Executor, frames: FrameStream, request_id: bytes) -> None:
        self.executor = executor
        self.frames = frames
        self.request_id = request_id
        self.seq = 0
        self.tokens = 0  # tokens reported in chunks so far
        self.first: float | None = None  # when the first output was ready
        self.output = OutputDigest()
        self.last_send = trio.current_time()
        self._lock = trio.Lock()  # seq numbers are assigned and sent in one step

    def started(self) -> None:
        if self.first is None:
            self.first = time.perf_counter()

    async def send(self, make: Callable[[int], Any]) -> None:
        async with self._lock:
            await self.executor._send(self.frames, make(self.seq))
            self.seq += 1
            self.last_send = trio.current_time()

    async def chunk(self, text: str, tokens: int, data: bytes | None = None) -> None:
        self.output.update(text, data)
        self.tokens += tokens
        await self.send(lambda seq: ResultChunk(request_id=self.request_id, seq=seq, text=text,
                                                tokens=tokens, data=data))

    async def heartbeat(self) -> None:
        interval = self.executor.timing.heartbeat_s
        while True:
            await trio.sleep(interval)
            if trio.current_time() - self.last_send >= interval:
                await self.chunk("", 0)


class Executor:
    """Serves inference streams from peers: checks each request (signature, deadline,
    residency, this node's limits), hands it to this node's dispatcher (``run``) and
    streams the job's output back, ending with a signed receipt."""

    def __init__(self, key: NodeKey, verifier: Verifier, run: Runner, limits: Limits,
                 *, jurisdiction: str = "", audit: AuditWriter | None = None,
                 timing: Timing = Timing(), max_frame: int = 1 << 20,
                 prices: Mapping[str, tuple[int, int, int]] | None = None,
                 peers: PeerAdmission | None = None, drain: Drain | None = None) -> None:
        self.key = key
        self.drain = drain or Drain()  # the node's: new jobs refused, running ones drained
        self.peers = peers  # per-peer limits (None: none, for tests of other parts)
        self.verifier = verifier
        self.run = run
        self.limits = limits
        self.jurisdiction = jurisdiction
        self.audit = audit
        self.timing = timing
        self.max_frame = max_frame
        # model name (and alias) -> (input per Mtok, output per Mtok, per image), charged in
        # receipts (routing.charge: tokens at their price, rounded down once, plus images)
        self.prices = dict(prices or {})
        self.served = 0
        self.unrecorded_refusals = 0  # refusals past a peer's REFUSALS_RECORDED a minute
        self._refusals: dict[bytes, tuple[float, int]] = {}  # peer -> (minute began, count)

    async def handle(self, stream: ByteStream, remote: bytes) -> None:
        """One inference stream from ``remote``.  Never raises (an escaping exception would
        break the libp2p connection's accept loop)."""
        frames = FrameStream(stream, self.max_frame)
        try:  # except*: a job's output is sent from a nursery, which raises groups
            await self._handle(frames, remote)
        except* (StreamGone, trio.TooSlowError) as group:
            log.info("inference stream from %s ended early: %s", peer_id_to_str(remote)[:16],
                     group.exceptions[0])
        except* Exception:
            log.exception("inference stream from %s failed", peer_id_to_str(remote)[:16])
        else:
            await frames.close()
            return
        await frames.reset()

    async def _send(self, frames: FrameStream, message: Any, ttl_ms: int = 60_000) -> None:
        await frames.send(seal(self.key, message, now_ms=now_ms(), ttl_ms=ttl_ms))

    async def _refuse(self, frames: FrameStream, code: str, text: str,
                      request_id: bytes | None = None, retry_after_ms: int | None = None) -> None:
        await self._send(frames, ErrorMessage(code=code, message=text[:1000], request_id=request_id,
                                              retry_after_ms=retry_after_ms))

    async def _handle(self, frames: FrameStream, remote: bytes) -> None:
        with trio.fail_after(self.timing.request_timeout_s):
            raw = await frames.receive()
        received = time.perf_counter_ns()
        try:
            verified = self.verifier.verify(raw, now_ms(), expect=InferenceRequest, sender=remote)
            message = verified.message
            session = InferenceSession(message.request_id, remote, self.key.peer_id)
            session.observe(remote, message)
        except ProtocolError as exc:
            await self._refuse(frames, "protocol", f"{exc.reason}: {exc}")
            return
        if message.deadline_ms < now_ms():
            await self._refuse(frames, "deadline", "the request's deadline has passed",
                               message.request_id)
            return
        if not satisfies(self.jurisdiction, message.residency):
            await self._refuse(frames, "forbidden", f"this node is in "
                               f"{self.jurisdiction or 'no declared jurisdiction'}, the request "
                               f"must stay in {message.residency}", message.request_id)
            await self._audit_refusal(message, remote, "forbidden")
            return
        admitted = None
        try:
            self.drain.check()
            if self.audit is not None:
                self.audit.check()
            request = from_wire(message, self.limits)
            if self.peers is not None:
                admitted = self.peers.admit(remote, request.model, request.tokens_estimate(),
                                            message.tenant_ref, request.prompt_chars())
            job = self.run(request, model_digest=message.model_digest,
                           admit_by_ms=message.admit_by_ms, now_ms=now_ms(),
                           request_id=message.request_id)
            mark("b_received", message.request_id, received)
            mark("b_admitted", message.request_id)
        except RequestError as exc:
            if admitted is not None:
                self.peers.finish(admitted, 0)  # type: ignore[union-attr]
            retry = int(exc.retry_after * 1000) if isinstance(exc, (Busy, QuotaExceeded)) \
                else None
            await self._refuse(frames, spec(exc).wire, str(exc), message.request_id, retry)
            await self._audit_refusal(message, remote, spec(exc).wire)
            return
        try:
            with self.drain.working():
                await self._execute(frames, remote, message, raw, session, request, job)
        finally:
            if admitted is not None:
                done = job.completion
                self.peers.finish(  # type: ignore[union-attr]
                    admitted, done.prompt_tokens + done.completion_tokens)

    async def _execute(self, frames: FrameStream, remote: bytes, request: InferenceRequest,
                       request_raw: bytes, session: InferenceSession, what: Request,
                       job: Any) -> None:
        reply = _Reply(self, frames, request.request_id)
        completion = job.completion
        started = time.perf_counter()

        async def watch_for_cancel(scope: trio.CancelScope) -> None:
            try:
                while True:
                    raw = await frames.receive()
                    message = self.verifier.verify(raw, now_ms(), expect=Cancel,
                                                   sender=remote).message
                    session.observe(remote, message)
                    scope.cancel()
            except (StreamGone, ProtocolError):
                scope.cancel()  # the requester went away: stop generating

        failure: RequestError | None = None
        async with trio.open_nursery() as nursery:
            scope = trio.CancelScope()
            nursery.start_soon(watch_for_cancel, scope)
            nursery.start_soon(reply.heartbeat)
            with scope:
                try:
                    # accepted: an empty chunk at once, so the requester can start its answer
                    # (HTTP headers) while the model works on the first token
                    await reply.chunk("", 0)
                    with self.drain.cuttable():
                        await _pump(job, reply)
                except RequestError as exc:
                    failure = exc
            cancelled = scope.cancelled_caught
            if cancelled:
                completion.finish_reason = "cancelled"
            total_ms = int((time.perf_counter() - started) * 1000)
            ttft_ms = int(((reply.first or time.perf_counter()) - started) * 1000)
            try:
                if failure is not None:
                    await self._audit("execute", "error", request, remote,
                                      error_code=spec(failure).wire, total_ms=total_ms)
                    await self._refuse(frames, spec(failure).wire, str(failure),
                                       request.request_id)
                else:
                    receipt = Receipt(
                        request_id=request.request_id, request_digest=digest(request_raw),
                        requester=remote, model=request.model, model_digest=job.model_digest,
                        tokens_in=completion.prompt_tokens,
                        tokens_out=completion.completion_tokens, ttft_ms=ttft_ms,
                        total_ms=total_ms, price=self._charge(request.model, what, job),
                        jurisdiction=self.jurisdiction,
                        output_digest=reply.output.digest())
                    receipt_raw = seal(self.key, receipt, now_ms=now_ms(), ttl_ms=0)
                    await self._audit("execute", "cancelled" if cancelled else "ok", request,
                                      remote, tokens_in=completion.prompt_tokens,
                                      tokens_out=completion.completion_tokens, ttft_ms=ttft_ms,
                                      total_ms=total_ms, receipt=receipt_raw)
                    await reply.send(lambda seq: ResultEnd(
                        request_id=request.request_id, seq=seq,
                        finish_reason=completion.finish_reason or "stop", receipt=receipt_raw))
            finally:
                nursery.cancel_scope.cancel()
                self.served += 1

    def _charge(self, model: str, what: Request, job: Any) -> int:
        """Micro-credits for a finished job at this node's price for ``model`` (0 if it set
        none): its prompt and completion tokens, or the images it made."""
        price = self.prices.get(model)
        if price is None:
            return 0
        completion = job.completion
        images = len(job.items) if what.image is not None else 0
        return charge(*price, tokens_in=completion.prompt_tokens,
                      tokens_out=completion.completion_tokens, images=images)

    async def _audit_refusal(self, request: InferenceRequest, remote: bytes, code: str) -> None:
        """A refused job's record: at most ``REFUSALS_RECORDED`` a minute from one peer (one
        flooding peer must not fill the disk with signed records); the rest are counted."""
        now = trio.current_time()
        if len(self._refusals) > MAX_TRACKED:
            self._refusals.clear()
        start, count = self._refusals.get(remote, (now, 0))
        if now - start >= 60:
            start, count = now, 0
        self._refusals[remote] = (start, count + 1)
        if count >= REFUSALS_RECORDED:
            self.unrecorded_refusals += 1
            return
        await self._audit("execute", "rejected", request, remote, error_code=code)

    async def _audit(self, kind: str, outcome: str, request: InferenceRequest, remote: bytes,
                     **fields: Any) -> None:
        if self.audit is not None:
            await self.audit.record(kind, outcome, request_id=request.request_id,
                                    tenant_ref=request.tenant_ref, model=request.model,
                                    entry_peer=remote, exec_peer=self.key.peer_id,
                                    jurisdiction=self.jurisdiction or None, **fields)




async def _pump(job: Job, reply: _Reply) -> None:
    """The job's output into frames: text as it comes (with the tokens it took), then any
    data items in chunks labelled with their index, then the tokens not yet reported
    (those that produced no text, e.g. a stop string; the images made)."""
    completion = job.completion
    async with aclosing(job.batches()) as batches:
        async for batch in batches:
            first = reply.first is None
            reply.started()
            await reply.chunk("".join(batch), completion.completion_tokens - reply.tokens)
            if first:
                mark("b_first_sent", reply.request_id)
    reply.started()
    for index, item in enumerate(job.items):
        for offset in range(0, max(len(item), 1), DATA_CHUNK):
            await reply.chunk(str(index), 0, item[offset:offset + DATA_CHUNK])
    if completion.completion_tokens > reply.tokens:
        await reply.chunk("", completion.completion_tokens - reply.tokens)
