"""Reading an audit log without owning it: verification and data-subject export.

Both work while a node runs and holds the log's lock: they read the files once, never take
the lock, and ignore a torn final record (a write in progress, or a crash).  The receipts
file is read before the log — a receipt is written after its record, so every receipt read
has its record in the log read after it — and the pair is read again if a rewrite (erasure,
retention) replaced the log in between.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

from ..errors import StorageError
from ..protocol.audit import ChainEntry, ChainHead, ChainReport, walk_chain
from ..protocol.envelope import Limits, check_signature, decode_envelope
from ..protocol.errors import ProtocolError
from ..protocol.identity import peer_id_to_str
from ..protocol.messages import Receipt
from .audit import SIG, read_frames, receipts_path, verify_frames

__all__ = ["Snapshot", "Verdict", "snapshot", "verify_log", "export_rows", "content_path",
           "read_content", "EXPORT_FIELDS"]

EXPORT_FIELDS = ("type", "seq", "time", "kind", "outcome", "request_id", "model",
                 "model_digest", "entry_peer", "exec_peer", "jurisdiction", "tokens_in",
                 "tokens_out", "ttft_ms", "total_ms", "error_code", "receipt_sig", "covers",
                 "prompt", "completion")


def content_path(home: Path, tenant_ref: bytes) -> Path:
    """Where a tenant's opt-in content log lives (outside the chain)."""
    return home / "content" / f"{tenant_ref.hex()}.jsonl"


@dataclass(frozen=True)
class Snapshot:
    """The log's and the receipts file's bytes, read consistently."""

    log: bytes
    receipts: bytes


def snapshot(path: Path) -> Snapshot:
    """Read ``path`` and its receipts file without the lock.  Raises :class:`StorageError`
    if there is no log."""
    rpath = receipts_path(path)
    for _ in range(5):
        try:
            before = os.stat(path).st_ino
            receipts = rpath.read_bytes() if rpath.exists() else b""
            with open(path, "rb") as f:
                data, after = f.read(), os.fstat(f.fileno()).st_ino
        except FileNotFoundError:
            raise StorageError(f"no audit log at {path}") from None
        if before == after:
            return Snapshot(data, receipts)
    raise StorageError(f"{path} keeps being rewritten; try again")


@dataclass
class Verdict:
    """What :func:`verify_log` found.  ``errors`` is empty if everything verified."""

    positions: int = 0
    redacted: int = 0
    pruned: int = 0
    receipts: int = 0
    head: ChainHead = ChainHead()
    signer: bytes | None = None
    errors: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors

    @property
    def records(self) -> int:
        return self.positions - self.redacted - self.pruned

    def summary(self) -> list[str]:
        lines = [f"chain    {self.positions} position(s): {self.records} record(s), "
                 f"{self.redacted} redacted, {self.pruned} pruned; head seq {self.head.seq} "
                 f"{self.head.hash.hex()[:16]}…",
                 f"signer   {peer_id_to_str(self.signer) if self.signer else '-'}",
                 f"receipts {self.receipts} checked"]
        lines += [f"note     {n}" for n in self.notes]
        if self.errors:
            lines.append(f"FAILED   {len(self.errors)} error(s); first: {self.errors[0]}")
            lines += [f"error    {e}" for e in self.errors[1:20]]
        else:
            lines.append("ok")
        return lines


def _walker(signer: bytes | None) -> Any:
    return lambda raws: walk_chain(raws, signer=signer)


def _chain(data: bytes, where: Path, signer: bytes | None, verdict: Verdict) -> ChainReport:
    report, cut = verify_frames(data, _walker(signer), where)
    if cut is not None:
        verdict.notes.append(f"ignored a torn final record ({len(data) - cut} bytes): "
                             "a write in progress or a crash")
    return report


