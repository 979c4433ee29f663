"""The private swarm's key on disk and the invitation that carries it (store/swarm.py)."""

import stat

import pytest

from rbee_p2p.errors import ConfigError
from rbee_p2p.store.swarm import (INVITE_PREFIX, MAX_INVITE_PEERS, join, joined_peers,
                                  load_or_create_swarm_key, make_invite, read_invite, swarm_id)

ADDR = "/ip4/192.168.1.5/tcp/7834/p2p/12D3KooWAbc"


def test_the_first_start_creates_a_key_only_its_owner_reads_and_later_ones_reuse_it(tmp_path):
    key, created = load_or_create_swarm_key(tmp_path)
    assert created and len(key) == 64 and int(key, 16) >= 0
    assert stat.S_IMODE((tmp_path / "swarm.key").stat().st_mode) == 0o600
    assert load_or_create_swarm_key(tmp_path) == (key, False)
    other, _ = load_or_create_swarm_key(tmp_path / "other")
    assert other != key and swarm_id(other) != swarm_id(key)
    assert key not in swarm_id(key) and len(swarm_id(key)) == 16


def test_a_key_readable_by_others_or_damaged_is_refused(tmp_path):
    load_or_create_swarm_key(tmp_path)
    (tmp_path / "swarm.key").chmod(0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        load_or_create_swarm_key(tmp_path)
    (tmp_path / "swarm.key").chmod(0o600)
    (tmp_path / "swarm.key").write_text("not a key")
    with pytest.raises(ConfigError, match="does not hold a swarm key"):
        load_or_create_swarm_key(tmp_path)


def test_an_invitation_carries_the_key_and_addresses(tmp_path):
    key, _ = load_or_create_swarm_key(tmp_path)
    token = make_invite(key, [ADDR] * 40)
    assert token.startswith(INVITE_PREFIX) and " " not in token
    got, addrs = read_invite(token)
    assert got == key and addrs == [ADDR] * MAX_INVITE_PEERS


@pytest.mark.parametrize("token, match", [
    ("hello", "not an rbee invitation"),
    (INVITE_PREFIX + "!!!!", "damaged"),
    (INVITE_PREFIX + "aGVsbG8", "does not hold a swarm key"),
    (INVITE_PREFIX + "x" * 9000, "not an rbee invitation"),
])
def test_malformed_invitations_are_clear_errors(token, match):
    with pytest.raises(ConfigError, match=match):
        read_invite(token)


def test_bad_addresses_in_an_invitation_are_refused():
    with pytest.raises(ConfigError, match="addresses are malformed"):
        read_invite(make_invite("ab" * 32, ["/ip4/1.2.3.4/tcp/1"]))  # no /p2p/


def test_joining_stores_the_key_and_members_and_keeps_the_old_key(tmp_path):
    old, _ = load_or_create_swarm_key(tmp_path)
    token = make_invite("cd" * 32, [ADDR])
    joined, left = join(tmp_path, token)
    assert joined == swarm_id("cd" * 32) and left == swarm_id(old)
    assert load_or_create_swarm_key(tmp_path) == ("cd" * 32, False)
    assert (tmp_path / "swarm.key.old").read_text().strip() == old
    assert joined_peers(tmp_path) == (ADDR,)
    assert join(tmp_path, token) == (joined, None)  # again: nothing left
    assert stat.S_IMODE((tmp_path / "swarm.peers").stat().st_mode) == 0o600
