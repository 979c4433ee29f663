"""Real nodes, real libp2p on loopback, the real model: forwarding, failures, discovery."""

from __future__ import annotations

import os
import signal
import time

import pytest
from nodeproc import audit_records, cluster, sdk


pytestmark = pytest.mark.e2e
HELLO = [{"role": "user", "content": "Say hello."}]


def knows(model, peer_id=None):
    def check(status):
        return any(p["state"] == "alive" and model in p["models"]
                   and (peer_id is None or p["id"] == peer_id) for p in status["peers"])
    return check


@pytest.fixture
def nodes(tmp_path):
    with cluster(tmp_path) as start:
        yield start


def warm(node):
    """Local requests until the node has measured its speed and advertises it (a sampled
    completion can end before the 8 tokens a measurement needs: a few tries, bounded)."""
    for i in range(6):
        sdk(node).completions.create(model="smollm2", prompt=f"Once upon a time, {i}",
                                     max_tokens=32, seed=i)
        if node.status()["models"][0]["tokens_per_s"] > 0:
            return
    raise AssertionError("no speed measured after 6 requests")


def test_three_nodes_a_request_on_a_runs_on_c(nodes):
    c = nodes("c")
    a = nodes("a", "--no-default-model", "--peer", c.addr)
    b = nodes("b", "--no-default-model", "--peer", c.addr)
    for n in (a, b, c):
        n.wait_ready()
    start = time.monotonic()
    a.wait_for(knows("smollm2", c.peer_id), 15, "C in A's table")
    b.wait_for(knows("smollm2", c.peer_id), 15, "C in B's table")
    joined_s = time.monotonic() - start

    client = sdk(a)
    # A serves none itself: the model it lists is C's
    listed = {m.id: m.model_extra for m in client.models.list()}
    assert (listed["smollm2"]["local"], listed["smollm2"]["peers"]) == (False, [c.peer_id])
    stream = client.chat.completions.create(model="smollm2", messages=HELLO, max_tokens=16,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text and chunks[-1].usage.completion_tokens <= 16
    r = client.chat.completions.create(model="smollm2", messages=HELLO, max_tokens=8)
    assert r.choices[0].message.content and r.usage.prompt_tokens > 0
    e = client.embeddings.create(model="smollm2", input=["hello world", "bees"])
    assert [len(d.embedding) for d in e.data] == [576, 576] and e.usage.prompt_tokens > 0

    forwarded = audit_records(a, "entry", 3)
    executed = audit_records(c, "execute", 3)
    assert len(forwarded) == 3 and len(executed) == 3
    assert all(f.outcome == "ok" and f.receipt_sig for f in forwarded)  # receipts verified
    assert {f.receipt_sig for f in forwarded} == {e.receipt_sig for e in executed}
    assert forwarded[0].exec_peer == executed[0].exec_peer
    assert c.status()["models"][0]["requests_served"] == 3  # two completions, one embedding
    assert joined_s < 15
    import shutil
    import subprocess

    listing = subprocess.run([shutil.which("rbee-node"), "peers", "--url", a.url],
                             capture_output=True, text=True, timeout=60).stdout
    assert c.peer_id in listing and "alive" in listing and "smollm2" in listing


def entry_and_two_servers(nodes):
    """A (no model) knows B and C (both serving); C has measured its speed, so A ranks it
    first."""
    c = nodes("c")
    b = nodes("b")
    a = nodes("a", "--no-default-model", "--peer", c.addr, "--peer", b.addr)
    for n in (a, b, c):
        n.wait_ready()
    warm(c)
    a.wait_for(lambda s: knows("smollm2", b.peer_id)(s) and any(
        p["id"] == c.peer_id and p["state"] == "alive" and p["tokens_per_s"].get("smollm2", 0) > 0
        for p in s["peers"]), 15, "B alive and C's measured speed in A's table")
    return a, b, c


def test_kill_9_before_the_first_token_is_retried_elsewhere(nodes):
    a, b, c = entry_and_two_servers(nodes)
    os.kill(c.proc.pid, signal.SIGKILL)
    c.proc.wait(10)
    r = sdk(a).chat.completions.create(model="smollm2", messages=HELLO, max_tokens=8)
    assert r.choices[0].message.content
    assert b.status()["models"][0]["requests_served"] == 1
    status = a.wait_for(lambda s: all(p["state"] != "alive" for p in s["peers"]
                                      if p["id"] == c.peer_id), 15, "C not alive")
    assert [p["state"] for p in status["peers"] if p["id"] == c.peer_id][0] in (
        "suspect", "dead")


def test_a_frozen_peer_is_detected_and_routed_around(nodes):
    a, b, c = entry_and_two_servers(nodes)
    os.kill(c.proc.pid, signal.SIGSTOP)
    start = time.monotonic()
    r = sdk(a).chat.completions.create(model="smollm2", messages=HELLO, max_tokens=8)
    took = time.monotonic() - start
    # bound: connect timeout (3 s) or frame timeout (5 s), then the answer from B
    assert r.choices[0].message.content and took < 30
    status = a.wait_for(lambda s: [p["state"] for p in s["peers"]
                                   if p["id"] == c.peer_id] == ["dead"], 20, "C dead")
    assert any(p["id"] == b.peer_id and p["state"] == "alive" for p in status["peers"])
    os.kill(c.proc.pid, signal.SIGCONT)


def test_dht_nodes_sharing_only_a_bootstrap_node_find_each_other(nodes):
    boot = nodes("boot", "--no-default-model")
    boot.wait_ready()
    a = nodes("a", "--no-default-model", "--bootstrap", boot.addr)
    c = nodes("c", "--bootstrap", boot.addr)
    a.wait_ready()
    c.wait_ready()
    # the DHT's provider records (not gossip relayed by the bootstrap node) connect A to C
    a.wait_for(lambda s: c.peer_id in s["connected"], 30, "A connected to C through the DHT")
    a.wait_for(knows("smollm2", c.peer_id), 15, "C's advert at A")
    r = sdk(a).chat.completions.create(model="smollm2", messages=HELLO, max_tokens=8)
    assert r.choices[0].message.content
    assert c.status()["models"][0]["requests_served"] == 1


def test_private_swarm_refuses_outsiders(nodes, tmp_path):
    c = nodes("c", "--no-default-model", env_psk="team-secret")
    c.wait_ready()
    outsider = nodes("x", "--no-default-model", "--peer", c.addr, env_psk="other-secret")
    insider = nodes("y", "--no-default-model", "--peer", c.addr, env_psk="team-secret")
    outsider.wait_ready()
    insider.wait_ready()
    insider.wait_for(lambda s: any(p["id"] == c.peer_id for p in s["peers"]), 15, "insider in")
    deadline = time.monotonic() + 8
    while "no handshake within 3 s (is its swarm key the same" not in outsider.output():
        assert time.monotonic() < deadline, outsider.output()[-2000:]
        time.sleep(0.2)
    assert not outsider.status()["peers"]


def test_large_swarm_mode_probes_sampled_candidates_for_their_load(nodes):
    """With probe_above = 0 the entry node treats every swarm as large: it does not rely on
    flooded load but probes candidates (/rbee/probe/1.0.0) before each request."""
    b = nodes("b")
    c = nodes("c")
    for node in (b, c):
        node.wait_ready()
    a_home = b.log.parent.parent / "a"
    a_home.mkdir()
    (a_home / "rbee-node.toml").write_text("probe_above = 0\nprobes = 2\nping_interval = 1.0\n")
    a = nodes("a", "--no-default-model", "--peer", b.addr, "--peer", c.addr)
    a.wait_ready()
    a.wait_for(knows("smollm2", b.peer_id), 30, "B at A")
    a.wait_for(knows("smollm2", c.peer_id), 30, "C at A")
    for _ in range(3):
        r = sdk(a).chat.completions.create(model="smollm2", messages=HELLO, max_tokens=4)
        assert r.choices[0].message.content is not None
    probes = a.status()["probes"]
    assert probes["sent"] >= 3 and probes["answered"] >= 3, probes
    served = sum(n.status()["models"][0]["requests_served"] for n in (b, c))
    assert served == 3
    # libp2p pings measured each peer's round trip (a real host answers /ipfs/ping/1.0.0)
    status = a.wait_for(lambda s: all(p["latency_ms"] for p in s["peers"]), 20, "latency")
    assert all(0 < p["latency_ms"] < 1000 for p in status["peers"]) and status["pings"]["answered"]
