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


def test_slowloris_with_2000_half_open_connections_leaves_health_answering(tmp_path):
    """2,000 connections that never finish their headers, against a node started with the
    common soft limit of 1,024 open files: /health answers within a second throughout, and
    the half-open connections are closed by the node (its idle timeout), not kept."""
    import resource
    import socket
    import time

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 2200:  # the attacker (this process) needs the descriptors too
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4096), hard))
    proc = NodeProcess(tmp_path / "n", "--no-default-model", "--no-p2p", "--fake-model",
                       "m:1000",
                       prefix=("prlimit", f"--nofile=1024:{hard}"))
    sockets = []
    try:
        proc.wait_ready()
        for i in range(2000):
            s = socket.create_connection(("127.0.0.1", proc.port), timeout=5)
            s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow-" + str(i).encode())
            sockets.append(s)
        worst = 0.0
        deadline = time.monotonic() + 8
        while time.monotonic() < deadline:
            started = time.monotonic()
            r = httpx.get(proc.url + "/health", timeout=5)
            worst = max(worst, time.monotonic() - started)
            assert r.status_code == 200
            time.sleep(0.2)
        assert worst < 1.0, worst
        closed = 0
        for s in sockets:  # by now (> 5 s) the node has closed them
            s.settimeout(0.5)
            try:
                closed += s.recv(1) == b""
            except (TimeoutError, OSError):
                pass
        assert closed >= 1900, closed
        r = httpx.post(proc.url + "/v1/chat/completions", json=CHAT, timeout=30)
        assert r.status_code == 200
    finally:
        for s in sockets:
            s.close()
        proc.kill()
