"""The inference session state machine (one request, as both ends see it).

Transitions are data (``TRANSITIONS``); :meth:`InferenceSession.observe` applies one message
sent or received in the session and raises :class:`IllegalTransition` for a move the table
does not allow, or :class:`Misdirected` for a message of another session or signer.  The
requester may cancel at any time before the end; the executor then still ends the session
with ``ResultEnd`` (finish_reason "cancelled") or an ``ErrorMessage``.

The output is bounded by the request: text by its ``max_tokens`` (the executor's own token
counts) and by ``MAX_TOKEN_BYTES`` a token (the text itself, whatever the counts say), data
by ``MAX_ITEM_BYTES`` per item asked for.  A chunk past a bound raises :class:`Overrun`: the
requester cuts the stream (a peer ignoring ``max_tokens`` cannot flood it).
"""

from __future__ import annotations

from enum import Enum
from typing import Mapping

from .errors import IllegalTransition, Misdirected, Overrun
from .messages import Cancel, ErrorMessage, InferenceRequest, Message, ResultChunk, ResultEnd

__all__ = ["SessionState", "TRANSITIONS", "InferenceSession", "MAX_TOKEN_BYTES",
           "MAX_ITEM_BYTES"]

MAX_TOKEN_BYTES = 128
"""The most text one generated token may carry (the longest tokens of common vocabularies
are well under 64 bytes), plus ``MAX_TOKEN_BYTES`` once for a final flush."""
MAX_ITEM_BYTES = {"embedding": 1 << 20, "image": 32 << 20}
"""The most data one embedding vector or one image may take (a 16k-dim float32 vector is
64 KiB; a 2048x2048 PNG rarely over 12 MiB)."""


class SessionState(Enum):
    IDLE = "idle"
    OPEN = "open"  # request sent/received, no output yet
    STREAMING = "streaming"
    CANCELLING = "cancelling"  # cancel sent; waiting for the executor's end or error
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


S = SessionState
TRANSITIONS: Mapping[tuple[SessionState, type[Message]], SessionState] = {
    (S.IDLE, InferenceRequest): S.OPEN,
    (S.OPEN, ResultChunk): S.STREAMING,
    (S.STREAMING, ResultChunk): S.STREAMING,
    (S.OPEN, ResultEnd): S.DONE,
    (S.STREAMING, ResultEnd): S.DONE,
    (S.OPEN, ErrorMessage): S.FAILED,
    (S.STREAMING, ErrorMessage): S.FAILED,
    (S.OPEN, Cancel): S.CANCELLING,
    (S.STREAMING, Cancel): S.CANCELLING,
    (S.CANCELLING, ResultChunk): S.CANCELLING,  # frames already in flight
    (S.CANCELLING, ResultEnd): S.CANCELLED,
    (S.CANCELLING, ErrorMessage): S.CANCELLED,
    (S.CANCELLING, Cancel): S.CANCELLING,
    # a cancel may cross the executor's last frame on the wire: harmless, ignored
    (S.DONE, Cancel): S.DONE,
    (S.FAILED, Cancel): S.FAILED,
    (S.CANCELLED, Cancel): S.CANCELLED,
}
TERMINAL = frozenset({S.DONE, S.FAILED, S.CANCELLED})

# Who may send what: the requester opens and cancels, the executor answers.
_FROM_REQUESTER = (InferenceRequest, Cancel)


class InferenceSession:
    """Tracks one request between ``requester`` and ``executor`` (binary peer IDs)."""

    def __init__(self, request_id: bytes, requester: bytes, executor: bytes) -> None:
        self.request_id = request_id
        self.requester = requester
        self.executor = executor
        self.state = SessionState.IDLE
        self.next_seq = 0
        self.tokens_out = 0
        self.text_bytes = 0
        self.data_bytes = 0
        self.kind = ""
        self.max_units = 0  # tokens to generate, images or inputs: as the request asked

    @property
    def finished(self) -> bool:
        return self.state in TERMINAL

    def observe(self, sender: bytes, message: Message) -> SessionState:
        """Apply ``message`` signed by ``sender``; return the new state.

        Raises :class:`Misdirected` (wrong session, target or signer) or
        :class:`IllegalTransition` (not allowed now, or a sequence gap).  On error the
        session is unchanged.
        """
        expected = self.requester if isinstance(message, _FROM_REQUESTER) else self.executor
        if sender != expected:
            raise Misdirected(f"{type(message).__name__} from the wrong peer")
        if getattr(message, "request_id", self.request_id) not in (self.request_id, None):
            raise Misdirected("message of another request")
        if isinstance(message, InferenceRequest) and message.target != self.executor:
            raise Misdirected("request addressed to another peer")
        new = TRANSITIONS.get((self.state, type(message)))
        if new is None:
            raise IllegalTransition(f"{type(message).__name__} not allowed in state {self.state.value}")
        seq = getattr(message, "seq", None)
        must_match = isinstance(message, (ResultChunk, ResultEnd)) or (
            isinstance(message, ErrorMessage) and seq is not None)
        if must_match and seq != self.next_seq:
            raise IllegalTransition(f"expected seq {self.next_seq}, got {seq}")
        if isinstance(message, ResultChunk):
            tokens = self.tokens_out + message.tokens
            text = self.text_bytes + len(message.text.encode())
            data = self.data_bytes + len(message.data or b"")
            self._check_output(tokens, text, data)
            self.next_seq += 1
            self.tokens_out, self.text_bytes, self.data_bytes = tokens, text, data
        if isinstance(message, InferenceRequest):
            self.kind, self.max_units = message.kind, message.max_tokens
        self.state = new
        return new

    def _check_output(self, tokens: int, text: int, data: int) -> None:
        if not self.kind:
            return  # the request was not observed (tests of the bare state machine)
        if self.kind in ("chat", "completion"):
            if tokens > self.max_units:
                raise Overrun(f"{tokens} tokens for a request of max_tokens {self.max_units}")
            if text > (self.max_units + 1) * MAX_TOKEN_BYTES:
                raise Overrun(f"{text} bytes of text for max_tokens {self.max_units}")
        elif data > self.max_units * MAX_ITEM_BYTES.get(self.kind, 0):
            raise Overrun(f"{data} bytes of data for {self.max_units} {self.kind} items")
