"""The libp2p host as built by the mesh: Noise only, yamux, standard protocols untouched."""

import multiaddr
import pytest
import trio
from libp2p.peer.peerinfo import info_from_p2p_addr

from rbee_p2p.mesh.host import build_host, psk_from_secret
from rbee_p2p.protocol.identity import NodeKey

pytestmark = pytest.mark.e2e
LISTEN = ["/ip4/127.0.0.1/tcp/0"]


async def test_noise_only_yamux_and_standard_protocol_ids():
    key = NodeKey.generate()
    host = build_host(key, LISTEN)
    with trio.fail_after(20):
        async with host.run(listen_addrs=[multiaddr.Multiaddr(a) for a in LISTEN]):
            upgrader = host.get_network().upgrader
            assert list(upgrader.security_multistream.transports) == ["/noise"]
            assert list(upgrader.muxer_multistream.transports) == ["/yamux/1.0.0"]
            protocols = set(host.get_mux().get_protocols())
            assert {"/ipfs/id/1.0.0", "/ipfs/ping/1.0.0"} <= protocols
            assert host.get_id().to_bytes() == key.peer_id


async def test_allowlist_refuses_strangers_both_ways():
    a, b, stranger = NodeKey.generate(), NodeKey.generate(), NodeKey.generate()
    ha = build_host(a, LISTEN, allow=[b.peer_id])
    hb = build_host(b, LISTEN, allow=[a.peer_id])
    hs = build_host(stranger, LISTEN)
    listen = [multiaddr.Multiaddr(x) for x in LISTEN]
    with trio.fail_after(30):
        async with ha.run(listen_addrs=listen), hb.run(listen_addrs=listen), \
                hs.run(listen_addrs=listen):
            await ha.connect(info_from_p2p_addr(hb.get_addrs()[0]))
            assert hb.get_id() in ha.get_connected_peers()
            for dialer, target in ((hs, ha), (ha, hs)):
                with pytest.raises(Exception):
                    with trio.fail_after(5):
                        await dialer.connect(info_from_p2p_addr(target.get_addrs()[0]))
            assert hs.get_id() not in ha.get_connected_peers()


def test_psk_from_a_passphrase_or_a_key():
    assert psk_from_secret("ab" * 32) == "ab" * 32
    derived = psk_from_secret("team secret")
    assert len(derived) == 64 and derived == psk_from_secret(" team secret ")
    assert derived != psk_from_secret("other")


def test_a_taken_p2p_port_is_refused_up_front():
    import socket

    from rbee_p2p.errors import ConfigError
    from rbee_p2p.mesh.host import check_ports_free

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError, match="another rbee-node"):
            check_ports_free([f"/ip4/127.0.0.1/tcp/{port}"])
    check_ports_free([f"/ip4/127.0.0.1/tcp/{port}", "/ip4/127.0.0.1/tcp/0"])
