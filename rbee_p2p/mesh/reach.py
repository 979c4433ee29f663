"""Whether this node is reachable from outside: AutoNAT v1 (py-libp2p's protocol, messages
and verdict aggregation, ``libp2p.host.autonat``) against connected peers.

py-libp2p's AutoNAT server dials back with the host the request came in on; that host is
already connected to the requester, so ``connect`` returns at once and every verdict would
be "reachable" (and it would dial every address the peerstore holds, not only the one
asked for).  So each dial-back request is answered from a throw-away host made for it
(its own identity, listening nowhere, the swarm's key), which knows nothing but the address
it is asked to try and is gone with its connection once it has answered.  Requests
are bounded: one a peer per :data:`SERVE_EVERY_S`, :data:`SERVING` at once.  (Under a
swarm key py-libp2p takes every connection for a relayed one and refuses; see
:meth:`Reach._dial_back`.)

As a client a node asks up to :data:`SERVERS` connected peers every ``interval_s`` and
keeps their verdicts: ``public`` / ``private`` once ``min(4, servers asked)`` agree (the
spec's heuristic: more than three), else ``unknown``; ``observed`` holds the addresses the
peers reached it at.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Iterable

import multiaddr
import trio

from ..protocol.identity import NodeKey
from .settings import Capped, short

__all__ = ["Reach", "SERVERS"]

log = logging.getLogger(__name__)

SERVERS = 4
"""Peers asked per check."""
SERVING = 4
"""Dial-back requests answered at once; more are refused."""
SERVE_EVERY_S = 30.0
"""One dial-back request a peer per this long is answered."""
STATUS = {0: "unknown", 1: "public", 2: "private"}


class Reach:
    """This node's reachability, and its answers to others' questions about theirs."""

    def __init__(self, interval_s: float = 300.0, first_after_s: float = 5.0,
                 timeout_s: float = 10.0) -> None:
        self.interval_s, self.first_after_s, self.timeout_s = interval_s, first_after_s, timeout_s
        self.status = "unknown"
        self.observed: list[str] = []
        self.asked = 0  # servers asked in the last check
        self.checked_at: float | None = None  # trio time of the last check
        self.served = {"answered": 0, "refused": 0}
        self._last_served: Capped[bytes, float] = Capped(1024)  # requester -> when
        self._serving = trio.CapacityLimiter(SERVING)

    async def run(self, host: Any, peers: Callable[[], Iterable[bytes]], psk: str | None,
                  task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Answer dial-back requests on ``host`` and check our own reachability against
        ``peers()`` (connected ones are asked) until cancelled."""
        from libp2p.host.autonat.autonat import AUTONAT_PROTOCOL_ID

        host.set_stream_handler(AUTONAT_PROTOCOL_ID, lambda stream: self._answer(stream, psk))
        task_status.started()
        await trio.sleep(self.first_after_s)
        while True:
            await self.check(host, peers)
            await trio.sleep(self.interval_s)

    async def _answer(self, stream: Any, psk: str | None) -> None:
        """One dial-back request, within the bounds, from a host made for it alone (no
        connection, address or auto-dial of it outlives the answer); never raises."""
        from libp2p.host.autonat.autonat import AutoNATService

        from .frames import end_quietly
        from .host import build_host

        peer = stream.muxed_conn.peer_id.to_bytes()
        now = trio.current_time()
        last = self._last_served.get(peer)
        if (last is not None and now - last < SERVE_EVERY_S) \
                or self._serving.statistics().borrowed_tokens >= SERVING:
            self.served["refused"] += 1
            await end_quietly(stream.reset)
            return
        self._last_served[peer] = now
        async with self._serving:
            try:
                with trio.fail_after(self.timeout_s):
                    dialer = build_host(NodeKey.generate(), (), psk=psk)
                    async with dialer.run(listen_addrs=[]):
                        await self._dial_back(AutoNATService(dialer, serve=False), stream)
                self.served["answered"] += 1
            except Exception as exc:
                log.debug("dial-back for %s failed: %s", short(peer), exc)
                await end_quietly(stream.reset)

    @staticmethod
    async def _dial_back(service: Any, stream: Any) -> None:
        """``AutoNATService.handle_stream``, but for its test of a relayed connection:
        under a swarm key (pnet) py-libp2p cannot read a connection's transport addresses
        and would refuse every request as relayed; here a connection with a remote IP
        address is direct (this node opens no circuits)."""
        from libp2p.host.autonat.autonat import _MAX_AUTONAT_MSG_SIZE
        from libp2p.host.autonat.pb.autonat_pb2 import Message
        from libp2p.utils.varint import encode_varint_prefixed, read_varint_prefixed_bytes_limited

        request = Message()
        request.ParseFromString(await read_varint_prefixed_bytes_limited(
            stream, _MAX_AUTONAT_MSG_SIZE))
        remote = stream.get_remote_address()
        observed = service._observed_ip(stream)
        response = await service._handle_request(request, observed, remote is None)
        await stream.write(encode_varint_prefixed(response.SerializeToString()))
        await stream.close()

    async def check(self, host: Any, peers: Callable[[], Iterable[bytes]]) -> str:
        """Ask up to SERVERS connected peers to dial us back; returns the status."""
        from libp2p.host.autonat.autonat import CONFIRMATIONS_REQUIRED, AutoNATService
        from libp2p.host.autonat.pb.autonat_pb2 import Message
        from libp2p.peer.id import ID

        connected = host.get_network().connections
        servers = [ID(p) for p in peers() if connected.get(ID(p))][:SERVERS]
        if not servers:
            return self.status
        client = AutoNATService(host, serve=False,
                                confirmations=min(CONFIRMATIONS_REQUIRED, len(servers)))
        observed = []
        for server in servers:
            try:
                status, addr = await client.query_server(server, timeout=self.timeout_s)
            except Exception as exc:  # a peer that cannot or will not answer says nothing
                log.debug("reachability check with %s failed: %s", server, exc)
                continue
            if status == int(Message.OK) and addr:
                observed.append(str(multiaddr.Multiaddr(addr)))
        if not client.dial_results:
            return self.status  # nobody answered: no news
        client.update_status()
        self.status = STATUS.get(client.get_status(), "unknown")
        self.observed = sorted(set(observed))
        self.asked, self.checked_at = len(servers), trio.current_time()
        return self.status

    def summary(self) -> dict[str, Any]:
        ago = None if self.checked_at is None else round(trio.current_time() - self.checked_at)
        return {"status": self.status, "observed": self.observed, "servers": self.asked,
                "checked_s_ago": ago, "dial_backs": dict(self.served)}
