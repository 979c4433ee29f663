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


@pytest.fixture(scope="module")
def tenanted(tmp_path_factory):
    """A node with tenants: "capped" (10 tokens a day), "single" (one request at a time)."""
    from rbee_p2p.tenancy.tenants import TenantBook

    home = tmp_path_factory.mktemp("tenanted")
    book = TenantBook.open(home)
    keys = {"capped": book.add("capped", tokens_per_day=10),
            "single": book.add("single", concurrent=1)}
    book.save()
    proc = NodeProcess(home, "--no-default-model", "--no-p2p", "--fake-model", "m:50")
    try:
        proc.wait_ready()
        yield proc, keys
    finally:
        proc.kill()


def test_twenty_concurrent_requests_overshoot_a_daily_quota_by_one_request_at_most(tenanted):
    """Before: 17 of 20 (plain) and 20 of 20 (streamed) admitted, 340x the quota."""
    import threading

    proc, keys = tenanted
    codes = []

    def one(stream):
        r = httpx.post(proc.url + "/v1/chat/completions", json={**CHAT, "stream": stream},
                       headers={"Authorization": f"Bearer {keys['capped']}"}, timeout=30)
        codes.append(r.status_code)

    threads = [threading.Thread(target=one, args=(i % 2 == 0,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(codes) == 20 and codes.count(429) >= 15 and set(codes) <= {200, 429}, codes
    usage = proc.status()["tenancy"]["usage"]["capped"]
    assert usage["tokens_today"] <= 10 + CHAT["max_tokens"], usage
    assert usage["reserved"] == 0 and usage["in_flight"] == 0


def test_streams_reset_right_after_sending_leave_no_slot_held(tenanted):
    """Before: a client resetting 1 ms after its request left the tenant's in-flight count
    stuck, and a one-at-a-time tenant got 429 until a restart."""
    import json
    import socket
    import struct
    import time

    proc, keys = tenanted
    body = json.dumps({**CHAT, "max_tokens": 200, "stream": True}).encode()
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
            f"\r\nAuthorization: Bearer {keys['single']}\r\nContent-Length: {len(body)}\r\n\r\n")
    for _ in range(20):
        s = socket.create_connection(("127.0.0.1", proc.port), timeout=5)
        s.sendall(head.encode() + body)
        time.sleep(0.001)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()  # RST
    deadline = time.monotonic() + 10
    while proc.status()["tenancy"]["usage"]["single"]["in_flight"]:
        assert time.monotonic() < deadline, proc.status()["tenancy"]["usage"]["single"]
        time.sleep(0.1)
    r = httpx.post(proc.url + "/v1/chat/completions", json=CHAT, timeout=30,
                   headers={"Authorization": f"Bearer {keys['single']}"})
    assert r.status_code == 200, r.text


def test_status_without_the_admin_key_tells_nothing(tenanted):
    """Before: every tenant name with its usage, model paths and peers."""
    proc, _ = tenanted
    r = httpx.get(proc.url + "/rbee/status", timeout=10)
    assert r.status_code == 401
    assert "capped" not in r.text and "single" not in r.text and "models" not in r.text
    assert proc.status()["tenancy"]["tenants"] == 2  # the admin key opens it
