"""Forwarding inference over ``/rbee/infer/1.0.0``: the executor's handler and the
requester's remote job.

One stream per job.  The requester writes a signed InferenceRequest, later maybe Cancel
frames; the executor answers with ResultChunk frames (a batch of tokens each; an empty one
as a heartbeat while there is nothing to send) and exactly one ResultEnd (carrying its
signed receipt) or ErrorMessage.  A stream that ends without one failed: a SIGKILLed peer
looks like a clean EOF.  The requester treats ``frame_timeout`` without any frame as a
dead or frozen peer.  Both ends check every frame with the protocol's session machine.
"""

from __future__ import annotations

import logging
import os
import struct
import time
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any, AsyncIterator, Awaitable, Callable, Literal, Protocol

import trio

from ..api.schemas import ChatCall, Limits, parse_chat, parse_completion, parse_embeddings
from ..dispatch import Kind, PeerUnavailable, Stamp
from ..engines.base import Completion, TextEngine
from ..engines.scheduler import Scheduler
from ..errors import (
    Busy,
    EngineFailure,
    Forbidden,
    InvalidRequest,
    ModelNotFound,
    RequestError,
)
from ..protocol.envelope import Verifier, seal
from ..protocol.errors import ProtocolError
from ..protocol.identity import NodeKey, peer_id_to_str
from ..protocol.messages import (
    Cancel,
    ErrorMessage,
    InferenceRequest,
    Receipt,
    ResultChunk,
    ResultEnd,
)
from ..protocol.receipts import OutputDigest, digest, verify_receipt
from ..protocol.session import InferenceSession
from ..routing import ModelFacts, PeerFacts, RequestFacts, expected_ms, satisfies
from ..store.writer import AuditWriter
from .frames import ByteStream, FrameStream, StreamGone

__all__ = ["PROTOCOL_ID", "Timing", "Executor", "RemoteJob", "ERROR_CODES", "Order",
           "ImageRunner", "fetch_items"]

log = logging.getLogger(__name__)
PROTOCOL_ID = "/rbee/infer/1.0.0"


def now_ms() -> int:
    return int(time.time() * 1000)


@dataclass(frozen=True)
class Timing:
    heartbeat_s: float = 1.0  # executor: send an empty chunk after this long without a frame
    frame_timeout_s: float = 5.0  # requester: no frame for this long = the peer is gone
    request_timeout_s: float = 30.0  # executor: the request frame must arrive by then
    warm_stream_s: float = 20.0  # requester: a pre-opened stream is used only this young
    deadline_s: float = 600.0  # requester: the job is useless after this long


# ErrorMessage codes <-> our error classes: the one translation table at this edge.
ERROR_CODES: dict[type[RequestError], str] = {
    InvalidRequest: "bad_request",
    ModelNotFound: "model_not_found",
    Busy: "busy",
    Forbidden: "forbidden",
    EngineFailure: "internal",
}


def _error_for(message: ErrorMessage, peer: str) -> RequestError:
    text = f"peer {peer[:16]}…: {message.message}"
    if message.code == "bad_request":
        return InvalidRequest(text)
    if message.code == "busy":
        return Busy(text, retry_after=(message.retry_after_ms or 1000) / 1000)
    if message.code in ("model_not_found", "protocol", "deadline", "cancelled", "forbidden",
                        "unauthorized"):
        # its advert was stale, it could not take the job, or its own acceptance policy
        # (residency, tenants) refused it: another peer may
        return PeerUnavailable(text)
    return EngineFailure(text)


def _code_for(exc: RequestError) -> str:
    for cls in type(exc).__mro__:
        if cls in ERROR_CODES:
            return ERROR_CODES[cls]  # type: ignore[index]
    return "internal"


IMAGE_CHUNK = 512 * 1024


class ImageRunner(Protocol):
    """What the executor needs to serve image requests (the node's image service)."""

    def serves(self, model: str) -> bool: ...

    def digest(self, model: str) -> bytes: ...

    async def run(self, model: str, params: dict[str, Any]) -> list[bytes]:
        """PNG bytes of each image.  Raises RequestError."""
        ...


