"""Peers' jobs admitted like tenants' requests (tenancy/peers.py)."""

import pytest

from rbee_p2p.errors import Forbidden, QuotaExceeded
from rbee_p2p.tenancy.peers import MAX_PEERS_COUNTED, PeerGate


class Clock:
    now = 1_000_000.0

    def __call__(self):
        return self.now


def test_a_peer_gets_its_requests_a_minute_and_then_waits():
    clock = Clock()
    gate = PeerGate((0, 3, 0), clock=clock)
    for _ in range(3):
        gate.finish(gate.admit(b"p", "m", 10, None), 10)
    with pytest.raises(QuotaExceeded) as info:
        gate.admit(b"p", "m", 10, None)
    assert info.value.retry_after >= 1
    gate.admit(b"q", "m", 10, None)  # another peer has its own count
    clock.now += 61
    gate.admit(b"p", "m", 10, None)


def test_finish_is_idempotent_and_refunds_the_reservation():
    gate = PeerGate((1, 0, 100), clock=Clock())
    admitted = gate.admit(b"p", "m", 80, None)
    assert admitted.reserved == 80
    gate.finish(admitted, 5)
    gate.finish(admitted, 5)
    (usage,) = gate.quotas.status().values()
    assert usage["in_flight"] == 0 and usage["reserved"] == 0 and usage["tokens_today"] == 5


def test_keyless_jobs_in_the_open_swarm_only_where_there_are_no_tenants():
    tenants = [False]
    gate = PeerGate((0, 0, 0), public=True, has_tenants=lambda: tenants[0], clock=Clock())
    gate.admit(b"p", "m", 1, None)
    tenants[0] = True
    with pytest.raises(Forbidden):
        gate.admit(b"p", "m", 1, None)
    gate.admit(b"p", "m", 1, b"r" * 32)
    assert gate.keyless_refused == 1


def test_what_is_kept_per_peer_is_bounded():
    gate = PeerGate((0, 1000, 0), clock=Clock())
    held = gate.admit(b"busy", "m", 1, None)  # in flight: kept whatever comes
    for i in range(3 * MAX_PEERS_COUNTED):
        gate.finish(gate.admit(i.to_bytes(4, "big"), "m", 1, None), 1)
    assert len(gate.quotas.usage) <= MAX_PEERS_COUNTED
    assert gate.quotas.status()[held.tenant.name]["in_flight"] == 1
