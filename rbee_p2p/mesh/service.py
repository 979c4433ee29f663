"""The mesh service: a libp2p host in the node's nursery, adverts over GossipSub, the peer
table, discovery (static peers, Kademlia DHT, mDNS) and remote jobs for the dispatcher.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import multiaddr
import trio
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo, info_from_p2p_addr

from .. import __version__
from ..dispatch.request import Request, Stamp
from ..errors import Busy, PeerUnavailable
from ..protocol.cadence import (BUDGET_PER_S, CEILING_MS, liveness_limits_ms,
                                membership_interval_ms)
from ..protocol.envelope import Verifier, seal
from ..protocol.errors import ProtocolError
from ..protocol.identity import NodeKey, peer_id_to_str
from ..protocol.messages import CapabilityAdvert, DeviceInfo, ModelInfo, Price
from ..protocol.peers import PeerState, PeerTable
from ..routing import DeviceFacts, ModelFacts, PeerFacts, RequestFacts
from ..routing.probing import (admit_by_ms, decided, draw_pool, draw_probes, pool_due, to_rank,
                               weighted)
from ..routing.reputation import (Standing, after_failure, after_refusal, after_result,
                                  effective_speed, failure_penalty_ms, trust)
from ..routing.sampling import peer_key
from ..store.writer import AuditWriter
from .executor import PROTOCOL_ID, Executor, Timing
from .remote import RemoteJob
from .frames import FrameStream, end_quietly
from .host import build_host, check_ports_free, psk_from_secret

__all__ = ["MeshConfig", "LocalInfo", "Mesh", "advert_topic", "rendezvous_key", "PROBE_ID",
           "reminder_interval_s", "liveness_s"]

log = logging.getLogger(__name__)


PROBE_ID = "/rbee/probe/1.0.0"
"""A stream on which a peer writes its current sealed advert (its load, now) and closes."""


def advert_topic(swarm: str) -> str:
    return f"rbee/{swarm}/adverts/1"


def rendezvous_key(swarm: str) -> str:
    """The DHT provider key under which a swarm's nodes find each other."""
    return hashlib.sha256(f"/rbee/swarm/{swarm}".encode()).hexdigest()


@dataclass(frozen=True)
class MeshConfig:
    listen: tuple[str, ...] = ("/ip4/0.0.0.0/tcp/7834",)
    peers: tuple[str, ...] = ()  # static peers: multiaddrs with /p2p/<id>
    bootstrap: tuple[str, ...] = ()  # DHT bootstrap nodes
    swarm: str = "default"
    mdns: bool = True
    dht: bool = True
    psk: str | None = None  # private swarm: pre-shared key (libp2p pnet)
    allow: tuple[str, ...] | None = None  # private swarm: peer-ID allowlist
    jurisdiction: str = ""
    advert_interval_s: float = 1.0
    suspect_after_s: float = 3.0
    dead_after_s: float = 8.0
    mdns_interfaces: tuple[str, ...] = ()  # empty: all
    # large swarms (see simulations/README.md): reminders paced to a swarm-wide budget, load
    # not flooded but probed from a few sampled candidates per request
    advert_budget: float = BUDGET_PER_S  # large swarms: reminders a second, swarm-wide
    probe_above: int = 32  # more peers than this serve a model: sample and probe
    probes: int = 8  # candidates probed per request
    probe_timeout_s: float = 0.25
    timing: Timing = field(default_factory=Timing)


@dataclass(frozen=True)
class LocalInfo:
    """What this node offers right now (for its advert)."""

    models: tuple[ModelInfo, ...]
    devices: tuple[DeviceInfo, ...]
    queue_depth: int
    active_jobs: int
    max_queue: int


def now_ms() -> int:
    return int(time.time() * 1000)


def reminder_interval_s(config: MeshConfig, known_peers: int) -> float:
    """Seconds between this node's advert reminders: ``advert_interval`` in a small swarm
    (up to ``probe_above`` peers: adverts carry the load routing uses); in a large one as
    long as keeps the whole swarm near ``advert_budget`` reminders a second (GossipSub hands
    every node several copies of each: the simulator measured 4 KB/s a node at 0.5 a
    second, 48 KB/s at 5)."""
    floor = int(config.advert_interval_s * 1000)
    if known_peers <= config.probe_above:
        return floor / 1000
    return membership_interval_ms(known_peers, budget_per_s=config.advert_budget,
                                  floor_ms=floor, ceiling_ms=max(floor, CEILING_MS)) / 1000


