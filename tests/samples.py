"""Sample protocol messages shared by the tests (valid unless a test changes them)."""

from __future__ import annotations

from rbee_p2p.protocol import (  # noqa: F401  (re-exported for tests)
    AuditRecord,
    CapabilityAdvert,
    Cancel,
    DeviceInfo,
    ErrorMessage,
    InferenceRequest,
    Sampling,
    Turn,
    Message,
    ModelInfo,
    NodeKey,
    Price,
    Receipt,
    ReceiptCountersign,
    ResultChunk,
    ResultEnd,
)

NOW = 1_790_000_000_000  # a fixed wall-clock time in ms (2026-09)
RID = bytes(range(16))
DIGEST = bytes(range(32))
SEED_A = bytes([1]) * 32
SEED_B = bytes([2]) * 32


def key_a() -> NodeKey:
    return NodeKey.from_seed(SEED_A)


def key_b() -> NodeKey:
    return NodeKey.from_seed(SEED_B)


def advert(**changes: object) -> CapabilityAdvert:
    fields: dict[str, object] = dict(
        swarm="default",
        seq=7,
        version="0.1.0",
        addrs=("/ip4/127.0.0.1/tcp/4001",),
        models=(
            ModelInfo(name="smollm2", digest=DIGEST, modality="text", context=2048,
                      tokens_per_s=150.5, size_bytes=98_000_000),
            ModelInfo(name="minilm", digest=DIGEST, modality="embeddings", device="cpu"),
        ),
        devices=(DeviceInfo(id="cpu", backend="cpu", name="x86_64", mem_total=24 << 30,
                            mem_free=20 << 30),),
        queue_depth=1,
        active_jobs=1,
        max_queue=16,
        jurisdiction="EU",
        price=Price(input_per_mtok=100, output_per_mtok=200),
    )
    fields.update(changes)
    return CapabilityAdvert(**fields)  # type: ignore[arg-type]


def request(target: bytes | None = None, **changes: object) -> InferenceRequest:
    fields: dict[str, object] = dict(
        request_id=RID,
        target=target if target is not None else key_b().peer_id,
        model="smollm2",
        kind="chat",
        messages=(Turn("user", "Hi"),),
        sampling=Sampling(temperature=0.5, stop=("\n\n",)),
        stream=True,
        max_tokens=64,
        deadline_ms=NOW + 60_000,
        tenant_ref=DIGEST,
        residency="EU",
    )
    fields.update(changes)
    return InferenceRequest(**fields)  # type: ignore[arg-type]


def receipt(requester: bytes, request_digest: bytes, **changes: object) -> Receipt:
    fields: dict[str, object] = dict(
        request_id=RID, request_digest=request_digest, requester=requester, model="smollm2",
        model_digest=DIGEST, tokens_in=5, tokens_out=3, ttft_ms=70, total_ms=90, price=12,
        jurisdiction="EU", output_digest=DIGEST,
    )
    fields.update(changes)
    return Receipt(**fields)  # type: ignore[arg-type]


def one_of_each() -> list[Message]:
    """A valid instance of every registered message type."""
    a, b = key_a(), key_b()
    return [
        advert(),
        request(),
        ResultChunk(request_id=RID, seq=0, text="Hello", tokens=1),
        ResultEnd(request_id=RID, seq=1, finish_reason="stop", receipt=b"\x80"),
        ErrorMessage(code="busy", message="queue full", request_id=RID, retry_after_ms=500),
        Cancel(request_id=RID, reason="client went away"),
        AuditRecord(seq=0, prev=bytes(32), kind="execute", outcome="ok", request_id=RID,
                    exec_peer=b.peer_id, entry_peer=a.peer_id, tokens_in=5, tokens_out=3),
        receipt(a.peer_id, DIGEST),
        ReceiptCountersign(request_id=RID, receipt_digest=DIGEST, accepted=True),
    ]
