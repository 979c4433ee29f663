"""Every call from the simulator into ``rbee_p2p.routing``'s policy, in one place.

The rest of the simulator speaks :class:`Place` (a node index and what routing sees of it:
for a peer the node's own ``routing.places.peer_facts`` of an advert, built in
``views.py``) and node indices; this module ranks places with ``decide(fastest, ...)`` as
the dispatcher does, and builds the one thing the node does not get from an advert: this
node's own facts (:meth:`Router.local_facts`, as ``Dispatcher.local_facts``).

Sampling, probing, admission and reputation are not adapted here: ``requests.py`` and
``views.py`` call ``rbee_p2p.routing.places`` / ``probing`` / ``sampling`` / ``reputation``
directly, the very functions the node's mesh calls (``tests/unit/test_sim_shared.py``
checks they are the same objects).

Also here: a vectorised twin of :func:`rbee_p2p.routing.sampling.priority` for drawing
pools over thousands of peers at once.  It is the same arithmetic (splitmix64 in uint64,
the same 53-bit unit, natural log); ``tests/unit/test_sim_pure.py`` checks that it picks
the same peers as the pure function, and ``test_sim_shared.py`` that a non-observer's pool
is the one ``probing.draw_pool`` draws.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from rbee_p2p.protocol.identity import peer_id_to_str
from rbee_p2p.routing import (ModelFacts, PeerFacts, Ranked, RequestFacts, Snapshot, decide,
                              expected_ms, fastest)

__all__ = ["Place", "Router", "priorities", "pool_many"]


@dataclass(slots=True)
class Place:
    """One place a request could run, as the deciding node sees it."""

    node: int
    facts: PeerFacts  # what routing sees: a peer's from ``peer_facts``, ours from local_facts
    claimed: float = 0.0  # the speed its advert claims (facts: after reputation)


class Router:
    """Ranks places with the node's built-in policy (``decide(fastest, ...)``, as the
    dispatcher does); counts decisions and their CPU time."""

    def __init__(self, peer_ids: Sequence[bytes]) -> None:
        self.peer_ids = peer_ids
        self._ids: dict[int, str] = {}
        self._nodes: dict[str, int] = {}
        self.decisions = 0
        self.seconds = 0.0
        self.places = 0

    def id(self, node: int) -> str:
        """The node's base58 peer id (encoded once)."""
        text = self._ids.get(node)
        if text is None:
            text = self._ids[node] = peer_id_to_str(self.peer_ids[node])
            self._nodes[text] = node
        return text

    def local_facts(self, model: str, node: int, tokens_per_s: float, queue_depth: int,
                    active_jobs: int, max_queue: int, jurisdiction: str = "") -> PeerFacts:
        """This node as its own dispatcher sees it (``Dispatcher.local_facts``: its measured
        speed, its scheduler's load)."""
        return PeerFacts(id=self.id(node), local=True,
                         models=(ModelFacts(model, "text", tokens_per_s),),
                         queue_depth=queue_depth, active_jobs=active_jobs,
                         max_queue=max_queue, jurisdiction=jurisdiction)

    def rank(self, model: str, max_tokens: int, prompt_tokens: int,
             places: Sequence[Place], now_ms: int = 0) -> list[int]:
        """Node indices best-first (full places left out), as the node's dispatcher would
        try them; empty when the policy rejects."""
        started = time.perf_counter()
        facts = [p.facts for p in places]
        local = next((f for f in facts if f.local), None)
        snapshot = Snapshot(local=local, peers=tuple(f for f in facts if not f.local),
                            now_ms=now_ms)
        request = RequestFacts(model=model, max_tokens=max_tokens, prompt_tokens=prompt_tokens)
        decision = decide(fastest, request, snapshot, "fastest")
        out = ([self._nodes[pid] for pid in decision.candidates]
               if isinstance(decision, Ranked) else [])
        self.seconds += time.perf_counter() - started
        self.decisions += 1
        self.places += len(places)
        return out

    def expected_ms(self, model: str, max_tokens: int, place: Place) -> float:
        """The policy's own estimate of when a request would be done at ``place``."""
        return expected_ms(place.facts, RequestFacts(model=model, max_tokens=max_tokens))

    def node(self, peer_id: str) -> int:
        return self._nodes[peer_id]


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def _splitmix(x: np.ndarray) -> np.ndarray:
    z = x + _GOLDEN
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


def priorities(salt: int, keys: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """:func:`sampling.priority` for many peers (``keys`` uint64, ``weights`` float)."""
    h = _splitmix(np.uint64(salt) ^ _splitmix(keys))
    u = ((h >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0**-53
    with np.errstate(divide="ignore"):
        return np.where(weights > 0, -np.log(u) / weights, np.inf)


def pool_many(salt: int, keys: np.ndarray, weights: np.ndarray, size: int) -> np.ndarray:
    """Positions of the ``size`` smallest priorities, best-first (= :func:`pool`)."""
    pr = priorities(salt, keys, weights)
    finite = int(np.isfinite(pr).sum())
    size = min(size, finite)
    if size <= 0:
        return np.empty(0, dtype=np.int64)
    if size < len(pr):
        part = np.argpartition(pr, size - 1)[:size]
    else:
        part = np.arange(len(pr))
    order = np.lexsort((keys[part], pr[part]))
    return part[order]
