"""mDNS discovery between two nodes in network namespaces this test creates (veth pair).

Nothing is sent on the machine's real interfaces: each node runs inside its own namespace,
announces only on its end of the veth pair, and is queried through its namespace's
loopback.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import uuid

import pytest
from nodeproc import NodeProcess

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(os.geteuid() != 0 or shutil.which("ip") is None,
                       reason="needs root and iproute2 to create network namespaces"),
]


def sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True, timeout=30)


@pytest.fixture
def namespaces():
    tag = uuid.uuid4().hex[:6]
    ns = (f"rbee-a-{tag}", f"rbee-b-{tag}")
    veth = (f"rba{tag}", f"rbb{tag}")
    ips = ("10.231.77.1", "10.231.77.2")
    try:
        for name in ns:
            sh("ip", "netns", "add", name)
            sh("ip", "-n", name, "link", "set", "lo", "up")
        sh("ip", "link", "add", veth[0], "type", "veth", "peer", "name", veth[1])
        for name, dev, ip in zip(ns, veth, ips):
            sh("ip", "link", "set", dev, "netns", name)
            sh("ip", "-n", name, "addr", "add", f"{ip}/24", "dev", dev)
            sh("ip", "-n", name, "link", "set", dev, "up")
            sh("ip", "-n", name, "route", "add", "224.0.0.0/4", "dev", dev)
        yield list(zip(ns, veth, ips))
    finally:
        for name in ns:
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)


def peers_in(ns: str, node: NodeProcess) -> list[dict]:
    out = subprocess.run(["ip", "netns", "exec", ns, "rbee-node", "peers", "--url", node.url,
                          "--json"], capture_output=True, text=True, timeout=30)
    return json.loads(out.stdout) if out.returncode == 0 else []


def test_two_nodes_find_each_other_by_mdns(namespaces, tmp_path):
    nodes = []
    try:
        for (ns, dev, ip), name in zip(namespaces, "ab"):
            # a: only its veth; b: every interface of its namespace (lo and its veth), as a
            # node started without --mdns-interface does
            only = ("--mdns-interface", dev) if name == "a" else ()
            node = NodeProcess(tmp_path / name, "-v", "--mdns", *only, "--no-dht",
                               "--no-default-model", prefix=("ip", "netns", "exec", ns),
                               p2p_host=ip)
            nodes.append((ns, node))
        for _, node in nodes:
            node.wait_ready()
        deadline = time.monotonic() + 30
        (ns_a, a), (ns_b, b) = nodes
        while True:
            seen_by_a = [p["id"] for p in peers_in(ns_a, a)]
            seen_by_b = [p["id"] for p in peers_in(ns_b, b)]
            if b.peer_id in seen_by_a and a.peer_id in seen_by_b:
                break
            assert time.monotonic() < deadline, (a.output()[-2000:], b.output()[-2000:])
            time.sleep(0.3)
        assert "mDNS: found" in a.output() + b.output()
    finally:
        for _, node in nodes:
            node.kill()
