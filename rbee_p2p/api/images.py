"""``POST /v1/images/generations`` (OpenAI's shape) and the node's short-lived image URLs.

Request: ``prompt`` (required, non-empty), ``model`` (default: the node's first image
model, else the first one a peer serves), ``n`` (1..``max_images``), ``size`` ("WxH" from OpenAI's sizes or the model's
native size, or "auto" = native), ``response_format`` (``b64_json``, the default, or
``url``), ``quality`` (low = half the model's default steps; auto/standard/medium = the
default; high/hd = 1.5x), ``output_format`` (png only), ``user`` (accepted, unused).
Extensions: ``seed`` (same seed, same image), ``steps`` (1..150, overrides quality),
``guidance_scale`` (0..50), ``negative_prompt``.  Unknown arguments are refused (400), as
OpenAI does; so are ``background``, ``moderation``, ``output_compression``, ``style``,
``partial_images`` and ``stream``.

``url`` images are served at ``GET /v1/images/files/<id>.png`` for ``image_url_ttl``
seconds; the store holds at most ``image_store_mb`` MiB and 1024 images (oldest dropped
first).  Ids are 144 random bits: the URL is the capability.

Requests take the one request path (``dispatch``): tenant admission, the routing policy
(built-in or Starlark, pins, residency), this node or a peer, failover, receipts, audit.
Local jobs wait in the model's FIFO (bounded, 503 + Retry-After when full), then for their
device's image slot (one image job per device at a time), separate from the text queues:
text and images never wait for each other.
"""

from __future__ import annotations

import json
import logging
import math
import secrets
import time
from base64 import b64encode
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

import trio
from quart import Response, request

from ..dispatch.request import Request
from ..engines.diffusion import MAX_STEPS, QUALITIES, ImageEngine, ImageRequest
from ..errors import InvalidRequest, ModelNotFound, ModelUnavailable
from .schemas import Call, int_param
from .serving import error_body

