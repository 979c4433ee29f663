"""GossipSub's topic validator is the mesh's advert check: what fails is neither applied nor
relayed (no network: the validator is called as py-libp2p's Pubsub calls it)."""

import time
from types import SimpleNamespace

import samples

from rbee_p2p.mesh.service import Mesh, MeshConfig
from rbee_p2p.protocol.envelope import Verifier, seal

A, B = samples.key_a(), samples.key_b()


def gossip(sender, data):
    return SimpleNamespace(from_id=sender.peer_id, data=data)


def test_only_verified_new_adverts_are_passed_on():
    mesh = Mesh(MeshConfig(), A, local=None, executor=None, verifier=Verifier())
    validate = mesh.membership.validate
    raw = seal(B, samples.advert(), now_ms=int(time.time() * 1000))
    assert validate(None, gossip(B, raw)) is True and B.peer_id in mesh.table.peers
    assert validate(None, gossip(B, raw)) is False  # the same envelope again: a replay
    forged = raw[:-1] + bytes([raw[-1] ^ 1])
    assert validate(None, gossip(B, forged)) is False  # bad signature: dropped, not relayed
    assert validate(None, gossip(B, b"\xff" * 64)) is False  # garbage
    assert validate(None, SimpleNamespace(from_id=b"?", data=raw)) is False
    assert validate(None, gossip(A, b"ours")) is True  # our own adverts go out
