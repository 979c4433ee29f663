"""Routing: pure functions (request, tenant, peer snapshot, now) -> ranked candidates.

Like ``rbee_p2p.protocol`` this package is sans-I/O: no trio, libp2p, sockets or clock.
"""
