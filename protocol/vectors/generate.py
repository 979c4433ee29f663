"""Regenerate the protocol test vectors: ``python protocol/vectors/generate.py``.

The vectors are deterministic (fixed keys, nonces and times; Ed25519 signatures are
deterministic), so running this again must reproduce the committed JSON byte for byte; the
test suite checks that.  Keys here are TEST KEYS ONLY.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rbee_p2p.protocol import cbor
from rbee_p2p.protocol.audit import ChainHead, append_record, cover_records, record_hash, tombstone
from rbee_p2p.protocol.envelope import DOMAIN, seal
from rbee_p2p.protocol.identity import NodeKey
from rbee_p2p.protocol.messages import (
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
    Price,
    Receipt,
    ReceiptCountersign,
    ResultChunk,
    ResultEnd,
)

HERE = Path(__file__).parent
SEED = bytes.fromhex("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")
OTHER_SEED = bytes(range(32))
NOW = 1_790_000_000_000
RID = bytes.fromhex("00112233445566778899aabbccddeeff")
DIGEST = bytes.fromhex("e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855")


def samples(key: NodeKey, other: NodeKey) -> list[tuple[str, Message]]:
    return [
        ("capability_advert", CapabilityAdvert(
            swarm="default", seq=1, version="0.1.0", addrs=("/ip4/127.0.0.1/tcp/7834",),
            models=(ModelInfo(name="smollm2", digest=DIGEST, modality="text", context=8192,
                              tokens_per_s=150.0, size_bytes=98_000_000),),
            devices=(DeviceInfo(id="cpu", backend="cpu", name="x86_64", mem_total=25769803776,
                                mem_free=21474836480),),
            queue_depth=0, active_jobs=0, max_queue=16, jurisdiction="EU",
            price=Price(input_per_mtok=0, output_per_mtok=0))),
        ("inference_request", InferenceRequest(
            request_id=RID, target=other.peer_id, model="smollm2", kind="chat",
            messages=(Turn("user", "Hello"),), sampling=Sampling(temperature=0.5),
            stream=True, max_tokens=16, deadline_ms=NOW + 60_000, tenant_ref=DIGEST,
            residency="EU")),
        ("result_chunk", ResultChunk(request_id=RID, seq=0, text="Hi there", tokens=2)),
        ("result_end", ResultEnd(request_id=RID, seq=1, finish_reason="stop",
                                 receipt=b"\x88")),
        ("error", ErrorMessage(code="busy", message="queue full", request_id=RID,
                               retry_after_ms=1000)),
        ("cancel", Cancel(request_id=RID, reason="client disconnected")),
        ("audit_record", AuditRecord(seq=0, prev=bytes(32), kind="execute", outcome="ok",
                                     request_id=RID, model="smollm2", model_digest=DIGEST,
                                     exec_peer=key.peer_id, jurisdiction="EU", tokens_in=5,
                                     tokens_out=2, ttft_ms=70, total_ms=85)),
        ("receipt", Receipt(request_id=RID, request_digest=DIGEST, requester=other.peer_id,
                            model="smollm2", model_digest=DIGEST, tokens_in=5, tokens_out=2,
                            ttft_ms=70, total_ms=85, price=0, jurisdiction="EU",
                            output_digest=DIGEST)),
        ("receipt_countersign", ReceiptCountersign(request_id=RID, receipt_digest=DIGEST,
                                                   accepted=True)),
        ("capability_advert_priced", CapabilityAdvert(
            swarm="default", seq=2, version="0.1.0", addrs=("/ip4/127.0.0.1/tcp/7834",),
            models=(ModelInfo(name="smollm2", digest=DIGEST, modality="text", context=8192,
                              tokens_per_s=150.0, size_bytes=98_000_000,
                              price=Price(input_per_mtok=100, output_per_mtok=200)),
                    ModelInfo(name="sd-turbo", digest=DIGEST, modality="image",
                              price=Price(per_image=5000))),
            devices=(), queue_depth=0, active_jobs=0, max_queue=16, jurisdiction="EU",
            price=Price())),
    ]


def resign(key: NodeKey, items: list[Any]) -> bytes:
    items = list(items)
    items[7] = key.sign(DOMAIN + cbor.encode(items[:7]))
    return cbor.encode(items)


def nonce(i: int) -> bytes:
    return i.to_bytes(16, "big")


def envelope_cases(key: NodeKey, other: NodeKey) -> list[dict[str, Any]]:
    cases: list[dict[str, Any]] = []

    def case(name: str, data: bytes, expected: str, now: int = NOW, **extra: Any) -> None:
        cases.append({"name": name, "hex": data.hex(), "now_ms": now, **extra,
                      "expected": expected})

    for i, (name, message) in enumerate(samples(key, other)):
        case(f"valid_{name}", seal(key, message, now_ms=NOW, ttl_ms=60_000, nonce=nonce(i)),
             "valid")
    base = seal(key, samples(key, other)[5][1], now_ms=NOW, ttl_ms=60_000, nonce=nonce(100))
    items = cbor.decode(base, max_size=1 << 20)
    case("valid_unknown_payload_key_ignored",
         resign(key, [*items[:6], {**items[6], "future": [1, 2]}, None]), "valid")
    case("valid_at_skew_edge_future", base, "valid", now=NOW - 30_000)
    case("valid_at_skew_edge_expired", base, "valid", now=NOW + 90_000)

    case("oversized_cancel_over_type_limit",
         resign(key, [*items[:6], {**items[6], "pad": "x" * 1100}, None]), "oversized")
    case("malformed_empty", b"", "malformed")
    case("malformed_truncated", base[:-1], "malformed")
    case("malformed_trailing_byte", base + b"\x00", "malformed")
    case("malformed_indefinite_array", b"\x9f" + base[1:] + b"\xff", "malformed")
    case("malformed_tagged", b"\xd8\x18" + base, "malformed")
    non_canonical = bytearray(base)
    non_canonical[1:2] = b"\x18\x01"  # version 1 encoded in two bytes
    case("malformed_non_shortest_integer", bytes(non_canonical), "malformed")
    case("invalid_schema_seven_items", cbor.encode(items[:7]), "invalid_schema")
    case("invalid_schema_version_2", resign(key, [2, *items[1:]]), "invalid_schema")
    case("invalid_schema_short_nonce", resign(key, [*items[:5], b"\x01", *items[6:]]),
         "invalid_schema")
    case("invalid_schema_expires_before_issued",
         resign(key, [*items[:3], NOW, NOW - 1, *items[5:]]), "invalid_schema")
    case("invalid_schema_missing_field",
         resign(key, [*items[:6], {"reason": "x"}, None]), "invalid_schema")
    case("invalid_schema_ttl_too_long",
         resign(key, [*items[:4], NOW + 3_600_000, *items[5:]]), "invalid_schema")
    case("unknown_type_99", resign(key, [items[0], 99, *items[2:]]), "unknown_type")
    flipped = bytearray(base)
    flipped[-1] ^= 1
    case("bad_signature_flipped_bit", bytes(flipped), "bad_signature")
    case("bad_signature_payload_changed",
         cbor.encode([*items[:6], {**items[6], "reason": "changed"}, items[7]]),
         "bad_signature")
    case("bad_signature_other_sender",
         cbor.encode([*items[:2], other.peer_id, *items[3:]]), "bad_signature")
    case("expired", base, "expired", now=NOW + 90_001)
    case("not_yet_valid", base, "not_yet_valid", now=NOW - 30_001)
    case("replayed", base, "replayed", seen=[base.hex()])
    return cases


def audit_vectors(key: NodeKey) -> dict[str, Any]:
    head, raws = ChainHead(), []
    for i in range(4):
        raw, head = append_record(key, head, now_ms=NOW + i, kind="execute", outcome="ok",
                                  request_id=RID, tokens_out=i, nonce=nonce(200 + i))
        raws.append(raw)
    records = [r.hex() for r in raws]
    edited = bytearray(bytes.fromhex(records[1]))
    edited[-70] ^= 1

    def stone(seq: int, hash_: bytes | None = None) -> str:
        return tombstone(seq, record_hash(raws[seq]) if hash_ is None else hash_).hex()

    def covered(kind: str, seqs: list[int], n: int, **fields: Any) -> tuple[str, dict[str, Any]]:
        (raw,), new = cover_records(key, head, [(s, record_hash(raws[s])) for s in seqs],
                                    now_ms=NOW + 10, kind=kind, nonce=nonce(n), **fields)
        return raw.hex(), {"seq": new.seq, "hash": new.hash.hex()}

    redaction, redacted_head = covered("redaction", [1, 2], 300, tenant_ref=DIGEST)
    prune, pruned_head = covered("prune", [0], 301)
    live_cover, live_head = covered("redaction", [2], 302)
    return {
        "description": "An audit chain of 4 records by the test key, damaged copies, and "
                       "copies with tombstones (redaction/prune). 'expected' is 'valid' or "
                       "the first bad index and its cause; a case's own 'head', if any, "
                       "replaces the chain's.",
        "records": records,
        "head": {"seq": head.seq, "hash": head.hash.hex()},
        "cases": [
            {"name": "valid", "records": records, "expected": "valid"},
            {"name": "edited", "records": [records[0], edited.hex(), *records[2:]],
             "expected": {"index": 1, "cause": "forged"}},
            {"name": "deleted", "records": [records[0], *records[2:]],
             "expected": {"index": 1, "cause": "sequence"}},
            {"name": "reordered", "records": [records[0], records[2], records[1], records[3]],
             "expected": {"index": 1, "cause": "sequence"}},
            {"name": "truncated", "records": records[:3],
             "expected": {"index": 3, "cause": "truncated"}},
            {"name": "redacted", "head": redacted_head, "expected": "valid",
             "records": [records[0], stone(1), stone(2), records[3], redaction]},
            {"name": "pruned", "head": pruned_head, "expected": "valid",
             "records": [stone(0), *records[1:], prune]},
            {"name": "tombstone_unvouched", "records": [records[0], stone(1), *records[2:]],
             "expected": {"index": 1, "cause": "unvouched"}},
            {"name": "tombstone_hash_edited", "head": redacted_head,
             "records": [records[0], stone(1, bytes(32)), stone(2), records[3], redaction],
             "expected": {"index": 4, "cause": "cover"}},
            {"name": "tombstone_before_a_live_record_edited", "head": redacted_head,
             "records": [records[0], stone(1), stone(2, bytes(32)), records[3], redaction],
             "expected": {"index": 3, "cause": "link"}},
            {"name": "cover_of_a_live_record", "head": live_head,
             "records": [*records, live_cover], "expected": {"index": 4, "cause": "cover"}},
        ],
    }


def build() -> dict[str, str]:
    key, other = NodeKey.from_seed(SEED), NodeKey.from_seed(OTHER_SEED)
    envelopes = {
        "description": "Signed envelopes and the verdict a conforming receiver reaches with "
                       "the default limits (1 MiB, per-type limits, 30 s skew, 10 min TTL). "
                       "Feed 'seen' envelopes (all valid) to a fresh replay cache first.",
        "public_key": key.public_key.hex(),
        "seed": key.seed.hex(),
        "peer_id": key.peer_id_str,
        "cases": envelope_cases(key, other),
    }
    return {
        "envelopes.json": json.dumps(envelopes, indent=1) + "\n",
        "audit_chain.json": json.dumps({"public_key": key.public_key.hex(), **audit_vectors(key)},
                                       indent=1) + "\n",
    }


if __name__ == "__main__":
    for name, text in build().items():
        (HERE / name).write_text(text)
        print(f"wrote {HERE / name}")
