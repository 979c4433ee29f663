"""GossipSub on one topic: the mesh, its heartbeat repair, and what a flood costs.

Faithful to: the mesh degree (each node keeps D mesh peers, grafts up to D below D_lo,
prunes to D above D_hi at its heartbeat), eager forwarding (a node forwards a new message
to every mesh peer except the one it came from, after validating it), per-hop delay =
propagation + transmission on the sender's uplink + validation, the retransmission of lost
segments, and the control traffic of lazy gossip (IHAVE to D_lazy non-mesh peers each
heartbeat, listing the message ids of the last ``history_gossip`` heartbeats).

Simplified (documented in the README):

* a flood is computed at once: the first-arrival time of a message at every node is the
  shortest path over live mesh links (weights as above).  Equivalent to eager push as long
  as links do not queue: no bandwidth contention, no py-libp2p per-peer rate limit or
  32-deep queue (they would only make the flood design look worse);
* IHAVE/IWANT repair is counted in bytes but delivers nothing: a node cut off from the
  mesh (a partition) misses what was published meanwhile, as in GossipSub once the
  message leaves the message cache;
* all heartbeats run at the same virtual instant; no peer scoring, no IDONTWANT (v1.2),
  no opportunistic grafting;
* a partition does not rewire the mesh: links across it are dead until it heals.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np

from .network import Network
from .scenario import Gossip

__all__ = ["Mesh", "Flood", "frame_bytes", "IHAVE_ID_BYTES"]

IHAVE_ID_BYTES = 50
"""A py-libp2p message id (sender peer id + seqno) plus protobuf framing."""
_CONTROL_BYTES = 40  # RPC + yamux + noise framing of one control message


def frame_bytes(data_len: int, topic_len: int = 24) -> int:
    """Bytes on the wire for one GossipSub message carrying ``data_len`` bytes: protobuf
    Message (from 40, seqno 10, topic, signature 66, data + 3) in an RPC, length prefix,
    yamux header (12) and noise frame (18)."""
    return data_len + 3 + 40 + 10 + topic_len + 2 + 66 + 3 + 2 + 12 + 18


@dataclass
class Flood:
    """One message's spread: arrival offsets (s, inf where it never arrives), how many
    copies each node received and sent."""

    arrival: np.ndarray
    received: np.ndarray
    sent: np.ndarray

    def percentile(self, alive: np.ndarray, q: float = 99.0) -> float:
        """Seconds until ``q``% of the live nodes (the sender included) have it; inf if
        that many never do."""
        values = self.arrival[alive]
        if values.size == 0:
            return 0.0
        return float(np.percentile(values, q, method="higher"))


class Mesh:
    """The mesh of one topic over node indices 0..capacity-1 (absent nodes have no links)."""

    def __init__(self, capacity: int, params: Gossip, net: Network, rng: random.Random) -> None:
        self.n = capacity
        self.p = params
        self.net = net
        self.rng = rng
        self.links: list[set[int]] = [set() for _ in range(capacity)]
        self.present = np.zeros(capacity, dtype=bool)  # in the topic (alive)
        self._members: list[int] = []
        self._pos: dict[int, int] = {}
        self.version = 0  # bumped whenever links or membership change
        self._arrays_version = -1
        self.control_bytes = 0  # GRAFT/PRUNE messages sent

    # -- membership and links -----------------------------------------------------------

    def join(self, node: int) -> None:
        """A node subscribes: it grafts D random members with room."""
        self._pos[node] = len(self._members)
        self._members.append(node)
        self.present[node] = True
        self._fill(node, self.p.degree)
        self.version += 1

    def leave(self, node: int) -> None:
        """A node is gone (left or crashed): its links die; neighbours repair at their next
        heartbeat."""
        if not self.present[node]:
            return
        index = self._pos.pop(node)
        last = self._members.pop()
        if last != node:
            self._members[index] = last
            self._pos[last] = index
        self.present[node] = False
        for peer in self.links[node]:
            self.links[peer].discard(node)
        self.links[node].clear()
        self.version += 1

    def _fill(self, node: int, target: int) -> None:
        tries = 0
        members = self._members
        while len(self.links[node]) < target and tries < 8 * target and len(members) > 1:
            tries += 1
            peer = members[self.rng.randrange(len(members))]
            if peer == node or peer in self.links[node]:
                continue
            if len(self.links[peer]) >= self.p.degree_high:
                continue
            self.links[node].add(peer)
            self.links[peer].add(node)
            self.control_bytes += 2 * _CONTROL_BYTES

    def heartbeat(self) -> None:
        """Every member below D_lo grafts up to D; above D_hi prunes down to D."""
        changed = False
        for node in list(self._members):
            links = self.links[node]
            if len(links) < self.p.degree_low:
                self._fill(node, self.p.degree)
                changed = True
            elif len(links) > self.p.degree_high:
                for peer in self.rng.sample(sorted(links), len(links) - self.p.degree):
                    links.discard(peer)
                    self.links[peer].discard(node)
                    self.control_bytes += _CONTROL_BYTES
                changed = True
        if changed:
            self.version += 1

    def members(self) -> list[int]:
        return self._members

    # -- floods ---------------------------------------------------------------------------

    def _arrays(self) -> None:
        """Padded neighbour arrays (row i: the nodes linked to i) and link delays."""
        if self._arrays_version == self.version:
            return
        width = max([len(s) for s in self.links] + [1])
        nbr = np.full((self.n, width), self.n, dtype=np.int64)  # self.n: a sentinel
        for i, links in enumerate(self.links):
            if links:
                row = sorted(links)
                nbr[i, :len(row)] = row
        valid = nbr < self.n
        rows = np.repeat(np.arange(self.n), width).reshape(self.n, width)
        lat = np.full(nbr.shape, np.inf)
        lat[valid] = self.net.owd_many(nbr[valid], rows[valid])
        self.nbr, self.valid, self.rows = nbr, valid, rows
        self.lat = lat + self.p.hop_ms / 1000.0
        up = np.append(self.net.uplink_np[: self.n], np.inf)
        self.inv_up = 8.0 / up[nbr]  # seconds per byte on the sender's uplink
        self._arrays_version = self.version

    def flood(self, source: int, data_len: int, loss_rng: np.random.Generator) -> Flood:
        """Spread one message from ``source`` (bytes: ``data_len`` of payload)."""
        self._arrays()
        size = frame_bytes(data_len)
        weight = self.lat + size * self.inv_up
        if self.net.loss:
            lost = loss_rng.random(weight.shape) < self.net.loss
            weight = np.where(lost, weight + np.maximum(0.2, 4.0 * self.lat), weight)
        cut = self.net.cut
        if cut is not None:
            side = np.append(cut[self.net.region_np[: self.n]], False)
            weight = np.where(side[self.nbr] != side[self.rows], np.inf, weight)
        arrival = np.full(self.n + 1, np.inf)
        arrival[source] = 0.0
        pred = np.full(self.n, -1, dtype=np.int64)
        absent = ~self.present
        for _ in range(4 * self.n):
            candidate = arrival[self.nbr] + weight
            k = candidate.argmin(axis=1)
            best = candidate[np.arange(self.n), k]
            best[absent] = np.inf
            better = best < arrival[: self.n]
            if not better.any():
                break
            arrival[: self.n][better] = best[better]
            pred[better] = self.nbr[better, k[better]]
        arrival = arrival[: self.n]
        # j = nbr[i, k] sends to i if j got the message, the link works, and i is not
        # the peer j got it from
        padded = np.append(arrival, np.inf)
        padded_pred = np.append(pred, -2)
        sends = (np.isfinite(padded[self.nbr]) & np.isfinite(weight) & self.valid
                 & (padded_pred[self.nbr] != self.rows) & self.present[:, None])
        received = sends.sum(axis=1)
        sent = np.bincount(self.nbr[sends], minlength=self.n + 1)[: self.n]
        return Flood(arrival, received, sent)

    def distances_to(self, target: int, data_len: int) -> np.ndarray:
        """Seconds a message of ``data_len`` bytes published by each node takes to reach
        ``target`` over the mesh (inf: never), without retransmissions.  The flood design
        uses it to know how old the adverts a node holds are."""
        self._arrays()
        size = frame_bytes(data_len)
        own_up = 8.0 / np.asarray(self.net.uplink_np[: self.n])
        weight = self.lat + size * own_up[:, None]  # j -> nbr[j, k], on j's uplink
        cut = self.net.cut
        if cut is not None:
            side = np.append(cut[self.net.region_np[: self.n]], False)
            weight = np.where(side[self.nbr] != side[self.rows], np.inf, weight)
        dist = np.full(self.n + 1, np.inf)
        dist[target] = 0.0
        absent = ~self.present
        for _ in range(4 * self.n):
            best = (dist[self.nbr] + weight).min(axis=1)
            best[absent] = np.inf
            better = best < dist[: self.n]
            if not better.any():
                break
            dist[: self.n][better] = best[better]
        return dist[: self.n]

    def ihave_bytes(self, messages_in_window: int) -> int:
        """Bytes of IHAVE one node receives per heartbeat (and about as many it sends)."""
        if messages_in_window <= 0:
            return 0
        return self.p.lazy * (_CONTROL_BYTES + IHAVE_ID_BYTES * messages_in_window)
