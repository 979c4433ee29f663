"""The mesh service: a libp2p host in the node's nursery composed of its parts --
:mod:`.membership` (adverts and the peer table), :mod:`.peers` (what routing sees, probes),
:mod:`.client` (forwarding jobs), :mod:`.executor` (serving peers' jobs) -- plus discovery
(static peers, Kademlia DHT, mDNS).  :class:`Mesh` implements ``dispatch.Remote``.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Iterable

import multiaddr
import trio
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo, info_from_p2p_addr

from ..dispatch.request import Request, Stamp
from ..logs import quiet_repeats
from ..protocol.envelope import Verifier
from ..protocol.identity import NodeKey, peer_id_to_str
from ..protocol.peers import PeerTable
from ..routing import PeerFacts
from ..store.writer import AuditWriter
from .client import Client
from .executor import PROTOCOL_ID, Executor
from .host import build_host, check_ports_free, psk_from_secret
from .latency import Latency
from .membership import Membership
from .peers import PeerView
from .reach import Reach
from .remote import RemoteJob
from .settings import (PROBE_ID, LocalInfo, MeshConfig, advert_topic, liveness_s, now_ms,
                       reminder_interval_s, rendezvous_key)

__all__ = ["MeshConfig", "LocalInfo", "Mesh", "advert_topic", "rendezvous_key", "PROBE_ID",
           "reminder_interval_s", "liveness_s", "listen_addrs"]

log = logging.getLogger(__name__)


class Mesh:
    """Implements ``dispatch.Remote``.  Run with ``await nursery.start(mesh.run)``."""

    def __init__(self, config: MeshConfig, key: NodeKey, local: Callable[[], LocalInfo],
                 executor: Executor, verifier: Verifier, audit: AuditWriter | None = None) -> None:
        self.config = config
        self.key = key
        self.executor = executor
        self.verifier = verifier
        self.host: Any = None
        self.pubsub: Any = None
        self._psk: str | None = None  # the swarm's pnet key, once running
        self.membership = Membership(config, key, local, verifier, self.addrs)
        self.membership.on_back = self._unblock
        self.view = PeerView(config, key, self.membership, verifier)
        self.client = Client(config, key, verifier, self.view, audit)
        self.latency = self.view.latency = Latency(config.ping_interval_s,
                                                   config.ping_concurrency)
        self.membership.forget_listeners.append(self.latency.forget)
        self.latency.on_answer = self.membership.prove
        self.reach = Reach(config.reach_interval_s)

    @property
    def table(self) -> PeerTable:
        return self.membership.table

    # -- running ------------------------------------------------------------------------

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the host, gossip, discovery and the mesh's loops until cancelled; started
        once listening and subscribed.  Raises ConfigError (a listen port in use) or what
        the host raises on start."""
        quiet_repeats()  # what peers can make us log, at most once a minute a kind
        from libp2p.pubsub.gossipsub import PROTOCOL_ID as GS10
        from libp2p.pubsub.gossipsub import PROTOCOL_ID_V11, PROTOCOL_ID_V12, GossipSub
        from libp2p.pubsub.pubsub import Pubsub
        from libp2p.tools.anyio_service import background_trio_service

        cfg = self.config
        psk = self._psk = psk_from_secret(cfg.psk) if cfg.psk else None
        allow = None
        if cfg.allow is not None:
            from ..protocol.identity import peer_id_from_str

            allow = [peer_id_from_str(p) for p in cfg.allow]
        check_ports_free(cfg.listen)
        self.host = host = build_host(self.key, cfg.listen, psk=psk, allow=allow)
        self.view.host = self.client.host = host
        router = GossipSub(protocols=[PROTOCOL_ID_V12, PROTOCOL_ID_V11, GS10], degree=6,
                           degree_low=4, degree_high=12, heartbeat_interval=1,
                           heartbeat_initial_delay=0.1)
        self.pubsub = pubsub = Pubsub(host, router, strict_signing=True)
        async with host.run(listen_addrs=[multiaddr.Multiaddr(a) for a in cfg.listen]):
            host.set_stream_handler(PROTOCOL_ID, self._on_stream)
            host.set_stream_handler(PROBE_ID, self.view.on_probe)
            async with background_trio_service(pubsub), background_trio_service(router):
                await pubsub.wait_until_ready()
                pubsub.set_topic_validator(advert_topic(cfg.swarm), self.membership.validate,
                                           False)
                subscription = await pubsub.subscribe(advert_topic(cfg.swarm))
                async with trio.open_nursery() as nursery:
                    self._start_loops(nursery, subscription)
                    log.info("mesh up as %s on %s", self.key.peer_id_str, self.addrs())
                    task_status.started()
                    await trio.sleep_forever()

    def _start_loops(self, nursery: trio.Nursery, subscription: Any) -> None:
        """Every loop the running mesh owns: gossip in and out, ageing, warm streams and
        discovery (each runs until the nursery is cancelled)."""
        cfg = self.config
        nursery.start_soon(self.membership.receive, subscription)
        nursery.start_soon(self.membership.publish, self.pubsub)
        nursery.start_soon(self._age_table)
        nursery.start_soon(self.client.keep_warm_streams)
        nursery.start_soon(self.latency.run, self.host, lambda: list(self.table.peers))
        nursery.start_soon(self.reach.run, self.host, lambda: list(self.table.peers),
                           self._psk)
        if cfg.peers:
            nursery.start_soon(self._keep_static_peers)
        if cfg.dht:
            nursery.start_soon(self._run_dht)
        if cfg.mdns:
            from .mdns import run_mdns

            nursery.start_soon(run_mdns, self, cfg.mdns_interfaces)

    async def _on_stream(self, stream: Any) -> None:
        remote = stream.muxed_conn.peer_id.to_bytes()
        await self.executor.handle(stream, remote)

    def addrs(self) -> list[str]:
        """Our dialable multiaddrs, each ending in /p2p/<id>."""
        if self.host is None:
            return []
        return listen_addrs(str(a) for a in self.host.get_addrs())

    async def _age_table(self) -> None:
        while True:
            await trio.sleep(0.25)
            await self.age(now_ms())

    async def age(self, now: int) -> None:
        """Age the peer table once; what is kept of peers that left it goes with them
        (bounded per-peer state: everything keyed by peer is at most ``max_peers``)."""
        self.membership.age(now)
        self.view.sweep()
        if len(self.latency.rtt) > len(self.table.peers):
            self.latency.keep(self.table.peers)
        await self.client.tidy()

    def _unblock(self, peer: bytes) -> None:
        """A peer is back (or new): forget libp2p's 60 s "recently failed" dial cache."""
        if self.host is not None:
            self.host.get_network().unblock_peer(ID(peer))

    # -- discovery ----------------------------------------------------------------------

    async def connect_addr(self, addr: str, *, again: bool = False) -> bytes | None:
        """Dial a multiaddr with /p2p/<id>; returns the peer ID, None on failure.  With
        ``again`` (a configured peer), libp2p's 60 s "recently failed" cache is ignored: a
        restarted peer is back at the next try, not a minute later."""
        try:
            info = info_from_p2p_addr(multiaddr.Multiaddr(addr))
        except Exception as exc:
            log.warning("bad peer address %s: %s", addr, exc)
            return None
        if again and self.host is not None \
                and not self.host.get_network().connections.get(info.peer_id):
            self.host.get_network().unblock_peer(info.peer_id)
        return await self.connect_info(info)

    async def connect_info(self, info: PeerInfo) -> bytes | None:
        peer = info.peer_id.to_bytes()
        if peer == self.key.peer_id:
            return None
        if self.host.get_network().connections.get(info.peer_id):
            return peer
        try:
            with trio.fail_after(3):  # a wrong pre-shared key otherwise hangs ~30 s
                await self.client.dial(info)
            return peer
        except trio.TooSlowError:
            hint = " (is its swarm key the same as ours?)" if self.config.psk else ""
            log.warning("cannot connect to %s: no handshake within 3 s%s", info.peer_id, hint)
        except Exception as exc:  # refused, unreachable, not in the allowlist
            log.warning("cannot connect to %s: %s: %s", info.peer_id, type(exc).__name__, exc)
        return None

    async def _keep_static_peers(self) -> None:
        while True:
            for addr in self.config.peers:
                await self.connect_addr(addr, again=True)
            await trio.sleep(1)

    async def _run_dht(self) -> None:
        from libp2p.kad_dht import DHTMode, KadDHT
        from libp2p.tools.anyio_service import background_trio_service

        logging.getLogger("libp2p.kad_dht.kad_dht").setLevel(logging.ERROR)  # EOF noise
        dht = KadDHT(self.host, DHTMode.SERVER, enable_random_walk=False)
        key = rendezvous_key(self.config.swarm)
        async with background_trio_service(dht):
            while True:
                if not self.config.bootstrap and not self.host.get_connected_peers():
                    await trio.sleep(5)  # nobody to ask yet
                    continue
                for addr in self.config.bootstrap:
                    peer = await self.connect_addr(addr)
                    if peer is not None:
                        try:
                            await dht.add_peer(ID(peer))
                        except Exception as exc:
                            log.debug("dht add_peer failed: %s", exc)
                try:
                    with trio.move_on_after(10):
                        await dht.refresh_routing_table()
                        await dht.provide(key)
                        for info in await self._find_providers(dht, key):
                            if info.peer_id.to_bytes() not in self.table.peers:
                                await self.connect_info(info)
                except Exception as exc:
                    log.debug("dht round failed: %s", exc)
                await trio.sleep(5 if len(self.table.peers) == 0 else 10)

    @staticmethod
    async def _find_providers(dht: Any, key: str) -> list[PeerInfo]:
        # py-libp2p answers from its own provider store when it provides the key itself:
        # hide our own records during the lookup so the network is asked.
        raw = bytes.fromhex(key)
        saved = dht.provider_store.providers.pop(raw, {})
        try:
            return list(await dht.find_providers(key, count=32))
        finally:
            dht.provider_store.providers.setdefault(raw, {}).update(saved)

    # -- dispatch.Remote ----------------------------------------------------------------

    def peers(self) -> tuple[PeerFacts, ...]:
        """Facts of the live peers for routing: alive ones, then suspect ones."""
        return self.view.peers()

    async def candidates(self, model: str, modality: str = "text") -> tuple[PeerFacts, ...]:
        """See :meth:`PeerView.candidates`."""
        return await self.view.candidates(model, modality)

    def serves(self, model: str, modality: str = "text") -> bool:
        return self.view.serves(model, modality)

    def models(self) -> list[tuple[str, str, str]]:
        """(model, modality, peer id) for every model a live peer advertises."""
        return self.view.models()

    def report_failure(self, peer_id: str) -> None:
        self.view.report_failure(peer_id)

    def gone_since(self, model: str) -> float | None:
        return self.view.gone_since(model)

    async def start(self, peer: str, request: Request, stamp: Stamp = Stamp()) -> RemoteJob:
        """See :meth:`Client.start`."""
        return await self.client.start(peer, request, stamp)

    def poke(self) -> None:
        """What we offer changed (load, models): advertise it soon."""
        self.membership.poke()

    # -- status -------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        now = now_ms()
        return {
            "addrs": self.addrs(),
            "swarm": self.config.swarm,
            "peers": [{
                "id": peer_id_to_str(e.peer_id), "state": e.state.value,
                "models": [m.name for m in e.advert.models],
                "tokens_per_s": {m.name: m.tokens_per_s for m in e.advert.models},
                "queue_depth": e.advert.queue_depth, "active_jobs": e.advert.active_jobs,
                "jurisdiction": e.advert.jurisdiction, "addrs": list(e.advert.addrs),
                "jurisdiction_attested": self.view.attested.get(
                    peer_id_to_str(e.peer_id)) == e.advert.jurisdiction != "",
                "last_advert_age_s": round(e.age_ms(now) / 1000, 2),
                "latency_ms": _rounded(self.latency.ms(e.peer_id)),
                "prices": {m.name: [m.price.input_per_mtok, m.price.output_per_mtok,
                                    m.price.per_image] for m in e.advert.models if m.price},
            } for e in self.table.peers.values()],
            "adverts": {**self.table.counters, "proven_peers": len(self.membership.proven)},
            "probes": dict(self.view.probes),
            "pings": dict(self.latency.pings),
            "reachability": self.reach.summary(),
            "connected": [str(p) for p in self.host.get_connected_peers()] if self.host else [],
        }


def _rounded(ms: float | None) -> float | None:
    return None if ms is None else round(ms, 2)


def listen_addrs(listen: Iterable[str]) -> list[str]:
    """Listen multiaddrs as others can dial them: 0.0.0.0 becomes each local address."""
    out = []
    for text in listen:
        if "/ip4/0.0.0.0/" in text:
            out += [text.replace("0.0.0.0", ip) for ip in _local_ipv4()]
        else:
            out.append(text)
    return out


def _local_ipv4() -> list[str]:
    import ifaddr

    ips = []
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            if isinstance(ip.ip, str) and not ip.ip.startswith("169.254."):
                ips.append(ip.ip)
    # a peer elsewhere dialling our 127.0.0.1 would reach itself: loopback only when alone
    outside = sorted({ip for ip in ips if not ip.startswith("127.")})
    return outside or sorted(set(ips))
