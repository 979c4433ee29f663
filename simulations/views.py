"""How an entry node sees the places a request may run (part of ``requests.Requests``).

Flood design: every peer whose advert it holds (compactly, or through an observer's real
``PeerTable``); sample design: its per-model pool, drawn with the node's own
``rbee_p2p.routing.probing`` functions.  What routing sees of each peer is the node's own
``rbee_p2p.routing.places.peer_facts`` (``PeerView.peers``, ``rbee_p2p/mesh/peers.py``) of
the advert this node holds, its standing there and the round trip it measured, smoothed
with the node's ``smoothed_rtt``.  A mixin: the state it reads (``self.s``, ``self.r``, the
standings, the pools, the round trips) belongs to ``Requests``.
"""

from __future__ import annotations

from bisect import bisect_right
from typing import TYPE_CHECKING

import math

import numpy as np

from rbee_p2p.mesh.settings import MeshConfig
from rbee_p2p.protocol.messages import CapabilityAdvert
from rbee_p2p.protocol.peers import PeerState
from rbee_p2p.routing import PeerFacts
from rbee_p2p.routing.facts import DEFAULT_TOKENS_PER_S
from rbee_p2p.routing.places import peer_facts, smoothed_rtt
from rbee_p2p.routing.probing import draw_pool, peer_weight, pool_due, pool_size

from . import policy
from .policy import Place

if TYPE_CHECKING:
    from .requests import Req

__all__ = ["Views", "NODE"]

NODE = MeshConfig()
"""The node's defaults: every node of the simulation runs with them."""
FLOOD_SUSPECT_S = NODE.suspect_after_s  # a small swarm's PeerTable limits (MeshConfig)
FLOOD_DEAD_S = NODE.dead_after_s
FRAME_TIMEOUT_S = NODE.timing.frame_timeout_s  # what a failure costs (PeerView.peers)
PING_INTERVAL_S = NODE.ping_interval_s  # mesh/latency.py pings each connected peer this often
PING_BYTES = 32 + 40  # the ping's payload, yamux + noise framing
FACTS_CACHE_MAX = 100_000  # peer facts kept for reuse (a few per peer and standing)
DEAD = PeerState.DEAD


