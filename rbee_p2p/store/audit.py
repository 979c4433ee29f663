"""The audit log file: an append-only, fsynced file of hash-chained, signed records.

Format: repeated ``[4-byte big-endian length][record envelope bytes]``.  An append is one
``write`` followed by ``fsync``, so a crash (kill -9, power loss) can only leave the last
record torn.  On open the whole chain is verified; a torn final record is cut off (and
logged), any other damage raises :class:`StorageError` — nothing is silently dropped.
One process at a time: the file is locked while open.
"""

from __future__ import annotations

import fcntl
import io
import logging
import os
import struct
from pathlib import Path
from typing import Any, Iterator

import cbor2

from ..errors import StorageError
from ..protocol.audit import ChainHead, append_record, verify_chain
from ..protocol.errors import ChainBroken
from ..protocol.identity import NodeKey

__all__ = ["AuditLog", "read_frames"]

log = logging.getLogger(__name__)
_HEADER = struct.Struct(">I")
MAX_RECORD = 64 * 1024


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


class AuditLog:
    """An open audit log owned by ``key``'s node.  Not thread-safe; one owner at a time."""

    def __init__(self, path: Path, key: NodeKey) -> None:
        self.path = path
        self.key = key
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._fd)
            raise StorageError(f"{path} is in use by another process") from None
        try:
            self.head = self._recover()
        except BaseException:
            os.close(self._fd)
            raise

    def _torn_tail(self, data: bytes, offset: int) -> bool:
        """Whether the bytes from ``offset`` (past the last complete frame) can be what a
        crash during one append leaves: a prefix of one frame, or a zero-filled tail."""
        tail = data[offset:]
        if not tail.strip(b"\0") or len(tail) < _HEADER.size:
            return True
        (length,) = _HEADER.unpack_from(tail)
        if not 0 < length <= MAX_RECORD:
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

    def _recover(self) -> ChainHead:
        data = self.path.read_bytes()
        frames, complete = read_frames(data)
        cut: int | None = None
        if complete < len(data):
            if not self._torn_tail(data, complete):
                raise StorageError(f"{self.path}: damaged record header at byte {complete} "
                                   f"(after record {len(frames) - 1}); refusing to drop the rest")
            cut = complete
        try:
            head, _ = verify_chain((raw for _, raw in frames), signer=self.key.peer_id)
        except ChainBroken as exc:
            offset = frames[exc.index][0]
            # A crash tears at most the final append: an unreadable last frame, or a
            # zero-filled tail.  Anything else is damage we must not hide.
            torn = exc.cause == "unreadable" and (
                (exc.index == len(frames) - 1 and cut is None) or not data[offset:].strip(b"\0")
            )
            if not torn:
                raise StorageError(f"{self.path}: {exc} (at byte {offset})") from None
            cut = offset
            head, _ = verify_chain((raw for _, raw in frames[: exc.index]), signer=self.key.peer_id)
        if cut is not None:
            log.warning("%s: cut a torn final record (%d bytes) left by a crash",
                        self.path, len(data) - cut)
            os.ftruncate(self._fd, cut)
            os.fsync(self._fd)
        return head

    def append(self, *, now_ms: int, kind: str, outcome: str, sync: bool = True,
               **fields: Any) -> bytes:
        """Append one record (and fsync unless ``sync`` is false: then call :meth:`sync`
        before acknowledging it); returns its bytes.  Raises :class:`InvalidSchema` for a
        bad field (nothing is written then)."""
        raw, head = append_record(self.key, self.head, now_ms=now_ms, kind=kind,
                                  outcome=outcome, **fields)
        os.write(self._fd, _HEADER.pack(len(raw)) + raw)
        if sync:
            os.fsync(self._fd)
        self.head = head
        return raw

    def sync(self) -> None:
        os.fsync(self._fd)

    def records(self) -> Iterator[bytes]:
        """The records' bytes, oldest first (read from disk)."""
        frames, _ = read_frames(self.path.read_bytes())
        return (raw for _, raw in frames)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
