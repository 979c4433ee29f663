"""The engine interface: what the serving layer needs from a local model.

An engine owns one loaded model.  ``prepare`` validates and tokenizes a request on the
caller's thread (cheap, raises :class:`InvalidRequest`), ``stream`` runs it and yields
batches of text pieces as they come (the first piece alone, at once), filling a
:class:`Completion` with the final counts.  Engines do not queue: the
:class:`~rbee_p2p.engines.scheduler.Scheduler` in front of them does.
"""

from __future__ import annotations

import hashlib
import json
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Literal

__all__ = [
    "ModelCard",
    "TextRequest",
    "ImageRequest",
    "Prepared",
    "Completion",
    "Embeddings",
    "TextEngine",
    "file_digest",
]

Modality = Literal["text", "embeddings", "image"]


@dataclass(frozen=True)
class ModelCard:
    """What a served model is: its served name, aliases, source and identity."""

    name: str
    path: str
    digest: bytes
    modality: Modality = "text"
    context: int = 0
    size_bytes: int = 0
    aliases: tuple[str, ...] = ()
    device: str = "cpu"


@dataclass
class TextRequest:
    """A generation request in engine terms (already validated by the API layer)."""

    max_tokens: int
    messages: list[dict[str, str]] | None = None  # chat
    prompt: str | None = None  # plain completion
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0


@dataclass(frozen=True)
class ImageRequest:
    """What a client asked for (validated by the API layer; sizes by the engine)."""

    prompt: str
    n: int = 1
    size: str | None = None  # "WxH"; None or "auto": the model's native size
    quality: str | None = None  # one of QUALITIES: steps relative to the model's default
    steps: int | None = None  # overrides quality
    guidance: float | None = None
    negative_prompt: str | None = None
    seed: int | None = None


@dataclass
class Prepared:
    """A request tokenized for one engine."""

    request: TextRequest
    prompt_tokens: list[int]
    stop: tuple[str, ...]


@dataclass
class Completion:
    """Filled in while a request runs; final once ``finish_reason`` is set."""

    prompt_tokens: int = 0
    completion_tokens: int = 0  # updated as tokens are generated
    finish_reason: str | None = None  # "stop" | "length" | "cancelled"
    tokens_at_cancel: int | None = None  # completion_tokens when cancellation was requested


@dataclass
class Embeddings:
    vectors: list[list[float]] = field(default_factory=list)
    prompt_tokens: int = 0


class TextEngine(ABC):
    """One loaded text model.  Implementations: llama-cpp-python, a scripted fake."""

    card: ModelCard

    @abstractmethod
    def prepare(self, request: TextRequest) -> Prepared:
        """Tokenize and check against the context size.  Raises :class:`InvalidRequest`."""

    @abstractmethod
    def stream(self, prepared: Prepared, completion: Completion) -> AsyncIterator[list[str]]:
        """Generate; yield batches of text pieces.  Cancel-safe: closing or cancelling the
        iterator stops generation within one token.  Raises :class:`EngineFailure`."""

    async def embed(self, inputs: list[str]) -> Embeddings:
        """Mean-pooled embeddings, one per input.  Raises :class:`InvalidRequest` if this
        model cannot embed."""
        from ..errors import InvalidRequest

        raise InvalidRequest(f"model {self.card.name} does not serve embeddings", param="model")

    async def aclose(self) -> None:
        """Release the model (stop its thread).  Idempotent."""


_DIGEST_CACHE_NAME = "digests.json"


def file_digest(path: Path, cache_dir: Path | None = None) -> bytes:
    """sha256 of a model file, cached by (path, size, mtime) in ``cache_dir``."""
    stat = path.stat()
    key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    cache_file = cache_dir / _DIGEST_CACHE_NAME if cache_dir else None
    cache: dict[str, Any] = {}
    if cache_file and cache_file.exists():
        try:
            cache = json.loads(cache_file.read_text())
        except (ValueError, OSError):
            cache = {}
        if isinstance(cache.get(key), str):
            return bytes.fromhex(cache[key])
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    digest = h.digest()
    if cache_file:
        cache[key] = digest.hex()
        cache_dir.mkdir(parents=True, exist_ok=True)  # type: ignore[union-attr]
        tmp = cache_file.with_name(cache_file.name + f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cache))
        os.replace(tmp, cache_file)
    return digest
