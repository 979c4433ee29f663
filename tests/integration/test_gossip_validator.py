"""GossipSub's topic validator is the mesh's advert check: what fails is neither applied nor
relayed (no network: the validator is called as py-libp2p's Pubsub calls it, with the
forwarder's peer ID).  Sybil limits: new identities per forwarder, the swarm's size as
cadence sees it.  Virtual time."""

import time
from types import SimpleNamespace

import samples
import trio
from libp2p.peer.id import ID

from rbee_p2p.mesh.membership import NEW_BURST, NEW_PER_S
from rbee_p2p.mesh.service import Mesh, MeshConfig, liveness_s, reminder_interval_s
from rbee_p2p.protocol.envelope import Verifier, seal
from rbee_p2p.protocol.identity import NodeKey

A, B = samples.key_a(), samples.key_b()
VIA = ID(B.peer_id)  # the connection they arrive on


def gossip(sender, data):
    return SimpleNamespace(from_id=sender.peer_id, data=data)


async def test_only_verified_new_adverts_are_passed_on():
    mesh = Mesh(MeshConfig(), A, local=None, executor=None, verifier=Verifier())
    validate = mesh.membership.validate
    raw = seal(B, samples.advert(), now_ms=int(time.time() * 1000))
    assert validate(VIA, gossip(B, raw)) is True and B.peer_id in mesh.table.peers
    assert validate(VIA, gossip(B, raw)) is False  # the same envelope again: a replay
    forged = raw[:-1] + bytes([raw[-1] ^ 1])
    assert validate(VIA, gossip(B, forged)) is False  # bad signature: dropped, not relayed
    assert validate(VIA, gossip(B, b"\xff" * 64)) is False  # garbage
    assert validate(VIA, SimpleNamespace(from_id=b"?", data=raw)) is False
    assert validate(VIA, gossip(A, b"ours")) is True  # our own adverts go out


def fakes(n):
    """``n`` identities, each with a valid signed advert."""
    now = int(time.time() * 1000)
    keys = [NodeKey.from_seed(i.to_bytes(32, "big")) for i in range(1, n + 1)]
    return [(k, seal(k, samples.advert(), now_ms=now)) for k in keys]


async def test_one_connection_brings_new_identities_only_at_a_bounded_rate(autojump_clock):
    """A Sybil pushing 200 identities through one connection gets NEW_BURST of them in, then
    NEW_PER_S a second, refused before the advert is verified; identities already known keep
    updating, and another connection still brings an honest newcomer at once."""
    mesh = Mesh(MeshConfig(), A, local=None, executor=None, verifier=Verifier())
    sybil = ID(fakes(1)[0][0].peer_id)
    flood = fakes(200)
    passed = [mesh.membership.validate(sybil, gossip(k, raw)) for k, raw in flood]
    assert sum(passed) == NEW_BURST == len(mesh.table.peers)
    assert mesh.table.counters["rejected_new_identities"] == 200 - NEW_BURST
    await trio.sleep(10)
    later = [mesh.membership.validate(sybil, gossip(k, raw)) for k, raw in flood[NEW_BURST:]]
    assert sum(later) == int(10 * NEW_PER_S)
    known, _ = flood[0]
    again = seal(known, samples.advert(seq=8), now_ms=int(time.time() * 1000))
    assert mesh.membership.validate(sybil, gossip(known, again))  # not new: no allowance
    honest = seal(B, samples.advert(), now_ms=int(time.time() * 1000))
    assert mesh.membership.validate(ID(B.peer_id), gossip(B, honest))


async def test_identities_that_only_advertise_never_slow_our_adverts(autojump_clock):
    """Cadence and liveness follow the peers that proved themselves: 150 advertising
    identities leave a node at the small swarm's pace (today 1 s reminders, dead after a few
    s); proven peers beyond ``probe_above`` do move it to the large swarm's."""
    config = MeshConfig(probe_above=32)
    mesh = Mesh(config, A, local=None, executor=None, verifier=Verifier())
    now = int(time.time() * 1000)
    for key, raw in fakes(150):
        mesh.membership.apply(mesh.verifier.verify(raw, now), now)
    assert len(mesh.table.peers) == 150 and mesh.membership.swarm_size() == 32
    small = reminder_interval_s(config, 32)
    assert reminder_interval_s(config, mesh.membership.swarm_size()) == small
    assert liveness_s(config, small)[1] < 10
    for peer in list(mesh.table.peers)[:100]:
        mesh.membership.prove(peer)  # e.g. answered a ping
    assert mesh.membership.swarm_size() == 100
    assert reminder_interval_s(config, mesh.membership.swarm_size()) > small
    mesh.membership.prove(b"\x00" * 38)  # not in the table: nothing kept
    assert len(mesh.membership.proven) == 100
    forgotten = next(iter(mesh.membership.proven))
    mesh.table._forget(forgotten)
    assert forgotten not in mesh.membership.proven


class Pipe:
    """One direction of bytes, enough of a libp2p stream for a probe and its answer."""

    def __init__(self):
        self.send, self.recv = trio.open_memory_channel(16)

    async def write(self, data):
        await self.send.send(data)

    async def read(self, n=None):
        try:
            return await self.recv.receive()
        except trio.EndOfChannel:
            return b""

    async def close(self):
        await self.send.aclose()

    async def reset(self):
        await self.send.aclose()


class ProbedHost:
    """A's host, whose probe streams reach B's answering side."""

    def __init__(self, answerer, nursery):
        self.answerer, self.nursery = answerer, nursery

    async def new_stream(self, pid, protocols):
        pipe = Pipe()
        self.nursery.start_soon(self.answerer.on_probe, pipe)
        return pipe


async def test_probes_are_answered_from_a_cached_advert_and_still_count(autojump_clock):
    """A probe flood costs a frame per probe, not a signature: B answers with the advert it
    sealed for the last probe while it is under a second old and nothing changed; A takes a
    repeat of the advert it holds as an answer (the peer is there), not a failure."""
    a = Mesh(MeshConfig(), A, local=None, executor=None, verifier=Verifier())
    b = Mesh(MeshConfig(), B, local=lambda: SimpleNamespace(
        models=(), devices=(), queue_depth=0, active_jobs=0, max_queue=8),
        executor=None, verifier=Verifier())
    now = int(time.time() * 1000)
    a.membership.apply(a.verifier.verify(seal(B, samples.advert(seq=1), now_ms=now), now), now)
    signed = []
    sealed = b.membership.sealed_advert
    b.membership.sealed_advert = lambda: signed.append(1) or sealed()
    async with trio.open_nursery() as nursery:
        a.view.host = ProbedHost(b.view, nursery)
        assert await a.view._probe(B.peer_id) and await a.view._probe(B.peer_id)
        assert len(signed) == 1 and a.view.probes["answered"] == 2
        assert B.peer_id in a.membership.proven  # it answered: proven
        await trio.sleep(1.0)
        assert await a.view._probe(B.peer_id) and len(signed) == 2  # a second on: fresh
        b.membership.poke()  # what B offers changed: the next answer says so
        assert await a.view._probe(B.peer_id) and len(signed) == 3
    assert a.view.probes == {"sent": 4, "answered": 4, "failed": 0}
