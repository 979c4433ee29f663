import pytest

from rbee_p2p.config import ModelSpec, default_model_path, load_config, parse_model_arg
from rbee_p2p.engines.base import file_digest
from rbee_p2p.errors import ConfigError


@pytest.fixture
def model_file(tmp_path):
    path = tmp_path / "tiny.gguf"
    path.write_bytes(b"GGUF fake weights")
    return path


def test_defaults(tmp_path):
    config = load_config(env={"RBEE_HOME": str(tmp_path)})
    assert (config.host, config.port, config.home) == ("127.0.0.1", 7833, tmp_path)
    names = [m.name for m in config.served_models()]
    assert names == ["smollm2"]
    assert config.served_models()[0].path == default_model_path()


def test_precedence_file_then_env_then_flags(tmp_path, model_file):
    (tmp_path / "rbee-node.toml").write_text(
        f'port = 9000\nhost = "127.0.0.2"\nmax_queue = 3\n'
        f'[[models]]\npath = "{model_file}"\nname = "tiny"\naliases = ["t"]\ncontext = 512\n'
        f'threads = 1\ndevice = "cuda:1"\ngpu_layers = 99\n')
    env = {"RBEE_HOME": str(tmp_path), "RBEE_PORT": "9001", "RBEE_MAX_QUEUE": "4"}
    config = load_config(env=env)
    assert (config.port, config.host, config.max_queue) == (9001, "127.0.0.2", 4)
    assert config.models == (ModelSpec(name="tiny", path=model_file, aliases=("t",),
                                       context=512, threads=1, gpu_layers=99,
                                       device="cuda:1"),)
    config = load_config(env=env, flags={"port": 9002, "host": None, "default_model": False,
                                         "models": [parse_model_arg(f"other={model_file}")]})
    assert config.port == 9002 and config.host == "127.0.0.2"
    assert [m.name for m in config.served_models()] == ["tiny", "other"]


def test_explicit_config_file_must_exist(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "missing.toml", env={"RBEE_HOME": str(tmp_path)})


@pytest.mark.parametrize("text, match", [
    ("port = 'x'", "port must be int"),
    ("colour = 'red'", "unknown setting"),
    ("port = 70000", "out of range"),
    ("[[models]]\nname = 'x'", "needs a path"),
    ("[[models]]\npath = '/x'\nsize = 3", "unknown model settings"),
    ("port = = 1", "cannot read config"),
])
def test_bad_config_files(tmp_path, text, match):
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_config(path, env={"RBEE_HOME": str(tmp_path)})


def test_bad_env_value(tmp_path):
    with pytest.raises(ConfigError, match=r"\$RBEE_PORT"):
        load_config(env={"RBEE_HOME": str(tmp_path), "RBEE_PORT": "many"})


def test_model_argument_forms(model_file):
    assert parse_model_arg(str(model_file)).name == "tiny"
    assert parse_model_arg(f"mine={model_file}") == ModelSpec(name="mine", path=model_file)
    with pytest.raises(ConfigError, match="does not exist"):
        parse_model_arg("/nonexistent/model.gguf")


def test_duplicate_names_are_refused(tmp_path, model_file):
    with pytest.raises(ConfigError, match="same name"):
        load_config(env={"RBEE_HOME": str(tmp_path)},
                    flags={"models": [parse_model_arg(f"smollm2={model_file}")] * 2})


def test_a_configured_model_may_replace_the_default(tmp_path, model_file):
    config = load_config(env={"RBEE_HOME": str(tmp_path)},
                         flags={"models": [parse_model_arg(f"smollm2={model_file}")]})
    assert [m.path for m in config.served_models()] == [model_file]


def test_model_digest_is_cached_by_path_and_mtime(tmp_path, model_file):
    import hashlib
    import os

    cache = tmp_path / "cache"
    expected = hashlib.sha256(model_file.read_bytes()).digest()
    assert file_digest(model_file, cache) == expected
    # a cached digest is trusted while size and mtime are unchanged...
    stat = model_file.stat()
    model_file.write_bytes(b"GGUF fake weightZ")  # same size
    os.utime(model_file, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert file_digest(model_file, cache) == expected
    # ...and recomputed when the file changes
    os.utime(model_file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))
    assert file_digest(model_file, cache) == hashlib.sha256(b"GGUF fake weightZ").digest()


def test_the_annotated_example_is_valid_and_states_the_defaults(tmp_path):
    from pathlib import Path

    example = Path(__file__).parents[2] / "node" / "rbee-node.toml"
    env = {"RBEE_HOME": str(tmp_path)}
    assert load_config(example, env=env) == load_config(env=env)


