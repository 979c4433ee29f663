"""The tamper-evident audit chain (pure).

Each record is a signed envelope of type :class:`AuditRecord` whose ``seq`` counts from the
chain's start and whose ``prev`` is the sha256 of the previous record's envelope bytes
(all zeros for the first record of a chain).  The chain's *head* is (next seq, hash of the
last record).  :func:`verify_chain` walks the records and names the first one that was
edited, deleted, reordered or cut off; with a known head it also detects truncation.

Erasure and retention keep the chain verifiable: a record is replaced by a *tombstone*
(:func:`tombstone`: its seq and its record hash, nothing else), so the next record's
``prev`` still links, and a later signed record of kind ``redaction`` or ``prune``
(:func:`cover_records`) vouches for it: its ``covers`` lists the seqs and its
``covers_digest`` is the sha256 of their record hashes, in order.  A tombstone nobody
vouches for, or a cover of anything but a tombstone, breaks the chain.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Sequence

from . import cbor
from .envelope import Limits, check_signature, decode_envelope, seal
from .errors import ChainBroken, ProtocolError
from .identity import NodeKey
from .messages import AuditRecord
from .receipts import digest

__all__ = [
    "GENESIS",
    "MAX_COVERS",
    "COVER_KINDS",
    "ChainHead",
    "ChainEntry",
    "ChainReport",
    "append_record",
    "cover_records",
    "covers_digest",
    "read_entry",
    "record_hash",
    "tombstone",
    "verify_chain",
    "walk_chain",
]

GENESIS = bytes(32)
MAX_COVERS = 4096  # AuditRecord.covers MaxItems: larger erasures take several records
COVER_KINDS = {"redaction": "redacted", "prune": "pruned"}  # kind -> its outcome
_TOMBSTONE_TAG = "tombstone"
_MAX_TOMBSTONE = 64


@dataclass(frozen=True)
class ChainHead:
    """Where a chain stands: the seq the next record gets and the hash it must link to."""

    seq: int = 0
    hash: bytes = GENESIS


@dataclass(frozen=True)
class ChainEntry:
    """One position of a chain: a record, or the tombstone left where one was erased.

    ``hash`` is the record hash (sha256 of the record's envelope bytes; for a tombstone,
    the hash it keeps).  ``issued_at`` and ``sender`` are the envelope's (None for a
    tombstone).  Produced by :func:`read_entry`, which checks no signature or link.
    """

    seq: int
    hash: bytes
    record: AuditRecord | None = None
    issued_at: int | None = None
    sender: bytes | None = None

    @property
    def is_tombstone(self) -> bool:
        return self.record is None


@dataclass(frozen=True)
class ChainReport:
    """What :func:`walk_chain` found: the head, every entry in order, and how many
    positions are tombstones vouched for by ``redaction`` and by ``prune`` records."""

    head: ChainHead
    entries: tuple[ChainEntry, ...]
    redacted: int
    pruned: int
    signer: bytes | None


def record_hash(raw: bytes) -> bytes:
    return digest(raw)


def covers_digest(hashes: Iterable[bytes]) -> bytes:
    """sha256 over the covered records' hashes (32 bytes each), in ``covers`` order."""
    return digest(b"".join(hashes))


def tombstone(seq: int, hash_: bytes) -> bytes:
    """The bytes that replace record ``seq`` (whose record hash is ``hash_``) when it is
    redacted or pruned: the canonical CBOR array ``["tombstone", seq, hash]``."""
    if not 0 <= seq < 2**64 or len(hash_) != 32:
        raise ValueError("a tombstone needs a u64 seq and a 32-byte hash")
    return cbor.encode([_TOMBSTONE_TAG, seq, hash_])


def _read_tombstone(raw: bytes) -> ChainEntry | None:
    """The tombstone in ``raw``, or None if ``raw`` does not claim to be one.
    Raises :class:`ProtocolError` for a malformed tombstone."""
    if not raw.startswith(b"\x83\x69tombstone"):
        return None
    item = cbor.decode(raw, max_size=_MAX_TOMBSTONE)
    if (not isinstance(item, list) or len(item) != 3 or item[0] != _TOMBSTONE_TAG
            or isinstance(item[1], bool) or not isinstance(item[1], int)
            or not 0 <= item[1] < 2**64 or not isinstance(item[2], bytes) or len(item[2]) != 32):
        raise ProtocolError("malformed tombstone")
    return ChainEntry(seq=item[1], hash=item[2])


