"""Engine-agnostic OpenAI responses: JSON bodies and SSE streams ending in ``data: [DONE]``.

One SSE event per batch of tokens (the engine hands over the first token alone, then
batches): each event costs event-loop time, so fewer, fuller events are faster for the
same text (DESIGN.md, engine notes).
"""

from __future__ import annotations

import base64
import json
import logging
import struct
import time
import uuid
from contextlib import aclosing
from typing import Any, AsyncIterator, Literal

from ..engines.base import Completion, Prepared, TextEngine
from ..engines.scheduler import Scheduler
from ..errors import RequestError
from .schemas import ChatCall, EmbeddingsCall

__all__ = ["Serving", "error_body", "Kind"]

log = logging.getLogger(__name__)
Kind = Literal["chat", "completion"]


def error_body(message: str, type_: str, *, param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def _sse(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"


class Serving:
    """Runs validated calls through the scheduler and shapes OpenAI responses."""

    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler
        self.tokens_generated: dict[str, int] = {}
        self.requests_served: dict[str, int] = {}

    def prepare(self, call: ChatCall) -> tuple[TextEngine, Prepared]:
        """Look up, tokenize, check the context and the queue: every error that must be an
        HTTP status is raised here, before a stream starts."""
        engine = self.scheduler.lookup(call.model)
        prepared = engine.prepare(call.request)
        self.scheduler.check(engine)
        return engine, prepared

    def _account(self, engine: TextEngine, completion: Completion) -> None:
        name = engine.card.name
        self.tokens_generated[name] = self.tokens_generated.get(name, 0) + \
            completion.completion_tokens
        self.requests_served[name] = self.requests_served.get(name, 0) + 1

    @staticmethod
    def _usage(c: Completion) -> dict[str, int]:
        return {"prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens,
                "total_tokens": c.prompt_tokens + c.completion_tokens}

    async def complete(self, call: ChatCall, kind: Kind) -> dict[str, Any]:
        engine, prepared = self.prepare(call)
        completion = Completion()
        parts: list[str] = []
        async with self.scheduler.admit(engine):
            try:
                async with aclosing(engine.stream(prepared, completion)) as batches:
                    async for batch in batches:
                        parts.extend(batch)
            finally:
                self._account(engine, completion)
        text = "".join(parts)
        head = {"created": int(time.time()), "model": call.model}
        if kind == "chat":
            return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", **head,
                    "choices": [{"index": 0, "logprobs": None,
                                 "finish_reason": completion.finish_reason,
                                 "message": {"role": "assistant", "content": text,
                                             "refusal": None}}],
                    "usage": self._usage(completion), "system_fingerprint": None}
        return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", **head,
                "choices": [{"index": 0, "text": text, "logprobs": None,
                             "finish_reason": completion.finish_reason}],
                "usage": self._usage(completion), "system_fingerprint": None}

    async def stream(self, call: ChatCall, kind: Kind, engine: TextEngine,
                     prepared: Prepared) -> AsyncIterator[bytes]:
        """SSE events.  Errors after the first byte arrive as an error event before
        ``[DONE]``.  Closing the iterator (client gone) stops generation within a token."""
        completion = Completion()
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

        try:
            async with self.scheduler.admit(engine):
                try:
                    if kind == "chat":
                        yield chunk("", None, role=True)
                    async with aclosing(engine.stream(prepared, completion)) as batches:
                        async for batch in batches:
                            yield chunk("".join(batch), None)
                finally:
                    self._account(engine, completion)
            yield chunk(None if kind == "chat" else "", completion.finish_reason)
            if call.include_usage:
                yield _sse({**head, "choices": [], "usage": self._usage(completion)})
        except RequestError as exc:
            log.warning("stream failed: %s", exc)
            yield _sse(error_body(str(exc), "server_error", code=type(exc).__name__))
        yield b"data: [DONE]\n\n"

    async def embeddings(self, call: EmbeddingsCall) -> dict[str, Any]:
        engine = self.scheduler.lookup(call.model)
        async with self.scheduler.admit(engine):
            result = await engine.embed(call.inputs)
        data = []
        for i, vector in enumerate(result.vectors):
            value: Any = vector
            if call.base64:
                value = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
            data.append({"object": "embedding", "index": i, "embedding": value})
        return {"object": "list", "data": data, "model": call.model,
                "usage": {"prompt_tokens": result.prompt_tokens,
                          "total_tokens": result.prompt_tokens}}
