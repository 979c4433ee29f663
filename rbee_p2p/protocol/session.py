"""The inference session state machine (one request, as both ends see it).

Transitions are data (``TRANSITIONS``); :meth:`InferenceSession.observe` applies one message
sent or received in the session and raises :class:`IllegalTransition` for a move the table
does not allow, or :class:`Misdirected` for a message of another session or signer.  The
requester may cancel at any time before the end; the executor then still ends the session
with ``ResultEnd`` (finish_reason "cancelled") or an ``ErrorMessage``.
"""

from __future__ import annotations

from enum import Enum
from typing import Mapping

from .errors import IllegalTransition, Misdirected
from .messages import Cancel, ErrorMessage, InferenceRequest, Message, ResultChunk, ResultEnd

__all__ = ["SessionState", "TRANSITIONS", "InferenceSession"]


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
            self.next_seq += 1
            self.tokens_out += message.tokens
        self.state = new
        return new
