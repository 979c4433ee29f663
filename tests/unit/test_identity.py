import pytest
from libp2p.crypto.ed25519 import Ed25519PrivateKey as Libp2pEd25519PrivateKey
from libp2p.peer.id import ID

from rbee_p2p.protocol import identity
from rbee_p2p.protocol.errors import BadSignature, InvalidSchema
from rbee_p2p.protocol.identity import NodeKey


@pytest.mark.parametrize("seed", [bytes(32), bytes(range(32)), b"\xff" * 32])
def test_peer_id_equals_libp2p_for_the_same_key(seed):
    ours = NodeKey.from_seed(seed)
    theirs = Libp2pEd25519PrivateKey.from_bytes(seed).get_public_key()
    pid = ID.from_pubkey(theirs)
    assert ours.peer_id == pid.to_bytes()
    assert ours.peer_id_str == pid.to_base58()
    assert ours.peer_id_str.startswith("12D3KooW")


def test_text_round_trip_and_key_extraction():
    key = NodeKey.generate()
    assert identity.peer_id_from_str(key.peer_id_str) == key.peer_id
    assert identity.public_key_from_peer_id(key.peer_id) == key.public_key


@pytest.mark.parametrize(
    "text",
    ["", "0OIl", "QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N", "12D3KooW" + "1" * 44],
)
def test_bad_peer_id_text_is_rejected(text):
    with pytest.raises(InvalidSchema):
        identity.peer_id_from_str(text)


def test_signatures_verify_only_for_the_signer_and_data():
    a, b = NodeKey.generate(), NodeKey.generate()
    sig = a.sign(b"data")
    identity.verify_signature(a.peer_id, sig, b"data")
    with pytest.raises(BadSignature):
        identity.verify_signature(b.peer_id, sig, b"data")
    with pytest.raises(BadSignature):
        identity.verify_signature(a.peer_id, sig, b"datA")


def test_seed_round_trip():
    key = NodeKey.generate()
    assert NodeKey.from_seed(key.seed).peer_id == key.peer_id


@pytest.mark.parametrize("key_hex", [
    "00" * 32,
    "01" + "00" * 31,
    "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
    "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac03fa",  # sign bit set
])
def test_small_order_keys_are_refused(key_hex):
    key = bytes.fromhex(key_hex)
    with pytest.raises(InvalidSchema, match="small-order"):
        identity.peer_id_from_public_key(key)
    forged_id = b"\x00\x24\x08\x01\x12\x20" + key
    with pytest.raises(InvalidSchema):
        identity.verify_signature(forged_id, bytes(64), b"anything")
