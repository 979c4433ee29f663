"""How a large-swarm node finds its candidates and how executors admit their jobs (pure).

One implementation, called by the node's mesh (``rbee_p2p/mesh/peers.py``, ``PeerView``:
``candidates``, ``_weighted``, ``_pool``, ``_admit_by``; the executor's check in
``Dispatcher.run_here``) and by the simulator (``simulations/requests.py``, ``views.py``),
so what the simulator measures is what the node does:

1. **weights** (:func:`weight`, :func:`peer_weight`, :func:`weighted`): a peer's weight is
   the speed it advertises for the model (already discounted by its standing:
   ``places.peer_facts``, ``reputation.effective_speed``) times its trust, a quarter of that
   while it is suspect;
2. **the pool** (:func:`draw_pool`, :func:`pool_due`): ``POOL_PER_PROBE x probes`` peers per
   model, drawn with this node's own key as the salt (``sampling.pool``), redrawn when it is
   older than ``POOL_REDRAW_MS``;
3. **the probes** (:func:`draw_probes`): ``probes`` pool members drawn per request with the
   request's salt (``sampling.pick``) on their current weights;
4. **the quorum** (:func:`quorum`, :func:`decided`): decide once half of the probed peers
   answered, or after the probe timeout (``PROBE_TIMEOUT_MS``), whichever comes first;
5. **what is ranked** (:func:`to_rank`): the peers that answered; when none did, the probed
   ones with what is known of them (a stale view beats none);
6. **deadline admission** (:func:`admit_by_ms`, :func:`refuses`): the requester asks the
   executor to be done by its own estimate x ``ADMIT_SLACK`` + ``ADMIT_MARGIN_MS``; the
   executor refuses ("busy") when its own estimate on its true queue ends later.

Nothing here reads a clock: times come in as ``now_ms``.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable, Sequence, TypeVar

from .facts import PeerFacts, RequestFacts
from .policy import expected_ms
from .sampling import pick, pool

__all__ = ["POOL_PER_PROBE", "POOL_REDRAW_MS", "SUSPECT_WEIGHT", "QUORUM", "PROBE_TIMEOUT_MS",
           "ADMIT_SLACK", "ADMIT_MARGIN_MS", "weight", "peer_weight", "weighted", "pool_size",
           "pool_due",
           "draw_pool", "draw_probes", "quorum", "decided", "to_rank", "admit_by_ms",
           "refuses"]

T = TypeVar("T")

POOL_PER_PROBE = 4
"""A node keeps this many peers per model for each probe it sends per request."""
POOL_REDRAW_MS = 5_000
"""A pool older than this is drawn again (new peers, new standings)."""
SUSPECT_WEIGHT = 0.25
"""A suspect peer is still drawn, less often (it may be back; DEAD peers are not offered)."""
QUORUM = 0.5
"""Decide once this share of the probed peers answered (the nearer ones answer first)."""
PROBE_TIMEOUT_MS = 250
"""... or this long after the probes went out (``MeshConfig.probe_timeout_s``'s default)."""
ADMIT_SLACK = 1.25
"""The executor may be this much later than the requester's estimate ..."""
ADMIT_MARGIN_MS = 250
"""... plus this, for the job's trip and the two clocks' difference."""


def weight(speed: float, reputation: float, state: str) -> float:
    """A peer's weight in the pool and probe draws."""
    return speed * reputation * (1.0 if state == "alive" else SUSPECT_WEIGHT)


def peer_weight(peer: PeerFacts, model: str) -> float:
    """:func:`weight` of what routing sees of a peer (``places.peer_facts``) for ``model``."""
    return weight(peer.speed(model), peer.reputation, peer.state)


def weighted(peers: Iterable[PeerFacts], model: str,
             key: Callable[[PeerFacts], int]) -> list[tuple[PeerFacts, int, float]]:
    """(peer, its sampling key, its :func:`peer_weight` for ``model``) for each peer."""
    return [(p, key(p), peer_weight(p, model)) for p in peers]


def pool_size(probes: int) -> int:
    return POOL_PER_PROBE * max(probes, 0)


def pool_due(drawn_at_ms: int | None, now_ms: int, redraw_ms: int = POOL_REDRAW_MS) -> bool:
    """Whether a pool drawn at ``drawn_at_ms`` (None: never) must be drawn again."""
    return drawn_at_ms is None or now_ms - drawn_at_ms > redraw_ms


def draw_pool(self_key: int, candidates: Sequence[tuple[T, int, float]], probes: int) -> list[T]:
    """The pool: :func:`pool_size` of ``candidates`` ((item, key, weight), from
    :func:`weighted`), salted with this node's key; best-first."""
    return pool(self_key, candidates, pool_size(probes))


def draw_probes(salt: int, candidates: Sequence[tuple[T, int, float]],
                in_pool: Callable[[T], bool], probes: int) -> list[T]:
    """The peers to probe for one request: ``probes`` of the candidates that are in the
    pool, on their current weights, salted per request (e.g. ``peer_key`` of its id)."""
    return pick(salt, [c for c in candidates if in_pool(c[0])], probes)


def quorum(probed: int) -> int:
    """How many answers end the wait (at least one when anything was probed)."""
    return math.ceil(QUORUM * probed) if probed > 0 else 0


def decided(answered: int, probed: int) -> bool:
    """Whether ``answered`` answers out of ``probed`` probes are enough to decide."""
    return answered >= quorum(probed)


def to_rank(probed: Sequence[T], answered: Iterable[T]) -> list[T]:
    """What routing ranks: those that answered (in probe order), else all that were probed."""
    got = set(answered)
    return [p for p in probed if p in got] or list(probed)


def admit_by_ms(now_ms: int, place: PeerFacts, request: RequestFacts) -> int:
    """The deadline a job carries to ``place``: the policy's estimate for it there, with
    slack (someone else's job that got there first makes the executor refuse)."""
    return now_ms + int(ADMIT_SLACK * expected_ms(place, request)) + ADMIT_MARGIN_MS


def refuses(now_ms: int, admit_by: int | None, here: PeerFacts, request: RequestFacts) -> bool:
    """The executor's side: whether a job due by ``admit_by`` must be refused, because
    its own estimate (``here``: its true queue and measured speed) ends later."""
    if admit_by is None:
        return False
    return now_ms + expected_ms(here, request) > admit_by
