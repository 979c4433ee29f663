"""Simulator parts: event loop, scenarios, network model, GossipSub mesh model."""

import random
from pathlib import Path

import numpy as np
import pytest

from simulations.engine import Loop
from simulations.gossip import Mesh, frame_bytes
from simulations.network import REGIONS, Network, place_nodes
from simulations.scenario import Gossip, Partition, ScenarioError, load, parse

SCENARIOS = sorted((Path(__file__).parents[2] / "simulations" / "scenarios").glob("*.toml"))


def test_events_run_in_time_order_then_scheduling_order():
    loop, seen = Loop(), []
    loop.at(2.0, seen.append, "c")
    loop.at(1.0, seen.append, "a")
    loop.at(1.0, seen.append, "b")
    loop.at(5.0, seen.append, "late")
    loop.run(until=3.0)
    assert seen == ["a", "b", "c"] and loop.now == 2.0
    loop.after(-1.0, seen.append, "never in the past")
    loop.run(until=10.0)
    assert seen[-2:] == ["never in the past", "late"]


@pytest.mark.parametrize("path", SCENARIOS, ids=lambda p: p.stem)
def test_shipped_scenarios_parse(path):
    sc = load(path)
    assert sc.name == path.stem and sc.nodes >= 2


def test_scenario_errors_name_the_problem():
    with pytest.raises(ScenarioError, match="unknown setting 'lod'"):
        parse({"workload": {"lod": 0.5}})
    with pytest.raises(ScenarioError, match="routing.mode"):
        parse({"routing": {"mode": "telepathy"}})
    sc = parse({"network": {"partition": [{"start_s": 1, "end_s": 2, "side": ["oceania"]}]},
                "workload": {"surge": [{"start_s": 1, "end_s": 2, "factor": 3}]}})
    assert sc.network.partitions == (Partition(1, 2, ("oceania",)),)
    assert sc.workload.surges[0].factor == 3


def network(n=300, seed=1, partitions=()):
    rng = np.random.default_rng(seed)
    placement = place_nodes(rng, (rng.random(n) < 0.3).tolist())
    return Network(placement, 0.0, partitions, random.Random(seed))


def test_delays_are_symmetric_fixed_per_pair_and_vectorised_alike():
    net = network()
    a = np.arange(300)
    b = np.random.default_rng(2).permutation(300)
    many = net.owd_many(a, b)
    assert all(abs(net.owd(int(x), int(y)) - d) < 1e-15 for x, y, d in zip(a, b, many))
    assert all(net.owd(int(x), int(y)) == net.owd(int(y), int(x)) for x, y in zip(a, b))
    same_site = [(i, j) for i in range(300) for j in range(i + 1, 300)
                 if net.site[i] == net.site[j]]
    assert same_site and all(net.owd(i, j) < 0.001 for i, j in same_site)
    far = [net.owd(i, j) for i in range(50) for j in range(50)
           if net.region[i] != net.region[j]]
    assert 0.01 < np.median(far) < 0.2


def test_partitions_cut_exactly_the_listed_regions():
    side = ("na-west", "na-east", "sa-east")
    net = network(partitions=[Partition(0, 1, side)])
    in_side = [REGIONS[r][0] in side for r in net.region]
    net.set_partition(0)
    for i in range(40):
        for j in range(40):
            assert net.reachable(i, j) == (in_side[i] == in_side[j])
    net.set_partition(None)
    assert all(net.reachable(i, j) for i in range(40) for j in range(40))


def mesh(n=400, seed=3, partitions=()):
    net = network(n, seed, partitions)
    m = Mesh(n, Gossip(), net, random.Random(seed))
    for i in range(n):
        m.join(i)
    m.heartbeat()
    return m, net


def test_mesh_degrees_stay_within_gossipsub_bounds():
    m, _ = mesh()
    degrees = [len(s) for s in m.links]
    assert min(degrees) >= Gossip().degree_low and max(degrees) <= Gossip().degree_high
    assert all(j in m.links[i] for i in range(400) for j in m.links[i])


def test_a_flood_reaches_everyone_along_shortest_paths():
    m, net = mesh()
    flood = m.flood(0, 600, np.random.default_rng(0))
    assert np.isfinite(flood.arrival).all() and flood.arrival[0] == 0
    assert flood.percentile(m.present) < 2.0
    # first arrival never beats any single link from a neighbour that had it earlier
    hop = Gossip().hop_ms / 1000 + frame_bytes(600) * 8 / net.uplink_np
    for i in range(1, 400):
        best = min(flood.arrival[j] + net.owd(j, i) + hop[j] for j in m.links[i])
        assert abs(best - flood.arrival[i]) < 1e-9
    # every node got a copy from each mesh peer but the one it first heard from (or less)
    assert (flood.received >= 1).all() and flood.sent.sum() == flood.received.sum()
    assert (m.distances_to(0, 600) >= 0).all()


def test_a_partitioned_mesh_floods_only_its_side_and_nodes_that_leave_are_skipped():
    side = ("na-west", "na-east", "sa-east")
    m, net = mesh(partitions=[Partition(0, 1, side)])
    net.set_partition(0)
    in_side = np.array([REGIONS[r][0] in side for r in net.region])
    source = int(np.flatnonzero(in_side)[0])
    flood = m.flood(source, 600, np.random.default_rng(0))
    assert np.isinf(flood.arrival[~in_side]).all()
    assert np.isfinite(flood.arrival[in_side]).mean() > 0.95
    net.set_partition(None)
    m.version += 1
    m.leave(5)
    flood = m.flood(source, 600, np.random.default_rng(0))
    assert np.isinf(flood.arrival[5]) and np.isfinite(np.delete(flood.arrival, 5)).all()
