"""The request every entry hands to dispatch, whatever the modality, and what comes back.

``Request`` is typed and modality-neutral: the HTTP layer builds it from an OpenAI body,
the mesh builds it from a peer's signed InferenceRequest; neither body format goes any
further.  ``Job`` is a started request, local or on a peer, behind one interface.  This
module depends only on the engines' request types, routing's tenant facts and the error
table, so the mesh can use it without knowing the dispatcher.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import AsyncIterator, Literal, Protocol

from ..engines.base import Completion, ImageRequest, TextRequest
from ..routing import TenantFacts

__all__ = ["Kind", "Request", "Stamp", "Job", "Limits"]

Kind = Literal["chat", "completion", "embedding", "image"]


@dataclass(frozen=True)
class Limits:
    """What this node accepts in one request, from a client or a peer."""

    max_tokens: int = 4096
    default_max_tokens: int = 512
    max_stop: int = 4
    max_stop_bytes: int = 256  # each stop string, UTF-8 (the wire's limit)
    max_messages: int = 1024  # the wire's limit
    max_inputs: int = 256
    max_images: int = 4
    max_prompt_chars: int = 32000  # image prompts

    def check(self, request: Request) -> None:
        """Raise InvalidRequest if ``request`` asks for more than this node allows (the
        HTTP layer checks the same while parsing, naming the client's parameter)."""
        from ..errors import InvalidRequest

        t, image = request.text, request.image
        if t is not None and t.max_tokens > self.max_tokens:
            raise InvalidRequest(f"max_tokens is {t.max_tokens}; this node allows at most "
                                 f"{self.max_tokens}", param="max_tokens")
        if t is not None and len(t.stop) > self.max_stop:
            raise InvalidRequest(f"at most {self.max_stop} stop sequences", param="stop")
        if t is not None and any(len(s.encode()) > self.max_stop_bytes for s in t.stop):
            raise InvalidRequest(f"a stop sequence is longer than {self.max_stop_bytes} bytes",
                                 param="stop")
        if t is not None and t.messages is not None and len(t.messages) > self.max_messages:
            raise InvalidRequest(f"at most {self.max_messages} messages", param="messages")
        if len(request.inputs) > self.max_inputs:
            raise InvalidRequest(f"at most {self.max_inputs} inputs per request", param="input")
        if image is not None and image.n > self.max_images:
            raise InvalidRequest(f"this node generates at most {self.max_images} images per "
                                 "request", param="n")
        for field in ("prompt", "negative_prompt"):
            if image is not None and len(getattr(image, field) or "") > self.max_prompt_chars:
                raise InvalidRequest(f"the {field} is longer than {self.max_prompt_chars} "
                                     "characters", param=field)


@dataclass(frozen=True)
class Request:
    """One inference request: ``text`` for chat and completions (messages or prompt,
    sampling, max_tokens), ``inputs`` for embeddings, ``image`` for images."""

    kind: Kind
    model: str
    text: TextRequest | None = None
    inputs: tuple[str, ...] = ()
    image: ImageRequest | None = None
    stream: bool = False

    def __post_init__(self) -> None:
        wanted = {"chat": self.text, "completion": self.text, "image": self.image,
                  "embedding": self.inputs or None}[self.kind]
        if wanted is None:
            raise ValueError(f"a {self.kind} request needs its input")

    @property
    def modality(self) -> str:
        """The engine modality that serves it: "image" or "text" (embeddings too)."""
        return "image" if self.kind == "image" else "text"

    @property
    def units(self) -> int:
        """What the request asks for: tokens to generate, images, or inputs to embed."""
        if self.text is not None:
            return self.text.max_tokens
        if self.image is not None:
            return self.image.n
        return len(self.inputs)

    def prompt_chars(self) -> int:
        """The size of the input, in characters (routing estimates tokens from it)."""
        if self.text is not None:
            t = self.text
            return len(t.prompt or "") + sum(len(m.get("content") or "") for m in t.messages or ())
        if self.image is not None:
            return len(self.image.prompt)
        return sum(len(s) for s in self.inputs)

    def tokens_estimate(self) -> int:
        """Tokens this request may use, erring high (what a tenant's daily quota reserves):
        what it asks to generate (nothing for images and embeddings) and a token a
        character of input."""
        generated = self.text.max_tokens if self.text is not None else 0
        return generated + self.prompt_chars()

    def content(self) -> object:
        """The client's input, for tenants that keep a content log."""
        if self.text is not None:
            return self.text.messages or self.text.prompt
        if self.image is not None:
            return self.image.prompt
        return list(self.inputs)


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


class Job(Protocol):
    """A started request.  ``batches()`` yields lists of text pieces (text kinds) and ends
    when the result is complete; then ``items`` holds a data result (each embedding as
    little-endian float32, each image as PNG) and ``completion`` the counts.  Closing the
    iterator early stops the work (a local model within one token; a peer through a
    Cancel frame).  Raises RequestError; PeerUnavailable only before any output."""

    @property
    def completion(self) -> Completion: ...

    @property
    def where(self) -> bytes | None:
        """The executing peer; None for this node."""

    @property
    def request_id(self) -> bytes: ...

    @property
    def items(self) -> list[bytes]: ...

    def batches(self) -> AsyncIterator[list[str]]: ...
