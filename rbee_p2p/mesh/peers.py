"""What routing sees of the peers: their facts (cached per advert and standing), what this
node learnt of each from its jobs (standings: speed kept, failures, refusals), the weighted
sampling pools and probes of a large swarm, and the probe protocol's answering side."""

from __future__ import annotations

import logging
import os
from typing import Any

import trio
from libp2p.peer.id import ID

from ..dispatch.request import Request
from ..protocol.envelope import Verifier
from ..protocol.errors import ProtocolError
from ..protocol.identity import NodeKey, peer_id_to_str
from ..protocol.messages import CapabilityAdvert
from ..protocol.peers import PeerState
from ..routing import PeerFacts, RequestFacts
from ..routing.places import attested_jurisdiction, peer_facts
from ..routing.probing import (admit_by_ms, decided, draw_pool, draw_probes, pool_due, to_rank,
                               weighted)
from ..routing.reputation import Standing, after_failure, after_refusal, after_result
from ..routing.sampling import peer_key
from .frames import FrameStream, end_quietly
from .latency import Latency
from .membership import Membership
from .remote import RemoteJob
from .settings import MAX_MODELS, PROBE_ID, Capped, MeshConfig, now_ms, short

__all__ = ["PeerView"]

log = logging.getLogger(__name__)


GONE_S = 600.0
"""How long a model whose peers all went away is answered 503 "retry", not 404."""