def read_entry(raw: bytes, limits: Limits | None = None) -> ChainEntry:
    """Decode one chain position (record or tombstone) WITHOUT checking its signature or
    its place in the chain: for scans that verify separately.  Raises
    :class:`ProtocolError` if ``raw`` is neither a decodable record nor a tombstone."""
    entry = _read_tombstone(raw)
    if entry is not None:
        return entry
    env, message = decode_envelope(raw, limits or Limits())
    if not isinstance(message, AuditRecord):
        raise ProtocolError("not an audit record")
    return ChainEntry(seq=message.seq, hash=record_hash(raw), record=message,
                      issued_at=env.issued_at, sender=env.sender)


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


def cover_records(
    key: NodeKey,
    head: ChainHead,
    covered: Sequence[tuple[int, bytes]],
    *,
    now_ms: int,
    kind: str,
    tenant_ref: bytes | None = None,
    nonce: bytes | None = None,
) -> tuple[list[bytes], ChainHead]:
    """The ``redaction`` or ``prune`` records that vouch for tombstones of ``covered``
    ((seq, record hash) pairs, ascending seqs below ``head.seq``): one record per
    :data:`MAX_COVERS` seqs.  Returns (records, new head).  Raises ValueError for a bad
    kind or order, :class:`InvalidSchema` for a bad field."""
    if kind not in COVER_KINDS:
        raise ValueError(f"cover records are of kind {' or '.join(COVER_KINDS)}")
    seqs = [seq for seq, _ in covered]
    if any(a >= b for a, b in zip(seqs, seqs[1:])) or (seqs and seqs[-1] >= head.seq):
        raise ValueError("covered seqs must ascend and precede the head")
    out: list[bytes] = []
    for start in range(0, len(covered), MAX_COVERS):
        part = covered[start:start + MAX_COVERS]
        raw, head = append_record(
            key, head, now_ms=now_ms, kind=kind, outcome=COVER_KINDS[kind], nonce=nonce,
            tenant_ref=tenant_ref, covers=tuple(seq for seq, _ in part),
            covers_digest=covers_digest(h for _, h in part))
        out.append(raw)
    return out, head


def _check_covers(index: int, record: AuditRecord, pending: dict[int, bytes],
                  start: ChainHead) -> int:
    """Settle the tombstones ``record`` vouches for; returns how many it covers."""
    if record.kind not in COVER_KINDS:
        if record.covers is not None or record.covers_digest is not None:
            raise ChainBroken(index, "cover", f"a {record.kind} record cannot cover seqs")
        return 0
    if record.outcome != COVER_KINDS[record.kind]:
        raise ChainBroken(index, "cover", f"a {record.kind} record must have outcome "
                                          f"{COVER_KINDS[record.kind]}")
    covers = record.covers or ()
    if any(a >= b for a, b in zip(covers, covers[1:])):
        raise ChainBroken(index, "cover", "covers must list ascending seqs")
    hashes: list[bytes] = []
    for seq in covers:
        if seq < start.seq:  # before this segment: cannot be checked here
            continue
        if seq not in pending:
            raise ChainBroken(index, "cover", f"covers seq {seq}, which is not an earlier "
                                              "tombstone awaiting a cover")
        hashes.append(pending.pop(seq))
    checkable = not covers or covers[0] >= start.seq
    if checkable and covers and record.covers_digest != covers_digest(hashes):
        raise ChainBroken(index, "cover", "covers_digest does not match the tombstones' "
                                          "hashes (a tombstone was edited)")
    return len(covers)


