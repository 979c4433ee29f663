"""(Named apart from integration/test_one_path.py: pytest needs distinct basenames.)
The one request path between real nodes (processes, libp2p on 127.0.0.1): a Starlark
policy and a pin on the entry node choose the executing peer; a peer killed mid-stream is
a clean SSE error and an audited error; a client closing a forwarded stream stops the
executor; /v1/models shows a peer's model while the peer lives.

Scripted models (``--fake-model NAME:TOKENS_PER_S``) give deterministic speeds where the
model is not the point; the real SmolLM2 serves the /v1/models test (what an editor asks
first).  Every process is killed by PID; every wait is bounded."""

from __future__ import annotations

import json
import os
import signal
import time

import httpx
import openai
import pytest
from nodeproc import NodeProcess, sdk
from nodeproc import audit_records
from test_mesh import knows

from rbee_p2p.protocol.identity import peer_id_from_str

pytestmark = pytest.mark.e2e
HELLO = [{"role": "user", "content": "Say hello."}]
DEAD_AFTER = 3.0
LIVENESS = f"advert_interval = 0.5\nsuspect_after = 1.5\ndead_after = {DEAD_AFTER}\n"


@pytest.fixture
def nodes(tmp_path):
    """start(name, *args) -> a NodeProcess with fast liveness settings; all killed by PID."""
    started = []

    def start(name, *args):
        home = tmp_path / name
        home.mkdir()
        (home / "rbee-node.toml").write_text(LIVENESS)
        node = NodeProcess(home, *args)
        started.append(node)
        return node

    yield start
    for node in started:
        node.kill()


def served(node, model):
    """(requests served, tokens generated) of ``model`` on ``node``."""
    [m] = [m for m in node.status()["models"] if m["name"] == model]
    return m["requests_served"], m["tokens_generated"]


def ask(node, model, max_tokens=8):
    r = sdk(node).chat.completions.create(model=model, messages=HELLO, max_tokens=max_tokens)
    assert r.choices[0].message.content


def test_a_starlark_policy_and_a_pin_choose_the_executing_peer(nodes, tmp_path):
    # B and C serve the same models at the same speed; B has measured its speed (warmed
    # up), C not yet, so the built-in "fastest" policy ranks B first (the control below)
    b = nodes("b", "--no-default-model", "--fake-model", "m:1000", "--fake-model", "n:1000")
    c = nodes("c", "--no-default-model", "--fake-model", "m:1000", "--fake-model", "n:1000")
    policy = tmp_path / "to_c.star"
    policy.write_text(f'CHOSEN = "{c.peer_id}"\n\n'
                      "def route(request, peers, local):\n"
                      '    chosen = filter(lambda p: p["id"] == CHOSEN, peers)\n'
                      "    if not chosen:\n"
                      '        reject("the chosen peer is not available")\n'
                      "    return ids(chosen)\n")
    by_policy = nodes("a1", "--no-default-model", "--policy", str(policy),
                      "--peer", b.addr, "--peer", c.addr)
    by_pin = nodes("a2", "--no-default-model", "--pin", f"m={c.peer_id}",
                   "--peer", b.addr, "--peer", c.addr)
    for n in (b, c, by_policy, by_pin):
        n.wait_ready()
    for model in ("m", "n"):  # > 8 tokens: the speed is measured and then advertised
        sdk(b).completions.create(model=model, prompt="warm up", max_tokens=32)

    def b_measured_and_c_alive(s):
        return knows("m", c.peer_id)(s) and any(
            p["id"] == b.peer_id and p["state"] == "alive" and p["tokens_per_s"].get("n", 0) > 0
            and p["tokens_per_s"].get("m", 0) > 0 for p in s["peers"])

    for entry in (by_policy, by_pin):
        entry.wait_for(b_measured_and_c_alive, 30, "B's measured speed and C in the table")
    assert by_policy.wait_for(lambda s: s["policy"].get("loaded"), 20, "the policy")[
        "policy"]["policy"] == "starlark:to_c.star"

    for entry in (by_policy, by_pin):
        for _ in range(2):
            ask(entry, "m")
    ask(by_pin, "n")  # not pinned: the built-in ranks the measured B first

    assert served(c, "m")[0] == 4 and served(c, "n")[0] == 0
    assert served(b, "m")[0] == 1 and served(b, "n")[0] == 2  # warm-ups and the control
    executed = audit_records(c, "execute", 4)
    assert sorted(r.entry_peer for r in executed) == sorted(
        [peer_id_from_str(by_policy.peer_id)] * 2 + [peer_id_from_str(by_pin.peer_id)] * 2)
    assert {r.outcome for r in executed} == {"ok"}


