"""The simulator runs the node's code: peer facts, sampling, probing, admission and
reputation are the very functions the node's mesh calls, both compose them the same way,
and the simulator's constants are the node's defaults."""

import math
import os

import numpy as np
import pytest
import trio
import trio.testing

import ast
import dataclasses
from pathlib import Path

import rbee_p2p.mesh.latency as latency
import rbee_p2p.mesh.membership as membership
import rbee_p2p.mesh.peers as service  # where the mesh draws, probes and learns
import rbee_p2p.mesh.settings as settings
import rbee_p2p.routing as routing
from rbee_p2p.mesh.executor import Timing
from rbee_p2p.mesh.service import Mesh, MeshConfig
from rbee_p2p.protocol.envelope import Verifier
from rbee_p2p.protocol.identity import NodeKey
from rbee_p2p.protocol.peers import PeerState, PeerTable
from rbee_p2p.routing import (ModelFacts, PeerFacts, RequestFacts, places, probing, reputation,
                              sampling)
from rbee_p2p.routing.reputation import Standing
from simulations import policy as sim_policy
from simulations import requests as sim_requests
from simulations import scenario as sim_scenario
from simulations import swarm as sim_swarm
from simulations import views as sim_views
from simulations import wire as sim_wire
from simulations.runner import run
from simulations.scenario import parse
from simulations.swarm import Swarm
from simulations.world import build_world

SIM = (sim_requests, sim_views, sim_policy, sim_swarm, sim_wire, sim_scenario)
SHARED = {
    places: ["peer_facts", "smoothed_rtt"],
    probing: ["admit_by_ms", "refuses", "draw_pool", "draw_probes", "pool_due", "quorum",
              "to_rank", "peer_weight", "pool_size", "PROBE_TIMEOUT_MS"],
    reputation: ["after_result", "after_failure", "after_refusal", "Standing"],
    sampling: ["peer_key"],
    routing: ["RequestFacts", "decide", "fastest", "expected_ms"],
    settings: ["MeshConfig", "liveness_s", "advert_ttl_ms"],
}


@pytest.mark.parametrize("module,name", [(m, n) for m, names in SHARED.items() for n in names])
def test_the_simulator_calls_the_very_functions_of_rbee_p2p_routing(module, name):
    used = [m for m in SIM if name in vars(m)]
    assert used and all(getattr(m, name) is getattr(module, name) for m in used)


def test_the_node_calls_them_too():
    for name in ["admit_by_ms", "decided", "draw_pool", "draw_probes", "pool_due", "to_rank",
                 "weighted"]:
        assert getattr(service, name) is getattr(probing, name)
    for name in ["after_result", "after_failure", "after_refusal"]:
        assert getattr(service, name) is getattr(reputation, name)
    assert service.peer_facts is places.peer_facts is sim_views.peer_facts
    assert latency.smoothed_rtt is places.smoothed_rtt is sim_views.smoothed_rtt
    assert membership.advert_ttl_ms is settings.advert_ttl_ms is sim_swarm.advert_ttl_ms


def test_no_copy_of_the_reputation_arithmetic_or_the_peer_facts_comes_back():
    """Only ``places.peer_facts`` turns an advert and a standing into facts: the simulator
    names none of its parts, and builds PeerFacts only for a node itself."""
    root = Path(sim_views.__file__).parent
    for path in sorted(root.glob("*.py")):
        tree = ast.parse(path.read_text())
        imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)
                    and (n.module or "").startswith("rbee_p2p") for a in n.names}
        modules = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        assert not imported & {"effective_speed", "trust", "failure_penalty_ms", "weight",
                               "reputation"}, path
        assert not {m for m in modules if m.startswith("rbee_p2p.routing")}, path
        built = [n for n in ast.walk(tree) if isinstance(n, ast.Call)
                 and isinstance(n.func, ast.Name) and n.func.id == "PeerFacts"]
        assert all(any(k.arg == "local" and isinstance(k.value, ast.Constant)
                       and k.value.value is True for k in n.keywords) for n in built), path


def spy_on_peer_facts(monkeypatch):
    """Record every PeerFacts the simulator's ranking sees and every one peer_facts made."""
    made, args, ranked = [], [], []

    def spy(*a, **kw):
        facts = places.peer_facts(*a, **kw)
        made.append(facts)
        args.append(a)
        return facts

    rank = sim_policy.Router.rank

    def ranking(self, model, max_tokens, prompt_tokens, where, now_ms=0):
        ranked.extend(p.facts for p in where)
        return rank(self, model, max_tokens, prompt_tokens, where, now_ms)

    monkeypatch.setattr(sim_views, "peer_facts", spy)
    monkeypatch.setattr(sim_policy.Router, "rank", ranking)
    return made, args, ranked


@pytest.mark.parametrize("mode", ["sample", "flood"])
def test_every_peer_the_simulator_ranks_is_the_nodes_peer_facts(monkeypatch, mode):
    made, args, ranked = spy_on_peer_facts(monkeypatch)
    sc = parse({"nodes": 30, "duration_s": 8, "warmup_s": 2, "sim": {"crypto": "fast"},
                "routing": {"mode": mode, "probes": 8}})
    run(sc)
    ids = {id(f) for f in made}
    peers = [f for f in ranked if not f.local]
    assert peers and all(id(f) in ids for f in peers)
    assert {a[4] for a in args} == {MeshConfig().timing.frame_timeout_s}  # a failure's cost
    if mode == "sample":  # probed peers are pinged: the round trip is in latency_ms
        assert any(f.latency_ms > 0 for f in peers)


def test_the_simulators_constants_are_the_nodes_defaults():
    node = MeshConfig()
    table = {f.name: f.default for f in dataclasses.fields(PeerTable)}
    assert (sim_views.FLOOD_SUSPECT_S, sim_views.FLOOD_DEAD_S) == (node.suspect_after_s,
                                                                    node.dead_after_s)
    assert sim_views.FRAME_TIMEOUT_S == Timing().frame_timeout_s
    assert sim_views.PING_INTERVAL_S == node.ping_interval_s
    assert sim_wire.ADVERT_TTL_MS == settings.advert_ttl_ms(node.dead_after_s)
    assert node.probe_timeout_s * 1000 == probing.PROBE_TIMEOUT_MS
    defaults = sim_scenario.Scenario()
    assert defaults.routing.probe_wait_s == node.probe_timeout_s
    assert defaults.routing.rtt_latency  # the node measures round trips
    assert defaults.routing.deadline_s == node.timing.deadline_s
    assert defaults.routing.stream_timeout_s == node.timing.frame_timeout_s
    assert defaults.malicious.drop_timeout_s == node.timing.frame_timeout_s
    assert defaults.gossip.advert_interval_s == node.advert_interval_s
    assert defaults.gossip.membership_budget_per_s == node.advert_budget
    for mode in ("flood", "sample"):
        sc = parse({"nodes": 80, "duration_s": 4, "warmup_s": 1, "sim": {"crypto": "fast"},
                    "routing": {"mode": mode}})
        s = Swarm(sc, build_world(sc))
        s._choose_observers()
        t = next(iter(s.tables.values()))
        want = (node.suspect_after_s, node.dead_after_s)
        if mode == "sample":
            want = settings.liveness_s(node, s._interval_ms() / 1000)
        assert (t.suspect_after_ms, t.dead_after_ms) == tuple(int(x * 1000) for x in want)
        assert t.forget_after_ms == table["forget_after_ms"]
        assert s.wire.ttl_ms == settings.advert_ttl_ms(want[1])


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
    pure = probing.draw_pool(req.keys[e], [(c, req.keys[c], req._weight(e, c))
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
