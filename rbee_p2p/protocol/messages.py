"""Protocol messages: frozen, validated values with append-only type numbers.

Each class below is the payload of a signed envelope (see ``envelope.py``).  Its type number
is registered once with :func:`message_type`; numbers are never reused or renumbered
(memberlist's "ONLY APPEND" rule).  Field names are the CBOR map keys on the wire; the
limits in the annotations are the protocol's (see protocol/README.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Callable, ClassVar, TypeVar

from .errors import UnknownType
from .schema import Len, MaxItems, MaxLen, OneOf, Range, U64

__all__ = [
    "Message",
    "MESSAGE_TYPES",
    "message_type",
    "class_for_type",
    "RequestId",
    "Digest",
    "PeerIdBytes",
    "ModelInfo",
    "DeviceInfo",
    "Price",
    "CapabilityAdvert",
    "InferenceRequest",
    "Turn",
    "Sampling",
    "ImageSpec",
    "ResultChunk",
    "ResultEnd",
    "ErrorMessage",
    "Cancel",
    "AuditRecord",
    "Receipt",
    "ReceiptCountersign",
    "MODALITIES",
    "REQUEST_KINDS",
    "ERROR_CODES",
    "FINISH_REASONS",
    "AUDIT_KINDS",
    "OUTCOMES",
]

RequestId = Annotated[bytes, Len(16)]
Digest = Annotated[bytes, Len(32)]  # sha256
PeerIdBytes = Annotated[bytes, Len(38)]  # Ed25519 identity-multihash peer ID
Name = Annotated[str, MaxLen(128)]
Millis = U64
Count = Annotated[int, Range(0, 2**32 - 1)]
Jurisdiction = Annotated[str, MaxLen(8)]  # "EU", "US", "DE", ...
Text = Annotated[str, MaxLen(1 << 20)]  # prompt text (the envelope limit bounds the sum)

MODALITIES = ("text", "embeddings", "image")
REQUEST_KINDS = ("chat", "completion", "embedding", "image")
FINISH_REASONS = ("stop", "length", "cancelled", "error")
ERROR_CODES = (
    "bad_request",
    "unauthorized",
    "forbidden",
    "model_not_found",
    "busy",
    "deadline",
    "cancelled",
    "internal",
    "protocol",
)
AUDIT_KINDS = ("entry", "forward", "execute", "redaction", "prune", "note")
OUTCOMES = ("ok", "error", "cancelled", "rejected", "redacted", "pruned")


class Message:
    """Base of all payload classes; ``TYPE`` is the registered wire type number."""

    TYPE: ClassVar[int]


MESSAGE_TYPES: dict[int, type[Message]] = {}

M = TypeVar("M", bound=type[Message])


def message_type(number: int) -> Callable[[M], M]:
    """Register a payload class under ``number``.  Numbers are append-only: never reuse one."""

    def register(cls: M) -> M:
        if number in MESSAGE_TYPES or number <= 0:
            raise ValueError(f"message type {number} is taken or invalid")
        cls.TYPE = number
        MESSAGE_TYPES[number] = cls
        return cls

    return register


def class_for_type(number: int) -> type[Message]:
    try:
        return MESSAGE_TYPES[number]
    except KeyError:
        raise UnknownType(f"unknown message type {number}") from None


@dataclass(frozen=True)
class ModelInfo:
    name: Name
    digest: Digest
    modality: Annotated[str, OneOf(*MODALITIES)]
    context: Count = 0
    tokens_per_s: Annotated[float, Range(0, 1e7)] = 0.0
    size_bytes: U64 = 0
    device: Annotated[str, MaxLen(32)] | None = None  # pinned device id, if any
    price: Price | None = None  # what this model costs there; absent: the advert's price


@dataclass(frozen=True)
class DeviceInfo:
    id: Annotated[str, MaxLen(32)]  # "cpu", "cuda:0", "metal:0"
    backend: Annotated[str, OneOf("cpu", "cuda", "metal", "rocm", "vulkan")]
    name: Name
    mem_total: U64
    mem_free: U64


@dataclass(frozen=True)
class Price:
    """Micro-credits per million tokens (text) or per image."""

    input_per_mtok: U64 = 0
    output_per_mtok: U64 = 0
    per_image: U64 = 0


@message_type(1)
@dataclass(frozen=True)
class CapabilityAdvert(Message):
    """What a node offers, gossiped periodically; a higher ``seq`` supersedes a lower one."""

    swarm: Name
    seq: U64
    version: Annotated[str, MaxLen(32)]
    addrs: Annotated[tuple[Annotated[str, MaxLen(256)], ...], MaxItems(16)]
    models: Annotated[tuple[ModelInfo, ...], MaxItems(64)]
    devices: Annotated[tuple[DeviceInfo, ...], MaxItems(16)]
    queue_depth: Count
    active_jobs: Count
    max_queue: Count
    jurisdiction: Jurisdiction
    price: Price


@dataclass(frozen=True)
class Turn:
    """One chat message."""

    role: Annotated[str, OneOf("system", "user", "assistant")]
    content: Text


@dataclass(frozen=True)
class Sampling:
    """How to sample text (OpenAI's meanings; ``seed`` makes a sampled answer repeatable)."""

    temperature: Annotated[float, Range(0, 2)] = 1.0
    top_p: Annotated[float, Range(0, 1)] = 1.0
    seed: U64 | None = None
    stop: Annotated[tuple[Annotated[str, MaxLen(256)], ...], MaxItems(16)] = ()
    presence_penalty: Annotated[float, Range(-2, 2)] = 0.0
    frequency_penalty: Annotated[float, Range(-2, 2)] = 0.0


@dataclass(frozen=True)
class ImageSpec:
    """What an image request asks for; ``n`` is ``InferenceRequest.max_tokens``."""

    size: Annotated[str, MaxLen(16)] | None = None  # "WxH"; absent: the model's own
    quality: Annotated[str, MaxLen(16)] | None = None
    steps: Annotated[int, Range(1, 1000)] | None = None
    guidance: Annotated[float, Range(0, 100)] | None = None
    negative_prompt: Text | None = None
    seed: U64 | None = None


# Type 2 was the first InferenceRequest, whose ``params`` was the OpenAI body as JSON: retired
# (never reused) when requests became typed.
@message_type(10)
@dataclass(frozen=True)
class InferenceRequest(Message):
    """Ask ``target`` to run one job of ``kind``: ``messages`` (chat), ``prompt``
    (completion; the image prompt), ``inputs`` (embedding), with ``sampling`` for text and
    ``image`` for images.  ``max_tokens``: tokens to generate, images to make, or inputs."""

    request_id: RequestId
    target: PeerIdBytes
    model: Name
    kind: Annotated[str, OneOf(*REQUEST_KINDS)]
    stream: bool
    max_tokens: Count
    deadline_ms: Millis  # absolute wall-clock time after which the result is useless
    messages: Annotated[tuple[Turn, ...], MaxItems(1024)] | None = None
    prompt: Text | None = None
    inputs: Annotated[tuple[Text, ...], MaxItems(256)] | None = None
    sampling: Sampling | None = None
    image: ImageSpec | None = None
    model_digest: Digest | None = None  # expected model, if the requester pins one
    tenant_ref: Digest | None = None  # keyed hash of the tenant, never the API key
    residency: Jurisdiction | None = None  # required jurisdiction of the executor
    max_price: Price | None = None
    admit_by_ms: Millis | None = None  # refuse ("busy") if you would finish later than this


@message_type(3)
@dataclass(frozen=True)
class ResultChunk(Message):
    """A frame of output: text of one or more tokens, or binary data (embeddings, images)."""

    request_id: RequestId
    seq: Count  # 0, 1, 2, ... within one session
    text: Annotated[str, MaxLen(64 * 1024)] = ""  # UTF-8 bytes
    tokens: Count = 0
    data: Annotated[bytes, MaxLen(768 * 1024)] | None = None  # larger results: more chunks


@message_type(4)
@dataclass(frozen=True)
class ResultEnd(Message):
    """The explicit end of a result; carries the executor's signed receipt envelope."""

    request_id: RequestId
    seq: Count  # one past the last chunk's seq
    finish_reason: Annotated[str, OneOf(*FINISH_REASONS)]
    receipt: Annotated[bytes, MaxLen(4096)]


@message_type(5)
@dataclass(frozen=True)
class ErrorMessage(Message):
    """A typed failure; ``retry_after_ms`` tells the requester when trying again may help."""

    code: Annotated[str, OneOf(*ERROR_CODES)]
    message: Annotated[str, MaxLen(1024)]
    request_id: RequestId | None = None
    seq: Count | None = None
    retry_after_ms: Millis | None = None


@message_type(6)
@dataclass(frozen=True)
class Cancel(Message):
    request_id: RequestId
    reason: Annotated[str, MaxLen(256)] = ""


@message_type(7)
@dataclass(frozen=True)
class AuditRecord(Message):
    """One link of a node's hash chain.  Metadata only: no field can hold prompt text."""

    seq: U64
    prev: Digest  # sha256 of the previous record's envelope bytes; zeros for the first
    kind: Annotated[str, OneOf(*AUDIT_KINDS)]
    outcome: Annotated[str, OneOf(*OUTCOMES)]
    request_id: RequestId | None = None
    tenant_ref: Digest | None = None
    model: Name | None = None
    model_digest: Digest | None = None
    entry_peer: PeerIdBytes | None = None
    exec_peer: PeerIdBytes | None = None
    jurisdiction: Jurisdiction | None = None
    tokens_in: Count | None = None
    tokens_out: Count | None = None
    ttft_ms: Millis | None = None
    total_ms: Millis | None = None
    receipt_sig: Annotated[bytes, Len(64)] | None = None
    error_code: Annotated[str, OneOf(*ERROR_CODES)] | None = None
    covers: Annotated[tuple[U64, ...], MaxItems(4096)] | None = None  # seqs redacted/pruned
    covers_digest: Digest | None = None  # sha256 over the covered records' hashes, in order


@message_type(8)
@dataclass(frozen=True)
class Receipt(Message):
    """Signed by the executor (the envelope's sender): what it ran for whom, and the cost."""

    request_id: RequestId
    request_digest: Digest  # sha256 of the requester's signed request envelope
    requester: PeerIdBytes
    model: Name
    model_digest: Digest
    tokens_in: Count
    tokens_out: Count
    ttft_ms: Millis
    total_ms: Millis
    price: U64  # micro-credits charged
    jurisdiction: Jurisdiction
    output_digest: Digest  # sha256 over the result's text and data, in order


@message_type(9)
@dataclass(frozen=True)
class ReceiptCountersign(Message):
    """The requester's acknowledgement of a receipt (signed by the requester)."""

    request_id: RequestId
    receipt_digest: Digest  # sha256 of the executor's receipt envelope bytes
    accepted: bool
