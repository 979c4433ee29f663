"""Reachability (AutoNAT v1, mesh/reach.py) between real libp2p hosts and real nodes on
loopback: a node whose address answers is "public", one whose advertised address does not
is "private" (the dial-back comes from a throw-away host, so an existing connection cannot
make every answer "reachable"); dial-back requests are bounded per peer; `rbee-node status`
shows the verdict."""

from __future__ import annotations

import subprocess

import multiaddr
import pytest
import trio
from libp2p.peer.peerinfo import info_from_p2p_addr
from nodeproc import cluster

from rbee_p2p.mesh import reach as reach_module
from rbee_p2p.mesh.host import build_host
from rbee_p2p.mesh.reach import Reach
from rbee_p2p.protocol.identity import NodeKey

pytestmark = pytest.mark.e2e
LISTEN = [multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]


@pytest.mark.parametrize("psk", [None, "ab" * 32], ids=["open", "swarm key"])
async def test_public_when_dialled_back_private_when_not_and_bounded_per_peer(monkeypatch, psk):
    """Under a swarm key too (py-libp2p's own server refuses every request there: it takes
    a pnet connection for a relayed one)."""
    hosts = [build_host(NodeKey.generate(), ["/ip4/127.0.0.1/tcp/0"], psk=psk)
             for _ in range(3)]
    reaches = [Reach(first_after_s=1e6) for _ in hosts]
    with trio.fail_after(60):
        async with hosts[0].run(listen_addrs=LISTEN), hosts[1].run(listen_addrs=LISTEN), \
                hosts[2].run(listen_addrs=LISTEN), trio.open_nursery() as nursery:
            for host, reach in zip(hosts, reaches):
                await nursery.start(reach.run, host, lambda: [], psk)
            for host in hosts[1:]:
                await hosts[0].connect(info_from_p2p_addr(host.get_addrs()[0]))
            servers = [h.get_id().to_bytes() for h in hosts[1:]]
            me = reaches[0]
            assert await me.check(hosts[0], lambda: servers) == "public"
            assert me.observed == [str(hosts[0].get_addrs()[0])] and me.asked == 2
            # at once again: each server answers one request a peer per 30 s
            assert await me.check(hosts[0], lambda: servers) == "public"  # (no new verdict)
            assert all(r.served == {"answered": 1, "refused": 1} for r in reaches[1:])
            monkeypatch.setattr(reach_module, "SERVE_EVERY_S", 0.0)
            closed = multiaddr.Multiaddr(f"/ip4/127.0.0.1/tcp/1/p2p/{hosts[0].get_id()}")
            monkeypatch.setattr(hosts[0], "get_addrs", lambda: [closed])  # nothing listens
            assert await me.check(hosts[0], lambda: servers) == "private"
            assert me.observed == []
            nursery.cancel_scope.cancel()


def test_a_node_reports_its_reachability_in_status(tmp_path):
    with cluster(tmp_path) as nodes:
        b = nodes("b", "--no-default-model")
        b.wait_ready()
        a = nodes("a", "--no-default-model", "--peer", b.addr)
        a.wait_ready()
        status = a.wait_for(lambda s: s["reachability"]["status"] != "unknown", 30,
                            "a reachability verdict")  # the first check is 5 s after start
        assert status["reachability"]["status"] == "public", status["reachability"]
        out = subprocess.run(["rbee-node", "status", "--url", a.url], capture_output=True,
                             text=True, timeout=30, env={**__import__("os").environ,
                                                         "RBEE_HOME": str(a.log.parent)})
        assert "reach    public (by 1 peer(s)), reached at /ip4/127.0.0.1/" in out.stdout, out
