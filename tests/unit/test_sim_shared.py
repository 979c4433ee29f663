"""The simulator runs the node's code: sampling, probing, admission and reputation are the
very functions the node's mesh calls, and both compose them the same way."""

import math
import os

import numpy as np
import pytest
import trio
import trio.testing

import rbee_p2p.mesh.peers as service  # where the mesh draws, probes and learns
import rbee_p2p.routing as routing
from rbee_p2p.mesh.service import Mesh, MeshConfig
from rbee_p2p.protocol.envelope import Verifier
from rbee_p2p.protocol.identity import NodeKey
from rbee_p2p.protocol.peers import PeerState
from rbee_p2p.routing import ModelFacts, PeerFacts, RequestFacts, probing, reputation, sampling
from rbee_p2p.routing.reputation import Standing
from simulations import policy as sim_policy
from simulations import requests as sim_requests
from simulations import views as sim_views
from simulations.scenario import parse
from simulations.swarm import Swarm
from simulations.world import build_world

SHARED = {
    probing: ["admit_by_ms", "refuses", "draw_pool", "draw_probes", "pool_due", "quorum",
              "to_rank", "weight", "pool_size"],
    reputation: ["after_result", "after_failure", "after_refusal", "effective_speed", "trust",
                 "failure_penalty_ms", "Standing"],
    sampling: ["peer_key"],
    routing: ["RequestFacts"],
}


@pytest.mark.parametrize("module,name", [(m, n) for m, names in SHARED.items() for n in names])
def test_the_simulator_calls_the_very_functions_of_rbee_p2p_routing(module, name):
    used = [m for m in (sim_requests, sim_views) if name in vars(m)]
    assert used and all(getattr(m, name) is getattr(module, name) for m in used)


def test_the_node_calls_them_too():
    for name in ["admit_by_ms", "decided", "draw_pool", "draw_probes", "pool_due", "to_rank",
                 "weighted"]:
        assert getattr(service, name) is getattr(probing, name)
    for name in ["after_result", "after_failure", "after_refusal"]:
        assert getattr(service, name) is getattr(reputation, name)


def test_policy_decisions_are_the_nodes_built_in_policy():
    assert sim_policy.decide is routing.decide and sim_policy.fastest is routing.fastest
    assert sim_policy.expected_ms is routing.expected_ms


# -- the node's Mesh.candidates is the composition the simulator runs -------------------

KEYS = [NodeKey.from_seed(bytes([n]) * 32) for n in range(1, 41)]


def peers_serving(model="m"):
    out = []
    for n, key in enumerate(KEYS[1:]):
        state = "suspect" if n % 7 == 3 else "alive"
        out.append(PeerFacts(id=key.peer_id_str, models=(ModelFacts(model, "text",
                                                                    10.0 + 5 * n),),
                             reputation=1.0 if n % 5 else 0.5, state=state,
                             queue_depth=n % 2))
    return tuple(out)


def run_candidates(monkeypatch, answering, salt_bytes=b"\x01" * 8):
    peers = peers_serving()
    mesh = Mesh(MeshConfig(probe_above=4, probes=6), KEYS[0], local=None, executor=None,
                verifier=Verifier())
    monkeypatch.setattr(mesh.view, "peers", lambda: peers)
    monkeypatch.setattr(service.os, "urandom", lambda n: salt_bytes[:n])
    probed = []

    async def probe(peer):
        probed.append(peer)
        if peer in answering:
            return True
        await trio.sleep(10)  # never answers: the timeout ends the wait
        return False

    monkeypatch.setattr(mesh.view, "_probe", probe)

    async def main():
        return await mesh.candidates("m")

    got = trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    return peers, mesh, probed, got


def expected_candidates(peers, answering, salt_bytes=b"\x01" * 8, probes=6):
    """The simulator's composition (requests.py: _pool, _probe, _decide) on the same facts."""
    key = {p.id: sampling.peer_key(bytes(KEYS[1 + i].peer_id)) for i, p in enumerate(peers)}
    weighted = [(p, key[p.id], probing.weight(p.speed("m"), p.reputation, p.state))
                for p in peers]
    pool = {p.id for p in probing.draw_pool(sampling.peer_key(KEYS[0].peer_id), weighted, probes)}
    chosen = probing.draw_probes(sampling.peer_key(salt_bytes), weighted,
                                 lambda p: p.id in pool, probes)
    answered = [p.id for p in chosen if p.id in answering]
    return set(probing.to_rank([p.id for p in chosen], answered)), chosen


