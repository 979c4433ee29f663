"""A hostile peer, for the security tier and bench/security.py: a real libp2p host (Noise and
yamux, as a node's) on loopback that connects to a victim node and sends what no honest
node would -- floods of requests, oversized or unsigned frames, probes, many identities."""

from __future__ import annotations

import os
import time
from contextlib import asynccontextmanager
from typing import AsyncIterator, Callable

import multiaddr
import trio
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import info_from_p2p_addr

from rbee_p2p.mesh.executor import PROTOCOL_ID
from rbee_p2p.mesh.frames import FrameStream, StreamGone
from rbee_p2p.mesh.host import build_host, psk_from_secret
from rbee_p2p.mesh.settings import PROBE_ID
from rbee_p2p.protocol.envelope import Verifier, seal
from rbee_p2p.protocol.framing import encode_frame
from rbee_p2p.protocol.identity import NodeKey, peer_id_to_str
from rbee_p2p.protocol.messages import (CapabilityAdvert, ErrorMessage, InferenceRequest, ModelInfo,
                                        Price, Turn)

__all__ = ["Attacker", "hostile", "sybil_adverts", "fake_advert"]


class Attacker:
    """Connected to ``victim`` (its peer ID, bytes) as ``key``."""

    def __init__(self, host, key: NodeKey, victim: bytes) -> None:
        self.host, self.key, self.victim = host, key, victim

    def request(self, model: str = "m", max_tokens: int = 4, ttl_ms: int = 60_000,
                **fields) -> bytes:
        """A sealed, well-formed chat InferenceRequest from us to the victim."""
        now = int(time.time() * 1000)
        message = InferenceRequest(
            request_id=os.urandom(16), target=self.victim, model=model, kind="chat",
            messages=(Turn("user", "hi"),), stream=True, max_tokens=max_tokens,
            deadline_ms=now + 60_000, **fields)
        return seal(self.key, message, now_ms=now, ttl_ms=ttl_ms)

    async def infer(self, frame: bytes, *, raw: bool = False,
                    timeout: float = 10) -> tuple[str, object]:
        """Send one first frame on a new inference stream; ("error", ErrorMessage) if the
        victim refused, ("served", tokens) if it streamed an answer to its end, ("gone",
        reason) if the stream ended otherwise.  ``raw``: ``frame`` goes as it is (a frame
        header with any body)."""
        with trio.fail_after(timeout):
            stream = await self.host.new_stream(ID(self.victim), [PROTOCOL_ID])
            frames = FrameStream(stream, 1 << 20)
            try:
                if raw:
                    await stream.write(encode_frame(frame))
                else:
                    await frames.send(frame)
                tokens = 0
                while True:
                    reply = Verifier().verify(await frames.receive(), int(time.time() * 1000))
                    message = reply.message
                    if isinstance(message, ErrorMessage):
                        return "error", message
                    tokens += getattr(message, "tokens", 0)
                    if type(message).__name__ == "ResultEnd":
                        return "served", tokens
            except StreamGone as exc:
                return "gone", str(exc)
            finally:
                await frames.reset()

    async def probe(self, timeout: float = 5) -> bytes:
        """The victim's answer to one probe (its sealed advert)."""
        with trio.fail_after(timeout):
            stream = await self.host.new_stream(ID(self.victim), [PROBE_ID])
            frames = FrameStream(stream, 64 * 1024)
            try:
                return await frames.receive()
            finally:
                await frames.reset()


def fake_advert(key: NodeKey) -> bytes:
    """A validly signed advert of the open swarm claiming model "m" at 10 million tokens/s
    and jurisdiction EU, at an address where nothing listens."""
    now = int(time.time() * 1000)
    return seal(key, CapabilityAdvert(
        swarm="public", seq=now, version="0.1.0",
        addrs=(f"/ip4/127.0.0.1/tcp/1/p2p/{peer_id_to_str(key.peer_id)}",),
        models=(ModelInfo(name="m", digest=bytes(32), modality="text", context=2048,
                          tokens_per_s=1e7 - 1, size_bytes=1),),
        devices=(), queue_depth=0, active_jobs=0, max_queue=64, jurisdiction="EU",
        price=Price()), now_ms=now, ttl_ms=600_000)


async def sybil_adverts(victim_addr: str, swarm: str, keys: list[NodeKey], *,
                        advert: Callable[[NodeKey], bytes], psk: str | None = None,
                        every_s: float = 0.0) -> None:
    """Gossip one signed advert per identity in ``keys`` to the victim, all over one
    connection (a GossipSub peer relaying "others'" adverts, each with a valid pubsub
    signature of its claimed origin), then again every ``every_s`` (0: once) until
    cancelled."""
    from libp2p.pubsub.gossipsub import PROTOCOL_ID_V11, GossipSub
    from libp2p.pubsub.pb import rpc_pb2
    from libp2p.pubsub.pubsub import PUBSUB_SIGNING_PREFIX, Pubsub
    from libp2p.tools.anyio_service import background_trio_service

    from rbee_p2p.mesh.host import keypair
    from rbee_p2p.mesh.settings import advert_topic

    key = NodeKey.generate()
    listen = ["/ip4/127.0.0.1/tcp/0"]
    host = build_host(key, listen, psk=psk_from_secret(psk) if psk else None)
    router = GossipSub(protocols=[PROTOCOL_ID_V11], degree=6, degree_low=4, degree_high=12,
                       heartbeat_interval=1, heartbeat_initial_delay=0.1)
    pubsub = Pubsub(host, router, strict_signing=True)
    topic = advert_topic(swarm)
    async with host.run(listen_addrs=[multiaddr.Multiaddr(a) for a in listen]), \
            background_trio_service(pubsub), background_trio_service(router):
        await pubsub.wait_until_ready()
        await pubsub.subscribe(topic)
        with trio.fail_after(10):
            await host.connect(info_from_p2p_addr(multiaddr.Multiaddr(victim_addr)))
        await trio.sleep(2)  # the victim in our mesh for the topic
        pairs = [(k, keypair(k)) for k in keys]
        seqno = 0
        while True:
            for k, pair in pairs:
                seqno += 1
                msg = rpc_pb2.Message(data=advert(k), topicIDs=[topic], from_id=k.peer_id,
                                      seqno=seqno.to_bytes(8, "big"))
                msg.signature = pair.private_key.sign(PUBSUB_SIGNING_PREFIX.encode()
                                                      + msg.SerializeToString())
                msg.key = pair.public_key.serialize()
                await pubsub.push_msg(pubsub.my_id, msg)
                await trio.sleep(0)
            if not every_s:
                return
            await trio.sleep(every_s)


@asynccontextmanager
async def hostile(victim_addr: str, *, psk: str | None = None,
                  key: NodeKey | None = None) -> AsyncIterator[Attacker]:
    """An :class:`Attacker` connected to the node at ``victim_addr`` (a multiaddr ending in
    /p2p/<id>); ``psk``: the swarm's secret, for a member turned hostile."""
    key = key or NodeKey.generate()
    listen = ["/ip4/127.0.0.1/tcp/0"]
    host = build_host(key, listen, psk=psk_from_secret(psk) if psk else None)
    async with host.run(listen_addrs=[multiaddr.Multiaddr(a) for a in listen]):
        info = info_from_p2p_addr(multiaddr.Multiaddr(victim_addr))
        with trio.fail_after(10):
            await host.connect(info)
        yield Attacker(host, key, info.peer_id.to_bytes())
