"""The pure modules the simulation argues for: candidate sampling, reputation, cadence."""

import math
import random

import numpy as np
import pytest

from rbee_p2p.protocol.cadence import liveness_limits_ms, membership_interval_ms
from rbee_p2p.routing import reputation as rep
from rbee_p2p.routing.facts import DEFAULT_TOKENS_PER_S
from rbee_p2p.routing import sampling
from simulations import policy


def candidates(n, seed=0):
    rng = random.Random(seed)
    return [(i, sampling.peer_key(bytes([i % 256, i // 256])), rng.uniform(1, 100))
            for i in range(n)]


def test_draws_are_pure_functions_of_their_inputs():
    c = candidates(200)
    assert sampling.pick(7, c, 5) == sampling.pick(7, list(c), 5)
    assert sampling.pick(7, c, 5) != sampling.pick(8, c, 5)
    assert len(set(sampling.pool(1, c, 64))) == 64


def test_zero_weights_are_never_drawn_and_k_is_bounded():
    c = [(0, 11, 0.0), (1, 12, 1.0), (2, 13, -1.0)]
    assert sampling.pick(3, c, 5) == [1]
    assert sampling.pick(3, c, 0) == []
    assert math.isinf(sampling.priority(1, 2, 0.0))


def test_heavier_peers_are_drawn_more_often():
    c = [(0, sampling.peer_key(b"a"), 1.0), (1, sampling.peer_key(b"b"), 4.0)]
    wins = sum(sampling.pick(salt, c, 1) == [1] for salt in range(4000))
    assert 0.75 < wins / 4000 < 0.85  # 4 / (1 + 4)


def test_each_node_draws_its_own_pool():
    c = candidates(1000)
    a, b = set(sampling.pool(1, c, 64)), set(sampling.pool(2, c, 64))
    assert len(a & b) < 32


def test_the_vectorised_twin_picks_the_same_peers():
    c = candidates(3000, seed=3)
    keys = np.array([k for _, k, _ in c], dtype=np.uint64)
    weights = np.array([w for _, _, w in c])
    for salt in (0, 1, 2**63 + 5, sampling.peer_key(b"node")):
        assert policy.pool_many(salt, keys, weights, 64).tolist() == sampling.pool(salt, c, 64)
        expected = [sampling.priority(salt, k, w) for _, k, w in c[:50]]
        assert np.allclose(policy.priorities(salt, keys[:50], weights[:50]), expected,
                           rtol=1e-12)


def test_honest_peers_keep_their_trust():
    s = rep.Standing()
    for _ in range(10):
        s = rep.after_job(s, claimed_tokens_per_s=100, measured_tokens_per_s=104,
                          claimed_wait_ms=3000, observed_wait_ms=2500)
    assert rep.trust(s) == 1.0 and s.jobs == 10


def test_liars_sink_within_a_few_jobs():
    s = rep.Standing()
    for _ in range(3):  # claims 3x its speed and an empty queue
        s = rep.after_job(s, claimed_tokens_per_s=300, measured_tokens_per_s=100,
                          claimed_wait_ms=0, observed_wait_ms=8000)
    assert rep.trust(s) < 0.4
    assert rep.effective_speed(s, 300) < 120


def test_a_claim_is_planned_at_no_more_than_was_measured():
    """An unmeasured peer is planned at the default speed at most, whatever it claims; its
    jobs raise that only to what they were measured to stream at."""
    fresh = rep.Standing()
    assert rep.effective_speed(fresh, 1e7) == DEFAULT_TOKENS_PER_S
    assert rep.effective_speed(fresh, 20) == 20  # a modest claim stands
    assert rep.effective_speed(fresh, 0) == 0  # no claim: the default applies later
    assert rep.effective_speed(fresh, 1e3, believe=True) == 1e3  # one owner's private swarm
    s = fresh
    for _ in range(4):  # an honest fast peer: measured at 200, raised to it
        s = rep.after_job(s, claimed_tokens_per_s=210, measured_tokens_per_s=200,
                          claimed_wait_ms=0, observed_wait_ms=0)
    assert s.measured_tokens_per_s == 200
    assert 190 < rep.effective_speed(s, 210) <= 200
    liar = rep.after_job(fresh, claimed_tokens_per_s=1e7, measured_tokens_per_s=30,
                         claimed_wait_ms=0, observed_wait_ms=0)
    assert rep.effective_speed(liar, 1e7) <= 30


def test_failures_cost_trust_and_good_jobs_restore_it():
    s = rep.after_failure(rep.after_failure(rep.Standing()))
    low = rep.trust(s)
    assert low < 0.1
    for _ in range(4):
        s = rep.after_job(s, claimed_tokens_per_s=50, measured_tokens_per_s=50,
                          claimed_wait_ms=0, observed_wait_ms=0)
    assert rep.trust(s) > 0.8 > low
    for _ in range(20):
        s = rep.after_failure(s)
    assert rep.trust(s) == rep.FLOOR
    assert rep.failure_penalty_ms(rep.Standing(), 10_000) == 0
    assert rep.failure_penalty_ms(s, 10_000) == pytest.approx(0.95 / 0.05 * 10_000)


@pytest.mark.parametrize("peers, expected", [(0, 30_000), (10, 30_000), (999, 2_000_000),
                                             (10**6, 86_400_000), (10**5, 86_400_000), (10_000, 20_002_000)])
def test_membership_interval_grows_with_the_swarm(peers, expected):
    assert membership_interval_ms(peers) == expected


def test_membership_interval_and_liveness_refuse_nonsense():
    with pytest.raises(ValueError):
        membership_interval_ms(10, budget_per_s=0)
    with pytest.raises(ValueError):
        membership_interval_ms(10, floor_ms=10, ceiling_ms=5)
    with pytest.raises(ValueError):
        liveness_limits_ms(0)
    assert liveness_limits_ms(1000) == (3000, 6000, 12000)


def test_refusals_after_claiming_room_sink_a_liar_but_good_jobs_restore_an_honest_peer():
    s = rep.Standing()
    for _ in range(3):
        s = rep.after_refusal(s)
    assert rep.effective_speed(s, 300) < 50
    for _ in range(5):
        s = rep.after_job(s, claimed_tokens_per_s=100, measured_tokens_per_s=100,
                          claimed_wait_ms=0, observed_wait_ms=0)
    assert rep.trust(s) > 0.9
