"""A node's mesh state stays bounded while 100,000 distinct peers come and go: the peer
table is capped and everything kept per peer leaves with the peer.

Signatures are irrelevant to what is kept, so adverts go into the table as already
verified values from made-up peer IDs (no key generation); the host is a stand-in that
connects to nobody.  Time is passed in (``now``) and trio's clock jumps.
"""

import logging
from types import SimpleNamespace

import samples
import trio
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo

from rbee_p2p.engines.base import Completion
from rbee_p2p.mesh.client import MAX_WARM
from rbee_p2p.mesh.executor import PROTOCOL_ID
from rbee_p2p.mesh.service import Mesh, MeshConfig
from rbee_p2p.mesh.settings import MAX_MODELS
from rbee_p2p.protocol.envelope import Verifier
from rbee_p2p.protocol.errors import ProtocolError

CAP = 64
PEERS = int(__import__("os").environ.get("CHURN", 100_000))


def peer_id(n: int) -> bytes:
    """An Ed25519 peer ID (identity multihash of a protobuf public key) made from ``n``."""
    return bytes([0x00, 0x24, 0x08, 0x01, 0x12, 0x20]) + n.to_bytes(32, "big")


class NoHost:
    """Connected to nobody; every dial 'succeeds' at once, every stream fails."""

    def get_network(self):
        return SimpleNamespace(connections={}, unblock_peer=lambda pid: None)

    async def connect(self, info):
        pass

    async def new_stream(self, pid, protocols):
        if protocols == [PROTOCOL_ID]:
            return SimpleNamespace(reset=_noop)  # a warm stream, never used
        raise ConnectionRefusedError("no probes here")


ADVERT = samples.advert()  # every peer is new: the same advert (and seq) does for all


def verified(sender: bytes):
    return SimpleNamespace(sender=sender, message=ADVERT)


def job(where: bytes):
    return SimpleNamespace(where=where, completion=Completion(completion_tokens=64),
                           request=SimpleNamespace(model="smollm2", max_tokens=64),
                           started_at=0.0, first_at=0.05, ended_at=0.5)


def sizes(mesh: Mesh) -> dict[str, int]:
    view, client = mesh.view, mesh.client
    return {"table": len(mesh.table.peers), "standings": len(view.standings),
            "facts": len(view._facts), "ids": len(view._ids), "keys": len(view._keys),
            "dial_locks": len(client._dial_locks), "warm": len(client._warm),
            "stale": len(client._stale),
            "latency": len(mesh.latency.rtt)}


async def test_churning_100k_peers_keeps_every_per_peer_structure_bounded(autojump_clock,
                                                                          monkeypatch):
    monkeypatch.setattr(logging.getLogger("rbee_p2p.mesh"), "level", logging.ERROR)
    mesh = Mesh(MeshConfig(max_peers=CAP, probe_above=8), samples.key_a(), local=None,
                executor=None, verifier=Verifier())
    mesh.view.host = mesh.client.host = NoHost()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(mesh.client.keep_warm_streams)
        largest, refused = await churn(mesh)
        nursery.cancel_scope.cancel()
    assert largest["table"] == CAP and refused > 0  # it filled, and turned peers away
    assert mesh.table.counters["evicted"] > 0  # dead peers made room for new ones
    assert all(largest[name] <= CAP for name in
               ("standings", "facts", "ids", "keys", "dial_locks", "latency")), largest
    assert largest["warm"] <= MAX_WARM and largest["stale"] <= MAX_WARM, largest
    assert largest["models"] <= MAX_MODELS and len(mesh.table.counters) < 16, largest
    assert len(mesh.verifier.replay) <= mesh.verifier.replay.capacity


async def churn(mesh: Mesh) -> tuple[dict[str, int], int]:
    """Peers come, are learnt about, die and are forgotten; the largest size each
    structure reached, and how many adverts the full table refused."""
    now = 1_000_000
    refused = 0
    largest: dict[str, int] = {}

    def learn(n: int) -> None:
        """What the node's jobs teach it about peer ``n`` and about strangers."""
        peer = peer_id(n)
        mesh.view._suspect(peer)
        mesh.view._job_done(job(peer), mesh.view.claim(peer, "smollm2"))
        mesh.latency.record(peer, 12.5)  # as a ping would
        mesh.view._suspect(peer_id(PEERS + n))  # a peer that was never in the table
        mesh.view._refused(peer_id(2 * PEERS + n))

    for n in range(PEERS):
        peer = peer_id(n)
        # a new peer every 150 ms (each dead after 8 s, forgotten 60 s later), and now and
        # then a crowd arriving at once, more than the table holds
        now += 0 if n % 10_000 < 2 * CAP else 150
        try:
            mesh.membership.apply(verified(peer), now)
        except ProtocolError:
            refused += 1
        if n % 4 == 0:
            learn(n)
        if n % 20 == 0:
            await mesh.age(now)
        if n % 200 == 0:
            mesh.view.report_failure(ID(peer).to_base58())
            await mesh.client.dial(PeerInfo(ID(peer), []))
            mesh.client._refill_send.send_nowait(peer)  # as after a job started there
            await mesh.candidates("smollm2")  # a large swarm here: pools, keys, probes
            for k in range(3):
                await mesh.candidates(f"model-{n}-{k}")  # whatever names requests give
            mesh.view.peers()
            for name, size in sizes(mesh).items():
                largest[name] = max(largest.get(name, 0), size)
            largest["models"] = max(largest.get("models", 0), len(mesh.view._large),
                                    len(mesh.view._pools))
            await trio.sleep(0)  # warm streams opened
    return largest, refused


async def _noop():
    pass