def test_the_mesh_and_the_simulator_pick_the_same_candidates(monkeypatch):
    peers = peers_serving()
    ids = [p.id for p in peers]
    answering = {bytes(k.peer_id) for k in KEYS[1::2]}  # every other peer answers
    _, mesh, probed, got = run_candidates(monkeypatch, answering)
    want, chosen = expected_candidates(peers, {p.id for p in peers
                                               if mesh.view.peer_bytes(p.id) in answering})
    assert sorted(mesh.view.peer_bytes(p.id) for p in chosen) == sorted(probed)
    assert {p.id for p in got} == want
    assert 0 < len(want) < len(chosen) and set(ids) > want


def test_when_nobody_answers_the_probed_peers_are_ranked_by_both(monkeypatch):
    peers, _, probed, got = run_candidates(monkeypatch, answering=set())
    want, chosen = expected_candidates(peers, set())
    assert {p.id for p in got} == want == {p.id for p in chosen} and len(probed) == 6


# -- the simulator's vectorised pool twin is the pure draw ------------------------------

def small_swarm():
    sc = parse({"name": "t", "nodes": 60, "duration_s": 4, "warmup_s": 1,
                "sim": {"observers": 2}})
    return Swarm(sc, build_world(sc))


def test_a_non_observers_pool_is_probing_draw_pool_on_the_nodes_weights():
    s = small_swarm()
    for i in range(s.world.initial):
        s._join(i, initial=True)
    req = s.requests
    e = next(i for i in range(s.n) if i not in s.tables)
    m = s.model[e]
    others = [c for c in s.members[m] if c != e]
    req.standing[e][others[0]] = reputation.after_failure(Standing())
    req.standing[e][others[1]] = Standing(pace=0.3, jobs=3)
    req.suspect[e][others[2]] = (PeerState.SUSPECT, 0.0)
    req.suspect[e][others[3]] = (PeerState.DEAD, 0.0)
    pure = probing.draw_pool(req.keys[e], [(c, req.keys[c], req._weight(e, c, s.claim_speed[c]))
                                           for c in s.members[m] if c != e], s.sc.routing.probes)
    assert req._model_pool(e, m) == pure
    members, weights = req.model_weights(e, m)
    w = dict(zip(members.tolist(), weights.tolist()))
    assert w[others[3]] == 0.0 and w[e] == 0.0
    assert math.isclose(w[others[2]], probing.SUSPECT_WEIGHT * s.claim_speed[others[2]])
    assert w[others[1]] < s.claim_speed[others[1]] and w[others[0]] < s.claim_speed[others[0]]


def test_deadline_admission_is_the_nodes_rule():
    here = PeerFacts(id="x", models=(ModelFacts("m", tokens_per_s=100.0),), queue_depth=1)
    request = RequestFacts("m", max_tokens=100)
    by = probing.admit_by_ms(1_000, here, request)
    assert by == 1_000 + int(1.25 * 2_000) + 250
    assert not probing.refuses(1_750, by, here, request)  # done at 3,750 exactly
    assert probing.refuses(1_751, by, here, request)
    assert not probing.refuses(10**9, None, here, request)


def test_quorum_is_half_the_probes_and_answers_are_ranked_in_probe_order():
    assert [probing.quorum(n) for n in (0, 1, 2, 7, 8, 32)] == [0, 1, 1, 4, 4, 16]
    assert probing.decided(4, 8) and not probing.decided(3, 8)
    assert probing.to_rank([3, 1, 2], [2, 3]) == [3, 2]
    assert probing.to_rank([3, 1, 2], []) == [3, 1, 2]
    assert probing.pool_due(None, 0) and probing.pool_due(0, 5_001)
    assert not probing.pool_due(0, 5_000)


def test_after_result_learns_what_mesh_job_done_learned():
    slow = reputation.after_result(Standing(), claimed_tokens_per_s=300.0, queue_depth=0,
                                   active_jobs=0, max_tokens=64, tokens=64, sent_s=10.0,
                                   first_s=10.05, ended_s=10.05 + 63 / 100.0)
    assert math.isclose(slow.pace, 0.5 + 0.5 * (100.0 / 300.0))
    short = reputation.after_result(Standing(), claimed_tokens_per_s=300.0, queue_depth=0,
                                    active_jobs=0, max_tokens=8, tokens=8, sent_s=0.0,
                                    first_s=0.1, ended_s=0.2)
    assert short == Standing()
    assert reputation.claimed_wait_ms(1, 1, 100, 0.0) == 2 * 100 / 50.0 * 1000


def test_the_vectorised_priorities_are_the_pure_ones_for_node_keys():
    keys = np.array([sampling.peer_key(os.urandom(8)) for _ in range(50)], dtype=np.uint64)
    weights = np.linspace(0.0, 5.0, 50)
    got = sim_policy.priorities(9, keys, weights)
    want = [sampling.priority(9, int(k), float(w)) for k, w in zip(keys, weights)]
    assert np.allclose(got, want, rtol=1e-12)
