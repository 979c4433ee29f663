"""Signed envelopes and the verification pipeline.

Wire form (deterministic CBOR array)::

    [version, type, sender, issued_at, expires_at, nonce, payload, signature]

The signature is Ed25519 by ``sender`` over ``DOMAIN || encode([version, type, sender,
issued_at, expires_at, nonce, payload])``.  Times are integer milliseconds since the Unix
epoch; every function that needs the time takes ``now_ms``.

Received bytes pass the checks in this order, each raising its own error:
size (:class:`Oversized`) → decode (:class:`Malformed`) → schema (:class:`InvalidSchema`)
→ signature (:class:`BadSignature`) → time window (:class:`Expired`, :class:`NotYetValid`)
→ replay cache (:class:`Replayed`).  Nothing is recorded unless every check passed.
"""

from __future__ import annotations

import heapq
import os
from dataclasses import dataclass, field
from typing import Any, Generic, Mapping, TypeVar

from . import cbor
from .errors import (Expired, InvalidSchema, Malformed, Misdirected, NotYetValid, Oversized,
                     Replayed)
from .identity import PEER_ID_LENGTH, NodeKey, verify_signature
from .messages import Message, class_for_type
from .schema import from_wire, to_wire

__all__ = [
    "VERSION",
    "DOMAIN",
    "NONCE_LENGTH",
    "Limits",
    "DEFAULT_LIMITS",
    "Envelope",
    "Verified",
    "seal",
    "decode_envelope",
    "signed_head",
    "signed_bytes",
    "check_signature",
    "check_time",
    "ReplayCache",
    "Verifier",
]

VERSION = 1
DOMAIN = b"rbee-p2p/envelope/v1\x00"
NONCE_LENGTH = 16
_SIGNATURE_LENGTH = 64


@dataclass(frozen=True)
class Limits:
    """Size and time limits applied to received envelopes."""

    max_bytes: int = 1024 * 1024
    """Largest envelope accepted at all."""
    max_bytes_by_type: Mapping[int, int] = field(
        default_factory=lambda: {1: 32 * 1024, 5: 4096, 6: 1024, 7: 64 * 1024, 8: 4096, 9: 1024}
    )
    """Tighter limits for small message types (advert, error, cancel, audit, receipts)."""
    max_skew_ms: int = 30_000
    """Tolerated clock difference between peers."""
    max_ttl_ms: int = 10 * 60_000
    """Longest validity (expires_at - issued_at) accepted; bounds the replay cache."""
    max_ttl_by_type: Mapping[int, int] = field(
        default_factory=lambda: {3: 90_000, 4: 90_000, 5: 90_000, 6: 90_000, 10: 90_000})
    """Shorter for a stream's frames (chunk, end, error, cancel, request): senders use 60 s."""


DEFAULT_LIMITS = Limits()
M = TypeVar("M", bound=Message)


@dataclass(frozen=True)
class Envelope:
    """A decoded, schema-checked envelope (its signature is checked separately)."""

    version: int
    type: int
    sender: bytes
    issued_at: int
    expires_at: int
    nonce: bytes
    payload: Mapping[str, Any]
    signature: bytes
    raw: bytes

    def signed_bytes(self) -> bytes:
        return signed_bytes(self.raw)


@dataclass(frozen=True)
class Verified(Generic[M]):
    """An envelope that passed every check, with its payload as a message value."""

    envelope: Envelope
    message: M

    @property
    def sender(self) -> bytes:
        return self.envelope.sender


def _signed_bytes(head: list[Any]) -> bytes:
    return DOMAIN + cbor.encode(head)


def seal(
    key: NodeKey,
    message: Message,
    *,
    now_ms: int,
    ttl_ms: int = 60_000,
    nonce: bytes | None = None,
    limits: Limits | None = None,
) -> bytes:
    """Sign ``message`` as ``key`` and return the envelope bytes.

    ``nonce`` defaults to 16 random bytes; pass one only for reproducible test vectors.
    Raises :class:`InvalidSchema` if ``message`` is not valid and :class:`Oversized` if the
    envelope would exceed ``limits`` (default: the receivers' defaults), so nothing is
    signed that peers would refuse.
    """
    if nonce is None:
        nonce = os.urandom(NONCE_LENGTH)
    head = [VERSION, message.TYPE, key.peer_id, now_ms, now_ms + ttl_ms, nonce, to_wire(message)]
    signature = key.sign(_signed_bytes(head))
    data = cbor.encode([*head, signature])
    _check_size(data, message.TYPE, DEFAULT_LIMITS if limits is None else limits)
    return data


def _check_size(data: bytes, type_: int, limits: Limits) -> None:
    limit = min(limits.max_bytes, limits.max_bytes_by_type.get(type_, limits.max_bytes))
    if len(data) > limit:
        raise Oversized(f"type {type_}: {len(data)} bytes exceed the limit of {limit}")


def _int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**64:
        raise InvalidSchema(f"envelope {what}: expected an unsigned integer")
    return value


def _bytes(value: Any, what: str, length: int) -> bytes:
    if not isinstance(value, bytes) or len(value) != length:
        raise InvalidSchema(f"envelope {what}: expected {length} bytes")
    return value


