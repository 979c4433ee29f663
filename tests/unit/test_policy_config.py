"""The routing-policy settings: TOML < RBEE_POLICY < --policy, checked at start-up."""

from pathlib import Path

import pytest

from rbee_p2p.cli import build_parser
from rbee_p2p.config import load_config
from rbee_p2p.errors import ConfigError

EXAMPLE = Path(__file__).parents[2] / "node" / "policies" / "tiers.star"


def test_policy_from_file_env_and_flag(tmp_path):
    (tmp_path / "rbee-node.toml").write_text('policy = "cheapest"\npolicy_timeout_ms = 80\n')
    env = {"RBEE_HOME": str(tmp_path)}
    assert load_config(env=env).policy == "cheapest"
    assert load_config(env=env).policy_timeout_ms == 80
    assert load_config(env={**env, "RBEE_POLICY": str(EXAMPLE)}).policy == str(EXAMPLE)
    config = load_config(env={**env, "RBEE_POLICY": "least_loaded"},
                         flags={"policy": "local_only"})
    assert config.policy == "local_only"
    assert load_config(env={"RBEE_HOME": str(tmp_path / "none")}).policy == "fastest"


@pytest.mark.parametrize("text, match", [
    ('policy = "fastestt"', "neither a built-in"),
    ('policy = "/nonexistent/p.star"', "neither a built-in"),
    ("policy_timeout_ms = 0", "policy_timeout_ms"),
])
def test_bad_policy_settings(tmp_path, text, match):
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_config(path, env={"RBEE_HOME": str(tmp_path)})


def test_start_takes_a_policy_flag():
    args = build_parser().parse_args(["start", "--policy", str(EXAMPLE)])
    assert args.policy == str(EXAMPLE)


def test_status_shows_the_policy(monkeypatch, capsys):
    from rbee_p2p.cli import commands as cli

    status = {"peer_id": "12D3KooWx", "version": "0", "models": [], "policy": {
        "policy": "starlark:tiers.star", "file": "/p/tiers.star", "loaded": False,
        "decisions": 7, "fallbacks": 2, "last_error": {"kind": "syntax",
                                                       "message": "tiers.star:3:1: oops"}}}
    monkeypatch.setattr(cli, "_fetch_status", lambda url: status)
    monkeypatch.setattr("rbee_p2p.cli.pull.status_lines", lambda s: [])
    assert cli.main(["status"]) == 0
    out = capsys.readouterr().out
    assert "policy   starlark:tiers.star (NOT loaded: fastest decides; 7 decisions, 2 by the " \
           "fallback)" in out and "last error: tiers.star:3:1: oops" in out


def test_pins_from_toml_and_flags_make_the_builtin_pinned(tmp_path):
    from rbee_p2p.config import load_config
    from rbee_p2p.policy_runtime.runtime import PolicyRuntime
    from rbee_p2p.routing import DeviceFacts, ModelFacts, PeerFacts, Ranked, RequestFacts, Snapshot

    config = tmp_path / "c.toml"
    config.write_text('[pins]\nm = "H100"\n')
    loaded = load_config(config, env={}, flags={"pins": ["x=cuda:1"]})
    assert dict(loaded.pins) == {"x": "cuda:1"}  # flags win over the file
    assert dict(load_config(config, env={}).pins) == {"m": "H100"}
    runtime = PolicyRuntime("least_loaded", pins={"m": "H100"})
    h100 = PeerFacts(id="h", models=(ModelFacts("m"),), queue_depth=5, devices=(
        DeviceFacts("cuda:0", "cuda", "NVIDIA H100", 80 << 30, 1 << 30),))
    idle = PeerFacts(id="idle", models=(ModelFacts("m"),))
    decision = runtime.builtin(RequestFacts(model="m"), Snapshot(None, (h100, idle)))
    assert decision == Ranked(("h",), "pinned")


def test_pins_are_refused_with_a_script(tmp_path):
    from rbee_p2p.errors import ConfigError
    from rbee_p2p.policy_runtime.runtime import PolicyRuntime

    script = tmp_path / "p.star"
    script.write_text("def route(request, peers, local):\n    return []\n")
    with pytest.raises(ConfigError, match="pins work with a built-in"):
        PolicyRuntime(str(script), pins={"m": "H100"})
