"""A dispatch ``Request`` to a signed-envelope ``InferenceRequest`` and back.

The wire message is typed (messages, prompt, inputs, sampling, image spec): the protocol's
schema checks types, sizes and ranges before anything else runs, and the executor checks
the request against its own limits (``Limits.check``).  No HTTP body crosses the mesh.
"""

from __future__ import annotations

from ..dispatch.request import Limits, Request, Stamp
from ..engines.base import ImageRequest, TextRequest
from ..errors import InvalidRequest
from ..protocol.messages import ImageSpec, InferenceRequest, Sampling, Turn

__all__ = ["to_wire", "from_wire"]


def to_wire(request: Request, *, request_id: bytes, target: bytes, deadline_ms: int,
            stamp: Stamp = Stamp(), admit_by_ms: int | None = None) -> InferenceRequest:
    t, image = request.text, request.image
    messages = prompt = inputs = sampling = spec = None
    if t is not None:
        if t.messages is not None:
            messages = tuple(Turn(m["role"], m["content"]) for m in t.messages)
        prompt = t.prompt
        sampling = Sampling(temperature=t.temperature, top_p=t.top_p, seed=t.seed,
                            stop=tuple(t.stop), presence_penalty=t.presence_penalty,
                            frequency_penalty=t.frequency_penalty)
    if image is not None:
        prompt = image.prompt
        spec = ImageSpec(size=image.size, quality=image.quality, steps=image.steps,
                         guidance=image.guidance, negative_prompt=image.negative_prompt,
                         seed=image.seed)
    if request.inputs:
        inputs = tuple(request.inputs)
    return InferenceRequest(
        request_id=request_id, target=target, model=request.model, kind=request.kind,
        stream=request.stream, max_tokens=request.units, deadline_ms=deadline_ms,
        messages=messages, prompt=prompt, inputs=inputs, sampling=sampling, image=spec,
        tenant_ref=stamp.tenant_ref, residency=stamp.residency,
        admit_by_ms=admit_by_ms)


def from_wire(message: InferenceRequest, limits: Limits) -> Request:
    """The request a peer sent, checked against this node's ``limits``.  Raises
    InvalidRequest."""
    kind = message.kind
    try:
        if kind == "image":
            if not message.prompt or message.image is None or message.max_tokens < 1:
                raise InvalidRequest("an image request needs a prompt, an image spec and n >= 1")
            i = message.image
            request = Request(kind="image", model=message.model, image=ImageRequest(
                prompt=message.prompt, n=message.max_tokens, size=i.size, quality=i.quality,
                steps=i.steps, guidance=i.guidance, negative_prompt=i.negative_prompt,
                seed=i.seed))
        elif kind == "embedding":
            if not message.inputs or not all(message.inputs):
                raise InvalidRequest("an embedding request needs non-empty inputs")
            request = Request(kind="embedding", model=message.model,
                              inputs=tuple(message.inputs))
        else:
            chat = kind == "chat"
            if (message.messages is None) == chat or (message.prompt is None) != chat or \
                    (chat and not message.messages) or message.max_tokens < 1:
                raise InvalidRequest(f"a {kind} request needs "
                                     f"{'messages' if chat else 'a prompt'} and max_tokens >= 1")
            s = message.sampling or Sampling()
            request = Request(kind=kind, model=message.model, stream=message.stream,  # type: ignore[arg-type]
                              text=TextRequest(
                max_tokens=message.max_tokens, prompt=message.prompt,
                messages=None if message.messages is None else
                [{"role": m.role, "content": m.content} for m in message.messages],
                temperature=s.temperature, top_p=s.top_p,
                seed=None if s.seed is None else s.seed & 0x7FFFFFFF, stop=tuple(s.stop),
                presence_penalty=s.presence_penalty, frequency_penalty=s.frequency_penalty))
    except ValueError as exc:  # Request's own consistency check
        raise InvalidRequest(str(exc)) from None
    limits.check(request)
    return request