__all__ = ["ImageLimits", "ImageCall", "ImageStore", "ImageService", "parse_images", "image_limits"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ImageLimits:
    max_images: int = 4  # n
    max_prompt_chars: int = 32000
    url_ttl: float = 600.0  # seconds a url response stays fetchable
    store_bytes: int = 256 << 20
    store_count: int = 1024


def image_limits(config: Any) -> ImageLimits:
    """The limits a :class:`~rbee_p2p.config.NodeConfig` sets."""
    return ImageLimits(max_images=config.max_images, url_ttl=float(config.image_url_ttl),
                       store_bytes=config.image_store_mb << 20)


@dataclass(frozen=True)
class ImageCall:
    model: str | None
    request: ImageRequest
    response_format: str  # "b64_json" | "url"


ALLOWED = {"model", "prompt", "n", "size", "response_format", "quality", "output_format",
           "seed", "steps", "guidance_scale", "negative_prompt"}
IGNORED = {"user"}
UNSUPPORTED = {"background", "moderation", "output_compression", "style", "partial_images",
               "input_fidelity", "image", "mask"}


def _text(body: dict[str, Any], key: str, limit: int) -> str | None:
    value = body.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidRequest(f"'{key}' must be a string", param=key)
    if len(value) > limit:
        raise InvalidRequest(f"'{key}' is {len(value)} characters; the limit is {limit}",
                             param=key)
    return value


def parse_images(body: dict[str, Any], limits: ImageLimits) -> ImageCall:
    """Validate an images/generations body.  Raises :class:`InvalidRequest` naming the
    parameter."""
    for key in body:
        if key in IGNORED:
            continue
        if key in UNSUPPORTED or (key == "stream" and body[key]):
            raise InvalidRequest(f"'{key}' is not supported by this server", param=key)
        if key not in ALLOWED and key != "stream":
            raise InvalidRequest(f"Unrecognized request argument supplied: {key}", param=key)
    prompt = _text(body, "prompt", limits.max_prompt_chars)
    if prompt is None or not prompt.strip():
        raise InvalidRequest("'prompt' is required and must be a non-empty string",
                             param="prompt")
    model = body.get("model")
    if model is not None and (not isinstance(model, str) or not model):
        raise InvalidRequest("'model' must be a non-empty string", param="model")
    n = int_param(body, "n", 1, 1 << 30)
    if n is not None and n > limits.max_images:
        raise InvalidRequest(f"'n' is {n}; this node generates at most {limits.max_images} "
                             "images per request", param="n")
    size = body.get("size")
    if size is not None and (not isinstance(size, str) or not (
            size == "auto" or _is_size(size))):
        raise InvalidRequest(f"Invalid size {size!r}: use 'WIDTHxHEIGHT' (e.g. '1024x1024') "
                             "or 'auto'", param="size")
    fmt = body.get("response_format")
    if fmt is None:
        fmt = "b64_json"
    if fmt not in ("b64_json", "url"):
        raise InvalidRequest("'response_format' must be 'b64_json' or 'url'",
                             param="response_format")
    quality = body.get("quality")
    if quality is not None and quality not in QUALITIES:
        raise InvalidRequest(f"'quality' must be one of {', '.join(QUALITIES)}",
                             param="quality")
    out_fmt = body.get("output_format")
    if out_fmt not in (None, "png"):
        raise InvalidRequest("only output_format 'png' is supported", param="output_format")
    guidance = body.get("guidance_scale")
    if guidance is not None and (isinstance(guidance, bool) or not isinstance(
            guidance, (int, float)) or not math.isfinite(guidance) or not 0 <= guidance <= 50):
        raise InvalidRequest("'guidance_scale' must be a number between 0 and 50",
                             param="guidance_scale")
    seed = int_param(body, "seed", -(2**63), 2**64 - 1)
    request = ImageRequest(
        prompt=prompt, n=n or 1, size=size, quality=quality,
        steps=int_param(body, "steps", 1, MAX_STEPS),
        guidance=None if guidance is None else float(guidance),
        negative_prompt=_text(body, "negative_prompt", limits.max_prompt_chars),
        seed=None if seed is None else seed & (2**63 - 1))
    return ImageCall(model=model, request=request, response_format=fmt)


def _png_size(png: bytes) -> str:
    """"WxH" from a PNG's IHDR chunk ("0x0" if it is not a PNG)."""
    if png[:8] != b"\x89PNG\r\n\x1a\n" or len(png) < 24:
        return "0x0"
    return f"{int.from_bytes(png[16:20], 'big')}x{int.from_bytes(png[20:24], 'big')}"


def _is_size(text: str) -> bool:
    w, sep, h = text.partition("x")
    return bool(sep) and w.isdigit() and h.isdigit() and len(w) <= 5 and len(h) <= 5


class ImageStore:
    """PNG files behind random ids, for a limited time, bounded in count and bytes.  Time is
    trio's clock (virtual in tests)."""

    def __init__(self, ttl: float, max_bytes: int, max_count: int = 1024) -> None:
        self.ttl = ttl
        self.max_bytes = max_bytes
        self.max_count = max_count
        self._items: OrderedDict[str, tuple[bytes, float]] = OrderedDict()
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._items)

    def _drop(self, key: str) -> None:
        data, _ = self._items.pop(key)
        self._bytes -= len(data)

    def _expire(self, now: float) -> None:
        while self._items:
            key, (_, expires) = next(iter(self._items.items()))
            if expires > now:
                break
            self._drop(key)

    def put(self, data: bytes) -> str:
        """Store ``data``; returns its id.  Raises :class:`InvalidRequest` if one image is
        larger than the whole store."""
        if len(data) > self.max_bytes:
            raise InvalidRequest("the image is larger than this node's URL store; use "
                                 "response_format 'b64_json'", param="response_format")
        now = trio.current_time()
        self._expire(now)
        while self._items and (len(self._items) >= self.max_count
                               or self._bytes + len(data) > self.max_bytes):
            self._drop(next(iter(self._items)))
        key = secrets.token_urlsafe(18)
        self._items[key] = (data, now + self.ttl)
        self._bytes += len(data)
        return key

    def get(self, key: str) -> tuple[bytes, float] | None:
        """(data, seconds left) or None if unknown or expired."""
        self._expire(trio.current_time())
        item = self._items.get(key)
        return None if item is None else (item[0], item[1] - trio.current_time())


