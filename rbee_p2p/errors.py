"""The rbee-p2p error tree: one root, documented once.

``RbeeError``
  ``ProtocolError`` and its reasons (``rbee_p2p.protocol.errors``): bad input from peers
  ``ConfigError``: the user's configuration or environment is unusable
    ``KeyFileError``: the node key file is unsafe or unreadable (never silently replaced)
  ``StorageError``: a local store (audit log) is corrupt or locked
  ``RequestError``: a client's request cannot be served; each subclass has one HTTP status
    ``InvalidRequest`` (400), ``ModelNotFound`` (404), ``PayloadTooLarge`` (413),
    ``Busy`` (503, with ``retry_after``), ``ModelUnavailable`` (503, no retry: configured
    but not loaded), ``EngineFailure`` (500), ``Unauthorized`` (401: missing or invalid API
    key), ``Forbidden`` (403: model not allowed for the tenant, residency impossible, the
    routing policy refused), ``QuotaExceeded`` (429, with ``retry_after``)
"""

from __future__ import annotations

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
    "ModelUnavailable",
    "EngineFailure",
    "Unauthorized",
    "Forbidden",
    "QuotaExceeded",
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
