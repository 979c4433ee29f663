"""The rbee-p2p error tree: one root, documented once.

``RbeeError``
  ``ProtocolError`` and its reasons (``rbee_p2p.protocol.errors``): bad input from peers
  ``ConfigError``: the user's configuration or environment is unusable
    ``KeyFileError``: the node key file is unsafe or unreadable (never silently replaced)
  ``StorageError``: a local store (audit log) is corrupt or locked
  ``RequestError``: a client's request cannot be served; each subclass has one HTTP status
    ``InvalidRequest`` (400), ``ModelNotFound`` (404), ``PayloadTooLarge`` (413),
    ``Busy`` (503, with ``retry_after``), ``ModelUnavailable`` (503, no retry: configured
    but not loaded), ``EngineFailure`` (500) and ``PeerUnavailable`` (502: a peer could not
    be reached or stopped answering; the next candidate may be tried), ``Unauthorized``
    (401: missing or invalid API key), ``Forbidden`` (403: model not allowed for the tenant,
    residency impossible, the routing policy refused), ``QuotaExceeded`` (429, with
    ``retry_after``)

:data:`ERRORS` is the one table from these classes to what the edges say: the HTTP status,
OpenAI's error ``type`` and ``code``, and the wire code of an ``ErrorMessage``; :func:`spec`
looks a raised error up in it and :func:`from_wire` turns a peer's ``ErrorMessage`` code
back into the error the requester acts on.
"""

from __future__ import annotations

from dataclasses import dataclass

from .protocol.errors import *  # noqa: F401,F403  (re-export the protocol part of the tree)
from .protocol.errors import RbeeError
from .protocol.errors import __all__ as _protocol_all

__all__ = [
    *_protocol_all,
    "ConfigError",
    "KeyFileError",
    "StorageError",
    "RequestError",
    "InvalidRequest",
    "ModelNotFound",
    "PayloadTooLarge",
    "Busy",
    "Unreachable",
    "ShuttingDown",
    "AuditUnavailable",
    "ModelUnavailable",
    "EngineFailure",
    "Unauthorized",
    "Forbidden",
    "QuotaExceeded",
    "PeerUnavailable",
    "PeerRefused",
    "ErrorSpec",
    "ERRORS",
    "spec",
    "from_wire",
]


class ConfigError(RbeeError):
    """The configuration, a flag or the environment is unusable; the message says how to fix it."""


class KeyFileError(ConfigError):
    """The node key file is readable by others, or corrupted.  Never replaced silently."""


class StorageError(RbeeError):
    """A local store is corrupt beyond a torn final record, or locked by another process."""


class RequestError(RbeeError):
    """A client request that cannot be served.  ``param`` names the offending field."""

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class InvalidRequest(RequestError):
    """Malformed JSON, wrong types, out-of-range values, prompt + max_tokens beyond context."""


class ModelNotFound(RequestError):
    """No model of that name is served here."""


class PayloadTooLarge(RequestError):
    """The request body exceeds the configured limit."""


class Busy(RequestError):
    """The model's queue is full; try again after ``retry_after`` seconds."""

    def __init__(self, message: str, *, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Unreachable(Busy):
    """Every node serving the model is unreachable right now (gone, restarting, cut off):
    a 503 with a Retry-After and a plain message, not the transport's details."""


class ShuttingDown(Busy):
    """This node is stopping: new work is refused, and work still running at the end of
    its drain is ended with this (another node may serve it)."""


class AuditUnavailable(Busy):
    """This node cannot write its audit log (a full disk): it serves nothing it could not
    record until it can again."""


class ModelUnavailable(RequestError):
    """The model is configured here but not loaded: it does not fit its device's memory
    budget, its pinned device is missing, or its engine (torch) is not installed.  Retrying
    will not help; another node may serve it."""


class EngineFailure(RequestError):
    """The engine failed while serving; the node keeps serving other requests."""


class Unauthorized(RequestError):
    """No API key, or one this node does not know."""


class Forbidden(RequestError):
    """The tenant may not do this: a model it is not allowed, a residency no live node can
    meet, or the routing policy's refusal."""


class QuotaExceeded(RequestError):
    """A tenant's rate limit or quota is used up; try again after ``retry_after`` seconds."""

    def __init__(self, message: str, *, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class PeerUnavailable(EngineFailure):
    """A peer could not be reached, stopped answering, or could not take the job (its
    advert was stale, its own rules refused it); the next candidate may be tried."""


class PeerRefused(PeerUnavailable):
    """A peer answered but would not take the job (not its model or digest, its rules, too
    late): try the next candidate, without counting it as the peer's failure."""


@dataclass(frozen=True)
class ErrorSpec:
    """How one error class looks at the edges."""

    status: int  # HTTP status
    type: str  # OpenAI error "type"
    code: str | None  # OpenAI error "code"
    wire: str  # ErrorMessage code (protocol.messages.ERROR_CODES)


ERRORS: dict[type[RequestError], ErrorSpec] = {
    InvalidRequest: ErrorSpec(400, "invalid_request_error", None, "bad_request"),
    ModelNotFound: ErrorSpec(404, "invalid_request_error", "model_not_found", "model_not_found"),
    PayloadTooLarge: ErrorSpec(413, "invalid_request_error", "request_too_large", "bad_request"),
    Unauthorized: ErrorSpec(401, "invalid_request_error", "invalid_api_key", "unauthorized"),
    Forbidden: ErrorSpec(403, "permission_error", "forbidden", "forbidden"),
    QuotaExceeded: ErrorSpec(429, "requests", "rate_limit_exceeded", "busy"),
    Busy: ErrorSpec(503, "server_error", "overloaded", "busy"),
    Unreachable: ErrorSpec(503, "server_error", "model_unreachable", "busy"),
    ShuttingDown: ErrorSpec(503, "server_error", "node_stopping", "busy"),
    AuditUnavailable: ErrorSpec(503, "server_error", "audit_unavailable", "busy"),
    ModelUnavailable: ErrorSpec(503, "server_error", "model_unavailable", "model_not_found"),
    EngineFailure: ErrorSpec(500, "server_error", "engine_failure", "internal"),
    PeerUnavailable: ErrorSpec(502, "server_error", "peer_unavailable", "internal"),
    PeerRefused: ErrorSpec(502, "server_error", "peer_unavailable", "internal"),
}


def spec(exc: RequestError) -> ErrorSpec:
    """The table's row for ``exc`` (its nearest listed class)."""
    for cls in type(exc).__mro__:
        found = ERRORS.get(cls)
        if found is not None:
            return found
    return ERRORS[EngineFailure]


# What a requester does with a peer's ErrorMessage: the client's fault (400) and a full
# queue (503) are final for that peer; anything that says "not here" moves on to the next
# candidate; the rest is the peer's failure.
_FROM_WIRE: dict[str, type[RequestError]] = {
    "bad_request": InvalidRequest,
    "busy": Busy,
    "internal": EngineFailure,
    "model_not_found": PeerRefused,
    "forbidden": PeerRefused,
    "unauthorized": PeerRefused,
    "deadline": PeerRefused,
    "cancelled": PeerUnavailable,
    "protocol": PeerUnavailable,
}


def from_wire(code: str, message: str, retry_after_ms: int | None = None) -> RequestError:
    """The error a peer's ``ErrorMessage`` stands for on the requester's side."""
    cls = _FROM_WIRE.get(code, EngineFailure)
    if cls is Busy:
        return Busy(message, retry_after=(retry_after_ms or 1000) / 1000)
    return cls(message)
