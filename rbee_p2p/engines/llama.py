"""The llama-cpp-python text engine (chat, completions, embeddings) for GGUF models."""

from __future__ import annotations

import codecs
import logging
import math
import os
import random
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Sequence

import trio

from ..errors import EngineFailure, InvalidRequest
from .base import Completion, Embeddings, ModelCard, Prepared, TextEngine, TextRequest
from .modelthread import ModelThread

__all__ = ["LlamaSettings", "LlamaEngine", "BATCH_TOKENS", "BATCH_SECONDS", "PREFILL_CHUNK",
           "PREFILL_CHUNK_GPU", "available_cores", "plan_reuse"]

log = logging.getLogger(__name__)

BATCH_TOKENS = 6
"""Pieces handed to the event loop per wake-up (the first piece goes alone, at once)."""
BATCH_SECONDS = 0.05
"""...or fewer, if this long has passed since the last hand-over."""
PREFILL_CHUNK = 64
"""Prompts are evaluated in batches of this many tokens, at multiples of it from position 0.

llama.cpp's floating-point results depend on how a prompt is batched: the same tokens
evaluated as one batch or as a reused prefix plus a short tail give slightly different
logits, and at temperature 0 a different answer.  A temperature-0 request therefore reuses
only whole chunks of the cached prompt that were themselves evaluated this way, so its
prompt is batched exactly as on a fresh node.  Sampled requests (a seed too) reuse any
cached prefix: re-evaluating a shared prefix costs about 2 ms a token on 2 CPU cores, and
a seeded answer changes only when the perturbation moves a sampled token across the
random draw (README "Repeatable answers")."""
PREFILL_CHUNK_GPU = 512
"""The same with layers on a GPU, where small batches waste most of the device and
re-evaluating up to 511 tokens of a conversation takes milliseconds (llama.cpp's default)."""


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


@dataclass(frozen=True)
class LlamaSettings:
    context: int = 4096
    threads: int | None = None  # None: every core this process may use (llama's own default
    # is half the cores, which measured 0.56x the speed on a 2-core machine)
    gpu_layers: int = 0
    main_gpu: int = 0
    split_mode: int | None = None  # 0 (none): the whole model on main_gpu (a pinned device)

    @property
    def n_threads(self) -> int:
        return self.threads or available_cores()

    @property
    def prefill_chunk(self) -> int:
        return PREFILL_CHUNK_GPU if self.gpu_layers else PREFILL_CHUNK


def _stop_hold(text: str, stops: tuple[str, ...]) -> int:
    """How many trailing characters of ``text`` could begin a stop string (must be held)."""
    hold = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:n]):
                hold = max(hold, n)
                break
    return hold


def plan_reuse(cached: Sequence[int], prompt: Sequence[int], aligned: int,
               repeatable: bool, chunk: int = PREFILL_CHUNK) -> tuple[int, int]:
    """How many leading cached tokens a request for ``prompt`` keeps, and the new count of
    leading positions equal to a fresh prefill in batches of ``chunk`` (``aligned``; see
    PREFILL_CHUNK).  At least one prompt token is always evaluated (fresh logits)."""
    common = 0
    for a, b in zip(cached, prompt):
        if a != b:
            break
        common += 1
    keep = min(common, len(prompt) - 1)
    if repeatable:
        keep = min(keep - keep % chunk, aligned)
    if keep % chunk == 0 and keep <= aligned:  # the rest is evaluated chunk-aligned
        return keep, len(prompt) - len(prompt) % chunk
    return keep, min(aligned, keep - keep % chunk)