def decode_envelope(data: bytes, limits: Limits) -> tuple[Envelope, Message]:
    """Size, decode and schema checks; the signature and time are NOT checked here.

    Raises :class:`Oversized`, :class:`Malformed`, :class:`InvalidSchema` or
    :class:`UnknownType`.  Pure and cheap to call on hostile input.
    """
    item = cbor.decode(data, max_size=limits.max_bytes)
    if not isinstance(item, list) or len(item) != 8:
        raise InvalidSchema("an envelope is an array of 8 items")
    version, type_, sender, iat, exp, nonce, payload, signature = item
    if _int(version, "version") != VERSION:
        raise InvalidSchema(f"unsupported envelope version {version}")
    cls = class_for_type(_int(type_, "type"))
    _check_size(data, type_, limits)
    if not isinstance(payload, dict):
        raise InvalidSchema("envelope payload: expected a map")
    env = Envelope(
        version=version,
        type=type_,
        sender=_bytes(sender, "sender", PEER_ID_LENGTH),
        issued_at=_int(iat, "issued_at"),
        expires_at=_int(exp, "expires_at"),
        nonce=_bytes(nonce, "nonce", NONCE_LENGTH),
        payload=payload,
        signature=_bytes(signature, "signature", _SIGNATURE_LENGTH),
        raw=data,
    )
    if env.expires_at < env.issued_at:
        raise InvalidSchema("envelope expires before it is issued")
    message: Message = from_wire(cls, payload)
    return env, message


def signed_bytes(raw: bytes) -> bytes:
    """What a canonical envelope's signature covers: ``raw`` is canonical, so the signed
    7-item array is raw's items minus the 66-byte signature (0x58 0x40 + 64 bytes) under a
    7-item array header (0x87), after the domain."""
    return DOMAIN + b"\x87" + raw[1:-(_SIGNATURE_LENGTH + 2)]


PRE_SIGNATURE_DECODE = 4096
"""Largest input decoded before its signature is checked: one without an envelope's fixed
head (a 1 MiB frame of small items would otherwise cost ~0.2 s of decoding first)."""


def signed_head(data: bytes) -> tuple[int, bytes, bytes] | None:
    """(type, sender, signature) read at their fixed places in a canonical envelope -- an
    8-item array whose version and type are small integers, whose sender is the third item
    and whose signature is the last (what :meth:`Envelope.signed_bytes` relies on) -- so
    the signature can be checked before anything is decoded; None if ``data`` is not laid
    out so.  Pure, O(1)."""
    if len(data) < 6 or data[0] != 0x88 or data[1] >= 24:
        return None
    if data[2] < 24:
        type_, at = data[2], 3
    elif data[2] == 0x18:
        type_, at = data[3], 4
    else:
        return None
    tail = len(data) - _SIGNATURE_LENGTH - 2
    if data[at:at + 2] != bytes([0x58, PEER_ID_LENGTH]) or tail < at + 2 + PEER_ID_LENGTH \
            or data[tail:tail + 2] != bytes([0x58, _SIGNATURE_LENGTH]):
        return None
    return type_, data[at + 2:at + 2 + PEER_ID_LENGTH], data[tail + 2:]


def check_signature(env: Envelope) -> None:
    """Raises :class:`BadSignature` (or :class:`InvalidSchema` for a non-Ed25519 sender)."""
    verify_signature(env.sender, env.signature, env.signed_bytes())


def check_time(env: Envelope, now_ms: int, limits: Limits) -> None:
    """Freshness: issued not too far in the future, not expired, validity not too long."""
    if env.issued_at > now_ms + limits.max_skew_ms:
        raise NotYetValid(f"issued {env.issued_at - now_ms} ms in the future")
    if env.expires_at + limits.max_skew_ms < now_ms:
        raise Expired(f"expired {now_ms - env.expires_at} ms ago")
    longest = limits.max_ttl_by_type.get(env.type, limits.max_ttl_ms)
    if env.expires_at - env.issued_at > longest:
        raise InvalidSchema(f"validity longer than {longest} ms")