@dataclass
class _Work:
    run: Callable[[_Reply], Awaitable[None]]
    digest: bytes
    completion: Completion
    done: Callable[[_Reply], None]


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
    """Serves inference streams from peers on this node's engines."""

    def __init__(self, key: NodeKey, verifier: Verifier, scheduler: Scheduler, limits: Limits,
                 *, jurisdiction: str = "", audit: AuditWriter | None = None,
                 timing: Timing = Timing(), max_frame: int = 1 << 20,
                 on_done: Callable[[str, Completion, float | None], None] | None = None,
                 images: ImageRunner | None = None,
                 speed: Callable[[str], float] = lambda model: 0.0) -> None:
        self.key = key
        self.images = images
        self.verifier = verifier
        self.scheduler = scheduler
        self.limits = limits
        self.jurisdiction = jurisdiction
        self.audit = audit
        self.timing = timing
        self.max_frame = max_frame
        self.on_done = on_done
        self.speed = speed  # measured tokens/s of a model here (0: not yet)
        self.served = 0

    async def handle(self, stream: ByteStream, remote: bytes) -> None:
        """One inference stream from ``remote``.  Never raises (an escaping exception would
        break the libp2p connection's accept loop)."""
        frames = FrameStream(stream, self.max_frame)
        try:
            await self._handle(frames, remote)
        except (StreamGone, trio.TooSlowError) as exc:
            log.info("inference stream from %s ended early: %s", peer_id_to_str(remote)[:16], exc)
            await frames.reset()
        except Exception:
            log.exception("inference stream from %s failed", peer_id_to_str(remote)[:16])
            await frames.reset()
        else:
            await frames.close()

    async def _send(self, frames: FrameStream, message: Any, ttl_ms: int = 60_000) -> None:
        await frames.send(seal(self.key, message, now_ms=now_ms(), ttl_ms=ttl_ms))

    async def _refuse(self, frames: FrameStream, code: str, text: str,
                      request_id: bytes | None = None, retry_after_ms: int | None = None) -> None:
        await self._send(frames, ErrorMessage(code=code, message=text[:1000], request_id=request_id,
                                              retry_after_ms=retry_after_ms))

    async def _handle(self, frames: FrameStream, remote: bytes) -> None:
        with trio.fail_after(self.timing.request_timeout_s):
            raw = await frames.receive()
        try:
            verified = self.verifier.verify(raw, now_ms(), expect=InferenceRequest, sender=remote)
            request = verified.message
            session = InferenceSession(request.request_id, remote, self.key.peer_id)
            session.observe(remote, request)
        except ProtocolError as exc:
            await self._refuse(frames, "protocol", f"{exc.reason}: {exc}")
            return
        if request.deadline_ms < now_ms():
            await self._refuse(frames, "deadline", "the request's deadline has passed",
                               request.request_id)
            return
        if not satisfies(self.jurisdiction, request.residency):
            await self._refuse(frames, "forbidden", f"this node is in "
                               f"{self.jurisdiction or 'no declared jurisdiction'}, the request "
                               f"must stay in {request.residency}", request.request_id)
            await self._audit("execute", "rejected", request, remote, error_code="forbidden")
            return
        try:
            if request.kind == "image":
                work = self._image_work(request)
            elif request.kind == "embedding":
                work = self._embedding_work(request)
            else:
                work = self._text_work(request)
        except RequestError as exc:
            retry = int(exc.retry_after * 1000) if isinstance(exc, Busy) else None
            await self._refuse(frames, _code_for(exc), str(exc), request.request_id, retry)
            await self._audit("execute", "rejected", request, remote, error_code=_code_for(exc))
            return
        await self._execute(frames, remote, request, raw, session, work)

    def _text_engine(self, request: InferenceRequest) -> TextEngine:
        engine = self.scheduler.find(request.model)
        if engine is None or engine.card.modality != "text":
            raise ModelNotFound(f"model {request.model} is not served here")
        if request.model_digest is not None and request.model_digest != engine.card.digest:
            raise ModelNotFound(f"model {request.model} here has another digest")
        return engine

    def _embedding_work(self, request: InferenceRequest) -> _Work:
        engine = self._text_engine(request)
        call = parse_embeddings(dict(request.params), self.limits)
        self.scheduler.check(engine)
        completion = Completion(finish_reason="stop")

        async def run(reply: _Reply) -> None:
            async with self.scheduler.admit(engine):
                result = await engine.embed(call.inputs)
            reply.started()
            completion.prompt_tokens = result.prompt_tokens
            for index, vector in enumerate(result.vectors):  # one little-endian float32 array
                await reply.chunk(str(index), 0, struct.pack(f"<{len(vector)}f", *vector))

        return _Work(run=run, digest=engine.card.digest, completion=completion,
                     done=lambda reply: None)

    def _text_work(self, request: InferenceRequest) -> _Work:
        engine = self._text_engine(request)
        if request.kind not in ("chat", "completion"):
            raise InvalidRequest(f"request kind {request.kind} is not served over the mesh yet")
        parse = parse_chat if request.kind == "chat" else parse_completion
        call = parse(dict(request.params), self.limits)
        prepared = engine.prepare(call.request)
        self.scheduler.check(engine)
        if request.admit_by_ms is not None:
            load = self.scheduler.load(engine.card.name)
            here = PeerFacts(id="", models=(ModelFacts(engine.card.name,
                                                       tokens_per_s=self.speed(engine.card.name)),),
                             queue_depth=load.queue_depth, active_jobs=load.active)
            finish = now_ms() + expected_ms(here, RequestFacts(request.model,
                                                               max_tokens=request.max_tokens))
            if finish > request.admit_by_ms:
                raise Busy(f"this node would finish {finish - request.admit_by_ms:.0f} ms after "
                           "the requester's estimate (another job got here first)",
                           retry_after=0.1)
        completion = Completion()

        async def run(reply: _Reply) -> None:
            async with self.scheduler.admit(engine):
                async with aclosing(engine.stream(prepared, completion)) as batches:
                    async for batch in batches:
                        reply.started()
                        tokens = completion.completion_tokens - reply.tokens
                        await reply.chunk("".join(batch), tokens)
            if completion.completion_tokens > reply.tokens:
                # tokens that produced no text (e.g. a stop string): count them
                await reply.chunk("", completion.completion_tokens - reply.tokens)

        def done(reply: _Reply) -> None:
            if self.on_done is not None:
                self.on_done(engine.card.name, completion, reply.first)

        return _Work(run=run, digest=engine.card.digest, completion=completion, done=done)

    def _image_work(self, request: InferenceRequest) -> _Work:
        if self.images is None or not self.images.serves(request.model):
            raise ModelNotFound(f"image model {request.model} is not served here")
        digest_ = self.images.digest(request.model)
        completion = Completion(finish_reason="stop")
        params = dict(request.params)

        async def run(reply: _Reply) -> None:
            assert self.images is not None
            pngs = await self.images.run(request.model, params)
            reply.started()
            for index, png in enumerate(pngs):  # each image: chunks of at most 512 KiB
                for offset in range(0, max(len(png), 1), IMAGE_CHUNK):
                    await reply.chunk(str(index), 1 if offset == 0 else 0,
                                      png[offset:offset + IMAGE_CHUNK])
            completion.completion_tokens = len(pngs)

        return _Work(run=run, digest=digest_, completion=completion, done=lambda reply: None)

    async def _execute(self, frames: FrameStream, remote: bytes, request: InferenceRequest,
                       request_raw: bytes, session: InferenceSession, work: _Work) -> None:
        reply = _Reply(self, frames, request.request_id)
        completion = work.completion
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
                    await work.run(reply)
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
                                      error_code=_code_for(failure), total_ms=total_ms)
                    await self._refuse(frames, _code_for(failure), str(failure),
                                       request.request_id)
                else:
                    receipt = Receipt(
                        request_id=request.request_id, request_digest=digest(request_raw),
                        requester=remote, model=request.model, model_digest=work.digest,
                        tokens_in=completion.prompt_tokens,
                        tokens_out=completion.completion_tokens, ttft_ms=ttft_ms,
                        total_ms=total_ms, price=0, jurisdiction=self.jurisdiction,
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
                work.done(reply)

    async def _audit(self, kind: str, outcome: str, request: InferenceRequest, remote: bytes,
                     **fields: Any) -> None:
        if self.audit is not None:
            await self.audit.record(kind, outcome, request_id=request.request_id,
                                    tenant_ref=request.tenant_ref, model=request.model,
                                    entry_peer=remote, exec_peer=self.key.peer_id,
                                    jurisdiction=self.jurisdiction or None, **fields)


@dataclass(frozen=True)
class Order:
    """A request whose result is data, not text (images, embeddings): the OpenAI body as the
    client sent it; ``n`` is how many items (images or inputs) it asks for."""

    model: str
    body: dict[str, Any]
    n: int = 1


async def fetch_items(peer: bytes, open_stream: OpenStream, order: Order,
                      kind: Literal["image", "embedding"],
                      **kwargs: Any) -> tuple[list[bytes], Receipt | None]:
    """Run ``order`` on ``peer``; the items' bytes in order (each item may have come in
    several chunks labelled with its index) and the verified receipt.  Raises like
    :meth:`RemoteJob.start`, or EngineFailure mid-way."""
    job = await RemoteJob.start(peer, open_stream, order, kind, **kwargs)
    async with aclosing(job.batches()) as batches:
        async for _ in batches:
            pass
    items: dict[str, bytes] = {}
    for label, data in job.data:
        items[label] = items.get(label, b"") + data
    return [items[k] for k in sorted(items, key=int)], job.receipt


OpenStream = Callable[[bytes, bool], Awaitable[ByteStream]]
"""``open_stream(peer, fresh)``: a stream to ``peer``; with ``fresh`` false it may be one
opened in advance (negotiating a new stream costs a few ms of round trips)."""


class RemoteJob:
    """A job running on a peer.  Build with :meth:`start`; then iterate :meth:`batches`."""

    def __init__(self, peer: bytes, frames: FrameStream, session: InferenceSession,
                 request_raw: bytes, verifier: Verifier, timing: Timing,
                 audit: AuditWriter | None, key: NodeKey, request: InferenceRequest,
                 on_failure: Callable[[bytes], None] | None = None,
                 stamp: Stamp = Stamp(),
                 on_done: Callable[[RemoteJob], None] | None = None) -> None:
        self.where = peer
        self.on_done = on_done
        self.first_at: float | None = None  # when the first text arrived (perf_counter)
        self.ended_at: float | None = None
        self.stamp = stamp
        self.receipt_raw: bytes | None = None  # the executor's signed receipt, as sent
        self.on_failure = on_failure
        self.frames = frames
        self.session = session
        self.request_raw = request_raw
        self.request = request
        self.verifier = verifier
        self.timing = timing
        self.audit = audit
        self.key = key
        self.completion = Completion()
        self.output = OutputDigest()
        self.receipt: Receipt | None = None
        self.data: list[tuple[str, bytes]] = []  # (label, bytes) of chunks that carry data
        self._first: list[str] | None = None
        self.started_at = time.perf_counter()

    @classmethod
    async def start(cls, peer: bytes, open_stream: OpenStream, call: ChatCall | Order,
                    kind: Kind | Literal["image", "embedding"], *,
                    key: NodeKey, verifier: Verifier, timing: Timing = Timing(),
                    max_frame: int = 1 << 20, audit: AuditWriter | None = None,
                    connect_timeout_s: float = 3.0,
                    on_failure: Callable[[bytes], None] | None = None,
                    stamp: Stamp = Stamp(),
                    on_done: Callable[[RemoteJob], None] | None = None,
                    admit_by_ms: int | None = None) -> RemoteJob:
        """Open the stream, send the request, wait for the first token (or the end).

        Raises :class:`PeerUnavailable` for anything that says "try another peer", or the
        peer's verdict as a :class:`RequestError`.
        """
        name = peer_id_to_str(peer)
        if isinstance(call, Order):
            params, max_tokens, stream_ = call.body, call.n, False
        else:
            params, max_tokens, stream_ = call.body, call.request.max_tokens, call.stream
        for fresh in (False, True):  # a pre-opened stream may have died: then one new try
            try:
                with trio.fail_after(connect_timeout_s):
                    stream = await open_stream(peer, fresh)
            except Exception as exc:
                raise PeerUnavailable(f"cannot open a stream to {name[:16]}…: "
                                      f"{type(exc).__name__}: {exc}") from None
            frames = FrameStream(stream, max_frame)
            request = InferenceRequest(
                request_id=os.urandom(16), target=peer, model=call.model, kind=kind,
                params=params, stream=stream_, max_tokens=max_tokens,
                deadline_ms=now_ms() + int(timing.deadline_s * 1000),
                tenant_ref=stamp.tenant_ref, residency=stamp.residency,
                admit_by_ms=admit_by_ms)
            raw = seal(key, request, now_ms=now_ms())
            session = InferenceSession(request.request_id, key.peer_id, peer)
            session.observe(key.peer_id, request)
            job = cls(peer, frames, session, raw, verifier, timing, audit, key, request,
                      on_failure, stamp, on_done)
            try:
                await frames.send(raw)
                job._first = await job._next_batch(accept=True)
                return job
            except StreamGone as exc:
                await frames.reset()
                if fresh:
                    raise PeerUnavailable(f"{name[:16]}… went away before the first token: "
                                          f"{exc}") from None
            except BaseException:
                await frames.reset()
                raise
        raise AssertionError("unreachable")

    @property
    def request_id(self) -> bytes:
        return self.request.request_id

    async def _next_batch(self, accept: bool = False) -> list[str] | None:
        """The next non-empty batch of text, or None at the end; with ``accept``, also []
        for the executor's empty "accepted" chunk.  Raises StreamGone, PeerUnavailable
        (silence) or the peer's error."""
        while True:
            with trio.move_on_after(self.timing.frame_timeout_s) as scope:
                raw = await self.frames.receive()
            if scope.cancelled_caught:
                raise PeerUnavailable(f"no frame from {peer_id_to_str(self.where)[:16]}… for "
                                      f"{self.timing.frame_timeout_s:.0f} s (dead or frozen)")
            try:
                verified = self.verifier.verify(raw, now_ms(), sender=self.where)
                message = verified.message
                self.session.observe(self.where, message)
            except ProtocolError as exc:
                raise PeerUnavailable(f"protocol error from peer: {exc.reason}: {exc}") from None
            if isinstance(message, ResultChunk):
                self.output.update(message.text, message.data)
                if message.data is not None:
                    self.data.append((message.text, message.data))
                if message.text:
                    if self.first_at is None:
                        self.first_at = time.perf_counter()
                    return [message.text]
                if accept:
                    return []
                continue  # heartbeat, or tokens without text
            if isinstance(message, ResultEnd):
                self._finish(message)
                return None
            if isinstance(message, ErrorMessage):
                raise _error_for(message, peer_id_to_str(self.where))
            raise PeerUnavailable(f"unexpected {type(message).__name__} from peer")

    def _finish(self, end: ResultEnd) -> None:
        try:
            receipt = verify_receipt(end.receipt, request_raw=self.request_raw,
                                     executor=self.where, output_digest=self.output.digest(),
                                     tokens_out=self.session.tokens_out)
        except ProtocolError as exc:
            raise EngineFailure(f"the peer's receipt does not verify: {exc}") from None
        if not satisfies(receipt.jurisdiction, self.stamp.residency):
            raise EngineFailure(f"the peer's receipt says it ran in {receipt.jurisdiction!r}, "
                                f"outside the required {self.stamp.residency}")
        self.receipt = receipt
        self.receipt_raw = end.receipt
        self.completion.prompt_tokens = receipt.tokens_in
        self.completion.completion_tokens = receipt.tokens_out
        self.completion.finish_reason = end.finish_reason

    async def batches(self) -> AsyncIterator[list[str]]:
        outcome = "error"
        produced = False
        try:
            if self._first is not None:
                if self._first:
                    produced = True
                    yield self._first
                while (batch := await self._next_batch()) is not None:
                    produced = True
                    yield batch
            outcome = "ok"
            self.ended_at = time.perf_counter()
            if self.on_done is not None:
                self.on_done(self)
        except (StreamGone, PeerUnavailable) as exc:
            name = peer_id_to_str(self.where)[:16]
            if self.on_failure is not None:
                self.on_failure(self.where)  # the peer is suspect from now on
            if not produced:  # nothing reached the client yet: another peer may take over
                raise PeerUnavailable(f"{name}… failed before the first token: {exc}") from None
            raise EngineFailure(f"peer {name}… failed mid-stream: {exc}") from None
        finally:
            if outcome != "ok" and not self.session.finished:
                outcome = "cancelled"
                with trio.CancelScope(shield=True), trio.move_on_after(1):
                    try:
                        await self.frames.send(seal(self.key, Cancel(
                            request_id=self.request.request_id, reason="client went away"),
                            now_ms=now_ms()))
                    except StreamGone:
                        pass
                await self.frames.reset()
            else:
                await self.frames.close()
            await self._audit(outcome)

    async def _audit(self, outcome: str) -> None:
        if self.audit is None:
            return
        r = self.receipt
        with trio.CancelScope(shield=True):
            await self.audit.record(
                "entry", outcome, request_id=self.request.request_id, model=self.request.model,
                tenant_ref=self.stamp.tenant_ref,
                entry_peer=self.key.peer_id, exec_peer=self.where,
                model_digest=r.model_digest if r else None,
                jurisdiction=(r.jurisdiction or None) if r else None,
                tokens_in=r.tokens_in if r else None, tokens_out=r.tokens_out if r else None,
                ttft_ms=r.ttft_ms if r else None,
                total_ms=int((time.perf_counter() - self.started_at) * 1000),
                receipt=self.receipt_raw)
