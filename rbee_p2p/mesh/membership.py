"""Membership: this node's signed capability adverts (built, sealed, published on
GossipSub at a pace that fits the swarm's size) and the peer table that other nodes'
adverts fill, aged into suspect / dead / forgotten.

Sybil resistance: identities are free, so an advert alone earns little.  A connection may
introduce new identities only at :data:`NEW_PER_S` (after a burst of :data:`NEW_BURST`, a
swarm being joined), checked before the advert is decoded or verified; and the swarm's size as our
advert cadence and the table's liveness limits see it counts peers that proved themselves
(answered a ping or a probe, or ran a job for us) -- thousands of identities that only send
adverts never slow our adverts nor keep themselves alive longer."""

from __future__ import annotations

import logging
from typing import Any, Callable

import trio
from libp2p.peer.id import ID

from .. import __version__
from ..protocol.envelope import Verified, Verifier, seal
from ..protocol.errors import ProtocolError
from ..protocol.identity import NodeKey
from ..protocol.messages import CapabilityAdvert, Price
from ..protocol.peers import PeerEntry, PeerState, PeerTable
from .settings import (Capped, LocalInfo, MeshConfig, advert_topic, advert_ttl_ms, liveness_s,
                       now_ms, reminder_interval_s, short)

__all__ = ["Membership"]

log = logging.getLogger(__name__)

NEW_BURST = 32
NEW_PER_S = 2.0
"""New identities one connection (a GossipSub forwarder) may introduce: ``NEW_BURST`` at
once, then ``NEW_PER_S`` a second."""
PROBE_ANSWER_S = 1.0
"""How long one sealed advert answers probes (unless what we offer changes): a probe flood
costs a frame each, not a signature."""
FORWARDERS = 1024
"""Forwarders whose allowance is remembered (the longest idle are forgotten)."""


