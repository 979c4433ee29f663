"""The real protocol objects of every virtual node: keys, capability adverts, envelopes.

Each node has a real Ed25519 :class:`NodeKey` (from a seeded 32-byte seed) and advertises
real :class:`CapabilityAdvert` values: its model with the speed it claims, its device, its
queue.  Message sizes are exact: each node's advert is sealed once with the real code
(canonical CBOR, 64-byte signature) to measure it; every later advert of that node has the
same size (the fields that change keep their CBOR width).

Crypto modes:

* ``real``: every advert that crosses the simulated wire is sealed (signed) by its sender
  and run through a real :class:`Verifier` (size, decode, schema, signature, time, replay)
  wherever a real :class:`PeerTable` receives it;
* ``fast``: the same advert values and sizes, no signing or verifying: observers get a
  :class:`Verified` built directly.  Use for large runs (seal + verify cost ~0.35 ms).
"""

from __future__ import annotations

import hashlib

from rbee_p2p import __version__
from rbee_p2p.mesh.settings import MeshConfig, advert_ttl_ms
from rbee_p2p.protocol.envelope import NONCE_LENGTH, Envelope, Verified, Verifier, seal
from rbee_p2p.protocol.identity import NodeKey, peer_id_to_str
from rbee_p2p.protocol.messages import CapabilityAdvert, DeviceInfo, ModelInfo, Price

from .engine import EPOCH_MS
from .hardware import DEVICES, MODELS, Machine
from .network import REGIONS

__all__ = ["Wire", "SWARM", "ADVERT_TTL_MS"]

SWARM = "sim"
ADVERT_TTL_MS = advert_ttl_ms(MeshConfig().dead_after_s)
"""A small swarm's advert validity (``Membership.sealed_advert``); ``Wire.ttl_ms`` is the
one in use (the swarm sets it from its liveness limits, as the node does)."""
_DEVICE_ID = {"cuda": "cuda:0", "metal": "metal:0", "rocm": "rocm:0", "cpu": "cpu"}


class Wire:
    def __init__(self, machines: list[Machine], placement: dict[str, list], seed: int,
                 real_crypto: bool) -> None:
        self.machines = machines
        self.real = real_crypto
        self.keys = [NodeKey.from_seed(hashlib.sha256(f"{seed}/{i}".encode()).digest())
                     for i in range(len(machines))]
        self.peer_ids = [k.peer_id for k in self.keys]
        self.index = {pid: i for i, pid in enumerate(self.peer_ids)}
        self.jurisdiction = [REGIONS[r][3] for r in placement["region"]]
        self._static: list[tuple[tuple[str, ...], tuple[DeviceInfo, ...]] | None] = \
            [None] * len(machines)
        self._sizes: list[int] = [0] * len(machines)
        self._models: dict[tuple[int, float], tuple[ModelInfo, ...]] = {}
        self._nonce = 0
        self.sealed = 0
        self.verified_count = 0
        self.ttl_ms = ADVERT_TTL_MS

    def _parts(self, node: int) -> tuple[tuple[str, ...], tuple[DeviceInfo, ...]]:
        parts = self._static[node]
        if parts is None:
            device = DEVICES[self.machines[node].device]
            addr = (f"/ip4/10.{node >> 16 & 255}.{node >> 8 & 255}.{node & 255}/tcp/7834/p2p/"
                    f"{peer_id_to_str(self.peer_ids[node])}")
            mem = int(device.mem_gb * 2**30)
            parts = ((addr,), (DeviceInfo(id=_DEVICE_ID[device.backend], backend=device.backend,
                                          name=device.name, mem_total=mem,
                                          mem_free=mem // 2),))
            self._static[node] = parts
        return parts

    def advert(self, node: int, seq: int, *, tokens_per_s: float, queue_depth: int,
               active_jobs: int, max_queue: int, serving: bool = True) -> CapabilityAdvert:
        """The node's advert; ``serving=False`` is a goodbye (no models, no room)."""
        addrs, devices = self._parts(node)
        models: tuple[ModelInfo, ...] = ()
        if serving:
            models = self._models.get((node, tokens_per_s), ())
            if not models:
                spec = MODELS[self.machines[node].model]
                models = (ModelInfo(name=spec.name, digest=_digest(spec.name), modality="text",
                                    context=8192, tokens_per_s=round(tokens_per_s, 1),
                                    size_bytes=int(spec.size_gb * 1e9)),)
                self._models[(node, tokens_per_s)] = models
        return CapabilityAdvert(
            swarm=SWARM, seq=seq, version=__version__, addrs=addrs, models=models,
            devices=devices, queue_depth=queue_depth, active_jobs=active_jobs,
            max_queue=max_queue if serving else 0, jurisdiction=self.jurisdiction[node],
            price=Price())

    def size(self, node: int, tokens_per_s: float) -> int:
        """Bytes of this node's sealed advert (sealed once, for real, to measure)."""
        size = self._sizes[node]
        if not size:
            advert = self.advert(node, EPOCH_MS, tokens_per_s=tokens_per_s, queue_depth=1,
                                 active_jobs=1, max_queue=16)
            size = self._sizes[node] = len(self.seal(node, advert, EPOCH_MS))
        return size

    def seal(self, node: int, advert: CapabilityAdvert, now_ms: int) -> bytes:
        self._nonce += 1
        self.sealed += 1
        return seal(self.keys[node], advert, now_ms=now_ms, ttl_ms=self.ttl_ms,
                    nonce=self._nonce.to_bytes(NONCE_LENGTH, "big"))

    def envelope(self, sender: int, advert: CapabilityAdvert, sent_ms: int) -> bytes | None:
        """The bytes on the wire (real mode; sealed once per message), else None."""
        return self.seal(sender, advert, sent_ms) if self.real else None

    def deliver(self, sender: int, advert: CapabilityAdvert, data: bytes | None, now_ms: int,
                sent_ms: int, verifier: Verifier) -> Verified[CapabilityAdvert]:
        """What a receiving PeerTable gets: in real mode the envelope ``data`` verified at
        ``now_ms`` by the receiver's real Verifier (which raises ProtocolError like on the
        wire); in fast mode a Verified built directly."""
        self.verified_count += 1
        if self.real:
            if data is None:
                data = self.seal(sender, advert, sent_ms)
            verified: Verified[CapabilityAdvert] = verifier.verify(
                data, now_ms, expect=CapabilityAdvert, sender=self.peer_ids[sender])
            return verified
        env = Envelope(version=1, type=CapabilityAdvert.TYPE, sender=self.peer_ids[sender],
                       issued_at=sent_ms, expires_at=sent_ms + self.ttl_ms,
                       nonce=bytes(NONCE_LENGTH), payload={}, signature=bytes(64), raw=b"")
        return Verified(env, advert)


def _digest(name: str) -> bytes:
    return hashlib.sha256(name.encode()).digest()
