"""Receipts: the executor's signed statement of work, and the requester's countersignature.

The executor signs a :class:`Receipt` envelope and sends its bytes inside ``ResultEnd``.  The
requester checks it against the request it signed and the output it received
(:func:`verify_receipt`), then may countersign (:func:`countersign`); anyone holding the
three envelopes can check the pair (:func:`verify_countersign`).
"""

from __future__ import annotations

import hashlib

from .envelope import Limits, Verified, check_signature, decode_envelope, seal
from .errors import Misdirected
from .identity import NodeKey
from .messages import InferenceRequest, Message, Receipt, ReceiptCountersign

__all__ = [
    "digest",
    "OutputDigest",
    "verify_receipt",
    "countersign",
    "verify_countersign",
    "tokens_in_bound",
]


TEMPLATE_TOKENS = 512
"""Tokens a chat template may add around the messages (role markers, a default system
prompt: SmolLM2's is about 20), plus ``TURN_TOKENS`` a message."""
TURN_TOKENS = 16


def tokens_in_bound(request: InferenceRequest) -> int:
    """The most prompt tokens ``request`` can be: byte-level tokenizers make at most one
    token a UTF-8 byte, plus the template's.  A receipt claiming more is not believed: the
    requester charges this bound (and counts the claim against the peer)."""
    texts = [t.content for t in request.messages or ()]
    texts += [request.prompt or ""] + list(request.inputs or ())
    return (sum(len(t.encode()) for t in texts) + TURN_TOKENS * len(request.messages or ())
            + TEMPLATE_TOKENS)


def digest(data: bytes) -> bytes:
    """sha256, the protocol's one hash."""
    return hashlib.sha256(data).digest()


class OutputDigest:
    """Running sha256 over a result's chunks (text as UTF-8, then data), in order."""

    def __init__(self) -> None:
        self._h = hashlib.sha256()

    def update(self, text: str = "", data: bytes | None = None) -> None:
        self._h.update(text.encode("utf-8"))
        if data:
            self._h.update(data)

    def digest(self) -> bytes:
        return self._h.digest()


def _open_signed(raw: bytes, limits: Limits, cls: type[Message]) -> Verified[Message]:
    env, message = decode_envelope(raw, limits)
    if not isinstance(message, cls):
        raise Misdirected(f"expected a {cls.__name__}")
    check_signature(env)
    return Verified(env, message)


def verify_receipt(
    receipt_raw: bytes,
    *,
    request_raw: bytes,
    executor: bytes,
    output_digest: bytes | None = None,
    tokens_out: int | None = None,
    limits: Limits | None = None,
) -> Receipt:
    """Check a receipt against the signed request it answers.

    The receipt must be signed by ``executor``, name the (validly signed) request's id,
    digest, model (and pinned model digest) and its signer as requester, and (when given)
    match the output digest and token count the requester observed.  Freshness is not checked: receipts are kept as records.
    Raises a :class:`ProtocolError` subclass; :class:`Misdirected` for any mismatch.
    """
    limits = limits or Limits()
    req = _open_signed(request_raw, limits, InferenceRequest)
    req_env, request = req.envelope, req.message
    rec = _open_signed(receipt_raw, limits, Receipt)
    receipt = rec.message
    assert isinstance(receipt, Receipt) and isinstance(request, InferenceRequest)
    problems = [
        (rec.sender != executor, "receipt not signed by the executor"),
        (receipt.request_id != request.request_id, "receipt for another request"),
        (receipt.request_digest != digest(request_raw), "request digest differs"),
        (receipt.requester != req_env.sender, "receipt names another requester"),
        (receipt.model != request.model, "receipt for another model"),
        (request.model_digest is not None and receipt.model_digest != request.model_digest,
         "receipt for another model digest than the request pinned"),
        (output_digest is not None and receipt.output_digest != output_digest,
         "output digest differs from what was received"),
        (tokens_out is not None and receipt.tokens_out != tokens_out,
         "token count differs from what was received"),
    ]
    for bad, what in problems:
        if bad:
            raise Misdirected(what)
    return receipt


def countersign(key: NodeKey, receipt_raw: bytes, receipt: Receipt, *, now_ms: int,
                accepted: bool = True) -> bytes:
    """The requester's countersignature envelope for a verified receipt."""
    message = ReceiptCountersign(
        request_id=receipt.request_id, receipt_digest=digest(receipt_raw), accepted=accepted
    )
    return seal(key, message, now_ms=now_ms, ttl_ms=0)


def verify_countersign(
    countersign_raw: bytes, receipt_raw: bytes, *, limits: Limits | None = None
) -> ReceiptCountersign:
    """Check that ``countersign_raw`` acknowledges exactly ``receipt_raw``, signed by the
    requester the receipt names.  Raises a :class:`ProtocolError` subclass."""
    limits = limits or Limits()
    rec = _open_signed(receipt_raw, limits, Receipt)
    ack = _open_signed(countersign_raw, limits, ReceiptCountersign)
    receipt, message = rec.message, ack.message
    assert isinstance(receipt, Receipt) and isinstance(message, ReceiptCountersign)
    if ack.sender != receipt.requester:
        raise Misdirected("countersigned by someone other than the requester")
    if message.receipt_digest != digest(receipt_raw) or message.request_id != receipt.request_id:
        raise Misdirected("countersignature for another receipt")
    return message