def slow_pair(nodes):
    """An entry node with no model and a peer serving "slow" at 20 tokens/s."""
    peer = nodes("peer", "--no-default-model", "--fake-model", "slow:20")
    entry = nodes("entry", "--no-default-model", "--peer", peer.addr)
    for n in (peer, entry):
        n.wait_ready()
    entry.wait_for(knows("slow", peer.peer_id), 30, "the peer's model at the entry node")
    return entry, peer


def test_a_peer_killed_mid_stream_is_a_clean_error_event_and_an_audited_error(nodes):
    entry, peer = slow_pair(nodes)
    stream = sdk(entry).chat.completions.create(model="slow", messages=HELLO, max_tokens=400,
                                                stream=True)
    text, killed_at = "", None
    with pytest.raises(openai.APIError) as info:
        for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
            if killed_at is None and len(text.split()) >= 7:
                os.kill(peer.proc.pid, signal.SIGKILL)
                killed_at = time.monotonic()
            assert killed_at is None or time.monotonic() - killed_at < 15, "no end in 15 s"
    took = time.monotonic() - killed_at
    assert took < 10  # the stream ended: a killed peer's connection closes at once
    assert len(text.split()) < 400
    error = info.value
    assert (error.type, error.code) == ("server_error", "engine_failure")
    assert "mid-stream" in error.message
    [record] = audit_records(entry, "entry", 1)
    assert (record.outcome, record.exec_peer) == ("error", peer_id_from_str(peer.peer_id))
    assert record.model == "slow"


def test_a_client_closing_a_forwarded_stream_stops_the_executor(nodes):
    entry, peer = slow_pair(nodes)
    received = 0
    with httpx.stream("POST", entry.url + "/v1/chat/completions", timeout=30, json={
            "model": "slow", "messages": HELLO, "max_tokens": 400, "stream": True}) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            delta = json.loads(line[6:])["choices"][0]["delta"]
            received += len((delta.get("content") or "").split())
            if received >= 7:  # the first token, then a batch: ~0.35 s into 20 s of work
                break  # leaving the block closes the connection
    status = peer.wait_for(lambda s: s["models"][0]["requests_served"] == 1, 10,
                           "the executor to finish the cancelled job")
    generated = status["models"][0]["tokens_generated"]
    assert received <= generated <= received + 2, (received, generated)
    [record] = audit_records(peer, "execute", 1)
    assert record.outcome == "cancelled"
    assert record.tokens_out is not None and received <= record.tokens_out <= generated


def test_models_of_a_peer_are_listed_while_it_lives(nodes):
    peer = nodes("peer")  # the real SmolLM2
    entry = nodes("entry", "--no-default-model", "--peer", peer.addr)
    for n in (peer, entry):
        n.wait_ready()
    entry.wait_for(knows("smollm2", peer.peer_id), 30, "the peer's model at the entry node")
    client = sdk(entry)
    listed = {m.id: m for m in client.models.list()}
    assert "smollm2" in listed  # what Zed or Cursor ask first
    extra = listed["smollm2"].model_extra
    assert (extra["local"], extra["peers"], extra["peer_count"]) == (False, [peer.peer_id], 1)
    assert client.models.retrieve("smollm2").id == "smollm2"

    os.kill(peer.proc.pid, signal.SIGKILL)
    killed_at = time.monotonic()
    while "smollm2" in [m.id for m in client.models.list()]:
        assert time.monotonic() - killed_at < DEAD_AFTER + 3, "still listed past dead_after"
        time.sleep(0.1)
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("smollm2")


