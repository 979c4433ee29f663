"""Envelope frames over a libp2p stream (or anything with the same four methods)."""

from __future__ import annotations

from collections import deque
from typing import Awaitable, Callable, Protocol

import trio

from ..protocol.framing import FrameDecoder, encode_frame

__all__ = ["ByteStream", "FrameStream", "StreamGone", "end_quietly"]


class ByteStream(Protocol):
    """The part of a libp2p ``INetStream`` we use."""

    async def read(self, n: int | None = None) -> bytes: ...

    async def write(self, data: bytes) -> None: ...

    async def close(self) -> None: ...

    async def reset(self) -> None: ...


class StreamGone(Exception):
    """The stream ended (EOF, reset, connection lost) before the protocol said it would."""


class FrameStream:
    """Sends and receives whole frames.  One reader task and any number of writers (writes
    are serialised, so frames never interleave)."""

    def __init__(self, stream: ByteStream, max_frame: int) -> None:
        self.stream = stream
        self._decoder = FrameDecoder(max_frame)
        self._frames: deque[bytes] = deque()
        self._write_lock = trio.Lock()

    async def send(self, envelope: bytes) -> None:
        """Raises :class:`StreamGone`."""
        async with self._write_lock:
            try:
                await self.stream.write(encode_frame(envelope))
            except Exception as exc:  # libp2p raises a zoo of stream/connection errors
                raise StreamGone(f"write failed: {type(exc).__name__}: {exc}") from None

    async def receive(self) -> bytes:
        """The next frame.  Raises :class:`StreamGone`, or :class:`ProtocolError` for a
        malformed or oversized frame.  Cancel-safe between frames."""
        while not self._frames:
            try:
                data = await self.stream.read(65536)
            except trio.Cancelled:
                raise
            except Exception as exc:
                raise StreamGone(f"read failed: {type(exc).__name__}: {exc}") from None
            if not data:
                raise StreamGone("end of stream")
            self._frames.extend(self._decoder.feed(data))
        return self._frames.popleft()

    async def close(self) -> None:
        await end_quietly(self.stream.close)

    async def reset(self) -> None:
        await end_quietly(self.stream.reset)


async def end_quietly(end: Callable[[], Awaitable[None]]) -> None:
    """Close or reset a stream, even from a cancelled task, within 2 s, ignoring errors
    (the stream may already be gone)."""
    with trio.CancelScope(shield=True), trio.move_on_after(2):
        try:
            await end()
        except Exception:
            pass
