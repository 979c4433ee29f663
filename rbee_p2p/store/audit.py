"""The audit log file: an append-only, fsynced file of hash-chained, signed records.

Format: repeated ``[4-byte big-endian length][record envelope bytes]``.  An append is one
``write`` followed by ``fsync``, so a crash (kill -9, power loss) can only leave the last
record torn.  On open the whole chain is verified; a torn final record is cut off (and
logged), any other damage raises :class:`StorageError` — nothing is silently dropped.
One process at a time: the file is locked while open.

Erasure (:meth:`AuditLog.erase`) and retention (:meth:`AuditLog.prune`) replace records by
tombstones and append signed cover records (protocol/README.md §11.1): the file is rewritten
atomically (new file, fsync, rename, fsync of the directory) under the lock, after verifying
the chain and the rewritten chain.

Receipts: a record appended with ``receipt=`` (the executor's signed receipt envelope) keeps
those bytes in the side file :func:`receipts_path`, same framing, written and fsynced only
after the record is — a crash can lose a receipt, never leave one without its record.
"""

from __future__ import annotations

import fcntl
import io
import logging
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import cbor2

from ..errors import InvalidSchema, StorageError
from ..protocol.audit import (
    COVER_KINDS,
    ChainEntry,
    ChainHead,
    ChainReport,
    append_record,
    cover_records,
    read_entry,
    tombstone,
    walk_chain,
)
from ..protocol.envelope import Limits, decode_envelope
from ..protocol.errors import ChainBroken, ProtocolError
from ..protocol.identity import NodeKey
from ..protocol.messages import Receipt

__all__ = ["AuditLog", "LogInUse", "Erased", "read_frames", "receipts_path", "frame", "torn_tail",
           "verify_frames"]

log = logging.getLogger(__name__)
_HEADER = struct.Struct(">I")
MAX_RECORD = 64 * 1024
MAX_RECEIPT = 4096
SIG = 64


def receipts_path(path: Path) -> Path:
    """The receipts side file of the audit log at ``path`` (``audit.receipts``)."""
    return path.with_suffix(".receipts")


def frame(raw: bytes) -> bytes:
    return _HEADER.pack(len(raw)) + raw


def read_frames(data: bytes) -> tuple[list[tuple[int, bytes]], int]:
    """Split a log's bytes into (offset, record) frames; also return where complete frames end."""
    frames: list[tuple[int, bytes]] = []
    offset = 0
    while offset + _HEADER.size <= len(data):
        (length,) = _HEADER.unpack_from(data, offset)
        end = offset + _HEADER.size + length
        if end > len(data):
            break
        frames.append((offset, data[offset + _HEADER.size : end]))
        offset = end
    return frames, offset


def torn_tail(data: bytes, offset: int, max_frame: int = MAX_RECORD) -> bool:
    """Whether the bytes from ``offset`` (past the last complete frame) can be what a crash
    during one append leaves: a prefix of one frame, or a zero-filled tail."""
    tail = data[offset:]
    if not tail.strip(b"\0") or len(tail) < _HEADER.size:
        return True
    (length,) = _HEADER.unpack_from(tail)
    if not 0 < length <= max_frame:
        return False
    # A torn record is a strict prefix of one CBOR item.  If a whole item is there, the
    # length header was damaged (records follow): refuse rather than drop them.
    try:
        cbor2.CBORDecoder(io.BytesIO(tail[_HEADER.size:])).decode()
    except cbor2.CBORDecodeEOF:
        return True
    except Exception:
        return False
    return False


