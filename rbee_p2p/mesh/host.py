"""Building the libp2p host: our identity, Noise only, yamux, TCP, connection limits.

py-libp2p's default host offers Noise, TLS, secio AND plaintext, and a plaintext dialer can
claim any peer ID (DESIGN.md): we always pass exactly one security transport, Noise.  With
an allowlist, the Noise transport itself refuses any other peer right after the handshake,
so a stranger never gets a connection, in either direction.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any, Iterable

import multiaddr
from libp2p import new_host
from libp2p.abc import IHost
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.keys import KeyPair
from libp2p.crypto.x25519 import create_new_key_pair as create_x25519_key_pair
from libp2p.custom_types import TProtocol
from libp2p.network.config import ConnectionConfig
from libp2p.peer.id import ID
from libp2p.security.exceptions import HandshakeFailure
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_PROTOCOL_ID
from libp2p.stream_muxer.yamux.yamux import Yamux

from ..protocol.identity import NodeKey, peer_id_to_str

__all__ = ["build_host", "keypair", "psk_from_secret", "SECURITY_PROTOCOLS", "check_ports_free"]

log = logging.getLogger(__name__)
SECURITY_PROTOCOLS = (NOISE_PROTOCOL_ID,)


def check_ports_free(listen: Iterable[str]) -> None:
    """Refuse listen ports already taken.  py-libp2p binds with SO_REUSEPORT, so a second
    node on the same port would start and silently share (and break) the first one's
    connections.  Raises :class:`ConfigError`."""
    import socket

    from ..errors import ConfigError

    for addr in listen:
        parts = addr.split("/")
        if len(parts) < 5 or parts[3] != "tcp" or parts[4] == "0":
            continue
        family = socket.AF_INET6 if parts[1] == "ip6" else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            # SO_REUSEADDR: connections of a node that just stopped (TIME_WAIT) do not
            # count; a socket still listening there does
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((parts[2], int(parts[4])))
            except OSError as exc:
                raise ConfigError(f"p2p address {addr} is not available ({exc.strerror}); is "
                                  "another rbee-node running? Use --p2p-listen") from None


def keypair(key: NodeKey) -> KeyPair:
    """The libp2p key pair of our node key (same seed, so the same peer ID)."""
    return create_new_key_pair(key.seed)


def psk_from_secret(secret: str) -> str:
    """A libp2p pnet key (64 hex digits) from a passphrase or a 64-hex-digit key."""
    text = secret.strip()
    if len(text) == 64 and all(c in "0123456789abcdefABCDEF" for c in text):
        return text.lower()
    return hashlib.sha256(b"rbee-p2p/psk/v1\0" + text.encode()).hexdigest()


class _AllowlistNoise(NoiseTransport):  # type: ignore[misc]
    def __init__(self, pair: KeyPair, allowed: set[ID]) -> None:
        super().__init__(pair, noise_privkey=create_x25519_key_pair().private_key)
        self.allowed = allowed

    async def secure_inbound(self, conn: Any) -> Any:
        return await self._check(await super().secure_inbound(conn))

    async def secure_outbound(self, conn: Any, peer_id: ID) -> Any:
        return await self._check(await super().secure_outbound(conn, peer_id))

    async def _check(self, secured: Any) -> Any:
        remote = secured.get_remote_peer()
        if remote not in self.allowed:
            log.warning("refused peer %s: not in this swarm's allowlist", remote)
            await secured.close()
            raise HandshakeFailure(f"peer {remote} is not in the allowlist")
        return secured


def build_host(key: NodeKey, listen: Iterable[str], *, psk: str | None = None,
               allow: Iterable[bytes] | None = None, max_connections: int = 256) -> IHost:
    """A host with Noise (only) and yamux on TCP.  Raises ValueError for a bad multiaddr."""
    pair = keypair(key)
    assert pair.public_key.to_bytes() == key.public_key
    if allow is not None:
        allowed = {ID(p) for p in allow} | {ID(key.peer_id)}
        security: Any = _AllowlistNoise(pair, allowed)
    else:
        security = NoiseTransport(pair, noise_privkey=create_x25519_key_pair().private_key)
    config = ConnectionConfig(max_connections_per_peer=1, max_connections=max_connections,
                              high_watermark=max_connections,
                              low_watermark=min(max_connections, 64), min_connections=0)
    host = new_host(key_pair=pair, sec_opt={NOISE_PROTOCOL_ID: security},
                    muxer_opt={TProtocol(YAMUX_PROTOCOL_ID): Yamux},
                    connection_config=config, psk=psk,
                    listen_addrs=[multiaddr.Multiaddr(a) for a in listen])
    log.debug("host %s built", peer_id_to_str(key.peer_id))
    return host
