"""How an entry node sees the places a request may run (part of ``requests.Requests``).

Flood design: every peer whose advert it holds (compactly, or through an observer's real
``PeerTable``); sample design: its per-model pool, drawn with the node's own
``rbee_p2p.routing.probing`` functions.  A mixin: the state it reads (``self.swarm``,
``self.cfg``, the standings, the pools) belongs to ``Requests``.
"""

from __future__ import annotations

from bisect import bisect_right
from typing import TYPE_CHECKING

import math

import numpy as np

from rbee_p2p.protocol.peers import PeerState
from rbee_p2p.routing.probing import draw_pool, pool_due, pool_size, weight
from rbee_p2p.routing.reputation import effective_speed, failure_penalty_ms, trust

from . import policy
from .policy import Place

if TYPE_CHECKING:
    from .requests import Req

__all__ = ["Views"]

FLOOD_SUSPECT_S = 3.0  # mesh/service.py: suspect_after_s
FLOOD_DEAD_S = 8.0  # mesh/service.py: dead_after_s
DEAD = PeerState.DEAD


class Views:
    def _local_place(self, req: Req) -> list[Place]:
        s, e = self.s, req.entry
        if s.model[e] != req.model or s.leaving[e]:
            return []
        return [Place(e, True, s.speed[e], len(s.queue[e]), 1 if s.running[e] >= 0 else 0,
                      s.max_queue)]

    def _rank_and_try(self, req: Req, places: list[Place]) -> None:
        tr = self.tr
        req.ranked = self.router.rank(self.model_names[req.model], tr.max_tokens[req.rid],
                                      tr.prompt[req.rid], places, self.loop.now_ms())
        req.claims = {p.node: (p.claimed, p.queue_depth, p.active_jobs) for p in places}
        req.places = {p.node: p for p in places}
        self._try(req, 0)

    def _speed(self, e: int, node: int, claimed: float) -> tuple[float, float, float]:
        """(speed to plan with, trust, expected ms lost to failures) for a peer, after what
        this node's jobs there showed (reputation)."""
        if not self.r.reputation:
            return claimed, 1.0, 0.0
        st = self.standing[e].get(node)
        if st is None:
            return claimed, 1.0, 0.0
        return (effective_speed(st, claimed), trust(st),
                failure_penalty_ms(st, self.s.sc.malicious.drop_timeout_s * 1000.0))

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
            speed, trust, penalty = self._speed(e, p, advert.models[0].tokens_per_s)
            places.append(Place(p, False, speed, advert.queue_depth, advert.active_jobs,
                                advert.max_queue, penalty, trust, state,
                                advert.models[0].tokens_per_s))
            ages += now - times[i]
        if self.m.in_window(now) and places:
            self.m.staleness.append(ages / len(places))
        return places

    def _table_places(self, req: Req) -> list[Place]:
        """An observer's places, straight from its real PeerTable: every peer not DEAD,
        suspect ones included (as Mesh.peers)."""
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
                    speed, trust, penalty = self._speed(e, node, model.tokens_per_s)
                    out.append(Place(node, False, speed, advert.queue_depth,
                                     advert.active_jobs, advert.max_queue, penalty, trust,
                                     entry.state.value, model.tokens_per_s))
        return out

    # -- the sample design: Mesh.candidates ---------------------------------------------

    def _state(self, e: int, c: int) -> str | None:
        """How node e sees peer c: "alive", "suspect", or None (DEAD: not offered, as
        ``Mesh.peers`` leaves DEAD peers out)."""
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

    def _weight(self, e: int, c: int, claimed: float) -> float:
        """``probing.weight`` of peer c as node e's ``Mesh._weighted`` computes it."""
        state = self._state(e, c)
        if state is None:
            return 0.0
        speed, trust_, _ = self._speed(e, c, claimed)
        return weight(speed, trust_, state)

    def _pool(self, e: int, m: int) -> tuple[list[int], set[int]]:
        """This node's pool for model m, redrawn when ``probing.pool_due`` (``Mesh._pool``)."""
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
        ``weight(claimed, 1.0, "alive")`` = its claimed speed; the others are computed by
        ``_weight``); peers it has not heard of yet weigh 0."""
        s, now = self.s, self.loop.now
        members = np.array(s.members[m], dtype=np.int64)
        weights = self.claim_np[members].copy() if members.size else np.zeros(0)
        weights[members == e] = 0.0
        joined_e = s.world.join[e]
        for p, heard in s.pending_heard.items():
            if s.model[p] == m and s.world.join[p] > joined_e and heard[e] > now:
                weights[members == p] = 0.0  # not heard of yet
        pos = s._member_pos[m]
        for c in set(self.standing[e]) | set(self.suspect[e]):
            i = pos.get(c)
            if i is not None and c != e and weights[i] > 0.0:
                weights[i] = self._weight(e, c, s.claim_speed[c])
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
                    candidates.append((node, self.keys[node],
                                       self._weight(e, node, model.tokens_per_s)))
        return draw_pool(self.keys[e], candidates, self.r.probes)