class LlamaEngine(TextEngine):
    """One GGUF model on its own :class:`ModelThread`.  Build with :meth:`load`."""

    def __init__(self, card: ModelCard, llm: Any, thread: ModelThread,
                 settings: LlamaSettings) -> None:
        self.card = card
        self._llm = llm
        self._thread = thread
        self._settings = settings
        self._embedder: Any = None
        self._template: Any = self._chat_formatter(llm)
        self._aligned = 0  # leading cached positions that a fresh, chunked prefill would equal

    @classmethod
    async def load(cls, name: str, path: Path, digest: bytes, settings: LlamaSettings,
                   aliases: tuple[str, ...] = (), device: str = "cpu") -> LlamaEngine:
        """Load the model on a new model thread.  Raises :class:`EngineFailure`."""
        thread = ModelThread(name)

        def construct() -> Any:
            from llama_cpp import Llama

            return Llama(str(path), n_ctx=settings.context, n_threads=settings.n_threads,
                         n_threads_batch=settings.n_threads, n_batch=settings.prefill_chunk,
                         n_gpu_layers=settings.gpu_layers,
                         main_gpu=settings.main_gpu, verbose=False,
                         **({} if settings.split_mode is None else
                            {"split_mode": settings.split_mode}))

        try:
            llm = await thread.call(construct)
        except Exception as exc:
            thread.close()
            raise EngineFailure(f"cannot load model {name} from {path}: {exc}") from exc
        card = ModelCard(name=name, path=str(path), digest=digest, modality="text",
                         context=llm.n_ctx(), size_bytes=path.stat().st_size, aliases=aliases,
                         device=device)
        return cls(card, llm, thread, settings)

    @staticmethod
    def _chat_formatter(llm: Any) -> Any:
        from llama_cpp import llama_chat_format

        template = llm.metadata.get("tokenizer.chat_template")
        if not template:
            return None
        eos = llm._model.token_get_text(llm.token_eos()) if llm.token_eos() >= 0 else ""
        bos = llm._model.token_get_text(llm.token_bos()) if llm.token_bos() >= 0 else ""
        return llama_chat_format.Jinja2ChatFormatter(template=template, eos_token=eos,
                                                     bos_token=bos)

    # -- preparing -------------------------------------------------------------------------

    def prepare(self, request: TextRequest) -> Prepared:
        llm = self._llm
        stops = tuple(request.stop)
        if request.messages is not None:
            if self._template is None:
                raise InvalidRequest(f"model {self.card.name} has no chat template; "
                                     "use /v1/completions", param="messages")
            formatted = self._template(messages=request.messages)
            text = formatted.prompt
            extra = formatted.stop
            if extra:
                stops += tuple([extra] if isinstance(extra, str) else extra)
            tokens = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
        else:
            text = request.prompt or ""
            tokens = llm.tokenize(text.encode("utf-8"), add_bos=llm._model.add_bos_token(),
                                  special=True)
        if not tokens:
            tokens = [llm.token_bos()]
        limit = llm.n_ctx()
        if len(tokens) + request.max_tokens > limit:
            raise InvalidRequest(
                f"This model's maximum context length is {limit} tokens. However, you "
                f"requested {len(tokens) + request.max_tokens} tokens ({len(tokens)} in the "
                f"prompt, {request.max_tokens} for the completion). Please reduce the prompt "
                "or max_tokens.", param="max_tokens")
        return Prepared(request=request, prompt_tokens=tokens, stop=stops)

    # -- generating (runs on the model thread) ---------------------------------------------

    def _generate(self, prepared: Prepared, completion: Completion, cancel: threading.Event,
                  deliver: Callable[[Any], None]) -> None:
        llm = self._llm
        req = prepared.request
        completion.prompt_tokens = len(prepared.prompt_tokens)
        llm.set_seed(req.seed if req.seed is not None else random.getrandbits(31))
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        stops = prepared.stop
        held = ""
        batch: list[str] = []
        last = time.perf_counter()
        first = True
        finish = "length"
        stopped = False
        produced = 0
        from llama_cpp import llama_vocab_is_eog

        vocab = llm._model.vocab
        keep, self._aligned = plan_reuse(llm.input_ids[: llm.n_tokens], prepared.prompt_tokens,
                                         self._aligned, repeatable=req.temperature == 0,
                                         chunk=self._settings.prefill_chunk)
        llm.n_tokens = keep  # (never more than cached) generate() evaluates the rest
        tokens = llm.generate(
            prepared.prompt_tokens, temp=req.temperature, top_p=req.top_p, top_k=40,
            min_p=0.05, repeat_penalty=1.0, presence_penalty=req.presence_penalty,
            frequency_penalty=req.frequency_penalty)
        try:
            for token in tokens:
                if cancel.is_set():
                    finish = "cancelled"
                    break
                if llama_vocab_is_eog(vocab, token):
                    finish = "stop"
                    break
                produced += 1
                completion.completion_tokens = produced
                piece = decoder.decode(llm.detokenize([token]))
                if stops:
                    held += piece
                    cut = min((i for i in (held.find(s) for s in stops) if i >= 0), default=-1)
                    if cut >= 0:
                        if held[:cut]:
                            batch.append(held[:cut])
                        finish, stopped = "stop", True
                        break
                    keep = _stop_hold(held, stops)
                    piece, held = held[: len(held) - keep], held[len(held) - keep :]
                if piece:
                    batch.append(piece)
                now = time.perf_counter()
                if batch and (first or len(batch) >= BATCH_TOKENS or now - last >= BATCH_SECONDS):
                    deliver(batch)
                    batch, last, first = [], now, False
                if produced >= req.max_tokens:
                    break
            if finish != "cancelled":
                # after a stop string, whatever follows it (held bytes included) is dropped
                tail = "" if stopped else held + decoder.decode(b"", final=True)
                if tail:
                    batch.append(tail)
                if batch:
                    deliver(batch)
            completion.completion_tokens = produced
            completion.finish_reason = finish
            deliver(None)
        except Exception as exc:  # the node keeps serving; this request fails
            self._aligned = 0  # the cache is in an unknown state
            log.exception("generation failed on %s", self.card.name)
            deliver(exc)
        finally:
            tokens.close()

    async def stream(self, prepared: Prepared, completion: Completion) -> AsyncIterator[list[str]]:
        send, receive = trio.open_memory_channel[Any](prepared.request.max_tokens + 4)
        cancel = threading.Event()
        token = trio.lowlevel.current_trio_token()

        def deliver(item: Any) -> None:
            try:
                token.run_sync_soon(send.send_nowait, item)
            except trio.RunFinishedError:
                cancel.set()

        self._thread.submit(lambda: self._generate(prepared, completion, cancel, deliver))
        finished = False
        try:
            while True:
                item = await receive.receive()
                if item is None:
                    finished = True
                    return
                if isinstance(item, BaseException):
                    finished = True
                    raise EngineFailure(f"generation failed: {item}") from item
                yield item
        finally:
            if not finished:
                # Stop the model thread (it checks before every token) and wait until it
                # has, so the model is free and the counts are final when we return.
                completion.tokens_at_cancel = completion.completion_tokens
                cancel.set()
                with trio.move_on_after(30, shield=True):
                    while not isinstance(item := await receive.receive(), BaseException) \
                            and item is not None:
                        pass

    # -- embeddings ------------------------------------------------------------------------

    async def embed(self, inputs: list[str]) -> Embeddings:
        def run() -> Embeddings:
            if self._embedder is None:
                from llama_cpp import LLAMA_POOLING_TYPE_MEAN, Llama

                self._embedder = Llama(
                    self.card.path, embedding=True, pooling_type=LLAMA_POOLING_TYPE_MEAN,
                    n_ctx=self._settings.context, n_threads=self._settings.n_threads,
                    n_gpu_layers=self._settings.gpu_layers, verbose=False)
            limit = self._embedder.n_ctx()
            counts = [len(self._embedder.tokenize(t.encode("utf-8"))) for t in inputs]
            for i, n in enumerate(counts):
                if n > limit:
                    raise InvalidRequest(f"input[{i}] has {n} tokens; the limit is {limit}",
                                         param="input")
            vectors = self._embedder.embed(inputs, normalize=False)
            out = []
            for v in vectors:
                norm = math.sqrt(sum(x * x for x in v)) or 1.0
                out.append([x / norm for x in v])
            return Embeddings(vectors=out, prompt_tokens=sum(counts))

        try:
            result: Embeddings = await self._thread.call(run)
        except InvalidRequest:
            raise
        except Exception as exc:
            raise EngineFailure(f"embedding failed: {exc}") from exc
        return result

    async def aclose(self) -> None:
        def release() -> None:
            self._llm.close()
            if self._embedder is not None:
                self._embedder.close()

        try:
            await self._thread.call(release)
        finally:
            self._thread.close()
