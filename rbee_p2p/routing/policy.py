"""Built-in routing policy: fastest expected completion (pure).

A policy ranks the places that can run a request: this node and the live peers that serve
the model.  Everything it needs arrives as plain values; it reads no clock and does no I/O,
so the node and the simulator run the same code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

__all__ = ["RouteRequest", "Offer", "fastest_expected_completion", "DEFAULT_TOKENS_PER_S"]

DEFAULT_TOKENS_PER_S = 50.0
"""Assumed speed of a model nobody has measured yet."""


@dataclass(frozen=True)
class RouteRequest:
    model: str
    max_tokens: int


@dataclass(frozen=True)
class Offer:
    """One place that serves the model: this node (``peer_id`` None) or a peer."""

    peer_id: bytes | None
    tokens_per_s: float
    queue_depth: int
    active_jobs: int
    max_queue: int
    latency_ms: float = 0.0

    @property
    def local(self) -> bool:
        return self.peer_id is None

    def expected_ms(self, request: RouteRequest) -> float:
        """Time until this request would be complete: the jobs ahead of it (assumed to be
        like it) plus its own run, plus the network round trip."""
        speed = self.tokens_per_s if self.tokens_per_s > 0 else DEFAULT_TOKENS_PER_S
        run_ms = request.max_tokens / speed * 1000.0
        return (self.queue_depth + self.active_jobs + 1) * run_ms + self.latency_ms


def fastest_expected_completion(request: RouteRequest, offers: Sequence[Offer], *,
                                local_margin: float = 0.1) -> list[Offer]:
    """Offers best-first by expected completion time; full queues are left out.

    Local-first on ties: this node wins unless a peer is expected to finish more than
    ``local_margin`` (10%) sooner, so equal machines do not bounce work across the network.
    """
    open_offers = [o for o in offers if o.queue_depth < o.max_queue]

    def key(offer: Offer) -> tuple[float, int]:
        expected = offer.expected_ms(request)
        return (expected * (1.0 - local_margin) if offer.local else expected, 0 if offer.local else 1)

    return sorted(open_offers, key=key)