def liveness_s(config: MeshConfig, interval_s: float) -> tuple[float, float]:
    """(suspect_after, dead_after): as configured, or longer when reminders are sparser
    (suspect after three missed reminders, dead after six)."""
    suspect, dead, _ = liveness_limits_ms(int(interval_s * 1000))
    return max(config.suspect_after_s, suspect / 1000), max(config.dead_after_s, dead / 1000)


class Mesh:
    """Implements ``dispatch.Remote``.  Run with ``await nursery.start(mesh.run)``."""

    def __init__(self, config: MeshConfig, key: NodeKey, local: Callable[[], LocalInfo],
                 executor: Executor, verifier: Verifier, audit: AuditWriter | None = None) -> None:
        self.config = config
        self.key = key
        self.local = local
        self.executor = executor
        self.verifier = verifier
        self.audit = audit
        self.table = PeerTable(self_id=key.peer_id, swarm=config.swarm,
                               suspect_after_ms=int(config.suspect_after_s * 1000),
                               dead_after_ms=int(config.dead_after_s * 1000))
        self.host: Any = None
        self.pubsub: Any = None
        self.dht: Any = None
        self._seq = 0
        self._warm: dict[bytes, tuple[Any, float]] = {}  # peer -> (open stream, opened at)
        self._refill_send, self._refill_receive = trio.open_memory_channel[bytes](64)
        self._dial_locks: dict[bytes, trio.Lock] = {}
        # what routing sees of each peer, rebuilt only when its advert or state changes
        self._facts: dict[bytes, tuple[tuple[Any, ...], PeerFacts]] = {}
        self._ids: dict[str, bytes] = {}
        self._change = trio.Event()
        self.probes = {"sent": 0, "answered": 0, "failed": 0}
        self._keys: dict[str, int] = {}  # peer id -> sampling key
        # what this node saw of each peer's jobs (never gossiped: nothing for a liar to forge)
        self.standings: dict[bytes, Standing] = {}
        self._pools: dict[str, tuple[float, set[str]]] = {}  # model -> (drawn at, peer ids)
        self._large: dict[str, bool] = {}  # model -> routed by probing (large swarm)

    # -- running ------------------------------------------------------------------------

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        from libp2p.pubsub.gossipsub import PROTOCOL_ID as GS10
        from libp2p.pubsub.gossipsub import PROTOCOL_ID_V11, PROTOCOL_ID_V12, GossipSub
        from libp2p.pubsub.pubsub import Pubsub
        from libp2p.tools.anyio_service import background_trio_service

        cfg = self.config
        psk = psk_from_secret(cfg.psk) if cfg.psk else None
        allow = None
        if cfg.allow is not None:
            from ..protocol.identity import peer_id_from_str

            allow = [peer_id_from_str(p) for p in cfg.allow]
        check_ports_free(cfg.listen)
        self.host = host = build_host(self.key, cfg.listen, psk=psk, allow=allow)
        router = GossipSub(protocols=[PROTOCOL_ID_V12, PROTOCOL_ID_V11, GS10], degree=6,
                           degree_low=4, degree_high=12, heartbeat_interval=1,
                           heartbeat_initial_delay=0.1)
        self.pubsub = pubsub = Pubsub(host, router, strict_signing=True)
        async with host.run(listen_addrs=[multiaddr.Multiaddr(a) for a in cfg.listen]):
            host.set_stream_handler(PROTOCOL_ID, self._on_stream)
            host.set_stream_handler(PROBE_ID, self._on_probe)
            async with background_trio_service(pubsub), background_trio_service(router):
                await pubsub.wait_until_ready()
                subscription = await pubsub.subscribe(advert_topic(cfg.swarm))
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._receive_adverts, subscription)
                    nursery.start_soon(self._publish_adverts)
                    nursery.start_soon(self._age_table)
                    nursery.start_soon(self._keep_warm_streams)
                    if cfg.peers:
                        nursery.start_soon(self._keep_static_peers)
                    if cfg.dht:
                        nursery.start_soon(self._run_dht)
                    if cfg.mdns:
                        from .mdns import run_mdns

                        nursery.start_soon(run_mdns, self, cfg.mdns_interfaces)
                    log.info("mesh up as %s on %s", self.key.peer_id_str, self.addrs())
                    task_status.started()
                    await trio.sleep_forever()

    async def _on_stream(self, stream: Any) -> None:
        remote = stream.muxed_conn.peer_id.to_bytes()
        await self.executor.handle(stream, remote)

    def addrs(self) -> list[str]:
        """Our dialable multiaddrs, each ending in /p2p/<id>."""
        if self.host is None:
            return []
        out = []
        for addr in self.host.get_addrs():
            text = str(addr)
            if "/ip4/0.0.0.0/" in text:
                out += [text.replace("0.0.0.0", ip) for ip in _local_ipv4()]
            else:
                out.append(text)
        return out

    # -- adverts ------------------------------------------------------------------------

    def _advert(self) -> CapabilityAdvert:
        info = self.local()
        self._seq = max(self._seq + 1, now_ms())  # survives restarts: newer than before
        return CapabilityAdvert(
            swarm=self.config.swarm, seq=self._seq, version=__version__,
            addrs=tuple(self.addrs()[:16]), models=info.models[:64], devices=info.devices[:16],
            queue_depth=info.queue_depth, active_jobs=info.active_jobs, max_queue=info.max_queue,
            jurisdiction=self.config.jurisdiction, price=Price())

    def poke(self) -> None:
        """What we offer changed (load, models): advertise it soon."""
        self._change.set()

    def _sealed_advert(self) -> bytes:
        _, dead = liveness_s(self.config, reminder_interval_s(self.config, len(self.table.peers)))
        return seal(self.key, self._advert(), now_ms=now_ms(),
                    ttl_ms=min(int(dead * 1000) + 5000, 600_000))

    def _membership(self) -> tuple[Any, ...]:
        """What a large swarm floods at once: where we are and what we serve (not load)."""
        return (tuple(self.addrs()), tuple((m.name, m.digest, m.modality)
                                           for m in self.local().models))

    async def _publish_adverts(self) -> None:
        """Reminders every ``reminder_interval_s`` (``advert_interval`` in a small swarm),
        and 0.1-0.25 s after a change in what we offer (at most 4 a second: GossipSub drops
        bursts above 10/s per peer and topic).  In a swarm too large to flood load (more
        peers than ``probe_above``) only membership changes are sent at once; routing probes
        a few candidates for their load instead."""
        topic = advert_topic(self.config.swarm)
        last_sent = -1e9
        sent: tuple[Any, ...] = ()
        while True:
            wait = last_sent + 0.25 - trio.current_time()
            if wait > 0:
                await trio.sleep(wait)
            data = self._sealed_advert()
            try:
                await self.pubsub.publish(topic, data)
            except Exception as exc:
                log.debug("advert publish failed: %s", exc)
            last_sent, sent = trio.current_time(), self._membership()
            while True:
                known = len(self.table.peers)
                interval = reminder_interval_s(self.config, known)
                self.table.suspect_after_ms, self.table.dead_after_ms = (
                    int(x * 1000) for x in liveness_s(self.config, interval))
                with trio.move_on_at(last_sent + interval) as idle:
                    await self._change.wait()
                self._change = trio.Event()
                if idle.cancelled_caught or known <= self.config.probe_above or \
                        self._membership() != sent:
                    break
            if not idle.cancelled_caught:
                # debounce: one advert for a burst of changes, sent after the request that
                # caused it has its first token (no CPU taken from its prompt processing)
                await trio.sleep(0.1)

    async def _receive_adverts(self, subscription: Any) -> None:
        async for message in subscription:
            try:
                sender = ID(message.from_id).to_bytes()
                if sender == self.key.peer_id:
                    continue  # GossipSub hands us our own adverts too
                verified = self.verifier.verify(message.data, now_ms(), expect=CapabilityAdvert,
                                                sender=sender)
                before = self.table.peers.get(sender)
                was = before.state if before is not None else None
                entry = self.table.apply_advert(verified, now_ms())
                if was is not PeerState.ALIVE:
                    # back (or new): forget libp2p's 60 s "recently failed" dial cache
                    self.host.get_network().unblock_peer(ID(sender))
            except ProtocolError as exc:
                if exc.reason not in ("stale", "replayed"):
                    log.info("advert refused: %s: %s", exc.reason, exc)
                if exc.reason == "replayed":
                    self.table.count_invalid("replayed")
                continue
            except Exception as exc:  # a malformed pubsub message
                self.table.count_invalid("malformed")
                log.info("advert refused: %s", exc)
                continue
            if was is None:
                log.info("peer %s joined (%s)", peer_id_to_str(sender)[:16],
                         ", ".join(m.name for m in entry.advert.models) or "no models")

    async def _age_table(self) -> None:
        while True:
            await trio.sleep(0.25)
            for peer, old, new in self.table.tick(now_ms()):
                log.info("peer %s: %s -> %s", peer_id_to_str(peer)[:16], old.value,
                         new.value if new else "forgotten")

    # -- discovery ----------------------------------------------------------------------

    async def connect_addr(self, addr: str) -> bytes | None:
        """Dial a multiaddr with /p2p/<id>; returns the peer ID, None on failure."""
        try:
            info = info_from_p2p_addr(multiaddr.Multiaddr(addr))
        except Exception as exc:
            log.warning("bad peer address %s: %s", addr, exc)
            return None
        return await self.connect_info(info)

    async def connect_info(self, info: PeerInfo) -> bytes | None:
        peer = info.peer_id.to_bytes()
        if peer == self.key.peer_id:
            return None
        if self.host.get_network().connections.get(info.peer_id):
            return peer
        try:
            with trio.fail_after(3):  # a wrong pre-shared key otherwise hangs ~30 s
                await self._dial(info)
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
                await self.connect_addr(addr)
            await trio.sleep(2)

    async def _run_dht(self) -> None:
        from libp2p.kad_dht import DHTMode, KadDHT
        from libp2p.tools.anyio_service import background_trio_service

        logging.getLogger("libp2p.kad_dht.kad_dht").setLevel(logging.ERROR)  # EOF noise
        self.dht = dht = KadDHT(self.host, DHTMode.SERVER, enable_random_walk=False)
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
        alive, suspect = [], []
        for entry in self.table.peers.values():
            if entry.state is PeerState.DEAD:
                continue
            standing = self.standings.get(entry.peer_id)
            version = (entry.advert.seq, entry.state, standing)
            cached = self._facts.get(entry.peer_id)
            if cached is None or cached[0] != version:
                cached = (version, _facts(entry.peer_id, entry.advert, entry.state.value,
                                          standing, self.config.timing.frame_timeout_s))
                self._facts[entry.peer_id] = cached
                self._ids[cached[1].id] = entry.peer_id
            (alive if entry.state is PeerState.ALIVE else suspect).append(cached[1])
        return (*alive, *suspect)

    async def candidates(self, model: str, modality: str = "text") -> tuple[PeerFacts, ...]:
        """The peers routing considers for ``model``: all of them in a small swarm; in a
        large one (more than ``probe_above`` serve it) a few drawn from a weighted sample
        kept per node, probed for their current advert (load) — the "power of d choices".
        Returns once half of the probes answered or ``probe_timeout_s`` passed."""
        everyone = self.peers()
        serving = [p for p in everyone if p.serves(model, modality)]
        cfg = self.config
        self._large[model] = len(serving) > cfg.probe_above
        if not self._large[model]:
            return everyone
        keep = self._pool(model, serving)
        chosen = draw_probes(peer_key(os.urandom(8)), self._weighted(model, serving),
                             lambda p: p.id in keep, cfg.probes)
        answered: list[str] = []
        with trio.move_on_after(cfg.probe_timeout_s):
            async with trio.open_nursery() as nursery:
                async def probe(peer: PeerFacts) -> None:
                    if await self._probe(self.peer_bytes(peer.id)):
                        answered.append(peer.id)
                        if decided(len(answered), len(chosen)):
                            nursery.cancel_scope.cancel()

                for peer in chosen:
                    nursery.start_soon(probe, peer)
        wanted = set(to_rank([p.id for p in chosen], answered))
        return tuple(p for p in self.peers() if p.id in wanted)

    def _weighted(self, model: str,
                  peers: list[PeerFacts]) -> list[tuple[PeerFacts, int, float]]:
        """(peer, its sampling key, its weight: ``routing.probing.weight``)."""
        def key(p: PeerFacts) -> int:
            k = self._keys.get(p.id)
            if k is None:
                k = self._keys[p.id] = peer_key(self.peer_bytes(p.id))
            return k

        return weighted(peers, model, key)

    def _pool(self, model: str, serving: list[PeerFacts]) -> set[str]:
        """The peers this node keeps for ``model`` (4 x probes of them): a weighted sample
        salted with our own id, so each node keeps its own; redrawn every 5 s at most."""
        now = trio.current_time()
        cached = self._pools.get(model)
        if cached is None or pool_due(int(cached[0] * 1000), int(now * 1000)):
            drawn = draw_pool(peer_key(self.key.peer_id), self._weighted(model, serving),
                              self.config.probes)
            cached = self._pools[model] = (now, {p.id for p in drawn})
        return cached[1]

    async def _probe(self, peer: bytes) -> bool:
        """Ask ``peer`` for its current advert and apply it.  Never raises."""
        self.probes["sent"] += 1
        try:
            stream = await self.host.new_stream(ID(peer), [PROBE_ID])
            frames = FrameStream(stream, 64 * 1024)
            try:
                raw = await frames.receive()
            finally:
                await end_quietly(stream.close)
            verified = self.verifier.verify(raw, now_ms(), expect=CapabilityAdvert, sender=peer)
            self.table.apply_advert(verified, now_ms())
        except Exception as exc:  # cancelled probes are not failures: trio.Cancelled passes
            self.probes["failed"] += 1
            log.debug("probe of %s failed: %s", peer_id_to_str(peer)[:16], exc)
            return False
        self.probes["answered"] += 1
        return True

    async def _on_probe(self, stream: Any) -> None:
        """Answer a probe with our current sealed advert.  Never raises."""
        try:
            with trio.fail_after(2):
                await FrameStream(stream, 64 * 1024).send(self._sealed_advert())
                await stream.close()
        except Exception as exc:
            log.debug("probe answer failed: %s", exc)
            await end_quietly(stream.reset)

    def peer_bytes(self, peer_id: str) -> bytes:
        return self._ids.get(peer_id) or ID.from_base58(peer_id).to_bytes()

    def serves(self, model: str, modality: str = "text") -> bool:
        return any(e.serves(model, modality) for e in self.peers())

    def models(self) -> list[tuple[str, str, str]]:
        """(model, modality, peer id) for every model a live peer advertises."""
        return [(m.name, m.modality, p.id) for p in self.peers() for m in p.models]

    def report_failure(self, peer_id: str) -> None:
        self._suspect(self.peer_bytes(peer_id))

    def _suspect(self, peer_id: bytes) -> None:
        self.standings[peer_id] = after_failure(self.standings.get(peer_id, Standing()))
        self.table.report_failure(peer_id, now_ms())
        log.warning("peer %s marked suspect", peer_id_to_str(peer_id)[:16])

    def _job_done(self, job: RemoteJob) -> None:
        """Learn from a finished text job: the speed we measured and the wait we saw,
        against what the peer's advert claimed when we chose it."""
        entry = self.table.peers.get(job.where)
        tokens = job.completion.completion_tokens
        if entry is None or job.first_at is None or job.ended_at is None:
            return
        advert = entry.advert
        claimed = next((m.tokens_per_s for m in advert.models if m.name == job.request.model),
                       0.0)
        self.standings[job.where] = after_result(
            self.standings.get(job.where, Standing()), claimed_tokens_per_s=claimed,
            queue_depth=advert.queue_depth, active_jobs=advert.active_jobs,
            max_tokens=job.request.max_tokens, tokens=tokens, sent_s=job.started_at,
            first_s=job.first_at, ended_s=job.ended_at)

    def _admit_by(self, peer_id: bytes, request: Request) -> int | None:
        """In a large swarm, when the peer should be done by our estimate (x 1.25, + 250 ms
        for the trip and clocks): it refuses if it would be later — someone else's job got
        there first — and the next candidate is tried (deadline admission; without it,
        requests herd)."""
        cached = self._facts.get(peer_id)
        if not self._large.get(request.model) or cached is None:
            return None
        return admit_by_ms(now_ms(), cached[1],
                           RequestFacts(request.model, max_tokens=request.units))

    def _refused(self, peer_id: bytes) -> None:
        """It said it had room, then refused ("busy")."""
        self.standings[peer_id] = after_refusal(self.standings.get(peer_id, Standing()))

    async def _open_stream(self, peer: bytes, fresh: bool) -> Any:
        """A stream for one job: the warm one opened in advance if it is young enough,
        else a new one."""
        warm = self._warm.pop(peer, None)
        if warm is not None:
            stream, opened = warm
            if not fresh and trio.current_time() - opened < self.config.timing.warm_stream_s:
                return stream
            await end_quietly(stream.reset)
        return await self._new_stream(peer)

    async def _keep_warm_streams(self) -> None:
        """Opens the next job's stream to a peer ahead of time (at most 16 peers)."""
        async for peer in self._refill_receive:
            if peer in self._warm:
                continue
            try:
                with trio.fail_after(3):
                    stream = await self._new_stream(peer)
            except Exception as exc:
                log.debug("no warm stream to %s: %s", peer_id_to_str(peer)[:16], exc)
                continue
            if len(self._warm) >= 16:
                oldest = min(self._warm, key=lambda p: self._warm[p][1])
                await end_quietly(self._warm.pop(oldest)[0].reset)
            self._warm[peer] = (stream, trio.current_time())

    async def _new_stream(self, peer: bytes) -> Any:
        pid = ID(peer)
        if not self.host.get_network().connections.get(pid):
            entry = self.table.peers.get(peer)
            addrs = [multiaddr.Multiaddr(a) for a in (entry.advert.addrs if entry else ())]
            if not addrs:
                raise PeerUnavailable("no address known for the peer")
            await self._dial(PeerInfo(pid, [multiaddr.Multiaddr(
                str(a).split("/p2p/")[0]) for a in addrs]))
        return await self.host.new_stream(pid, [PROTOCOL_ID])

    async def _dial(self, info: PeerInfo) -> None:
        """One dial at a time per peer: concurrent dials to one peer stall py-libp2p."""
        peer = info.peer_id.to_bytes()
        lock = self._dial_locks.setdefault(peer, trio.Lock())
        async with lock:
            if not self.host.get_network().connections.get(info.peer_id):
                await self.host.connect(info)
        if not lock.locked() and peer not in self.table.peers:
            self._dial_locks.pop(peer, None)

    async def start(self, peer: str, request: Request, stamp: Stamp = Stamp()) -> RemoteJob:
        peer_id = self.peer_bytes(peer)
        try:
            job = await RemoteJob.start(peer_id, self._open_stream, request, key=self.key,
                                        verifier=self.verifier, timing=self.config.timing,
                                        audit=self.audit, on_failure=self._suspect, stamp=stamp,
                                        on_done=self._job_done,
                                        admit_by_ms=self._admit_by(peer_id, request))
        except Busy:
            self._refused(peer_id)
            raise
        # the peer answered: open the next job's stream now, over the live connection
        # (never while dialling a peer that may be gone: concurrent dials to one peer stall)
        try:
            self._refill_send.send_nowait(peer_id)
        except trio.WouldBlock:
            pass
        return job

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
                "last_advert_age_s": round(e.age_ms(now) / 1000, 2),
            } for e in self.table.peers.values()],
            "adverts": dict(self.table.counters),
            "probes": dict(self.probes),
            "connected": [str(p) for p in self.host.get_connected_peers()] if self.host else [],
        }


def _facts(peer_id: bytes, advert: CapabilityAdvert, state: str, standing: Standing | None,
           timeout_s: float) -> PeerFacts:
    """What routing sees of a peer: its advert, with the speed it claims discounted by how
    it kept its word so far, and the time its failures are expected to cost as latency."""
    s = standing or Standing()
    return PeerFacts(
        id=peer_id_to_str(peer_id),
        models=tuple(ModelFacts(m.name, m.modality, effective_speed(s, m.tokens_per_s),
                                m.device) for m in advert.models),
        devices=tuple(DeviceFacts(d.id, d.backend, d.name, d.mem_total, d.mem_free)
                      for d in advert.devices),
        queue_depth=advert.queue_depth, active_jobs=advert.active_jobs,
        max_queue=advert.max_queue, jurisdiction=advert.jurisdiction,
        price=advert.price.output_per_mtok, state=state, reputation=trust(s),
        latency_ms=failure_penalty_ms(s, timeout_s * 1000))


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
