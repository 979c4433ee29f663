"""Audit logs with real keys, real receipts and two tenants, for the audit tests."""

from __future__ import annotations

from pathlib import Path

import samples
from rbee_p2p.protocol.envelope import seal
from rbee_p2p.store.audit import AuditLog

REF_A, REF_B = bytes([0xA]) * 32, bytes([0xB]) * 32
DAY_MS = 86_400_000


def rid(i: int) -> bytes:
    return i.to_bytes(16, "big")


def receipt_for(i: int, executor=None, **changes) -> bytes:
    executor = executor or samples.key_b()
    body = samples.receipt(samples.key_a().peer_id, samples.DIGEST, request_id=rid(i), **changes)
    return seal(executor, body, now_ms=samples.NOW, ttl_ms=0, nonce=rid(i))


def add_request(log: AuditLog, i: int, tenant_ref: bytes, now_ms: int,
                receipt: bool = True, sync: bool = True) -> bytes:
    """An entry record as the entry node writes it for a forwarded request (with its
    receipt) and an execute-like record without one; returns the entry record."""
    b = samples.key_b().peer_id
    raw = log.append(now_ms=now_ms, kind="entry", outcome="ok", request_id=rid(i),
                     tenant_ref=tenant_ref, model="smollm2", model_digest=samples.DIGEST,
                     entry_peer=log.key.peer_id, exec_peer=b, jurisdiction="EU",
                     tokens_in=5, tokens_out=3, ttft_ms=70, total_ms=90, sync=sync,
                     receipt=receipt_for(i) if receipt else None)
    log.append(now_ms=now_ms, kind="forward", outcome="ok", request_id=rid(i),
               tenant_ref=tenant_ref, model="smollm2", sync=sync)
    return raw


def fill(path: Path, *, a: int = 3, b: int = 2, now_ms: int = samples.NOW,
         key=None) -> AuditLog:
    """A log (left open) with ``a`` requests of tenant A then ``b`` of tenant B, and a note."""
    log = AuditLog(path, key or samples.key_a())
    log.append(now_ms=now_ms, kind="note", outcome="ok")
    for i in range(a):
        add_request(log, i, REF_A, now_ms)
    for i in range(b):
        add_request(log, 100 + i, REF_B, now_ms)
    return log
