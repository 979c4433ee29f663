"""The peer table: who is out there, what they offer, and whether they are alive (pure).

Fed with verified capability adverts and with failures seen by the forwarding layer; aged by
``tick(now_ms)``.  Liveness follows memberlist's ALIVE / SUSPECT / DEAD, with transitions as
data (``TRANSITIONS``): silence longer than ``suspect_after_ms`` makes a peer SUSPECT, longer
than ``dead_after_ms`` DEAD, and a DEAD peer is forgotten after ``forget_after_ms``.  A
failed request makes a peer SUSPECT at once; a fresh advert makes it ALIVE again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Callable, Mapping

from .envelope import Verified
from .errors import Misdirected, ProtocolError
from .messages import CapabilityAdvert

__all__ = ["PeerState", "PeerEntry", "PeerTable", "TRANSITIONS", "Stale"]


class PeerState(Enum):
    ALIVE = "alive"
    SUSPECT = "suspect"
    DEAD = "dead"


class Stale(ProtocolError):
    """An advert older than (or as old as) the one already held for that peer."""

    reason = "stale"


P = PeerState
# (state, event) -> new state; events: "advert", "silence" (aged past the state's limit),
# "failure" (a request to the peer failed)
TRANSITIONS: Mapping[tuple[PeerState, str], PeerState] = {
    (P.ALIVE, "advert"): P.ALIVE,
    (P.SUSPECT, "advert"): P.ALIVE,
    (P.DEAD, "advert"): P.ALIVE,
    (P.ALIVE, "silence"): P.SUSPECT,
    (P.SUSPECT, "silence"): P.DEAD,
    (P.ALIVE, "failure"): P.SUSPECT,
    (P.SUSPECT, "failure"): P.SUSPECT,
    (P.DEAD, "failure"): P.DEAD,
}


@dataclass
class PeerEntry:
    peer_id: bytes
    advert: CapabilityAdvert
    received_ms: int  # when the current advert arrived (receiver's clock)
    state: PeerState = PeerState.ALIVE
    changed_ms: int = 0  # when the state last changed

    def age_ms(self, now_ms: int) -> int:
        return max(0, now_ms - self.received_ms)


@dataclass
class PeerTable:
    self_id: bytes
    swarm: str
    suspect_after_ms: int = 3_000
    dead_after_ms: int = 8_000
    forget_after_ms: int = 60_000
    max_peers: int = 4_096
    peers: dict[bytes, PeerEntry] = field(default_factory=dict)
    counters: dict[str, int] = field(default_factory=dict)
    # told of every peer that leaves the table (forgotten or evicted), so that whatever
    # else is kept per peer leaves with it
    on_forget: Callable[[bytes], None] | None = None

    def _count(self, what: str) -> None:
        self.counters[what] = self.counters.get(what, 0) + 1

    def _move(self, entry: PeerEntry, event: str, now_ms: int) -> bool:
        new = TRANSITIONS[(entry.state, event)]
        changed = new is not entry.state
        if changed:
            entry.state, entry.changed_ms = new, now_ms
        return changed

    def apply_advert(self, verified: Verified[CapabilityAdvert], now_ms: int) -> PeerEntry:
        """Take a verified advert.  Raises :class:`Stale` (not newer than the one held),
        :class:`Misdirected` (another swarm, our own, or the table is full); counted.  A
        new peer in a full table (``max_peers``) takes the place of a dead peer; with no
        dead peer it is refused (the live ones are kept)."""
        sender, advert = verified.sender, verified.message
        try:
            if advert.swarm != self.swarm:
                raise Misdirected(f"advert for swarm {advert.swarm!r}")
            if sender == self.self_id:
                raise Misdirected("our own advert")
            entry = self.peers.get(sender)
            if entry is not None and advert.seq <= entry.advert.seq:
                raise Stale(f"advert seq {advert.seq} is not newer than {entry.advert.seq}")
            if entry is None and len(self.peers) >= self.max_peers and not self._evict():
                raise Misdirected("peer table full")
        except ProtocolError as exc:
            self._count(f"rejected_{exc.reason}")
            raise
        self._count("accepted")
        if entry is None:
            entry = self.peers[sender] = PeerEntry(sender, advert, now_ms, changed_ms=now_ms)
            self._count("joined")
        else:
            entry.advert, entry.received_ms = advert, now_ms
            self._move(entry, "advert", now_ms)
        return entry

    def _evict(self) -> bool:
        """Forget a dead peer (the first found, in the order they joined: a scan that ends
        early, as this runs for each new peer while the table is full); False if none is
        dead."""
        victim = next((e.peer_id for e in self.peers.values() if e.state is P.DEAD), None)
        if victim is None:
            return False
        self._forget(victim)
        self._count("evicted")
        return True

    def _forget(self, peer_id: bytes) -> None:
        del self.peers[peer_id]
        if self.on_forget is not None:
            self.on_forget(peer_id)

    def count_invalid(self, reason: str) -> None:
        """Record an advert that failed verification before reaching the table."""
        self._count(f"rejected_{reason}")

    def report_failure(self, peer_id: bytes, now_ms: int) -> None:
        entry = self.peers.get(peer_id)
        if entry is not None:
            self._move(entry, "failure", now_ms)

    def tick(self, now_ms: int) -> list[tuple[bytes, PeerState, PeerState | None]]:
        """Age every entry; returns (peer, old state, new state or None if forgotten)."""
        changes: list[tuple[bytes, PeerState, PeerState | None]] = []
        for peer_id, entry in list(self.peers.items()):
            age = entry.age_ms(now_ms)
            old = entry.state
            if old is P.DEAD and age > self.forget_after_ms:
                self._forget(peer_id)
                changes.append((peer_id, old, None))
                continue
            limit = self.suspect_after_ms if old is P.ALIVE else self.dead_after_ms
            if old is not P.DEAD and age > limit and self._move(entry, "silence", now_ms):
                changes.append((peer_id, old, entry.state))
                if entry.state is P.SUSPECT and age > self.dead_after_ms:
                    self._move(entry, "silence", now_ms)
                    changes[-1] = (peer_id, old, entry.state)
        return changes

    def alive(self) -> list[PeerEntry]:
        return [e for e in self.peers.values() if e.state is P.ALIVE]