class Membership:
    """Our adverts out, peers' adverts in, the table aged.  ``addrs`` gives our dialable
    addresses (the host's, known once it runs)."""

    def __init__(self, config: MeshConfig, key: NodeKey, local: Callable[[], LocalInfo],
                 verifier: Verifier, addrs: Callable[[], list[str]]) -> None:
        self.config = config
        self.key = key
        self.local = local
        self.verifier = verifier
        self.addrs = addrs
        self.table = PeerTable(self_id=key.peer_id, swarm=config.swarm,
                               suspect_after_ms=int(config.suspect_after_s * 1000),
                               dead_after_ms=int(config.dead_after_s * 1000),
                               max_peers=config.max_peers, on_forget=self._forgotten)
        self.forget_listeners: list[Callable[[bytes], None]] = []
        self.proven: set[bytes] = set()  # peers in the table that proved themselves
        # forwarder -> (allowance of new identities, when it was last refilled)
        self._allowance: Capped[bytes, tuple[float, float]] = Capped(FORWARDERS)
        self._seq = 0
        self._change = trio.Event()
        self._answer: tuple[float, bytes] | None = None  # (sealed at, advert) for probes
        # called for a peer that is back (or new): the host forgets its failed dials
        self.on_back: Callable[[bytes], None] = lambda peer: None

    # -- ours ---------------------------------------------------------------------------

    def advert(self) -> CapabilityAdvert:
        """What we offer now, with a sequence number newer than any before (even across
        restarts: it is at least the wall clock in ms)."""
        info = self.local()
        self._seq = max(self._seq + 1, now_ms())
        return CapabilityAdvert(
            swarm=self.config.swarm, seq=self._seq, version=__version__,
            addrs=tuple(self.addrs()[:16]), models=info.models[:64], devices=info.devices[:16],
            queue_depth=info.queue_depth, active_jobs=info.active_jobs, max_queue=info.max_queue,
            jurisdiction=self.config.jurisdiction, price=Price())

    def poke(self) -> None:
        """What we offer changed (load, models): advertise it soon."""
        self._answer = None
        self._change.set()

    def probe_answer(self) -> bytes:
        """Our sealed advert for a probe: the one sealed for the last probe if that was
        less than :data:`PROBE_ANSWER_S` ago and nothing changed since."""
        now = trio.current_time()
        if self._answer is None or now - self._answer[0] >= PROBE_ANSWER_S:
            self._answer = (now, self.sealed_advert())
        return self._answer[1]

    def sealed_advert(self) -> bytes:
        """Our advert, signed, valid a little longer than a peer waits before it calls us
        dead."""
        _, dead = liveness_s(self.config, reminder_interval_s(self.config, self.swarm_size()))
        return seal(self.key, self.advert(), now_ms=now_ms(), ttl_ms=advert_ttl_ms(dead))

    def membership(self) -> tuple[Any, ...]:
        """What a large swarm floods at once: where we are and what we serve (not load)."""
        return (tuple(self.addrs()), tuple((m.name, m.digest, m.modality)
                                           for m in self.local().models))

    async def publish(self, pubsub: Any) -> None:
        """Reminders every ``reminder_interval_s`` (``advert_interval`` in a small swarm),
        and 0.1-0.25 s after a change in what we offer (at most 4 a second: GossipSub drops
        bursts above 10/s per peer and topic).  In a swarm too large to flood load (more
        peers than ``probe_above``) only membership changes are sent at once; routing probes
        a few candidates for their load instead.  Runs until cancelled; a failed publish is
        logged and retried at the next reminder."""
        topic = advert_topic(self.config.swarm)
        last_sent = -1e9
        sent: tuple[Any, ...] = ()
        while True:
            wait = last_sent + 0.25 - trio.current_time()
            if wait > 0:
                await trio.sleep(wait)
            data = self.sealed_advert()
            try:
                await pubsub.publish(topic, data)
            except Exception as exc:
                log.debug("advert publish failed: %s", exc)
            last_sent, sent = trio.current_time(), self.membership()
            if not await self._until_next(last_sent, sent):
                # debounce: one advert for a burst of changes, sent after the request that
                # caused it has its first token (no CPU taken from its prompt processing)
                await trio.sleep(0.1)

    async def _until_next(self, last_sent: float, sent: tuple[Any, ...]) -> bool:
        """Wait for the next advert's reason; True if it is the reminder (idle), False if a
        change.  Keeps the table's liveness limits in step with the reminder pace."""
        while True:
            known = self.swarm_size()
            interval = reminder_interval_s(self.config, known)
            self.table.suspect_after_ms, self.table.dead_after_ms = (
                int(x * 1000) for x in liveness_s(self.config, interval))
            with trio.move_on_at(last_sent + interval) as idle:
                await self._change.wait()
            self._change = trio.Event()
            if idle.cancelled_caught:
                return True
            if known <= self.config.probe_above or self.membership() != sent:
                return False

    def swarm_size(self) -> int:
        """The swarm's size as cadence and liveness see it: the peers that proved
        themselves, and of the others no more than a small swarm holds (``probe_above``):
        only proven peers take a node past the small swarm's pace."""
        return max(len(self.proven), min(len(self.table.peers), self.config.probe_above))

    # -- theirs -------------------------------------------------------------------------

    def prove(self, peer: bytes) -> None:
        """``peer`` answered a ping or a probe, or ran a job for us (kept while it is in
        the table)."""
        if peer in self.table.peers:
            self.proven.add(peer)

    def may_introduce(self, forwarder: bytes) -> bool:
        """Whether ``forwarder`` may bring us one more identity now (spends it if so)."""
        now = trio.current_time()
        tokens, at = self._allowance.get(forwarder, (float(NEW_BURST), now))
        tokens = min(float(NEW_BURST), tokens + (now - at) * NEW_PER_S)
        if tokens < 1:
            self._allowance[forwarder] = (tokens, now)
            return False
        self._allowance[forwarder] = (tokens - 1, now)
        return True

    def apply(self, verified: Verified[CapabilityAdvert], now: int) -> PeerEntry:
        """A verified advert into the table.  Raises what ``PeerTable.apply_advert``
        raises (Stale, Misdirected); calls ``on_back`` for a peer new or not alive."""
        before = self.table.peers.get(verified.sender)
        entry = self.table.apply_advert(verified, now)
        if before is None or before.state is not PeerState.ALIVE:
            self.on_back(verified.sender)
        if before is None:
            log.info("peer %s joined (%s)", short(verified.sender),
                     ", ".join(m.name for m in entry.advert.models) or "no models")
        return entry

    def receive_one(self, sender: bytes, data: bytes, now: int) -> PeerEntry | None:
        """One gossiped advert: verified, applied; None if refused (counted, never
        raises)."""
        if sender == self.key.peer_id:
            return None  # GossipSub hands us our own adverts too
        try:
            verified = self.verifier.verify(data, now, expect=CapabilityAdvert, sender=sender)
            return self.apply(verified, now)
        except ProtocolError as exc:
            if exc.reason not in ("stale", "replayed"):
                log.info("advert refused: %s: %s", exc.reason, exc)
            if exc.reason == "replayed":
                self.table.count_invalid("replayed")
        except Exception as exc:  # a malformed pubsub message
            self.table.count_invalid("malformed")
            log.info("advert refused: %s", exc)
        return None

    def validate(self, forwarder: Any, message: Any) -> bool:
        """GossipSub's topic validator: verify and apply a gossiped advert before it is
        delivered or relayed; only what passed is passed on (an invalid advert dies at the
        first honest node).  Our own adverts pass; an identity new to us passes only
        within its forwarder's allowance (:meth:`may_introduce`).  Never raises."""
        try:
            sender = ID(message.from_id).to_bytes()
            via = forwarder.to_bytes()
        except Exception as exc:
            self.table.count_invalid("malformed")
            log.info("advert refused: %s", exc)
            return False
        if sender == self.key.peer_id:
            return True
        if sender not in self.table.peers and not self.may_introduce(via):
            self.table.count_invalid("new_identities")
            log.info("peer %s brings new identities faster than %s a second: refused",
                     short(via), NEW_PER_S)
            return False
        return self.receive_one(sender, message.data, now_ms()) is not None

    @staticmethod
    async def receive(subscription: Any) -> None:
        """Drain the topic's deliveries until cancelled: :meth:`validate` applied each one
        already (verifying twice would refuse it as a replay)."""
        async for _ in subscription:
            pass

    def _forgotten(self, peer: bytes) -> None:
        self.proven.discard(peer)
        for listener in self.forget_listeners:
            listener(peer)

    def age(self, now: int) -> list[bytes]:
        """Age the table once; returns the peers forgotten."""
        gone = []
        for peer, old, new in self.table.tick(now):
            log.info("peer %s: %s -> %s", short(peer), old.value,
                     new.value if new else "forgotten")
            if new is None:
                gone.append(peer)
        return gone
