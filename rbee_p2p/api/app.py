"""The HTTP routes (quart-trio).  Thin: parse, call serving, translate errors in one table."""

from __future__ import annotations

import logging
import math
from typing import Any, Callable

from quart import Response, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from ..errors import Busy, PayloadTooLarge, QuotaExceeded, RequestError, spec
from ..tenancy.tenants import Tenant
from .schemas import Limits, parse_chat, parse_completion, parse_embeddings, parse_json
from .serving import Serving, error_body

__all__ = ["create_app"]

log = logging.getLogger(__name__)

_HTTP_TYPES = {404: "invalid_request_error", 405: "invalid_request_error",
               413: "invalid_request_error"}


def _json(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    import json

    return Response(json.dumps(body, ensure_ascii=False), status=status, headers=headers,
                    mimetype="application/json")


def create_app(serving: Serving, limits: Limits, *, max_body_bytes: int,
               status: Callable[[], dict[str, Any]], images: Any = None) -> QuartTrio:
    """``images``: an :class:`~rbee_p2p.api.images.ImageService` adds the image routes."""
    app = QuartTrio("rbee_p2p")
    app.config["MAX_CONTENT_LENGTH"] = max_body_bytes
    app.config["RESPONSE_TIMEOUT"] = None  # generations may run longer than quart's 60 s
    app.config["BODY_TIMEOUT"] = 60

    async def body() -> dict[str, Any]:
        length = request.content_length
        if length is not None and length > max_body_bytes:
            raise PayloadTooLarge(f"request body of {length} bytes exceeds the limit of "
                                  f"{max_body_bytes} bytes")
        return parse_json(await request.get_data(cache=False))

    gate = serving.gate

    def tenant() -> Tenant | None:
        return gate.authenticate(request.headers.get("Authorization"),
                                 request.remote_addr or "")

    async def text_route(kind: str) -> Response:
        who = tenant()
        parse = parse_chat if kind == "chat" else parse_completion
        call = parse(await body(), limits)
        async with serving.admission(who, call.model, call.request.tokens_estimate(),
                                     call.request.prompt_chars()) as admitted:
            if not call.stream:
                return _json(await serving.complete(call, admitted))
            job = await serving.start(call, admitted)
            admitted.streaming = True
        events = serving.stream(call, job, admitted)
        response = Response(events, mimetype="text/event-stream",
                            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        response.timeout = None
        return response

    @app.post("/v1/chat/completions")
    async def chat() -> Response:
        return await text_route("chat")

    @app.post("/v1/completions")
    async def completions() -> Response:
        return await text_route("completion")

    @app.post("/v1/embeddings")
    async def embeddings() -> Response:
        who = tenant()
        call = parse_embeddings(await body(), limits)
        async with serving.admission(who, call.model, call.request.tokens_estimate(),
                                     call.request.prompt_chars()) as admitted:
            return _json(await serving.embeddings(call, admitted))

    @app.get("/v1/models")
    async def models() -> Response:
        return _json({"object": "list", "data": list(serving.models().values())})

    @app.get("/v1/models/<path:name>")
    async def model(name: str) -> Response:
        entry = serving.models().get(name)
        if entry is None:
            serving.scheduler.lookup(name)  # raises ModelNotFound / ModelUnavailable
        return _json(entry)

    @app.get("/health")
    async def health() -> Response:
        return _json({"status": "ok"})

    @app.get("/rbee/status")
    async def rbee_status() -> Response:
        gate.authorize_admin(request.headers.get("Authorization"), request.remote_addr or "")
        return _json(status())

    @app.errorhandler(RequestError)
    async def request_error(exc: RequestError) -> Response:
        row = spec(exc)
        code, type_, err_code = row.status, row.type, row.code
        headers = None
        if isinstance(exc, (Busy, QuotaExceeded)):
            headers = {"Retry-After": str(max(1, math.ceil(exc.retry_after)))}
        if code >= 500:
            log.warning("%s: %s", type(exc).__name__, exc)
        return _json(error_body(str(exc), type_, param=exc.param, code=err_code), code, headers)

    @app.errorhandler(HTTPException)
    async def http_error(exc: HTTPException) -> Response:
        code = exc.code or 500
        message = {404: f"Unknown request URL: {request.method} {request.path}",
                   413: f"request body exceeds the limit of {max_body_bytes} bytes"}.get(
            code, exc.description or exc.name)
        return _json(error_body(message, _HTTP_TYPES.get(code, "server_error")), code)

    @app.errorhandler(Exception)
    async def unexpected(exc: Exception) -> Response:
        log.exception("unexpected error serving %s %s", request.method, request.path)
        return _json(error_body(f"internal error: {type(exc).__name__}", "server_error"), 500)

    if images is not None:
        images.register(app, body, tenant, serving.admission)
    return app
