"""Routing: pure functions (request, tenant, peer snapshot, now) -> ranked candidates.

Like ``rbee_p2p.protocol`` this package is sans-I/O: no trio, libp2p, sockets or clock.
"""

from .policy import DEFAULT_TOKENS_PER_S, Offer, RouteRequest, fastest_expected_completion

__all__ = ["DEFAULT_TOKENS_PER_S", "Offer", "RouteRequest", "fastest_expected_completion"]
