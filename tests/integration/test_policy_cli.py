"""`rbee-node policy test`: every example policy dry-runs to a decision; rejections,
errors (with their line) and bad input have their own exit status.  Each run starts a
policy worker process (real time, bounded)."""

import json
from pathlib import Path

import pytest

from rbee_p2p.cli import main

EXAMPLES = Path(__file__).parents[2] / "node" / "policies"
GIB = 1 << 30


def device(name, free_gib):
    return {"id": "cuda:0", "backend": "cuda", "name": name, "mem_total": 80 * GIB,
            "mem_free": free_gib * GIB}


PEERS = [
    {"id": "h100", "models": ["llama"], "tokens_per_s": 300, "queue_depth": 2,
     "jurisdiction": "DE", "price": 900, "devices": [device("NVIDIA H100 80GB HBM3", 40)]},
    {"id": "a100", "models": ["llama"], "tokens_per_s": 150, "jurisdiction": "US",
     "price": 400, "devices": [device("NVIDIA A100-SXM4-80GB", 60)]},
    {"id": "here", "local": True, "models": ["llama"], "tokens_per_s": 20,
     "jurisdiction": "FR", "price": 0},
]


def dry_run(capsys, policy, request, peers=PEERS, *extra):
    code = main(["policy", "test", str(policy), "--request", json.dumps(request), "--peers",
                 json.dumps(peers), "--timeout-ms", "2000", *extra])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


@pytest.mark.parametrize("file, request_, first", [
    ("tiers.star", {"model": "llama", "tenant": {"id": "acme", "tier": "enterprise"}}, "h100"),
    ("tiers.star", {"model": "llama", "tenant": {"id": "bob", "tier": "pro"}}, "a100"),
    ("eu_cheapest.star", {"model": "llama"}, "here"),
    ("least_loaded.star", {"model": "llama"}, "here"),
    ("trusted.star", {"model": "llama"}, "a100"),
])
def test_every_example_decides(capsys, file, request_, first):
    code, out = dry_run(capsys, EXAMPLES / file, request_)
    assert code == 0, out
    assert out.startswith(f"ranked by starlark:{file} in ")
    assert out.splitlines()[1] == f"  1. {first}"


def test_every_example_file_is_covered():
    assert {p.name for p in EXAMPLES.glob("*.star")} == \
        {"tiers.star", "eu_cheapest.star", "least_loaded.star", "trusted.star"}


def test_json_report_and_residency(capsys):
    request = {"model": "llama", "tenant": {"id": "acme", "tier": "x", "residency": "EU"}}
    code, out = dry_run(capsys, EXAMPLES / "tiers.star", request, PEERS, "--json")
    report = json.loads(out)
    assert code == 0 and report["decision"] == "ranked"
    assert "a100" not in report["candidates"]  # US: never shown to the policy, never chosen


def test_a_rejection_exits_1(capsys):
    code, out = dry_run(capsys, EXAMPLES / "eu_cheapest.star", {"model": "llama"}, PEERS[1:2])
    assert code == 1
    assert out.strip() == ("rejected (forbidden) by starlark:eu_cheapest.star: no peer in "
                           "the EU can run llama now")


def test_a_builtin_can_be_dry_run(capsys):
    code, out = dry_run(capsys, "cheapest", {"model": "llama"})
    assert code == 0 and out.splitlines()[1:] == ["  1. here", "  2. a100", "  3. h100"]


@pytest.mark.parametrize("source, words", [
    ("def route(request, peers, local):\n    x = (\n    return x\n",
     "error (syntax) in bad.star:3:"),
    ("def route(request, peers, local):\n    return peers[0]['nope']\n",
     "error (runtime) in bad.star:2:12:"),
    ("def route(request, peers, local):\n    for i in range(1000000000):\n        pass\n",
     "error (timeout) in bad.star:2:5:"),
    ("def route(request, peers, local):\n    return [0] * 2000000000\n",
     "error (crash) in starlark:bad.star: the policy worker died"),
])
def test_errors_exit_2_with_the_line(capsys, caplog, tmp_path, source, words):
    path = tmp_path / "bad.star"
    path.write_text(source)
    extra = ("--timeout-ms", "50") if "range" in source else ()
    code, out = dry_run(capsys, path, {"model": "llama"}, PEERS, *extra)
    assert code == 2 and words in out, out
    # the runtime's own warnings stay quiet: the report says it all
    assert not [r for r in caplog.records if r.name.startswith("rbee_p2p.policy_runtime")]
    if "syntax" not in words:
        assert "the node would route this request by fastest instead: " in out


@pytest.mark.parametrize("args, words", [
    (["--request", "{not json", "--peers", "[]"], "--request: not JSON"),
    (["--request", '{"model": "m"}', "--peers", '{"id": "a"}'], "must be a JSON list"),
    (["--request", '{"model": "m"}', "--peers", '[{"models": []}]'], "string id"),
    (["--request", '{"model": "m"}', "--peers", "@/nonexistent.json"], "--peers"),
])
def test_bad_input_exits_2(capsys, args, words):
    code = main(["policy", "test", "fastest", *args])
    assert code == 2 and words in capsys.readouterr().err


def test_unknown_policy_exits_2(capsys, tmp_path):
    assert main(["policy", "test", str(tmp_path / "none.star"), "--request", '{"model": "m"}',
                 "--peers", "[]"]) == 2
    assert "neither a built-in" in capsys.readouterr().err
