"""A scripted text engine for tests and simulations: trio-native, virtual-time friendly.

Tokens are words.  Each generated token takes ``token_seconds`` of (virtual) time; the
output is ``script`` repeated, or the prompt echoed.  It records what happened so tests
can assert on it: how many tokens were generated, and whether a run was cancelled.
"""

from __future__ import annotations

import hashlib
from typing import AsyncIterator

import trio

from ..errors import EngineFailure, InvalidRequest
from .base import Completion, Embeddings, ModelCard, Prepared, TextEngine, TextRequest

__all__ = ["ScriptedEngine"]


class ScriptedEngine(TextEngine):
    def __init__(self, name: str = "fake", *, script: str = "", token_seconds: float = 0.01,
                 context: int = 512, batch: int = 4, fail_at: int | None = None,
                 aliases: tuple[str, ...] = ()) -> None:
        self.card = ModelCard(name=name, path=f"scripted:{name}",
                              digest=hashlib.sha256(name.encode()).digest(), context=context,
                              aliases=aliases)
        self.script = script
        self.token_seconds = token_seconds
        self.batch = batch
        self.fail_at = fail_at
        self.generated = 0  # tokens produced, all runs
        self.runs: list[Completion] = []

    def prepare(self, request: TextRequest) -> Prepared:
        if request.messages is not None:
            text = " ".join(m.get("content", "") for m in request.messages)
        else:
            text = request.prompt or ""
        tokens = list(range(len(text.split()) or 1))
        if len(tokens) + request.max_tokens > self.card.context:
            raise InvalidRequest(f"maximum context length is {self.card.context} tokens",
                                 param="max_tokens")
        return Prepared(request=request, prompt_tokens=tokens, stop=tuple(request.stop))

    async def stream(self, prepared: Prepared, completion: Completion) -> AsyncIterator[list[str]]:
        req = prepared.request
        words = (self.script or " ".join(["tok"] * 8)).split()
        completion.prompt_tokens = len(prepared.prompt_tokens)
        completion.finish_reason = "cancelled"
        self.runs.append(completion)
        batch: list[str] = []
        for i in range(req.max_tokens):
            await trio.sleep(self.token_seconds)
            if self.fail_at is not None and i == self.fail_at:
                raise EngineFailure("scripted failure")
            piece = (" " if i else "") + words[i % len(words)]
            self.generated += 1
            completion.completion_tokens += 1
            if any(s in piece for s in prepared.stop):
                completion.finish_reason = "stop"
                break
            batch.append(piece)
            if i == 0 or len(batch) >= self.batch:
                yield batch
                batch = []
        else:
            completion.finish_reason = "length"
        if batch:
            yield batch

    async def embed(self, inputs: list[str]) -> Embeddings:
        vectors = [[b / 255 for b in hashlib.sha256(text.encode()).digest()[:8]]
                   for text in inputs]
        return Embeddings(vectors=vectors, prompt_tokens=sum(len(t.split()) for t in inputs))
