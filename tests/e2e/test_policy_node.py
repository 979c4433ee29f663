"""A real node routing by a Starlark policy: status, hot reload of a broken and a fixed
version without a restart, requests served throughout; and the `policy test` command as
a process.  The node runs `python -m rbee_p2p.cli` from the package under test (the
installed `rbee-node` script may belong to another checkout)."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

import rbee_p2p
from nodeproc import free_port

pytestmark = pytest.mark.e2e

ROOT = Path(rbee_p2p.__file__).resolve().parent.parent
GOOD = "def route(request, peers, local):\n    return least_loaded(peers)\n"
BROKEN = "X = 1\ndef route(request, peers, local)\n    return []\n"


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "rbee_p2p.cli", *args]


def env(home: Path) -> dict[str, str]:
    return {**os.environ, "RBEE_HOME": str(home),
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}


def wait_for(url: str, predicate, what: str, timeout: float = 20) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        try:
            status = httpx.get(url + "/rbee/status", timeout=5).json()
            if predicate(status):
                return status
        except httpx.HTTPError:
            status = None
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}: {status}")
        time.sleep(0.1)


def chat(url: str) -> httpx.Response:
    return httpx.post(url + "/v1/chat/completions", timeout=20, json={
        "model": "m", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]})


def test_a_node_routes_by_a_policy_and_reloads_it(tmp_path):
    policy = tmp_path / "p.star"
    policy.write_text(GOOD)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(tmp_path / "node.log", "wb")
    proc = subprocess.Popen(cli("start", "--port", str(port), "--no-p2p", "--no-default-model",
                                "--fake-model", "m:500", "--policy", str(policy)),
                            env=env(tmp_path / "home"), stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(url, lambda s: True, "the node", timeout=60)
        status = wait_for(url, lambda s: s["policy"]["loaded"], "the policy")
        assert status["policy"]["policy"] == "starlark:p.star"
        assert chat(url).status_code == 200
        assert wait_for(url, lambda s: s["policy"]["decisions"] >= 1, "a decision")

        policy.write_text(BROKEN)  # reloaded within ~1 s; the built-in decides meanwhile
        status = wait_for(url, lambda s: not s["policy"]["loaded"] and s["policy"]["last_error"],
                          "the broken version")  # (not loaded, no error yet: compiling)
        assert status["policy"]["last_error"]["message"].startswith("p.star:2:33:")
        assert chat(url).status_code == 200
        assert wait_for(url, lambda s: s["policy"]["fallbacks"] >= 1, "a fallback")

        policy.write_text(GOOD + "# fixed\n")
        status = wait_for(url, lambda s: s["policy"]["loaded"], "the fixed version")
        assert status["policy"]["reloads"] == 1  # versions loaded since the start
        before = status["policy"]["fallbacks"]
        assert chat(url).status_code == 200
        status = wait_for(url, lambda s: s["policy"]["decisions"] >= 3, "a decision")
        assert status["policy"]["fallbacks"] == before
        assert proc.poll() is None
    finally:
        proc.kill()
        proc.wait(10)
        log.close()
    output = (tmp_path / "node.log").read_text()
    assert "p.star:2:33" in output and "reloaded" in output


def test_policy_test_as_a_process(tmp_path):
    peers = [{"id": "a", "models": ["m"], "queue_depth": 3}, {"id": "b", "models": ["m"]}]
    run = subprocess.run(
        cli("policy", "test", str(ROOT / "node" / "policies" / "least_loaded.star"),
            "--request", '{"model": "m"}', "--peers", json.dumps(peers), "--json",
            "--timeout-ms", "2000"),
        env=env(tmp_path), capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["candidates"] == ["b", "a"]
    loop = tmp_path / "loop.star"
    loop.write_text("def route(request, peers, local):\n    for i in range(1000000000):\n"
                    "        pass\n")
    started = time.monotonic()
    run = subprocess.run(cli("policy", "test", str(loop), "--request", '{"model": "m"}',
                             "--peers", json.dumps(peers)),
                         env=env(tmp_path), capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "loop.star:2:5" in run.stdout
    assert time.monotonic() - started < 30
