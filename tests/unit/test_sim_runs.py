"""Small whole runs of the simulator (<= 50 nodes, a few virtual seconds each): invariants,
not performance.  Every request ends exactly once, a seed fixes the results, adverts
converge, partitions heal, malicious peers lose traffic once nodes learn."""

import json
from dataclasses import replace
from pathlib import Path

import pytest

from simulations.__main__ import main
from simulations.plots import plot
from simulations.runner import run
from simulations.scenario import parse

SCENARIOS = Path(__file__).parents[2] / "simulations" / "scenarios"


def tiny(**settings):
    base = {"nodes": 40, "duration_s": 20, "warmup_s": 5, "sim": {"crypto": "fast"},
            "routing": {"probes": 8, "max_queue": 1}}
    for key, value in settings.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            base[key] = {**base[key], **value}
        else:
            base[key] = value
    return parse(base)


def outcomes_are_complete(results):
    rq = results["requests"]
    assert results["invariants"] == {"every_request_ended_once": True, "unfinished": 0}
    assert rq["total"] == rq["ended"] == rq["completed"] + rq["failed"] > 0
    return rq


@pytest.mark.parametrize("settings", [
    {},
    {"routing": {"mode": "flood"}, "nodes": 25},
    {"workload": {"load": 0.6, "surge": [{"start_s": 8, "end_s": 12, "factor": 3}]}},
    {"churn": {"mean_session_s": 40, "crash_fraction": 0.5}, "workload": {"load": 0.6}},
    {"churn": {"mean_session_s": 40}, "routing": {"mode": "flood"}, "nodes": 25},
], ids=["steady", "flood", "flash-crowd", "churn", "churn-flood"])
def test_every_request_ends_exactly_once(settings):
    results = run(tiny(**settings)).results
    rq = outcomes_are_complete(results)
    assert set(rq["failed_by_reason"]) <= {"busy", "no_place", "entry_left"}
    if "churn" in settings:
        assert results["world"]["nodes_total"] > 40 or settings.get("nodes") == 25


def test_a_seed_fixes_the_results_and_another_seed_changes_them():
    sc = tiny(seed=3, churn={"mean_session_s": 60})
    first = json.dumps(run(sc).results, sort_keys=True)
    assert json.dumps(run(sc).results, sort_keys=True) == first
    assert json.dumps(run(replace(sc, seed=4)).results, sort_keys=True) != first


@pytest.mark.parametrize("mode", ["sample", "flood"])
def test_adverts_converge(mode):
    results = run(tiny(routing={"mode": mode}, nodes=30)).results
    advert = results["convergence"]["advert_p99_s"]
    assert advert["n"] >= 3 and advert["never"] == 0 and 0 < advert["max"] < 10
    if mode == "flood":
        assert results["convergence"]["load_p99_s"]["never"] == 0


@pytest.mark.parametrize("mode", ["sample", "flood"])
def test_partitions_heal(mode):
    sc = tiny(nodes=40, duration_s=40, routing={"mode": mode}, workload={"load": 0.6},
              network={"partition": [{"start_s": 10, "end_s": 22,
                                      "side": ["na-west", "na-east", "sa-east"]}]})
    results = run(sc).results
    outcomes_are_complete(results)
    p = results["partition"]
    assert p["cross_during"] == 0
    assert p["cross_before"] > 0 and p["cross_after"] > 0


@pytest.mark.parametrize("mode", ["sample", "flood"])
def test_observers_real_peer_tables_agree_with_the_compact_views(mode):
    sc = tiny(nodes=30, routing={"mode": mode}, sim={"crypto": "fast", "check_views": True},
              network={"loss": 0.0})
    views = run(sc).results["views"]
    assert views["checks"] > 20 and views["mean_mismatch"] < 0.05


def test_malicious_peers_get_less_traffic_once_nodes_have_learned():
    sc = tiny(nodes=30, duration_s=120, warmup_s=30, workload={"load": 0.5},
              malicious={"fraction": 0.2, "kinds": ["dropper", "liar"], "drop_timeout_s": 5})
    results = run(sc).results
    outcomes_are_complete(results)
    mal = results["malicious"]
    assert mal["nodes"] > 0
    assert mal["share_last_third"] < mal["share_before_warmup"]


def test_real_crypto_runs_every_advert_through_seal_and_verifier():
    for mode in ("sample", "flood"):
        sc = tiny(nodes=12, duration_s=8, warmup_s=2, routing={"mode": mode},
                  sim={"crypto": "real"})
        results = run(sc).results
        outcomes_are_complete(results)
        world = results["world"]
        assert world["crypto"] == "real" and world["adverts_sealed"] > 0
        assert world["adverts_to_peer_tables"] > 0


def test_the_command_line_writes_results(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", str(SCENARIOS / "steady.toml"), "--nodes", "20", "--duration", "8",
                 "--seed", "2", "--out", str(out), "--no-plots"]) == 0
    assert {p.name for p in out.iterdir()} == {"results.json", "timing.json", "summary.txt"}
    results = json.loads((out / "results.json").read_text())
    assert results["scenario"]["nodes"] == 20 and results["scenario"]["seed"] == 2
    assert "ratio to central" in capsys.readouterr().out
    assert main(["run", str(tmp_path / "missing.toml")]) == 2


def test_plots_are_skipped_with_a_message_without_matplotlib(monkeypatch, tmp_path, capsys):
    import simulations.plots as plots

    monkeypatch.setattr(plots, "have_matplotlib", lambda: False)
    assert plot({}, tmp_path / "x.png") is None
    assert "matplotlib is not installed" in capsys.readouterr().err


def test_sweep_varies_one_setting_at_a_time(capsys):
    from simulations.sweep import variations

    sc = tiny()
    runs = variations(sc, ["routing.probes=2,4", "routing.reputation=false"])
    assert [label for label, _ in runs] == ["as is", "routing.probes=2", "routing.probes=4",
                                            "routing.reputation=false"]
    assert runs[2][1].routing.probes == 4 and runs[3][1].routing.reputation is False
    assert runs[1][1].workload == sc.workload
    assert main(["sweep", str(SCENARIOS / "steady.toml"), "--vary", "routing.nope=1"]) == 2
    assert main(["sweep", str(SCENARIOS / "steady.toml"), "--nodes", "12", "--duration", "6",
                 "--vary", "routing.probes=2"]) == 0
    assert "| routing.probes=2 |" in capsys.readouterr().out