def verify_log(path: Path, *, signer: bytes | None = None) -> Verdict:
    """Verify the chain (signatures, links, tombstones vouched for) and every stored
    receipt (signature; a live record carries its signature, with the same request id and
    the receipt's signer as exec_peer where set).  ``signer``: the expected node (default:
    the first record's signer).  Never raises for damage: it is listed in the verdict."""
    verdict = Verdict(signer=signer)
    try:
        snap = snapshot(path)
    except StorageError as exc:
        verdict.errors.append(str(exc))
        return verdict
    by_sig: dict[bytes, ChainEntry] | None = None  # None: the chain failed, no cross-check
    try:
        report = _chain(snap.log, path, signer, verdict)
    except StorageError as exc:
        verdict.errors.append(str(exc))
    else:
        verdict.positions, verdict.head = len(report.entries), report.head
        verdict.signer = report.signer or signer
        verdict.redacted, verdict.pruned = report.redacted, report.pruned
        by_sig = {e.record.receipt_sig: e for e in report.entries
                  if e.record is not None and e.record.receipt_sig is not None}
    frames, complete = read_frames(snap.receipts)
    if complete < len(snap.receipts):
        verdict.notes.append(f"ignored a torn final receipt ({len(snap.receipts) - complete} "
                             "bytes)")
    for index, (_, raw) in enumerate(frames):
        problem = _check_receipt(raw, by_sig)
        if problem:
            verdict.errors.append(f"{receipts_path(path).name} receipt {index}: {problem}")
        verdict.receipts += 1
    return verdict


def _check_receipt(raw: bytes, by_sig: dict[bytes, ChainEntry] | None) -> str | None:
    try:
        env, receipt = decode_envelope(raw, Limits())
        if not isinstance(receipt, Receipt):
            return "not a receipt"
        check_signature(env)
    except ProtocolError as exc:
        return f"invalid ({exc.reason}: {exc})"
    if by_sig is None:
        return None
    entry = by_sig.get(raw[-SIG:])
    rid = receipt.request_id.hex()
    if entry is None or entry.record is None:
        return f"request {rid}: no audit record carries this receipt's signature"
    record = entry.record
    if record.request_id is not None and record.request_id != receipt.request_id:
        return f"request {rid}: record seq {entry.seq} is for request {record.request_id.hex()}"
    if record.exec_peer is not None and record.exec_peer != env.sender:
        return f"request {rid}: signed by {peer_id_to_str(env.sender)}, but record seq " \
               f"{entry.seq} names executor {peer_id_to_str(record.exec_peer)}"
    return None


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, timezone.utc).isoformat(
        timespec="milliseconds").replace("+00:00", "Z")


def _row(entry: ChainEntry) -> dict[str, Any]:
    r = entry.record
    assert r is not None and entry.issued_at is not None

    def hx(b: bytes | None) -> str | None:
        return b.hex() if b is not None else None

    def pid(b: bytes | None) -> str | None:
        return peer_id_to_str(b) if b is not None else None

    return {"type": "record", "seq": r.seq, "time": _iso(entry.issued_at), "kind": r.kind,
            "outcome": r.outcome, "request_id": hx(r.request_id), "model": r.model,
            "model_digest": hx(r.model_digest), "entry_peer": pid(r.entry_peer),
            "exec_peer": pid(r.exec_peer), "jurisdiction": r.jurisdiction,
            "tokens_in": r.tokens_in, "tokens_out": r.tokens_out, "ttft_ms": r.ttft_ms,
            "total_ms": r.total_ms, "error_code": r.error_code,
            "receipt_sig": hx(r.receipt_sig),
            "covers": list(r.covers) if r.covers is not None else None}


def read_content(path: Path) -> Iterator[dict[str, Any]]:
    """The lines of a tenant's content log (a torn or unreadable line is skipped)."""
    if not path.exists():
        return
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                item = json.loads(line)
            except ValueError:
                continue
            if isinstance(item, dict):
                yield item


def export_rows(path: Path, tenant_ref: bytes, *, since_ms: int | None = None,
                content: Path | None = None, signer: bytes | None = None
                ) -> Iterator[dict[str, Any]]:
    """A tenant's records (``type`` "record", oldest first, issued at or after ``since_ms``)
    then the lines of its content log (``type`` "content"; with ``since_ms``, only those of
    the requests exported).  The chain is verified first: raises :class:`StorageError` if
    it does not verify."""
    verdict = Verdict()
    report = _chain(snapshot(path).log, path, signer, verdict)
    requests: set[str] = set()
    for entry in report.entries:
        if entry.record is None or entry.record.tenant_ref != tenant_ref:
            continue
        if since_ms is not None and (entry.issued_at or 0) < since_ms:
            continue
        row = _row(entry)
        if row["request_id"]:
            requests.add(row["request_id"])
        yield row
    for item in read_content(content) if content else ():
        if since_ms is None or item.get("request_id") in requests:
            yield {**item, "type": "content"}
