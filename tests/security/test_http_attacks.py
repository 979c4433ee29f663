"""Attacks on a real node process over HTTP on loopback (scripted model: the attack, not the
model, is the point); each asserts the outcome that must hold.  Bounded in time; the node
is killed by PID."""

from __future__ import annotations

import httpx
import pytest
from e2e.nodeproc import NodeProcess

pytestmark = pytest.mark.e2e
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    proc = NodeProcess(tmp_path_factory.mktemp("victim"), "--no-default-model", "--no-p2p",
                       "--fake-model", "m:1000")
    try:
        proc.wait_ready()
        yield proc
    finally:
        proc.kill()


def test_json_nested_200k_deep_is_a_400_and_the_node_serves_on(node):
    body = b"[" * 200_000 + b"]" * 200_000
    r = httpx.post(node.url + "/v1/chat/completions", content=body,
                   headers={"Content-Type": "application/json"}, timeout=30)
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and "nested too deeply" in error["message"]
    assert httpx.post(node.url + "/v1/chat/completions", json=CHAT, timeout=30).status_code == 200
