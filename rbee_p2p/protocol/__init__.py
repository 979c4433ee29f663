"""The sans-I/O protocol core of rbee-p2p.

Bytes, values and state only: no trio, no libp2p, no sockets, no files, no clock (callers
pass ``now_ms``).  See protocol/README.md at the repository root for the written spec.
"""

from . import audit, cbor, envelope, identity, messages, receipts, schema, session
from .audit import GENESIS, ChainHead, append_record, record_hash, verify_chain
from .envelope import Envelope, Limits, ReplayCache, Verified, Verifier, decode_envelope, seal
from .errors import (
    BadSignature,
    ChainBroken,
    Expired,
    IllegalTransition,
    InvalidSchema,
    Malformed,
    Misdirected,
    NotYetValid,
    Oversized,
    ProtocolError,
    RbeeError,
    Replayed,
    UnknownType,
)
from .identity import NodeKey, peer_id_from_str, peer_id_to_str
from .messages import (
    MESSAGE_TYPES,
    AuditRecord,
    CapabilityAdvert,
    Cancel,
    DeviceInfo,
    ErrorMessage,
    ImageSpec,
    InferenceRequest,
    Message,
    ModelInfo,
    Price,
    Receipt,
    ReceiptCountersign,
    ResultChunk,
    ResultEnd,
    Sampling,
    Turn,
)
from .receipts import OutputDigest, countersign, digest, verify_countersign, verify_receipt
from .session import InferenceSession, SessionState

__all__ = [
    "audit", "cbor", "envelope", "identity", "messages", "receipts", "schema", "session",
    "GENESIS", "ChainHead", "append_record", "record_hash", "verify_chain",
    "Envelope", "Limits", "ReplayCache", "Verified", "Verifier", "decode_envelope", "seal",
    "BadSignature", "ChainBroken", "Expired", "IllegalTransition", "InvalidSchema",
    "Malformed", "Misdirected", "NotYetValid", "Oversized", "ProtocolError", "RbeeError",
    "Replayed", "UnknownType",
    "NodeKey", "peer_id_from_str", "peer_id_to_str",
    "MESSAGE_TYPES", "AuditRecord", "CapabilityAdvert", "Cancel", "DeviceInfo",
    "ErrorMessage", "InferenceRequest", "Message", "ModelInfo", "Price", "Receipt",
    "ReceiptCountersign", "ResultChunk", "ResultEnd", "Sampling", "Turn", "ImageSpec",
    "OutputDigest", "countersign", "digest", "verify_countersign", "verify_receipt",
    "InferenceSession", "SessionState",
]
