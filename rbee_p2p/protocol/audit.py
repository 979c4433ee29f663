"""The tamper-evident audit chain (pure).

Each record is a signed envelope of type :class:`AuditRecord` whose ``seq`` counts from the
chain's start and whose ``prev`` is the sha256 of the previous record's envelope bytes
(all zeros for the first record of a chain).  The chain's *head* is (next seq, hash of the
last record).  :func:`verify_chain` walks the records and names the first one that was
edited, deleted, reordered or cut off; with a known head it also detects truncation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

from .envelope import Limits, check_signature, decode_envelope, seal
from .errors import ChainBroken, ProtocolError
from .identity import NodeKey
from .messages import AuditRecord
from .receipts import digest

__all__ = ["GENESIS", "ChainHead", "append_record", "verify_chain", "record_hash"]

GENESIS = bytes(32)


@dataclass(frozen=True)
class ChainHead:
    """Where a chain stands: the seq the next record gets and the hash it must link to."""

    seq: int = 0
    hash: bytes = GENESIS


def record_hash(raw: bytes) -> bytes:
    return digest(raw)


def append_record(
    key: NodeKey,
    head: ChainHead,
    *,
    now_ms: int,
    kind: str,
    outcome: str,
    nonce: bytes | None = None,
    **fields: Any,
) -> tuple[bytes, ChainHead]:
    """Seal the next record after ``head``; returns (record bytes, new head).

    ``fields`` are the optional :class:`AuditRecord` fields (metadata only); ``nonce`` is
    for reproducible test vectors only.  Records carry
    no freshness window (expires_at == issued_at); they are checked by :func:`verify_chain`.
    Raises :class:`InvalidSchema` for a bad field.
    """
    record = AuditRecord(seq=head.seq, prev=head.hash, kind=kind, outcome=outcome, **fields)
    raw = seal(key, record, now_ms=now_ms, ttl_ms=0, nonce=nonce)
    return raw, ChainHead(head.seq + 1, record_hash(raw))


def verify_chain(
    records: Iterable[bytes],
    *,
    signer: bytes | None = None,
    start: ChainHead = ChainHead(),
    expected_head: ChainHead | None = None,
    limits: Limits | None = None,
) -> tuple[ChainHead, list[AuditRecord]]:
    """Verify a chain segment that begins at ``start``; return its head and records.

    Every record must decode, carry a valid signature (by ``signer`` when given, else by
    the first record's signer), have the next seq and link to its predecessor's hash.  With
    ``expected_head``, a chain that stops short of it is reported as truncated.  Raises
    :class:`ChainBroken` with the index (0-based, within ``records``) of the first bad record.
    """
    limits = limits or Limits()
    head = start
    out: list[AuditRecord] = []
    for index, raw in enumerate(records):
        try:
            env, message = decode_envelope(raw, limits)
        except ProtocolError as exc:
            raise ChainBroken(index, "unreadable", f"unreadable record ({exc})") from None
        if not isinstance(message, AuditRecord):
            raise ChainBroken(index, "unreadable", "not an audit record")
        if env.expires_at != env.issued_at:
            raise ChainBroken(index, "invalid", "audit records carry no validity window")
        try:
            check_signature(env)
        except ProtocolError:
            raise ChainBroken(index, "forged", "signature does not verify (record edited)") from None
        signer = signer or env.sender
        if env.sender != signer:
            raise ChainBroken(index, "foreign", "signed by another node")
        if message.seq != head.seq:
            raise ChainBroken(index, "sequence", f"expected seq {head.seq}, found {message.seq} "
                                                 "(record deleted, inserted or reordered)")
        if message.prev != head.hash:
            raise ChainBroken(index, "link", "does not link to the previous record")
        head = ChainHead(head.seq + 1, record_hash(raw))
        out.append(message)
    if expected_head is not None and head != expected_head:
        index = len(out)
        if head.seq < expected_head.seq:
            raise ChainBroken(index, "truncated",
                              f"chain ends at seq {head.seq}, expected {expected_head.seq}")
        raise ChainBroken(max(index - 1, 0), "link", "head differs from the expected head")
    return head, out