class PeerView:
    """The peers as routing sees them (``dispatch.Remote``'s read side).  ``host`` is set
    once the libp2p host runs (probes need it)."""

    def __init__(self, config: MeshConfig, key: NodeKey, membership: Membership,
                 verifier: Verifier) -> None:
        self.config = config
        self.key = key
        self.membership = membership
        self.table = membership.table
        self.verifier = verifier
        self.attested = dict(config.attested)  # peer id -> jurisdiction, by configuration
        self.host: Any = None
        self.latency = Latency()  # the mesh puts the one it runs here
        # what routing sees of each peer, rebuilt only when its advert or state changes
        self._facts: dict[bytes, tuple[tuple[Any, ...], PeerFacts]] = {}
        self._ids: dict[str, bytes] = {}
        self.probes = {"sent": 0, "answered": 0, "failed": 0}
        self._keys: dict[str, int] = {}  # peer id -> sampling key
        # what this node saw of each peer's jobs (never gossiped: nothing for a liar to forge)
        self.standings: dict[bytes, Standing] = {}
        # model -> (drawn at, peer ids); model -> routed by probing (large swarm).  Keyed by
        # the models requests name, so capped; the per-peer maps above leave with the peer
        self._pools: dict[str, tuple[float, set[str]]] = Capped(MAX_MODELS)
        self._large: dict[str, bool] = Capped(MAX_MODELS)
        # model -> when the last peer known to serve it left the table (monotonic seconds)
        self._departed: dict[str, float] = Capped(MAX_MODELS)
        membership.forget_listeners.append(self.forget)

    def peers(self) -> tuple[PeerFacts, ...]:
        """Facts of the live peers for routing: alive ones, then suspect ones."""
        alive, suspect = [], []
        for entry in self.table.peers.values():
            if entry.state is PeerState.DEAD:
                continue
            standing = self.standings.get(entry.peer_id)
            rtt = self.latency.ms(entry.peer_id)
            proven = entry.peer_id in self.membership.proven
            version = (entry.advert.seq, entry.state, standing, rtt, proven)
            cached = self._facts.get(entry.peer_id)
            if cached is None or cached[0] != version:
                pid = peer_id_to_str(entry.peer_id)
                where = attested_jurisdiction(pid, entry.advert.jurisdiction,
                                              self.attested)
                cached = (version, peer_facts(pid, entry.advert, entry.state.value, standing,
                                              self.config.timing.frame_timeout_s, rtt or 0.0,
                                              jurisdiction=where,
                                              believe_claims=self.config.believe_claims,
                                              proven=proven))
                self._facts[entry.peer_id] = cached
                self._ids[cached[1].id] = entry.peer_id
            (alive if entry.state is PeerState.ALIVE else suspect).append(cached[1])
        return (*alive, *suspect)

    def peer_bytes(self, peer_id: str) -> bytes:
        """The binary peer ID for a base58 one.  Raises ValueError if it is not one."""
        return self._ids.get(peer_id) or ID.from_base58(peer_id).to_bytes()

    def serves(self, model: str, modality: str = "text") -> bool:
        return any(e.serves(model, modality) for e in self.peers())

    def models(self) -> list[tuple[str, str, str]]:
        """(model, modality, peer id) for every model a live peer advertises."""
        return [(m.name, m.modality, p.id) for p in self.peers() for m in p.models]

    def report_failure(self, peer_id: str) -> None:
        self._suspect(self.peer_bytes(peer_id))

    def _suspect(self, peer_id: bytes) -> None:
        """A job there failed: a worse standing (for a peer in the table: nothing is kept
        of others) and suspect until its next advert."""
        if peer_id in self.table.peers:
            self.standings[peer_id] = after_failure(self.standings.get(peer_id, Standing()))
        self.table.report_failure(peer_id, now_ms())
        log.warning("peer %s marked suspect", short(peer_id))

    def forget(self, peer: bytes) -> None:
        """The peer left the table: drop all that is kept of it (but that its models
        were served until now)."""
        self.standings.pop(peer, None)
        cached = self._facts.pop(peer, None)
        if cached is not None:  # names are only ever learnt from the cached facts
            self._ids.pop(cached[1].id, None)
            self._keys.pop(cached[1].id, None)
            for model in cached[1].models:
                self._departed[model.name] = trio.current_time()

    def gone_since(self, model: str) -> float | None:
        """Seconds since the last peer serving ``model`` was heard of, if it is dead (still
        in the table) or left the table within :data:`GONE_S`; else None."""
        now = now_ms()
        ages = [e.age_ms(now) / 1000 for e in self.table.peers.values()
                if e.state is PeerState.DEAD and any(m.name == model for m in e.advert.models)]
        left = self._departed.get(model)
        if left is not None:
            ages.append(trio.current_time() - left)
        recent = [a for a in ages if a < GONE_S]
        return min(recent) if recent else None

    def sweep(self) -> None:
        """Drop what is kept of peers not in the table (e.g. a refusal from a peer that
        was never there); cheap when there is nothing to drop."""
        known = self.table.peers
        for per_peer in (self.standings, self._facts):
            if len(per_peer) > len(known):
                for peer in [p for p in per_peer if p not in known]:
                    self.forget(peer)
        for by_name in (self._ids, self._keys):
            if len(by_name) > len(known):
                for name in list(by_name):
                    if self._ids.get(name) not in known:
                        self._ids.pop(name, None)
                        self._keys.pop(name, None)

    # -- large swarms: sampled, probed candidates ---------------------------------------

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
        """Ask ``peer`` for its current advert and apply it.  Never raises; cancel-safe
        (a cancelled probe counts as sent, not as failed)."""
        self.probes["sent"] += 1
        try:
            stream = await self.host.new_stream(ID(peer), [PROBE_ID])
            frames = FrameStream(stream, 64 * 1024)
            received = False
            try:
                raw = await frames.receive()
                received = True
            finally:  # a probe cut short (quorum, timeout) resets: no wait on a stalled peer
                await end_quietly(stream.close if received else stream.reset)
            try:
                verified = self.verifier.verify(raw, now_ms(), expect=CapabilityAdvert,
                                                sender=peer)
                self.membership.apply(verified, now_ms())
            except ProtocolError as exc:  # the advert it answered the last probe with:
                if exc.reason not in ("replayed", "stale"):  # what we hold is current
                    raise
            self.membership.prove(peer)
        except Exception as exc:  # cancelled probes are not failures: trio.Cancelled passes
            self.probes["failed"] += 1
            log.debug("probe of %s failed: %s", short(peer), exc)
            return False
        self.probes["answered"] += 1
        return True

    async def on_probe(self, stream: Any) -> None:
        """Answer a probe with our current sealed advert (``Membership.probe_answer``).
        Never raises."""
        try:
            with trio.fail_after(2):
                await FrameStream(stream, 64 * 1024).send(self.membership.probe_answer())
                await stream.close()
        except Exception as exc:
            log.debug("probe answer failed: %s", exc)
            await end_quietly(stream.reset)

    # -- learning from jobs -------------------------------------------------------------

    def claim(self, peer_id: bytes, model: str) -> tuple[float, int, int] | None:
        """What the peer's advert claims now — ``model``'s speed, its queue and active jobs —
        which a job sent now is judged against when it comes back (None: not in the table)."""
        entry = self.table.peers.get(peer_id)
        if entry is None:
            return None
        advert = entry.advert
        speed = next((m.tokens_per_s for m in advert.models if m.name == model), 0.0)
        return speed, advert.queue_depth, advert.active_jobs

    def _job_done(self, job: RemoteJob, claim: tuple[float, int, int] | None) -> None:
        """Learn from a finished text job: the speed we measured and the wait we saw,
        against what the peer's advert claimed when we chose it (``claim``)."""
        if claim is None or job.where not in self.table.peers or job.first_at is None \
                or job.ended_at is None:
            return  # (a forgotten peer gets no standing back: state stays bounded)
        claimed, queue_depth, active_jobs = claim
        self.standings[job.where] = after_result(
            self.standings.get(job.where, Standing()), claimed_tokens_per_s=claimed,
            queue_depth=queue_depth, active_jobs=active_jobs,
            max_tokens=job.request.max_tokens, tokens=job.completion.completion_tokens,
            sent_s=job.started_at, first_s=job.first_at, ended_s=job.ended_at)
        self.membership.prove(job.where)

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