def test_mesh_settings_from_file_env_and_flags(tmp_path):
    (tmp_path / "rbee-node.toml").write_text(
        'swarm = "public"\npeers = ["/ip4/10.0.0.2/tcp/7834/p2p/12D3KooWx"]\nmdns = false\n'
        'jurisdiction = "EU"\nallow_peers = ["12D3KooWa", "12D3KooWb"]\nmax_peers = 100\n')
    env = {"RBEE_HOME": str(tmp_path), "RBEE_SWARM": "private", "RBEE_PSK": "secret"}
    config = load_config(env=env, flags={"dht": False, "p2p_listen": ["/ip4/127.0.0.1/tcp/0"]})
    assert (config.swarm, config.psk, config.mdns, config.dht) == (
        "private", "secret", False, False)
    assert config.peers == ("/ip4/10.0.0.2/tcp/7834/p2p/12D3KooWx",)
    assert config.allow_peers == ("12D3KooWa", "12D3KooWb") and config.max_peers == 100
    assert config.p2p_listen == ("/ip4/127.0.0.1/tcp/0",) and config.jurisdiction == "EU"


def test_peers_give_way_to_local_users_in_the_open_swarm_by_default(tmp_path):
    from rbee_p2p.config import peer_yield_s

    env = {"RBEE_HOME": str(tmp_path)}
    assert peer_yield_s(load_config(env=env)) == 0  # private: one owner's machines alike
    assert peer_yield_s(load_config(env={**env, "RBEE_SWARM": "public"})) == 30
    (tmp_path / "rbee-node.toml").write_text('swarm = "public"\npeer_yield = 0\n')
    assert peer_yield_s(load_config(env=env)) == 0


@pytest.mark.parametrize("text, match", [
    ("peers = 3", "list of strings"),
    ("suspect_after = 9.0", "suspect_after < dead_after"),
    ("jurisdiction = 'EUROPEAN-UNION'", "at most 8 bytes"),
    ("swarm = 'lab'", "'private' .* or 'public'"),
    ("swarm = 'public'\npsk = 'x'", "makes a private swarm"),
    ("psk = 'x'\njoin = 'y'", "pick one"),
    ("peer_rpm = -1", "peer limits"),
    ("peer_yield = -1.0", "peer_yield"),
    ("peer_queue_share = 0.0", "peer_queue_share"),
    ("max_peers = 0", "max_peers"),
])
def test_bad_mesh_settings(tmp_path, text, match):
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_config(path, env={"RBEE_HOME": str(tmp_path)})


def test_audit_retention_from_file_and_env(tmp_path):
    env = {"RBEE_HOME": str(tmp_path)}
    assert load_config(env=env).audit_retention_days == 365  # on by default: a year
    (tmp_path / "rbee-node.toml").write_text("audit_retention_days = 0\n")
    assert load_config(env=env).audit_retention_days == 0  # keep all
    env["RBEE_AUDIT_RETENTION_DAYS"] = "30.5"
    assert load_config(env=env).audit_retention_days == 30.5
    env["RBEE_AUDIT_RETENTION_DAYS"] = "-1"
    with pytest.raises(ConfigError, match="audit_retention_days"):
        load_config(env=env)


def test_prices_per_model_from_the_file(tmp_path):
    (tmp_path / "rbee-node.toml").write_text(
        "[prices.smollm2]\ninput_per_mtok = 100\noutput_per_mtok = 200\n"
        "[prices.sd-turbo]\nper_image = 5000\n")
    config = load_config(env={"RBEE_HOME": str(tmp_path)})
    assert dict(config.prices) == {"smollm2": (100, 200, 0), "sd-turbo": (0, 0, 5000)}


@pytest.mark.parametrize("text", ["[prices.m]\ncheap = 1\n", "[prices.m]\nper_image = -1\n",
                                  "[prices.m]\nper_image = 1.5\n", "prices = 3\n"])
def test_bad_prices(tmp_path, text):
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match="prices"):
        load_config(path, env={"RBEE_HOME": str(tmp_path)})


def test_attested_jurisdictions_from_file_and_flags(tmp_path):
    (tmp_path / "rbee-node.toml").write_text('[attested]\n"12D3KooWa" = "EU"\n')
    env = {"RBEE_HOME": str(tmp_path)}
    assert load_config(env=env).attested == (("12D3KooWa", "EU"),)
    flagged = load_config(env=env, flags={"attested": ["12D3KooWb=DE"]})
    assert flagged.attested == (("12D3KooWb", "DE"),)
    (tmp_path / "rbee-node.toml").write_text('[attested]\n"12D3KooWa" = "EUROPEAN-UNION"\n')
    with pytest.raises(ConfigError, match="jurisdiction"):
        load_config(env=env)