class ReplayCache:
    """Remembers accepted (sender, nonce) pairs until they expire; bounded in size.

    When full, or when one sender holds ``per_sender`` entries, the entry that expires first
    (of all, or of that sender) is forgotten and its *sender's* mark is raised to its expiry:
    from then on anything of that sender expiring at or before its mark is refused as
    possibly replayed.  So a full cache fails closed for the senders it forgot, never open,
    and a flood of long-lived envelopes from many identities cannot make it refuse anyone
    else's fresh ones.  The marks are bounded too: dropped once expired, and past
    ``capacity`` of them the lowest are folded into one floor for every sender.
    """

    def __init__(self, capacity: int = 100_000, per_sender: int = 4096) -> None:
        if capacity <= 0 or per_sender <= 0:
            raise ValueError("capacity and per_sender must be positive")
        self.capacity = capacity
        self.per_sender = per_sender
        self.floor = -1
        self._marks: dict[bytes, int] = {}
        self._seen: dict[tuple[bytes, bytes], int] = {}
        self._by_expiry: list[tuple[int, bytes, bytes]] = []
        self._per_sender: dict[bytes, list[tuple[int, bytes]]] = {}  # heaps (expiry, nonce)

    def __len__(self) -> int:
        return len(self._seen)

    def mark(self, sender: bytes) -> int:
        """What of ``sender`` is refused: anything expiring at or before this."""
        return max(self.floor, self._marks.get(sender, -1))

    def _forget(self, expiry: int, sender: bytes, nonce: bytes, *, evicted: bool) -> None:
        if self._seen.pop((sender, nonce), None) is None:
            return  # already gone (the two heaps are pruned lazily)
        own = self._per_sender.get(sender)
        if own is not None:
            own.remove((expiry, nonce))
            heapq.heapify(own)
            if not own:
                del self._per_sender[sender]
        if evicted:
            self._marks[sender] = max(self._marks.get(sender, -1), expiry)

    def _prune(self, now_ms: int, skew_ms: int) -> None:
        # entries the time check would refuse anyway need not be remembered
        while self._by_expiry and self._by_expiry[0][0] + skew_ms < now_ms:
            expiry, sender, nonce = heapq.heappop(self._by_expiry)
            self._forget(expiry, sender, nonce, evicted=False)
        if len(self._marks) > self.capacity:
            self._marks = {s: m for s, m in self._marks.items() if m + skew_ms >= now_ms}
        if len(self._marks) > self.capacity:
            ordered = sorted(self._marks.items(), key=lambda item: item[1])
            cut = len(ordered) - self.capacity // 2
            self.floor = max(self.floor, ordered[cut - 1][1])
            self._marks = dict(ordered[cut:])

    def check_and_add(self, env: Envelope, now_ms: int, skew_ms: int) -> None:
        """Record ``env``'s nonce; :class:`Replayed` if seen before or at or below its
        sender's mark.  ``skew_ms`` must be the skew the time check uses.  Nothing changes
        on rejection."""
        self._prune(now_ms, skew_ms)
        key = (env.sender, env.nonce)
        if key in self._seen or env.expires_at <= self.mark(env.sender):
            raise Replayed("nonce already seen from this sender")
        own = self._per_sender.setdefault(env.sender, [])
        while len(own) >= self.per_sender:
            expiry, nonce = own[0]
            self._forget(expiry, env.sender, nonce, evicted=True)
            own = self._per_sender.setdefault(env.sender, [])
        while len(self._seen) >= self.capacity:
            expiry, sender, nonce = heapq.heappop(self._by_expiry)
            self._forget(expiry, sender, nonce, evicted=True)
        self._seen[key] = env.expires_at
        if len(self._by_expiry) >= 2 * self.capacity:  # drop what per-sender evictions left
            self._by_expiry = [(e, s, n) for (s, n), e in self._seen.items()]
            heapq.heapify(self._by_expiry)
        else:
            heapq.heappush(self._by_expiry, (env.expires_at, env.sender, env.nonce))
        heapq.heappush(self._per_sender.setdefault(env.sender, own), (env.expires_at, env.nonce))


class Verifier:
    """The full pipeline for one receiving node: limits + replay cache."""

    def __init__(self, limits: Limits | None = None, replay: ReplayCache | None = None) -> None:
        self.limits = Limits() if limits is None else limits
        self.replay = ReplayCache() if replay is None else replay

    def verify(
        self,
        data: bytes,
        now_ms: int,
        *,
        expect: type[M] | None = None,
        sender: bytes | None = None,
    ) -> Verified[Any]:
        """Run every check on ``data``; return the verified message.

        ``expect`` restricts the accepted message class and ``sender`` the signer
        (:class:`Misdirected` otherwise).  Raises a :class:`ProtocolError` subclass naming
        the first failed check; the replay cache is only updated when all checks pass.
        """
        if len(data) > self.limits.max_bytes:
            raise Oversized(f"{len(data)} bytes exceed the limit of {self.limits.max_bytes}")
        head = signed_head(data)
        if head is None:  # not an envelope's layout: the decoder says what is wrong
            if len(data) > PRE_SIGNATURE_DECODE:
                raise Malformed("not an envelope (its fixed head or signature is missing)")
            env, message = decode_envelope(data, self.limits)
            if expect is not None and not isinstance(message, expect):
                raise Misdirected(f"expected {expect.__name__}, got {type(message).__name__}")
            check_signature(env)
        else:  # the signature first: nothing unsigned is ever decoded
            type_, signer, signature = head
            cls = class_for_type(type_)
            _check_size(data, type_, self.limits)
            if expect is not None and not issubclass(cls, expect):
                raise Misdirected(f"expected {expect.__name__}, got {cls.__name__}")
            verify_signature(signer, signature, signed_bytes(data))
            env, message = decode_envelope(data, self.limits)
        if sender is not None and env.sender != sender:
            raise Misdirected("signed by an unexpected peer")
        check_time(env, now_ms, self.limits)
        self.replay.check_and_add(env, now_ms, self.limits.max_skew_ms)
        return Verified(env, message)
