"""The forwarding client: streams to peers (a warm one opened ahead of each peer's next
job), dials with one lock per peer, and ``start`` of a :class:`RemoteJob` that reports
what it learns to the :class:`PeerView`."""

from __future__ import annotations

import logging
from typing import Any

import multiaddr
import trio
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo

from ..dispatch.request import Request, Stamp
from ..errors import Busy, PeerUnavailable
from ..protocol.envelope import Verifier
from ..protocol.identity import NodeKey
from ..protocol.peers import PeerTable
from ..store.writer import AuditWriter
from .executor import PROTOCOL_ID
from .frames import end_quietly
from .peers import PeerView
from .remote import RemoteJob
from .settings import MeshConfig, short

__all__ = ["Client", "MAX_WARM"]

log = logging.getLogger(__name__)

MAX_WARM = 16
"""Peers with a stream opened ahead of their next job."""


class Client:
    """Starts jobs on peers.  ``host`` is set once the libp2p host runs."""

    def __init__(self, config: MeshConfig, key: NodeKey, verifier: Verifier, view: PeerView,
                 audit: AuditWriter | None = None) -> None:
        self.config = config
        self.key = key
        self.verifier = verifier
        self.view = view
        self.table: PeerTable = view.table
        self.audit = audit
        self.host: Any = None
        self._warm: dict[bytes, tuple[Any, float]] = {}  # peer -> (open stream, opened at)
        self._refill_send, self._refill_receive = trio.open_memory_channel[bytes](64)
        self._dial_locks: dict[bytes, trio.Lock] = {}
        self._stale: list[Any] = []  # warm streams of forgotten peers, to be reset
        view.membership.forget_listeners.append(self.forget)

    def forget(self, peer: bytes) -> None:
        """The peer left the table: its dial lock (unless a dial holds it) and its warm
        stream go (the stream is reset by :meth:`tidy`)."""
        lock = self._dial_locks.get(peer)
        if lock is not None and not lock.locked():
            del self._dial_locks[peer]
        warm = self._warm.pop(peer, None)
        if warm is not None:
            self._stale.append(warm[0])

    async def tidy(self) -> None:
        """Reset the warm streams of forgotten peers and drop idle dial locks of peers not
        in the table.  Never raises."""
        stale, self._stale = self._stale, []
        for stream in stale:
            await end_quietly(stream.reset)
        if len(self._dial_locks) > len(self.table.peers):
            for peer, lock in list(self._dial_locks.items()):
                if peer not in self.table.peers and not lock.locked():
                    del self._dial_locks[peer]

    async def start(self, peer: str, request: Request, stamp: Stamp = Stamp()) -> RemoteJob:
        """Open a job on ``peer`` and wait for its first frame.  Raises PeerUnavailable (try
        elsewhere; the peer is then suspect) or a RequestError (the peer's verdict; Busy
        counts as a refusal against it).  Cancel-safe: a cancelled start leaves no stream."""
        view = self.view
        peer_id = view.peer_bytes(peer)
        claim = view.claim(peer_id, request.model)  # as the peer was chosen
        try:
            job = await RemoteJob.start(peer_id, self._open_stream, request, key=self.key,
                                        verifier=self.verifier, timing=self.config.timing,
                                        audit=self.audit, on_failure=view._suspect, stamp=stamp,
                                        on_done=lambda done: view._job_done(done, claim),
                                        admit_by_ms=view._admit_by(peer_id, request))
        except Busy:
            view._refused(peer_id)
            raise
        # the peer answered: open the next job's stream now, over the live connection
        # (never while dialling a peer that may be gone: concurrent dials to one peer stall)
        try:
            self._refill_send.send_nowait(peer_id)
        except trio.WouldBlock:
            pass
        return job

    async def _open_stream(self, peer: bytes, fresh: bool) -> Any:
        """A stream for one job: the warm one opened in advance if it is young enough,
        else a new one.  Raises PeerUnavailable or what libp2p raises."""
        warm = self._warm.pop(peer, None)
        if warm is not None:
            stream, opened = warm
            if not fresh and trio.current_time() - opened < self.config.timing.warm_stream_s:
                return stream
            await end_quietly(stream.reset)
        return await self._new_stream(peer)

    async def keep_warm_streams(self) -> None:
        """Opens the next job's stream to a peer ahead of time (at most MAX_WARM peers).
        Runs until cancelled; never raises for a peer's failure."""
        async for peer in self._refill_receive:
            if peer in self._warm:
                continue
            try:
                with trio.fail_after(3):
                    stream = await self._new_stream(peer)
            except Exception as exc:
                log.debug("no warm stream to %s: %s", short(peer), exc)
                continue
            if len(self._warm) >= MAX_WARM:
                oldest = min(self._warm, key=lambda p: self._warm[p][1])
                await end_quietly(self._warm.pop(oldest)[0].reset)
            self._warm[peer] = (stream, trio.current_time())

    async def _new_stream(self, peer: bytes) -> Any:
        """A new inference stream, dialling first if not connected (to the addresses in
        the peer's advert).  Raises PeerUnavailable (no address) or what libp2p raises."""
        pid = ID(peer)
        if not self.host.get_network().connections.get(pid):
            entry = self.table.peers.get(peer)
            addrs = [multiaddr.Multiaddr(a) for a in (entry.advert.addrs if entry else ())]
            if not addrs:
                raise PeerUnavailable("no address known for the peer")
            await self.dial(PeerInfo(pid, [multiaddr.Multiaddr(
                str(a).split("/p2p/")[0]) for a in addrs]))
        return await self.host.new_stream(pid, [PROTOCOL_ID])

    async def dial(self, info: PeerInfo) -> None:
        """Connect unless connected, one dial at a time per peer: concurrent dials to one
        peer stall py-libp2p.  Raises what ``host.connect`` raises; callers own the
        timeout."""
        peer = info.peer_id.to_bytes()
        lock = self._dial_locks.setdefault(peer, trio.Lock())
        async with lock:
            if not self.host.get_network().connections.get(info.peer_id):
                await self.host.connect(info)
        if not lock.locked() and peer not in self.table.peers:
            self._dial_locks.pop(peer, None)