def verify_frames(data: bytes, walk: Callable[[list[bytes]], ChainReport],
                  where: Path) -> tuple[ChainReport, int | None]:
    """Verify a log's bytes with ``walk``; return the report and, if a crash left a torn
    final record (see the module doc), the offset where it starts (the report covers the
    records before it).  Raises :class:`StorageError` for any other damage."""
    frames, complete = read_frames(data)
    cut: int | None = None
    if complete < len(data):
        if not torn_tail(data, complete):
            raise StorageError(f"{where}: damaged record header at byte {complete} "
                               f"(after record {len(frames) - 1}); refusing to drop the rest")
        cut = complete
    try:
        return walk([raw for _, raw in frames]), cut
    except ChainBroken as exc:
        offset = frames[exc.index][0] if exc.index < len(frames) else complete
        # A crash tears at most the final append: an unreadable last frame, or a
        # zero-filled tail.  Anything else is damage we must not hide.
        torn = exc.cause == "unreadable" and (
            (exc.index == len(frames) - 1 and cut is None) or not data[offset:].strip(b"\0")
        )
        if not torn:
            raise StorageError(f"{where}: {exc} (at byte {offset})") from None
        return walk([raw for _, raw in frames[: exc.index]]), offset


class LogInUse(StorageError):
    """Another process (a running node) holds the audit log's lock."""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _open_locked(path: Path) -> int:
    """Open ``path`` for appending and take its exclusive lock, or raise StorageError.

    A rewrite renames a new file over the path: if we locked a file that was replaced
    meanwhile, we try again on the new one."""
    for _ in range(10):
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise LogInUse(f"{path} is in use by another process (a running rbee-node?)"
                           ) from None
        try:
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)
    raise StorageError(f"{path} keeps being replaced; is another process rewriting it?")


def _append_all(fd: int, data: bytes, path: Path) -> None:
    """Append all of ``data`` to ``fd``, or nothing: a short or failed write (a full disk)
    is truncated back, so the file never keeps half a record for later appends to follow.
    Raises StorageError."""
    start = os.lseek(fd, 0, os.SEEK_END)
    view = memoryview(data)
    try:
        while view:
            written = os.write(fd, view)
            if written <= 0:
                raise OSError(f"wrote nothing of {len(view)} bytes")
            view = view[written:]
    except OSError as exc:
        try:
            os.ftruncate(fd, start)
        except OSError:
            log.exception("%s: cannot cut back a failed write", path)
        raise StorageError(f"{path}: cannot write ({exc}); nothing was kept") from exc


