"""Length-prefixed frames on a byte stream (sans-I/O).

Each frame is an unsigned LEB128 varint length followed by that many bytes (one envelope).
:class:`FrameDecoder` is fed whatever bytes arrive and returns the complete frames; a frame
announced larger than ``max_frame`` raises :class:`Oversized` before its body is read, a
non-minimal or over-long varint raises :class:`Malformed`.
"""

from __future__ import annotations

from .errors import Malformed, Oversized

__all__ = ["encode_frame", "FrameDecoder", "MAX_VARINT_BYTES"]

MAX_VARINT_BYTES = 10


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def encode_frame(payload: bytes) -> bytes:
    return _varint(len(payload)) + payload


class FrameDecoder:
    """Incremental decoder.  Not thread-safe; one per stream."""

    def __init__(self, max_frame: int) -> None:
        self.max_frame = max_frame
        self._buf = bytearray()

    @property
    def pending(self) -> int:
        """Bytes received but not yet part of a complete frame."""
        return len(self._buf)

    def _header(self) -> tuple[int, int] | None:
        """(frame length, header size), or None if the varint is incomplete."""
        n = shift = 0
        for i, byte in enumerate(self._buf[:MAX_VARINT_BYTES]):
            n |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                if i and byte == 0:
                    raise Malformed("non-minimal frame length")
                return n, i + 1
        if len(self._buf) >= MAX_VARINT_BYTES:
            raise Malformed("frame length varint too long")
        return None

    def feed(self, data: bytes) -> list[bytes]:
        """Add received bytes; return the frames now complete (possibly none).

        Raises :class:`Oversized` or :class:`Malformed`; after that the stream is unusable.
        """
        self._buf += data
        frames = []
        while (header := self._header()) is not None:
            length, size = header
            if length > self.max_frame:
                raise Oversized(f"frame of {length} bytes exceeds the limit of {self.max_frame}")
            if len(self._buf) < size + length:
                break
            frames.append(bytes(self._buf[size : size + length]))
            del self._buf[: size + length]
        return frames
