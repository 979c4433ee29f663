"""Node identity: Ed25519 keys and libp2p-compatible peer IDs (pure; no file I/O).

A peer ID is the libp2p identity multihash of the protobuf-encoded public key, exactly as
py-libp2p's ``ID.from_pubkey`` computes it for Ed25519 keys (the key is small enough to be
inlined).  Because the key is inlined, a peer ID is enough to verify that peer's signatures.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import base58
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from .errors import BadSignature, InvalidSchema

__all__ = [
    "NodeKey",
    "PEER_ID_LENGTH",
    "peer_id_from_public_key",
    "public_key_from_peer_id",
    "peer_id_to_str",
    "peer_id_from_str",
    "verify_signature",
]

# protobuf PublicKey { KeyType Type = 1 (Ed25519 = 1); bytes Data = 2 (32 bytes) }
_PB_PREFIX = b"\x08\x01\x12\x20"
# identity multihash: code 0x00, then the length of the inlined data (36)
_MH_PREFIX = b"\x00\x24"
PEER_ID_LENGTH = len(_MH_PREFIX) + len(_PB_PREFIX) + 32

# Encodings of the small-order points (and their non-canonical twins), compared with the
# sign bit cleared, as libsodium does: signatures "by" such keys can be forged by anyone.
_SMALL_ORDER = frozenset(bytes.fromhex(h) for h in (
    "0000000000000000000000000000000000000000000000000000000000000000",
    "0100000000000000000000000000000000000000000000000000000000000000",
    "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05",
    "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a",
    "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
    "edffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
    "eeffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
))


def _check_key(public_key: bytes) -> None:
    if len(public_key) != 32:
        raise InvalidSchema("an Ed25519 public key has 32 bytes")
    if public_key[:31] + bytes([public_key[31] & 0x7F]) in _SMALL_ORDER:
        raise InvalidSchema("weak (small-order) Ed25519 public key")


def peer_id_from_public_key(public_key: bytes) -> bytes:
    """The binary peer ID (38 bytes) for a raw 32-byte Ed25519 public key."""
    _check_key(public_key)
    return _MH_PREFIX + _PB_PREFIX + public_key


def public_key_from_peer_id(peer_id: bytes) -> bytes:
    """The raw Ed25519 public key inlined in ``peer_id``; :class:`InvalidSchema` if none is."""
    if len(peer_id) != PEER_ID_LENGTH or not peer_id.startswith(_MH_PREFIX + _PB_PREFIX):
        raise InvalidSchema("not an Ed25519 peer ID with an inlined key")
    key = peer_id[len(_MH_PREFIX) + len(_PB_PREFIX) :]
    _check_key(key)
    return key


def peer_id_to_str(peer_id: bytes) -> str:
    """The usual text form (base58btc, ``12D3KooW…``)."""
    return base58.b58encode(peer_id).decode("ascii")


def peer_id_from_str(text: str) -> bytes:
    """Parse the text form; :class:`InvalidSchema` if it is not an Ed25519 peer ID."""
    try:
        raw = base58.b58decode(text.encode("ascii"))
    except ValueError as exc:
        raise InvalidSchema(f"not a base58 peer ID: {exc}") from None
    public_key_from_peer_id(raw)
    return raw


def verify_signature(peer_id: bytes, signature: bytes, data: bytes) -> None:
    """Check ``signature`` over ``data`` by the key inlined in ``peer_id``.

    Raises :class:`BadSignature` if it does not verify, :class:`InvalidSchema` if the peer ID
    carries no Ed25519 key.
    """
    public = Ed25519PublicKey.from_public_bytes(public_key_from_peer_id(peer_id))
    try:
        public.verify(signature, data)
    except InvalidSignature:
        raise BadSignature("signature does not verify") from None


@dataclass(frozen=True, eq=False)
class NodeKey:
    """A node's Ed25519 private key with its derived peer ID."""

    private: Ed25519PrivateKey

    @classmethod
    def generate(cls) -> NodeKey:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_seed(cls, seed: bytes) -> NodeKey:
        """From the 32-byte private seed (RFC 8032); :class:`ValueError` if malformed."""
        return cls(Ed25519PrivateKey.from_private_bytes(seed))

    @property
    def seed(self) -> bytes:
        return self.private.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )

    @cached_property
    def public_key(self) -> bytes:
        return self.private.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )

    @cached_property
    def peer_id(self) -> bytes:
        return peer_id_from_public_key(self.public_key)

    @property
    def peer_id_str(self) -> str:
        return peer_id_to_str(self.peer_id)

    def sign(self, data: bytes) -> bytes:
        return self.private.sign(data)