class ImageService:
    """The image routes: parses requests, resolves the default model, runs them through
    the one request path (``Serving``: tenant admission, routing, local or peer) and
    shapes OpenAI responses; keeps the short-lived URL store."""

    def __init__(self, serving: Any, capacity: Any, limits: ImageLimits) -> None:
        self.serving = serving  # api.serving.Serving
        self.capacity = capacity  # engines.admission.Capacity (why images are unavailable)
        self.limits = limits
        self.store = ImageStore(limits.url_ttl, limits.store_bytes, limits.store_count)

    def image_engines(self) -> list[ImageEngine]:
        return [e for e in self.serving.scheduler.engines if isinstance(e, ImageEngine)]

    def default_model(self) -> str:
        """The model a request without ``model`` runs on: this node's first image model,
        else the first one a peer serves.  Raises :class:`ModelUnavailable` (configured
        here but not loaded: no torch, or it did not fit) or :class:`ModelNotFound`."""
        engines = self.image_engines()
        if engines:
            return engines[0].card.name
        remote = self.serving.dispatcher.remote
        peers = sorted(name for name, modality, _ in (remote.models() if remote else ())
                       if modality == "image")
        if peers:
            return peers[0]
        reason = self.capacity.images_reason if self.capacity else None
        unavailable = [p for p in (self.capacity.placements if self.capacity else [])
                       if p.kind == "image" and p.reason]
        if unavailable or reason:
            raise ModelUnavailable(f"images are unavailable on this node: "
                                   f"{reason or unavailable[0].reason}", param="model")
        raise ModelNotFound("no image model is served by this node or its peers; name one "
                            "with 'model'", param="model")

    async def generate(self, call: ImageCall, model: str, base_url: str,
                       admitted: Any) -> dict[str, Any]:
        request = Request("image", model, image=call.request)
        job, _ = await self.serving.run(Call(request), admitted)
        pngs = job.items
        if call.response_format == "url":
            data = [{"url": f"{base_url.rstrip('/')}/v1/images/files/{self.store.put(png)}.png"}
                    for png in pngs]
        else:
            data = [{"b64_json": b64encode(png).decode()} for png in pngs]
        return {"created": int(time.time()), "data": data,
                "size": _png_size(pngs[0]) if pngs else "0x0",
                "quality": call.request.quality or "auto", "output_format": "png"}

    def status(self) -> dict[str, Any]:
        d = self.serving.dispatcher
        return {"models": [e.card.name for e in self.image_engines()],
                "images_generated": dict(d.images_generated), "failures": dict(d.failures),
                "url_store": len(self.store)}

    def register(self, app: Any, get_body: Callable[[], Awaitable[dict[str, Any]]],
                 tenant: Callable[[], Any], admission: Callable[..., Any]) -> None:
        """Add the routes to a quart app.  ``get_body`` reads and parses the request body
        (the app's own helper, with its size limit); ``tenant`` authenticates the caller and
        ``admission(tenant, model, reserve)`` admits the request (Serving.admission)."""

        @app.post("/v1/images/generations")
        async def images_generations() -> Response:
            who = tenant()
            body = await get_body()
            call = parse_images(body, self.limits)
            model = call.model or self.default_model()  # the tenant's allow-list sees it
            async with admission(who, model, len(call.request.prompt)) as admitted:
                result = await self.generate(call, model, request.host_url, admitted)
            return Response(json.dumps(result), mimetype="application/json")

        @app.get("/v1/images/files/<name>")
        async def image_file(name: str) -> Response:
            key = name[:-4] if name.endswith(".png") else name
            item = self.store.get(key)
            if item is None:
                body = error_body("This image does not exist or has expired (image URLs are "
                                  f"kept {self.limits.url_ttl:.0f} s).",
                                  "invalid_request_error", code="image_not_found")
                return Response(json.dumps(body), status=404, mimetype="application/json")
            data, left = item
            return Response(data, mimetype="image/png", headers={
                "Cache-Control": f"private, max-age={max(0, int(left))}"})
