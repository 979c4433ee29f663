"""The rbee-p2p error tree (the protocol part of it).

Every error the project raises on purpose derives from :class:`RbeeError`.  Errors about
bytes received from a peer derive from :class:`ProtocolError` and carry a short machine
``reason`` (the same strings the test vectors use as verdicts).  Layers at the edges (HTTP,
libp2p streams) translate these classes in one table each; nobody inspects messages.
"""

from __future__ import annotations

__all__ = [
    "RbeeError",
    "ProtocolError",
    "Oversized",
    "Malformed",
    "InvalidSchema",
    "UnknownType",
    "BadSignature",
    "Expired",
    "NotYetValid",
    "Replayed",
    "Misdirected",
    "IllegalTransition",
    "Overrun",
    "ChainBroken",
]


class RbeeError(Exception):
    """Root of every error rbee-p2p raises deliberately."""


class ProtocolError(RbeeError):
    """Input from the network (or a file of protocol records) broke a protocol rule."""

    reason = "protocol_error"


class Oversized(ProtocolError):
    """The input is larger than the limit for its kind; it was not decoded."""

    reason = "oversized"


class Malformed(ProtocolError):
    """Not one well-formed, deterministically encoded CBOR item of the allowed types."""

    reason = "malformed"


class InvalidSchema(ProtocolError):
    """Well-formed CBOR whose structure or field values break the message schema."""

    reason = "invalid_schema"


class UnknownType(InvalidSchema):
    """The envelope names a message type this implementation does not know."""

    reason = "unknown_type"


class BadSignature(ProtocolError):
    """The signature does not verify against the sender's public key."""

    reason = "bad_signature"


class Expired(ProtocolError):
    """The envelope's expiry lies in the past (beyond the allowed clock skew)."""

    reason = "expired"


class NotYetValid(ProtocolError):
    """The envelope was issued in the future (beyond the allowed clock skew)."""

    reason = "not_yet_valid"


class Replayed(ProtocolError):
    """The (sender, nonce) pair was already accepted within the replay window."""

    reason = "replayed"


class Misdirected(ProtocolError):
    """A valid message that does not belong here: wrong target, request id or sender."""

    reason = "misdirected"


class IllegalTransition(ProtocolError):
    """A message arrived that the session's state machine does not allow now."""

    reason = "illegal_transition"


class Overrun(ProtocolError):
    """A peer sent more output than the request allows (tokens, text or data bytes)."""

    reason = "overrun"


class ChainBroken(ProtocolError):
    """An audit chain failed verification; ``index`` is the first bad record (0-based).

    ``cause`` is one of "unreadable", "invalid", "forged", "foreign", "sequence", "link",
    "truncated", "unvouched" (a tombstone no redaction/prune record covers), "cover" (a
    redaction/prune record covers something other than a tombstone awaiting a cover, or
    its covers_digest does not match).
    """

    reason = "chain_broken"

    def __init__(self, index: int, cause: str, detail: str) -> None:
        super().__init__(f"audit chain broken at record {index}: {detail}")
        self.index = index
        self.cause = cause
        self.detail = detail
