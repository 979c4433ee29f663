"""Measured round trips to peers: a libp2p ping (``/ipfs/ping/1.0.0``, answered by every
py-libp2p host) to each connected peer in the table every ``interval`` seconds, at most
``concurrency`` at a time, smoothed (an EWMA: ``routing.places.smoothed_rtt``, which the
simulator runs too) into what routing sees as ``latency_ms``.

A connection on which pings go unanswered :data:`UNANSWERED` times in a row is closed: new
streams on it hang (a connection the other side, a NAT or a cut dial left half-dead; its
peer's adverts may still arrive through others), and the next dial gets a fresh one."""

from __future__ import annotations

import logging
from typing import Any, Callable, Container, Iterable

import trio

from ..routing.places import smoothed_rtt
from .frames import end_quietly
from .settings import short

__all__ = ["Latency", "PING_ID"]

log = logging.getLogger(__name__)

PING_ID = "/ipfs/ping/1.0.0"
UNANSWERED = 2
"""Pings in a row a connected peer leaves unanswered before its connection is closed."""


class Latency:
    """Smoothed round trip per peer, in ms.  Bounded: a peer's entry goes with it
    (:meth:`forget`); only peers the caller names are pinged."""

    def __init__(self, interval_s: float = 5.0, concurrency: int = 4,
                 timeout_s: float = 2.0) -> None:
        self.interval_s = interval_s
        self.concurrency = concurrency
        self.timeout_s = timeout_s
        self.rtt: dict[bytes, float] = {}
        self.pings = {"sent": 0, "answered": 0, "failed": 0, "reconnects": 0}
        self._unanswered: dict[bytes, int] = {}  # peer -> pings failed in a row
        self.on_answer: Callable[[bytes], None] = lambda peer: None  # it proved itself

    def record(self, peer: bytes, ms: float) -> None:
        self.rtt[peer] = smoothed_rtt(self.rtt.get(peer), ms)

    def ms(self, peer: bytes) -> float | None:
        return self.rtt.get(peer)

    def forget(self, peer: bytes) -> None:
        self.rtt.pop(peer, None)
        self._unanswered.pop(peer, None)

    def keep(self, known: Container[bytes]) -> None:
        """Drop the round trips of peers not in ``known`` (a ping that ended after its
        peer was forgotten)."""
        for peer in [p for p in (*self.rtt, *self._unanswered) if p not in known]:
            self.forget(peer)

    async def run(self, host: Any, peers: Callable[[], Iterable[bytes]]) -> None:
        """Ping ``peers()`` (those connected) every ``interval_s`` until cancelled.  Never
        raises for a peer's failure."""
        limiter = trio.CapacityLimiter(self.concurrency)
        from libp2p.peer.id import ID

        while True:
            connected = host.get_network().connections
            targets = [p for p in peers() if connected.get(ID(p))]
            async with trio.open_nursery() as nursery:
                for peer in targets:
                    nursery.start_soon(self._ping_with, limiter, host, peer)
            await trio.sleep(self.interval_s)

    async def _ping_with(self, limiter: trio.CapacityLimiter, host: Any, peer: bytes) -> None:
        async with limiter:
            if await self.ping(host, peer) is not None:
                self._unanswered.pop(peer, None)
                return
            failed = self._unanswered[peer] = self._unanswered.get(peer, 0) + 1
            if failed >= UNANSWERED:
                del self._unanswered[peer]
                self.pings["reconnects"] += 1
                log.info("peer %s left %d pings unanswered: its connection is closed, the "
                         "next dial opens a new one", short(peer), failed)
                from libp2p.peer.id import ID

                await end_quietly(lambda: host.get_network().close_peer(ID(peer)))

    async def ping(self, host: Any, peer: bytes) -> float | None:
        """One ping on a new stream; records and returns the round trip (ms), None if it
        failed or took longer than ``timeout_s``.  Never raises; cancel-safe (a
        cancelled ping records nothing)."""
        from libp2p.host.ping import perform_ping_roundtrip
        from libp2p.peer.id import ID

        self.pings["sent"] += 1
        stream = None
        try:
            with trio.fail_after(self.timeout_s):
                stream = await host.new_stream(ID(peer), [PING_ID])
                started = trio.current_time()
                await perform_ping_roundtrip(stream)
                ms = (trio.current_time() - started) * 1000
        except Exception as exc:
            self.pings["failed"] += 1
            log.debug("ping of %s failed: %s", short(peer), exc)
            if stream is not None:
                await end_quietly(stream.reset)
            return None
        self.pings["answered"] += 1
        self.record(peer, ms)
        self.on_answer(peer)
        await end_quietly(stream.close)
        return ms
