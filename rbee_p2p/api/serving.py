"""Engine-agnostic OpenAI responses: JSON bodies and SSE streams ending in ``data: [DONE]``.

A job (local or on a peer, see ``rbee_p2p.dispatch``) yields batches of text pieces; each
batch becomes one SSE event: every event costs event-loop time, so fewer, fuller events are
faster for the same text (DESIGN.md, engine notes).
"""

from __future__ import annotations

import base64
import json
import logging
import struct
import time
import uuid
import weakref
from contextlib import aclosing, asynccontextmanager
from typing import Any, AsyncIterator

from ..dispatch import Dispatcher, Job
from ..engines.base import Completion
from ..errors import Forbidden, RequestError, spec
from ..tenancy.gate import Gate, Pass
from ..tenancy.tenants import Tenant
from ..trace import mark
from .schemas import Call

__all__ = ["Serving", "error_body"]

log = logging.getLogger(__name__)


def error_body(message: str, type_: str, *, param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def _sse(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"


def _usage(c: Completion) -> dict[str, int]:
    return {"prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens,
            "total_tokens": c.prompt_tokens + c.completion_tokens}


class Serving:
    """Starts validated calls through the dispatcher and shapes OpenAI responses."""

    def __init__(self, dispatcher: Dispatcher, gate: Gate | None = None) -> None:
        self.dispatcher = dispatcher
        self.scheduler = dispatcher.scheduler
        self.gate = gate or Gate(None)

    def models(self) -> dict[str, dict[str, Any]]:
        """Every model this node can serve, here or through a live peer, by name (aliases
        too): OpenAI's model object plus where it runs (``local``, up to 16 ``peers`` and
        their count)."""
        out: dict[str, dict[str, Any]] = {}
        for engine in self.scheduler.engines:
            for name in (engine.card.name, *engine.card.aliases):
                out[name] = {"id": name, "object": "model", "created": 0, "owned_by": "rbee",
                             "modality": engine.card.modality, "local": True, "peers": [],
                             "peer_count": 0}
        remote = self.dispatcher.remote
        for name, modality, peer in remote.models() if remote is not None else ():
            entry = out.setdefault(name, {"id": name, "object": "model", "created": 0,
                                          "owned_by": "rbee", "modality": modality,
                                          "local": False, "peers": [], "peer_count": 0})
            entry["peer_count"] += 1
            if len(entry["peers"]) < 16:
                entry["peers"].append(peer)
        return out

    async def start(self, call: Call, admitted: Pass) -> Job:
        """Every error that must be an HTTP status is raised here, before a stream starts."""
        started = time.perf_counter_ns()
        job = await self.dispatcher.start(call.request, admitted.stamp)
        mark("http", job.request_id, started)
        return job

    async def run(self, call: Call, admitted: Pass) -> tuple[Job, str]:
        """Run ``call`` to its end: the job (counts, data items) and its text."""
        job = await self.start(call, admitted)
        parts: list[str] = []
        try:
            with self.dispatcher.drain.cuttable():
                async with aclosing(job.batches()) as batches:
                    async for batch in batches:
                        parts.extend(batch)
        finally:
            self._finish(admitted, call, job, parts)
        return job, "".join(parts)

    @asynccontextmanager
    async def admission(self, tenant: Tenant | None, model: str, reserve: int = 0,
                        prompt: int = 0) -> AsyncIterator[Pass]:
        """Admit one request of ``tenant`` for ``model`` expected to use ``reserve`` tokens,
        ``prompt`` of them its input (quotas, allowed models).  A refusal — here or, for
        residency and policy, by the dispatcher — is counted and audited, then raised."""
        try:
            admitted = self.gate.admit(tenant, model, reserve, prompt)
        except Forbidden as exc:
            await self._refused(tenant, model, exc)
            raise
        try:
            yield admitted
        except Forbidden as exc:
            self.gate.refused(tenant, 403)
            await self._refused(tenant, model, exc, admitted.stamp.tenant_ref)
            raise
        finally:
            if not admitted.streaming:
                self.gate.finish(admitted, 0)  # no-op when the request counted its tokens

    async def _refused(self, tenant: Tenant | None, model: str, exc: Exception,
                       ref: bytes | None = None) -> None:
        log.info("refused (%s): %s", tenant.name if tenant else "-", exc)
        audit, d = self.dispatcher.audit, self.dispatcher
        if audit is not None:
            if ref is None and tenant is not None:
                ref = self.gate.ref(tenant)
            await audit.record("entry", "rejected", tenant_ref=ref, model=model[:128],
                               entry_peer=d.peer, error_code="forbidden")

    def _finish(self, admitted: Pass, call: Call, job: Job, parts: list[str]) -> None:
        if admitted.finished:
            return
        c = job.completion
        tokens = c.prompt_tokens + (c.completion_tokens if call.request.modality == "text" else 0)
        self.gate.finish(admitted, tokens)
        if admitted.keeps_content:
            self.gate.log_content(admitted, job.request_id, call.request.content(),
                                  "".join(parts))

    async def complete(self, call: Call, admitted: Pass) -> dict[str, Any]:
        job, text = await self.run(call, admitted)
        completion, kind = job.completion, call.request.kind
        head = {"created": int(time.time()), "model": call.model}
        if kind == "chat":
            return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", **head,
                    "choices": [{"index": 0, "logprobs": None,
                                 "finish_reason": completion.finish_reason,
                                 "message": {"role": "assistant", "content": text,
                                             "refusal": None}}],
                    "usage": _usage(completion), "system_fingerprint": None}
        return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", **head,
                "choices": [{"index": 0, "text": text, "logprobs": None,
                             "finish_reason": completion.finish_reason}],
                "usage": _usage(completion), "system_fingerprint": None}

    def stream(self, call: Call, job: Job, admitted: Pass) -> AsyncIterator[bytes]:
        """SSE events.  Errors after the first byte arrive as an error event before
        ``[DONE]``.  Closing the iterator (client gone) stops generation within a token.
        A body that never starts (the client left while the headers went out) still ends
        the request for its tenant when it is dropped: its slot and reservation are freed."""
        events = self._events(call, job, admitted)
        weakref.finalize(events, self._finish, admitted, call, job, [])
        return events

    async def _events(self, call: Call, job: Job, admitted: Pass) -> AsyncIterator[bytes]:
        kind = call.request.kind
        head: dict[str, Any] = {"created": int(time.time()), "model": call.model,
                                "system_fingerprint": None}
        if kind == "chat":
            head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion.chunk",
                    **head}
        else:
            head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", **head}
        if call.include_usage:
            head["usage"] = None

        def chunk(text: str | None, finish: str | None, role: bool = False) -> bytes:
            if kind == "chat":
                delta: dict[str, Any] = {}
                if role:
                    delta["role"] = "assistant"
                if text is not None:
                    delta["content"] = text
                choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": text or "", "logprobs": None,
                          "finish_reason": finish}
            return _sse({**head, "choices": [choice]})

        parts: list[str] = []
        first = True
        try:
            if kind == "chat":
                yield chunk("", None, role=True)
            async with aclosing(job.batches()) as batches, \
                    aclosing(self.dispatcher.drain.through(batches)) as until_cut:
                async for batch in until_cut:
                    text = "".join(batch)
                    if first:
                        mark("sse_first", job.request_id)
                        first = False
                    if admitted.keeps_content:  # the text is kept only for those tenants
                        parts.append(text)
                    yield chunk(text, None)
            yield chunk(None if kind == "chat" else "", job.completion.finish_reason)
            if call.include_usage:
                yield _sse({**head, "choices": [], "usage": _usage(job.completion)})
        except RequestError as exc:
            log.warning("stream failed: %s", exc)
            row = spec(exc)
            yield _sse(error_body(str(exc), row.type, param=exc.param, code=row.code))
        finally:
            self._finish(admitted, call, job, parts)
        yield b"data: [DONE]\n\n"

    async def embeddings(self, call: Call, admitted: Pass) -> dict[str, Any]:
        """Here or on the best peer, as the routing policy decides."""
        job, _ = await self.run(call, admitted)
        prompt_tokens = job.completion.prompt_tokens
        data = []
        for i, packed in enumerate(job.items):
            value: Any = base64.b64encode(packed).decode() if call.base64 else \
                list(struct.unpack(f"<{len(packed) // 4}f", packed))
            data.append({"object": "embedding", "index": i, "embedding": value})
        return {"object": "list", "data": data, "model": call.model,
                "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}}
