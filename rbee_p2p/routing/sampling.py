"""Candidate sampling for swarms too large to know everyone's load (pure).

At thousands of nodes no node can follow every peer's load: flooding load adverts costs
every node megabytes per second (see simulations/README.md).  Instead a node

1. keeps a *pool* per model: a bounded, weighted random sample of the peers it knows serve
   that model (:func:`pool`), drawn with its own id as the salt, so every node holds a
   different sample and no peer is everybody's favourite;
2. for each request, picks a few candidates from that pool (:func:`pick`, salted with the
   request id), asks them for their current advert (a probe), and lets the routing policy
   rank the answers: the "power of d choices".

Both draws are weighted sampling without replacement by exponential keys
(Efraimidis-Spirakis): a peer of weight ``w`` gets the key ``-ln(u) / w`` with ``u``
uniform in (0, 1), and the ``k`` smallest keys win.  ``u`` comes from a 64-bit hash of
(salt, peer), so a draw is a pure function of its inputs: reproducible, nothing to store,
and computable in bulk (the simulator has a vectorised twin of :func:`priority` that a test
holds to the same results).  Nothing here reads a clock or a random source.
"""

from __future__ import annotations

import hashlib
import heapq
import math
from typing import Sequence, TypeVar

__all__ = ["peer_key", "mix", "unit", "priority", "pool", "pick", "MASK64"]

MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_M1 = 0xBF58476D1CE4E5B9
_M2 = 0x94D049BB133111EB

T = TypeVar("T")


def peer_key(peer_id: bytes) -> int:
    """A 64-bit key for a peer ID (or any salt bytes, e.g. a request id)."""
    return int.from_bytes(hashlib.blake2b(peer_id, digest_size=8).digest(), "big")


def _splitmix(x: int) -> int:
    z = (x + _GOLDEN) & MASK64
    z = ((z ^ (z >> 30)) * _M1) & MASK64
    z = ((z ^ (z >> 27)) * _M2) & MASK64
    return z ^ (z >> 31)


def mix(salt: int, key: int) -> int:
    """A 64-bit hash of (salt, key): splitmix64 of the salt xor splitmix64 of the key."""
    return _splitmix(salt ^ _splitmix(key))


def unit(h: int) -> float:
    """The top 53 bits of ``h`` as a float strictly inside (0, 1)."""
    return ((h >> 11) + 0.5) * 2.0**-53


def priority(salt: int, key: int, weight: float) -> float:
    """The exponential key of a peer: smaller wins; ``inf`` for a weight <= 0 (never
    drawn while anything of positive weight is left)."""
    if weight <= 0.0:
        return math.inf
    return -math.log(unit(mix(salt, key))) / weight


def _smallest(salt: int, items: Sequence[tuple[T, int, float]], k: int) -> list[T]:
    if k <= 0:
        return []
    keyed = [(priority(salt, key, weight), key, n)
             for n, (_, key, weight) in enumerate(items) if weight > 0.0]
    return [items[n][0] for _, _, n in heapq.nsmallest(k, keyed)]


def pool(self_key: int, candidates: Sequence[tuple[T, int, float]], size: int) -> list[T]:
    """The ``size`` peers this node keeps for one model, best-first.

    ``candidates`` are (item, peer_key, weight): weight is what makes a peer worth keeping
    (its advertised speed for the model, times trust); peers of weight <= 0 are left out.
    Salted with this node's own key, so each node draws its own sample.  Ties on the key
    (practically impossible) fall back to the peer key, then the input order.
    """
    return _smallest(self_key, candidates, size)


def pick(salt: int, candidates: Sequence[tuple[T, int, float]], k: int) -> list[T]:
    """``k`` candidates to probe for one request (salt: e.g. :func:`peer_key` of the
    request id), weighted sampling without replacement; best-first.  Same rules as
    :func:`pool`."""
    return _smallest(salt, candidates, k)