def test_a_restarted_static_peer_is_back_within_seconds(nodes, tmp_path):
    b = nodes("b", "--no-default-model", "--fake-model", "m:1000")
    a = nodes("a", "--no-default-model", "--peer", b.addr)
    for n in (a, b):
        n.wait_ready()
    a.wait_for(knows("m", b.peer_id), 15, "B at A")
    b.kill()
    # while the model's only peer is down: a plain 503 with Retry-After, first while B is
    # still thought alive (the dial fails), then once it is dead -- never a 500 carrying
    # libp2p's words, nor a 404 "does not exist"
    chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    seen = set()
    deadline = time.monotonic() + 3 * DEAD_AFTER
    while time.monotonic() < deadline and "dead" not in seen:
        r = httpx.post(a.url + "/v1/chat/completions", json=chat, timeout=30)
        assert r.status_code == 503 and int(r.headers["Retry-After"]) >= 1, r.text
        error = r.json()["error"]
        assert error["code"] == "model_unreachable", error
        assert "libp2p" not in error["message"] and "Error" not in error["message"]
        seen.add("dead" if "went away" in error["message"] else "dialled")
        time.sleep(0.2)
    assert seen == {"dialled", "dead"} or seen == {"dead"}, seen
    time.sleep(2)  # A's dials to B fail meanwhile (libp2p remembers that for 60 s)
    again = NodeProcess(tmp_path / "b", "--no-default-model", "--fake-model", "m:1000",
                        port=b.port, p2p_port=b.p2p_port)  # same identity, same address
    try:
        again.wait_ready()
        started = time.monotonic()
        a.wait_for(knows("m", b.peer_id), 15, "B back at A")
        assert time.monotonic() - started < 3.0
    finally:
        again.kill()


def test_ctrl_c_drains_peers_jobs_and_ends_the_rest_with_an_error_event_and_done(nodes):
    """Ctrl-C at an executor: a peer's job that fits in the drain runs to its end; new jobs
    are refused meanwhile (503 at the entry: nobody else serves it); a forwarded stream and
    a local one still running at the drain's end each end with an SSE error event and
    [DONE] -- never a bare cut -- and the node exits 0."""
    import threading

    peer = nodes("peer", "--no-default-model", "--fake-model", "long:20", "--fake-model",
                 "short:20", "--fake-model", "local:20")
    entry = nodes("entry", "--no-default-model", "--peer", peer.addr)
    for n in (peer, entry):
        n.wait_ready()
    entry.wait_for(knows("short", peer.peer_id), 30, "the peer's models at the entry node")
    results, first = {}, threading.Semaphore(0)

    def stream(key, node, model, max_tokens):
        lines = []
        with httpx.stream("POST", node.url + "/v1/chat/completions", timeout=60, json={
                "model": model, "messages": HELLO, "max_tokens": max_tokens,
                "stream": True}) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    lines.append(line[6:])
                    if len(lines) == 2:
                        first.release()
        results[key] = (r.status_code, lines)

    threads = [threading.Thread(target=stream, args=args, daemon=True) for args in (
        ("forwarded", entry, "long", 1000), ("local", peer, "local", 1000),
        ("fits", entry, "short", 100))]  # 5 s of work, in a 10 s drain
    for t in threads:
        t.start()
    for _ in threads:
        assert first.acquire(timeout=30), "a stream did not start"
    peer.proc.send_signal(signal.SIGINT)
    stopped = time.monotonic()
    time.sleep(1)
    late = httpx.post(entry.url + "/v1/chat/completions", timeout=30, json={
        "model": "short", "messages": HELLO, "max_tokens": 4})
    assert late.status_code == 503, late.text
    for t in threads:
        t.join(40)
    assert peer.proc.wait(30) == 0
    assert time.monotonic() - stopped < 25
    status, lines = results["fits"]
    assert status == 200 and lines[-1] == "[DONE]" and "error" not in lines[-2]
    assert json.loads(lines[-2])["choices"][0]["finish_reason"] == "length"
    for key in ("forwarded", "local"):
        status, lines = results[key]
        assert status == 200 and lines[-1] == "[DONE]", (key, lines[-3:])
        error = json.loads(lines[-2])["error"]
        assert "shutting down" in error["message"], (key, error)
        assert len(lines) < 200  # cut ~10 s into 50 s of work
