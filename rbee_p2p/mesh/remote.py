"""The requester's side of ``/rbee/infer/1.0.0``: a job running on a peer.

One stream per job: the signed InferenceRequest, maybe Cancel frames later; back come
ResultChunk frames (text with its token count; data items in labelled chunks; an empty one
as "accepted" and as a heartbeat) and exactly one ResultEnd with the executor's signed
receipt, or an ErrorMessage.  A stream that ends without one failed (a SIGKILLed peer looks
like a clean EOF); ``frame_timeout`` without any frame means a dead or frozen peer.
"""

from __future__ import annotations

import logging
import os
import time
from typing import AsyncIterator, Awaitable, Callable

import trio

from ..dispatch.request import Request, Stamp
from ..engines.base import Completion
from ..errors import EngineFailure, InvalidRequest, PeerRefused, PeerUnavailable, from_wire
from ..protocol.envelope import Verifier, seal
from ..protocol.errors import ProtocolError
from ..protocol.identity import NodeKey, peer_id_to_str
from ..protocol.messages import Cancel, ErrorMessage, InferenceRequest, Receipt, ResultChunk
from ..protocol.messages import ResultEnd
from ..protocol.receipts import OutputDigest, tokens_in_bound, verify_receipt
from ..protocol.session import InferenceSession
from ..routing import satisfies
from ..store.writer import AuditWriter
from ..trace import mark
from .executor import Timing, now_ms
from .frames import ByteStream, FrameStream, StreamGone
from .wire import to_wire

log = logging.getLogger(__name__)

__all__ = ["RemoteJob", "OpenStream"]


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
        self._items: dict[int, bytearray] = {}  # data items by index, as they arrive
        self._first: list[str] | None = None
        self.started_at = time.perf_counter()

    @classmethod
    async def start(cls, peer: bytes, open_stream: OpenStream, what: Request, *,
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
        for fresh in (False, True):  # a pre-opened stream may have died: then one new try
            try:  # checked before a stream is opened: what the wire cannot carry is refused
                request = to_wire(what, request_id=os.urandom(16), target=peer,
                                  deadline_ms=now_ms() + int(timing.deadline_s * 1000),
                                  stamp=stamp, admit_by_ms=admit_by_ms)
                raw = seal(key, request, now_ms=now_ms())
            except ProtocolError as exc:
                raise InvalidRequest(f"this request is too large to send to a peer: {exc}") \
                    from None
            try:
                with trio.fail_after(connect_timeout_s):
                    stream = await open_stream(peer, fresh)
            except Exception as exc:
                raise PeerUnavailable(f"cannot open a stream to {name[:16]}…: "
                                      f"{type(exc).__name__}: {exc}") from None
            frames = FrameStream(stream, max_frame)
            session = InferenceSession(request.request_id, key.peer_id, peer)
            session.observe(key.peer_id, request)
            job = cls(peer, frames, session, raw, verifier, timing, audit, key, request,
                      on_failure, stamp, on_done)
            try:
                await frames.send(raw)
                mark("a_sent", request.request_id)
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
    def items(self) -> list[bytes]:
        """The data items (embeddings, images) in order, once the result is complete."""
        return [bytes(self._items[i]) for i in sorted(self._items)]

    @property
    def model_digest(self) -> bytes | None:
        return self.receipt.model_digest if self.receipt else None

    def _add_item(self, label: str, data: bytes) -> None:
        if not label.isdigit() or int(label) > 4096:
            raise PeerUnavailable(f"a data chunk labelled {label[:16]!r} from the peer")
        self._items.setdefault(int(label), bytearray()).extend(data)

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
                if message.data is not None:  # a piece of data item number ``text``
                    self._add_item(message.text, message.data)
                    continue
                if message.text:
                    if self.first_at is None:
                        self.first_at = time.perf_counter()
                        mark("a_first_text", self.request.request_id)
                    return [message.text]
                if accept:
                    return []
                continue  # heartbeat, or tokens without text
            if isinstance(message, ResultEnd):
                self._finish(message)
                return None
            if isinstance(message, ErrorMessage):
                raise from_wire(message.code, f"peer {peer_id_to_str(self.where)[:16]}…: "
                                f"{message.message}", message.retry_after_ms)
            raise PeerUnavailable(f"unexpected {type(message).__name__} from peer")

    def _finish(self, end: ResultEnd) -> None:
        """Check the receipt; a bad one counts as the peer's failure (it lied or broke)."""
        try:
            receipt = verify_receipt(end.receipt, request_raw=self.request_raw,
                                     executor=self.where, output_digest=self.output.digest(),
                                     tokens_out=self.session.tokens_out)
        except ProtocolError as exc:
            self._failed()
            raise EngineFailure(f"the peer's receipt does not verify: {exc}") from None
        if not satisfies(receipt.jurisdiction, self.stamp.residency):
            self._failed()
            raise EngineFailure(f"the peer's receipt says it ran in {receipt.jurisdiction!r}, "
                                f"outside the required {self.stamp.residency}")
        self.receipt = receipt
        self.receipt_raw = end.receipt
        bound = tokens_in_bound(self.request)
        if receipt.tokens_in > bound:  # charged at our count, the claim held against it
            log.warning("peer %s… claims %d prompt tokens for a request of at most %d",
                        peer_id_to_str(self.where)[:16], receipt.tokens_in, bound)
            self._failed()
        self.completion.prompt_tokens = min(receipt.tokens_in, bound)
        self.completion.completion_tokens = receipt.tokens_out
        self.completion.finish_reason = end.finish_reason

    def _failed(self) -> None:
        if self.on_failure is not None:
            self.on_failure(self.where)  # the peer is suspect from now on

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
            if isinstance(exc, PeerRefused) and not produced:
                raise  # it answered, and would not take the job: no mark against it
            name = peer_id_to_str(self.where)[:16]
            self._failed()
            if not produced:  # nothing reached the client yet: another peer may take over
                raise PeerUnavailable(f"{name}… failed before the first token: {exc}") from None
            raise EngineFailure(f"peer {name}… failed mid-stream: {exc}") from None
        except (GeneratorExit, trio.Cancelled):  # the client went away: not a failure
            outcome = "cancelled"
            raise
        finally:
            if outcome != "ok" and not self.session.finished:
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
