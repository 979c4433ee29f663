"""Who may use my machine (issue 13, item 1), against real node processes on loopback:
a plain start forms a private swarm that strangers cannot join, an invitation lets a
machine in, and in the open swarm key-less work relayed by a stranger's tenant-less node
gets nothing from a node whose users need keys.  Scripted models; bounded; killed by PID."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import time

import httpx
import pytest
from e2e.nodeproc import cluster

from rbee_p2p.tenancy.tenants import TenantBook

pytestmark = pytest.mark.e2e
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
FAST = "advert_interval = 0.5\nsuspect_after = 1.5\ndead_after = 3.0\n"


@pytest.fixture
def members(tmp_path):
    """Started, ready nodes with fast liveness."""
    with cluster(tmp_path) as nodes:
        def start(name, *args, **kwargs):
            (tmp_path / name).mkdir(exist_ok=True)
            (tmp_path / name / "rbee-node.toml").write_text(FAST)
            node = nodes(name, *args, **kwargs)
            node.wait_ready()
            return node
        yield start


def sees(node, peer_id):
    return any(p["id"] == peer_id and p["state"] == "alive" for p in node.status()["peers"])


def test_a_plain_start_is_a_private_swarm_strangers_cannot_join_but_invitees_can(members):
    nodes = members
    a = nodes("a", "--no-default-model", "--fake-model", "m:1000", env_psk=None)
    assert "created private swarm" in a.output()
    key = a.log.parent / "swarm.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    # a stranger (its own first start: another swarm) dials A and gets nothing
    stranger = nodes("s", "--no-default-model", "--peer", a.addr, env_psk=None)
    deadline = time.monotonic() + 8
    while "no handshake within 3 s" not in stranger.output():
        assert time.monotonic() < deadline, stranger.output()[-2000:]
        time.sleep(0.2)
    assert not stranger.status()["connected"] and not sees(a, stranger.peer_id)
    r = httpx.post(stranger.url + "/v1/chat/completions", json=CHAT, timeout=30)
    assert r.status_code == 404  # the stranger does not even learn that A serves m

    invite = subprocess.run(
        [shutil.which("rbee-node"), "invite", "--addr", a.addr.rsplit("/p2p/", 1)[0]],
        env={**os.environ, "RBEE_HOME": str(a.log.parent)}, capture_output=True, text=True,
        timeout=60, check=True)
    token = invite.stdout.strip()
    assert token.startswith("rbee-invite-1:") and "--join" in invite.stderr
    b = nodes("b", "--no-default-model", "--join", token, env_psk=None)
    assert "joined private swarm" in b.output()
    b.wait_for(lambda s: sees(b, a.peer_id), 15, "A in the invitee's table")
    r = httpx.post(b.url + "/v1/chat/completions", json=CHAT, timeout=30)
    assert r.status_code == 200, r.text
    b.kill()
    # restarted without the token, it is still a member (key and members were stored)
    again = nodes("b", "--no-default-model", env_psk=None)
    again.wait_for(lambda s: sees(again, a.peer_id), 15, "A after the restart")


def test_the_open_swarm_gives_keyless_relayed_work_nothing_where_users_need_keys(members,
                                                                                tmp_path):
    nodes = members
    (tmp_path / "a").mkdir()
    book = TenantBook.open(tmp_path / "a")
    api_key = book.add("owner")
    book.save()
    a = nodes("a", "--no-default-model", "--fake-model", "m:1000", "--swarm", "public",
              env_psk=None)
    b = nodes("b", "--no-default-model", "--swarm", "public", "--peer", a.addr, env_psk=None)
    b.wait_for(lambda s: sees(b, a.peer_id), 15, "A in B's table")
    r = httpx.post(b.url + "/v1/chat/completions", json=CHAT, timeout=30)  # B has no tenants
    assert r.status_code >= 400 and "API key of its own tenants" in r.text, r.text
    assert a.status()["tenancy"]["peers"]["keyless_refused"] >= 1
    # A's own tenant is served, and so would be B's if B had tenants
    r = httpx.post(a.url + "/v1/chat/completions", json=CHAT, timeout=30,
                   headers={"Authorization": f"Bearer {api_key}"})
    assert r.status_code == 200
