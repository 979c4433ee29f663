"""How often a node re-announces itself, scaled to the swarm (pure).

Flooding a message to every node of a GossipSub topic costs every node about ``degree``
copies of it.  A swarm where each of N nodes re-advertises every ``interval`` therefore
costs each node about ``N / interval * size * degree`` bytes per second: fine for ten nodes
at one advert a second, megabytes per second for a thousand.  So membership adverts (who
is out there and what it serves, which changes rarely) are re-sent on an interval that
grows with the number of peers a node knows, keeping the whole swarm near a fixed budget of
adverts per second; load, which changes every job, is not flooded at scale but asked for
when routing (see ``rbee_p2p.routing.sampling``).  A node still advertises at once when
what it serves changes; the interval only paces the reminders.

Liveness follows from the interval: a peer is suspect after missing a few reminders.
Failed requests make a peer suspect much sooner (``PeerTable.report_failure``).
"""

from __future__ import annotations

__all__ = ["membership_interval_ms", "liveness_limits_ms", "BUDGET_PER_S", "FLOOR_MS",
           "CEILING_MS"]

BUDGET_PER_S = 0.5
"""Membership adverts per second for the whole swarm (reminders; changes come on top)."""
FLOOR_MS = 30_000
CEILING_MS = 86_400_000


def membership_interval_ms(known_peers: int, *, budget_per_s: float = BUDGET_PER_S,
                           floor_ms: int = FLOOR_MS, ceiling_ms: int = CEILING_MS) -> int:
    """Milliseconds between one node's membership reminders when it knows ``known_peers``
    others: (peers + 1) / budget, clamped to [floor, ceiling].  Raises ValueError for a
    budget <= 0 or a floor above the ceiling."""
    if budget_per_s <= 0 or floor_ms > ceiling_ms:
        raise ValueError("need budget_per_s > 0 and floor_ms <= ceiling_ms")
    wanted = (max(known_peers, 0) + 1) / budget_per_s * 1000.0
    return int(min(max(wanted, floor_ms), ceiling_ms))


def liveness_limits_ms(interval_ms: int) -> tuple[int, int, int]:
    """(suspect_after, dead_after, forget_after) for a PeerTable fed by reminders every
    ``interval_ms``: suspect after three missed reminders, dead after six, forgotten after
    twelve."""
    if interval_ms <= 0:
        raise ValueError("interval_ms must be positive")
    return 3 * interval_ms, 6 * interval_ms, 12 * interval_ms