def walk_chain(
    records: Iterable[bytes],
    *,
    signer: bytes | None = None,
    start: ChainHead = ChainHead(),
    expected_head: ChainHead | None = None,
    limits: Limits | None = None,
    check_signatures: bool = True,
) -> ChainReport:
    """Verify a chain segment that begins at ``start``, tombstones included.

    Every record must decode, carry a valid signature (by ``signer`` when given, else by
    the first record's signer), have the next seq and link to its predecessor's hash.  A
    tombstone must have the next seq and be covered by a later ``redaction``/``prune``
    record of the segment (whose ``covers_digest`` must match the tombstones' hashes); a
    cover must name only tombstones not yet covered (seqs before ``start`` are not
    checked).  With ``expected_head``, a chain that stops short of it is reported as
    truncated.  Raises :class:`ChainBroken` with the index (0-based, within ``records``)
    of the first bad record; an unvouched tombstone is found only at the segment's end.

    ``check_signatures=False`` (about 4x faster) is for a verifier that TRUSTS
    ``expected_head`` — the log's owner, who verified the chain with signatures when it
    opened it and made every append since: the hash links from that head then bind every
    byte of every record.  Raises ValueError without ``expected_head``.
    """
    if not check_signatures and expected_head is None:
        raise ValueError("skipping signatures needs a trusted expected_head")
    limits = limits or Limits()
    head = start
    entries: list[ChainEntry] = []
    pending: dict[int, bytes] = {}  # tombstones awaiting a cover: seq -> hash
    pending_index: dict[int, int] = {}
    counts = {"redaction": 0, "prune": 0}
    for index, raw in enumerate(records):
        try:
            entry = _read_tombstone(raw)
        except ProtocolError as exc:
            raise ChainBroken(index, "unreadable", f"unreadable tombstone ({exc})") from None
        if entry is None:
            entry = _verify_record(index, raw, limits, signer, head, check_signatures)
            signer = entry.sender
            assert entry.record is not None
            covered = _check_covers(index, entry.record, pending, start)
            if entry.record.kind in counts:
                counts[entry.record.kind] += covered
        elif entry.seq != head.seq:
            raise ChainBroken(index, "sequence", f"expected seq {head.seq}, found tombstone "
                                                 f"of seq {entry.seq}")
        else:
            pending[entry.seq] = entry.hash
            pending_index[entry.seq] = index
        head = ChainHead(head.seq + 1, entry.hash)
        entries.append(entry)
    if expected_head is not None and head != expected_head:
        index = len(entries)
        if head.seq < expected_head.seq:
            raise ChainBroken(index, "truncated",
                              f"chain ends at seq {head.seq}, expected {expected_head.seq}")
        raise ChainBroken(max(index - 1, 0), "link", "head differs from the expected head")
    if pending:
        seq = min(pending)
        raise ChainBroken(pending_index[seq], "unvouched",
                          f"tombstone of seq {seq} is covered by no redaction or prune record")
    return ChainReport(head, tuple(entries), counts["redaction"], counts["prune"], signer)


def _verify_record(index: int, raw: bytes, limits: Limits, signer: bytes | None,
                   head: ChainHead, check_signatures: bool) -> ChainEntry:
    try:
        env, message = decode_envelope(raw, limits)
    except ProtocolError as exc:
        raise ChainBroken(index, "unreadable", f"unreadable record ({exc})") from None
    if not isinstance(message, AuditRecord):
        raise ChainBroken(index, "unreadable", "not an audit record")
    if env.expires_at != env.issued_at:
        raise ChainBroken(index, "invalid", "audit records carry no validity window")
    try:
        if check_signatures:
            check_signature(env)
    except ProtocolError:
        raise ChainBroken(index, "forged", "signature does not verify (record edited)") from None
    if env.sender != (signer or env.sender):
        raise ChainBroken(index, "foreign", "signed by another node")
    if message.seq != head.seq:
        raise ChainBroken(index, "sequence", f"expected seq {head.seq}, found {message.seq} "
                                             "(record deleted, inserted or reordered)")
    if message.prev != head.hash:
        raise ChainBroken(index, "link", "does not link to the previous record")
    return ChainEntry(seq=message.seq, hash=record_hash(raw), record=message,
                      issued_at=env.issued_at, sender=env.sender)


def verify_chain(
    records: Iterable[bytes],
    *,
    signer: bytes | None = None,
    start: ChainHead = ChainHead(),
    expected_head: ChainHead | None = None,
    limits: Limits | None = None,
) -> tuple[ChainHead, list[AuditRecord]]:
    """Verify a chain segment that begins at ``start``; return its head and its records
    (tombstones left out).  See :func:`walk_chain` for the rules.  Raises
    :class:`ChainBroken` with the index (0-based, within ``records``) of the first bad
    record.
    """
    report = walk_chain(records, signer=signer, start=start, expected_head=expected_head,
                        limits=limits)
    return report.head, [e.record for e in report.entries if e.record is not None]