def _replace_file(path: Path, data: bytes, *, lock: bool) -> int | None:
    """Atomically replace ``path`` by ``data``: write a new file, fsync, rename, fsync the
    directory.  With ``lock``, the new file is locked before it takes the name and its open
    descriptor (for appending) is returned."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o600)
    try:
        if lock:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        os.close(fd)
        raise
    if lock:
        return fd
    os.close(fd)
    return None


@dataclass(frozen=True)
class Erased:
    """What an erasure or prune did: records tombstoned, cover records appended, receipts
    removed."""

    records: int = 0
    covers: int = 0
    receipts: int = 0


class AuditLog:
    """An open audit log owned by ``key``'s node.  Not thread-safe; one owner at a time."""

    def __init__(self, path: Path, key: NodeKey) -> None:
        self.path = path
        self.receipts_path = receipts_path(path)
        self.key = key
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._fd = _open_locked(path)
        self._rfd = -1
        self._pending_receipts: list[bytes] = []
        try:
            self.head = self._recover()
            self._rfd = os.open(self.receipts_path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
            self._recover_receipts()
        except BaseException:
            self.close()
            raise

    def _recover(self) -> ChainHead:
        data = self.path.read_bytes()
        report, cut = verify_frames(data, self._walk, self.path)
        if cut is not None:
            log.warning("%s: cut a torn final record (%d bytes) left by a crash",
                        self.path, len(data) - cut)
            os.ftruncate(self._fd, cut)
            os.fsync(self._fd)
        return report.head

    def _recover_receipts(self) -> None:
        data = self.receipts_path.read_bytes()
        _, complete = read_frames(data)
        if complete < len(data):
            if not torn_tail(data, complete, MAX_RECEIPT):
                raise StorageError(f"{self.receipts_path}: damaged receipt header at byte "
                                   f"{complete}; refusing to drop the rest")
            log.warning("%s: cut a torn final receipt (%d bytes) left by a crash",
                        self.receipts_path, len(data) - complete)
            os.ftruncate(self._rfd, complete)
            os.fsync(self._rfd)

    def _walk(self, raws: list[bytes], trusted: ChainHead | None = None) -> ChainReport:
        # Signatures are checked when the log is opened; afterwards our own in-memory head
        # is trusted and anchors the hash links, which bind every byte (4x faster).
        return walk_chain(raws, signer=self.key.peer_id, expected_head=trusted,
                          check_signatures=trusted is None)

    def append(self, *, now_ms: int, kind: str, outcome: str, sync: bool = True,
               receipt: bytes | None = None, **fields: Any) -> bytes:
        """Append one record (and fsync unless ``sync`` is false: then call :meth:`sync`
        before acknowledging it); returns its bytes.  With ``receipt`` (a Receipt envelope),
        the record's ``receipt_sig`` is the receipt's signature and the receipt is kept in
        the receipts file, written at the next sync.  Raises :class:`InvalidSchema` for a
        bad field or receipt, :class:`StorageError` when the disk refuses the write (full):
        nothing is written then."""
        if receipt is not None:
            _check_receipt(receipt)
            if fields.get("receipt_sig") not in (None, receipt[-SIG:]):
                raise InvalidSchema("receipt_sig is not the receipt's signature")
            fields["receipt_sig"] = receipt[-SIG:]
        raw, head = append_record(self.key, self.head, now_ms=now_ms, kind=kind,
                                  outcome=outcome, **fields)
        _append_all(self._fd, frame(raw), self.path)  # StorageError: head stays as it was
        self.head = head
        if receipt is not None:
            self._pending_receipts.append(receipt)
        if sync:
            self.sync()
        return raw

    def sync(self) -> None:
        """fsync the records, then write and fsync the receipts appended since last time."""
        os.fsync(self._fd)
        if self._pending_receipts:  # kept for the next sync if this write fails
            _append_all(self._rfd, b"".join(frame(r) for r in self._pending_receipts),
                        self.receipts_path)
            os.fsync(self._rfd)
            self._pending_receipts.clear()

    def records(self) -> Iterator[bytes]:
        """The records' bytes (tombstones included), oldest first (read from disk)."""
        frames, _ = read_frames(self.path.read_bytes())
        return (raw for _, raw in frames)

    def receipts(self) -> list[bytes]:
        """The stored receipt envelopes (synced ones), oldest first."""
        frames, _ = read_frames(self.receipts_path.read_bytes())
        return [raw for _, raw in frames]

    # -- erasure and retention

    def erase(self, tenant_ref: bytes, *, now_ms: int) -> Erased:
        """Right to erasure: tombstone every record of ``tenant_ref`` (cover records are
        kept), append ``redaction`` records, remove those records' receipts.  Raises
        :class:`StorageError` if the chain does not verify before or after."""
        if len(tenant_ref) != 32:
            raise ValueError("a tenant ref is 32 bytes")
        return self._tombstone(lambda e: e.record is not None and e.record.tenant_ref
                               == tenant_ref, "redaction", now_ms, tenant_ref)

    def prune(self, before_ms: int, *, now_ms: int, quick: bool = False) -> Erased:
        """Retention: tombstone every record issued before ``before_ms`` (cover records are
        kept), append ``prune`` records, remove those records' receipts.

        ``quick`` (the running node, every hour): first look from the oldest live record
        to the first one to keep and do nothing if that is the oldest — records are
        appended in time order; one stamped older after the clock stepped back goes later,
        with its neighbours."""
        def old(entry: ChainEntry) -> bool:
            return (entry.record is not None and entry.record.kind not in COVER_KINDS
                    and entry.issued_at is not None and entry.issued_at < before_ms)

        if not quick:
            return self._tombstone(old, "prune", now_ms, None)
        try:
            for raw in self._stream():
                entry = read_entry(raw)
                if entry.record is None or entry.record.kind in COVER_KINDS:
                    continue
                if not old(entry):
                    return Erased()
                break
            else:
                return Erased()
        except ProtocolError:
            pass  # the full verification below names the damage
        return self._tombstone(old, "prune", now_ms, None)

    def _stream(self) -> Iterator[bytes]:
        """The records' bytes, oldest first, read as needed."""
        with open(self.path, "rb") as f:
            while len(header := f.read(_HEADER.size)) == _HEADER.size:
                raw = f.read(_HEADER.unpack(header)[0])
                yield raw

    def _tombstone(self, select: Callable[[ChainEntry], bool], kind: str, now_ms: int,
                   tenant_ref: bytes | None) -> Erased:
        self.sync()
        raws = list(self.records())
        try:
            report = self._walk(raws, self.head)
        except ChainBroken as exc:
            raise StorageError(f"{self.path}: {exc}; not rewriting a damaged log") from None
        victims = [e for e in report.entries
                   if e.record is not None and e.record.kind not in COVER_KINDS and select(e)]
        if not victims:
            return Erased()
        seqs = {e.seq for e in victims}
        sigs = {e.record.receipt_sig for e in victims if e.record and e.record.receipt_sig}
        new = [tombstone(e.seq, e.hash) if e.seq in seqs else raw
               for e, raw in zip(report.entries, raws)]
        covers, head = cover_records(self.key, self.head, [(e.seq, e.hash) for e in victims],
                                     now_ms=now_ms, kind=kind, tenant_ref=tenant_ref)
        new += covers
        try:
            after = self._walk(new, head)
        except ChainBroken as exc:  # a bug, never expected: keep the old file
            raise StorageError(f"{self.path}: the rewritten chain does not verify ({exc})"
                               ) from None
        assert after.redacted + after.pruned == report.redacted + report.pruned + len(victims)
        # receipts first: a crash in between leaves records without receipts (allowed)
        removed = self._drop_receipts(sigs)
        data = b"".join(frame(raw) for raw in new)
        fd = _replace_file(self.path, data, lock=True)
        assert fd is not None
        os.close(self._fd)
        self._fd, self.head = fd, head
        if self.path.read_bytes() != data:
            raise StorageError(f"{self.path}: read back differs from what was written")
        log.info("%s: %s of %d record(s), %d receipt(s) removed", self.path, kind,
                 len(victims), removed)
        return Erased(records=len(victims), covers=len(covers), receipts=removed)

    def _drop_receipts(self, sigs: set[bytes]) -> int:
        if not sigs:
            return 0
        stored = self.receipts()
        kept = [raw for raw in stored if raw[-SIG:] not in sigs]
        removed = len(stored) - len(kept)
        if removed:
            _replace_file(self.receipts_path, b"".join(frame(r) for r in kept), lock=False)
            os.close(self._rfd)
            self._rfd = os.open(self.receipts_path, os.O_RDWR | os.O_APPEND)
        return removed

    def close(self) -> None:
        if self._fd >= 0 and self._rfd >= 0 and self._pending_receipts:
            self.sync()
        if self._rfd >= 0:
            os.close(self._rfd)
            self._rfd = -1
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _check_receipt(receipt: bytes) -> None:
    if not isinstance(receipt, bytes) or not SIG < len(receipt) <= MAX_RECEIPT:
        raise InvalidSchema("a receipt is a Receipt envelope of at most 4096 bytes")
    try:
        _, message = decode_envelope(receipt, Limits())
    except ProtocolError as exc:
        raise InvalidSchema(f"not a receipt envelope ({exc})") from None
    if not isinstance(message, Receipt):
        raise InvalidSchema("not a Receipt envelope")