class Views:
    def _local_place(self, req: Req) -> list[Place]:
        s, e = self.s, req.entry
        if s.model[e] != req.model or s.leaving[e]:
            return []
        name = self.model_names[req.model]
        return [Place(e, self.router.local_facts(name, e, s.speed[e], len(s.queue[e]),
                                                 1 if s.running[e] >= 0 else 0, s.max_queue,
                                                 s.wire.jurisdiction[e]), s.speed[e])]

    def _rank_and_try(self, req: Req, places: list[Place]) -> None:
        tr = self.tr
        req.ranked = self.router.rank(self.model_names[req.model], tr.max_tokens[req.rid],
                                      tr.prompt[req.rid], places, self.loop.now_ms())
        req.claims = {p.node: (p.claimed, p.facts.queue_depth, p.facts.active_jobs)
                      for p in places}
        req.places = {p.node: p for p in places}
        self._try(req, 0)

    def _facts(self, e: int, c: int, advert: CapabilityAdvert, state: str,
               rtt_ms: float = 0.0, cache: bool = True) -> PeerFacts:
        """Peer c as node e's routing sees it: the node's own ``peer_facts`` of the advert e
        holds, with e's standing there (reputation) and the round trip e measured.  Cached
        while those are the same (``PeerView.peers`` caches per advert and standing too);
        ``cache=False`` for an advert seen once (a probe's answer)."""
        standing = self.standing[e].get(c) if self.r.reputation else None
        if not cache:
            return peer_facts(self.router.id(c), advert, state, standing, FRAME_TIMEOUT_S,
                              rtt_ms, jurisdiction=advert.jurisdiction)
        key = (c, state, standing)
        cached = self.facts_cache.get(key)
        if cached is None or cached[0] is not advert or cached[1] != rtt_ms:
            if len(self.facts_cache) >= FACTS_CACHE_MAX:  # old standings' entries
                self.facts_cache.clear()
            cached = self.facts_cache[key] = (advert, rtt_ms, peer_facts(
                self.router.id(c), advert, state, standing, FRAME_TIMEOUT_S, rtt_ms,
                # the simulated operators attested what their peers claim
                jurisdiction=advert.jurisdiction))
        return cached[2]

    def _place(self, e: int, c: int, advert: CapabilityAdvert, state: str,
               rtt_ms: float = 0.0, cache: bool = True) -> Place:
        claimed = advert.models[0].tokens_per_s if advert.models else 0.0
        return Place(c, self._facts(e, c, advert, state, rtt_ms, cache), claimed)

    def _member_advert(self, c: int) -> CapabilityAdvert:
        """What a node that is no observer holds of peer c: its membership advert (what it
        serves and the speed it claims; no load: large swarms do not flood it)."""
        advert = self.member_adverts.get(c)
        if advert is None:
            s = self.s
            advert = self.member_adverts[c] = s.wire.advert(
                c, 0, tokens_per_s=s.claim_speed[c], queue_depth=0, active_jobs=0,
                max_queue=s.max_queue)
        return advert

    # -- measured round trips (mesh/latency.py) -----------------------------------------

    def _connected(self, e: int, c: int) -> None:
        """e opened a stream to c (a probe, a job): from now on e's ping loop measures the
        round trip, the first time half a ping interval later (on average)."""
        if self.r.rtt_latency and c not in self.rtts[e]:
            self.rtts[e][c] = [self.loop.now - PING_INTERVAL_S / 2, None]

    def _rtt_ms(self, e: int, c: int) -> float:
        """e's smoothed round trip to c (``smoothed_rtt`` of its pings, one per
        ``ping_interval_s``; 0 until the first answer, as ``PeerView.peers``).  Pings are
        folded in lazily, when the value is read: one sample for the intervals since."""
        if not self.r.rtt_latency:
            return 0.0
        got = self.rtts[e].get(c)
        if got is None:
            return 0.0
        now, net = self.loop.now, self.net
        if now - got[0] >= PING_INTERVAL_S:
            got[0] = now
            if self.s.alive[c] and net.reachable(e, c):
                sample = (net.delay(e, c, PING_BYTES) + net.delay(c, e, PING_BYTES)) * 1000.0
                got[1] = smoothed_rtt(got[1], sample)
        return got[1] or 0.0

    # -- the flood design ---------------------------------------------------------------

    def _dist(self, e: int) -> list[float]:
        cached = self.dists.get(e)
        if cached is None or cached[0] != self.s.mesh.version:
            size = self.s.advert_size[e]
            cached = (self.s.mesh.version, self.s.mesh.distances_to(e, size).tolist())
            self.dists[e] = cached
        return cached[1]

    def _flood_places(self, req: Req) -> list[Place]:
        s, e = self.s, req.entry
        places = self._local_place(req)
        if e in s.tables:
            table_places = self._table_places(req)
            if s.sc.sim.check_views:
                self._compare([p.node for p in table_places],
                              [p.node for p in self._history_places(req)])
            return places + table_places
        return places + self._history_places(req)

    def _compare(self, real: list[int], compact: list[int]) -> None:
        """Count how far an observer's real view and the compact one differ (Jaccard)."""
        a, b = set(real), set(compact)
        union = len(a | b)
        self.m.counters["view_checks"] += 1
        if union:
            self.m.counters["view_mismatch_permille"] += round(1000 * (1 - len(a & b) / union))

    def _history_places(self, req: Req) -> list[Place]:
        """The flood view of a non-observer: each peer's newest advert that has reached
        this node over the mesh, unless older than the PeerTable's suspect limit or
        older than a failure seen since."""
        s, e, now = self.s, req.entry, self.loop.now
        places: list[Place] = []
        dist, suspect = self._dist(e), self.suspect[e]
        ages = 0.0
        for p in s.members[req.model]:
            times = s.hist_t[p]
            if p == e or not times or dist[p] == math.inf:
                continue
            i = bisect_right(times, now - dist[p]) - 1
            if i < 0:
                continue
            received = times[i] + dist[p]
            if now - received > FLOOD_DEAD_S:
                continue  # DEAD: not offered
            failed = suspect.get(p)
            state = "suspect" if now - received > FLOOD_SUSPECT_S or (
                failed is not None and failed[1] >= received) else "alive"
            advert = s.hist_a[p][i]
            if not advert.models:
                continue
            places.append(self._place(e, p, advert, state, self._rtt_ms(e, p)))
            ages += now - times[i]
        if self.m.in_window(now) and places:
            self.m.staleness.append(ages / len(places))
        return places

    def _table_places(self, req: Req) -> list[Place]:
        """An observer's places, straight from its real PeerTable: every peer not DEAD,
        suspect ones included (as ``PeerView.peers``)."""
        s, e = self.s, req.entry
        name = self.model_names[req.model]
        out = []
        for entry in s.tables[e].peers.values():
            if entry.state is DEAD:
                continue
            advert = entry.advert
            for model in advert.models:
                if model.name == name:
                    node = s.wire.index[entry.peer_id]
                    out.append(self._place(e, node, advert, entry.state.value,
                                           self._rtt_ms(e, node)))
        return out

    # -- the sample design: PeerView.candidates ------------------------------------------

    def _state(self, e: int, c: int) -> str | None:
        """How node e sees peer c: "alive", "suspect", or None (DEAD: not offered, as
        ``PeerView.peers`` leaves DEAD peers out)."""
        s = self.s
        if e in s.tables:
            entry = s.tables[e].peers.get(s.wire.peer_ids[c])
            if entry is None or entry.state is DEAD:
                return None
            return entry.state.value
        failed = self.suspect[e].get(c)
        if failed is None:
            return "alive"
        return None if failed[0] is DEAD else failed[0].value

    def _held_advert(self, e: int, c: int) -> CapabilityAdvert | None:
        """The advert of peer c that node e holds: an observer's table entry, else the
        membership advert."""
        s = self.s
        if e in s.tables:
            entry = s.tables[e].peers.get(s.wire.peer_ids[c])
            return None if entry is None else entry.advert
        return self._member_advert(c)

    def _weight(self, e: int, c: int) -> float:
        """Peer c's weight in node e's draws, as ``PeerView._weighted`` computes it:
        ``probing.peer_weight`` of the node's ``peer_facts`` of it."""
        state = self._state(e, c)
        advert = None if state is None else self._held_advert(e, c)
        if advert is None or not advert.models:
            return 0.0
        return peer_weight(self._facts(e, c, advert, state), advert.models[0].name)

    def _pool(self, e: int, m: int) -> tuple[list[int], set[int]]:
        """This node's pool for model m, redrawn when ``probing.pool_due``
        (``PeerView._pool``)."""
        s, now_ms = self.s, self.loop.now_ms()
        cached = self.pools.get((e, m))
        if cached is not None and not pool_due(cached[0], now_ms):
            return cached[1], cached[2]
        if e in s.tables:
            pool = self._table_pool(e, m)
            if s.sc.sim.check_views:
                self._compare(pool, self._model_pool(e, m))
        else:
            pool = self._model_pool(e, m)
        self.pools[(e, m)] = (now_ms, pool, set(pool))
        return pool, set(pool)

    def model_weights(self, e: int, m: int) -> tuple[np.ndarray, np.ndarray]:
        """(members, weights) of a non-observer's pool draw for model m: the vectorised
        form of ``probing.weighted`` (a peer nothing was learned about weighs
        ``peer_weight`` of its membership advert's facts = its claimed speed, at most the
        default an unmeasured peer is planned at; the others are computed by ``_weight``);
        peers it has not heard of yet weigh 0."""
        s, now = self.s, self.loop.now
        members = np.array(s.members[m], dtype=np.int64)
        claims = self.claim_np[members] if members.size else np.zeros(0)
        weights = np.minimum(np.where(claims > 0, claims, DEFAULT_TOKENS_PER_S),
                             DEFAULT_TOKENS_PER_S)
        weights[members == e] = 0.0
        joined_e = s.world.join[e]
        for p, heard in s.pending_heard.items():
            if s.model[p] == m and s.world.join[p] > joined_e and heard[e] > now:
                weights[members == p] = 0.0  # not heard of yet
        pos = s._member_pos[m]
        for c in set(self.standing[e]) | set(self.suspect[e]):
            i = pos.get(c)
            if i is not None and c != e and weights[i] > 0.0:
                weights[i] = self._weight(e, c)
        return members, weights

    def _model_pool(self, e: int, m: int) -> list[int]:
        members, weights = self.model_weights(e, m)
        if members.size == 0:
            return []
        chosen = policy.pool_many(self.keys[e], self.keys_np[members], weights,
                                  pool_size(self.r.probes))
        return members[chosen].tolist()

    def _table_pool(self, e: int, m: int) -> list[int]:
        s = self.s
        name = self.model_names[m]
        candidates = []
        for entry in s.tables[e].peers.values():
            if entry.state is DEAD:
                continue
            for model in entry.advert.models:
                if model.name == name:
                    node = s.wire.index[entry.peer_id]
                    candidates.append((node, self.keys[node], self._weight(e, node)))
        return draw_pool(self.keys[e], candidates, self.r.probes)

