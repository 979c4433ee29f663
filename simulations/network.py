"""The network: regions on several continents, LAN sites inside them, last-mile links,
bandwidth, retransmissions and partitions.

One-way delay between two nodes:

* same site (a home, an office, a rack): 0.15 ms, a LAN;
* same region, other site: the region's metro delay, plus each side's last mile;
* other regions: half the round trip between the regions (approximate public cloud
  inter-region ping times), plus each side's last mile.

Region and metro delays are stretched by a per-pair factor in [1, 1.25] (routes are not
straight lines), fixed for the pair, so a link's delay is the same every time.  Homes have
a last mile of ~6 ms (lognormal) and 5-1000 Mbit/s up; datacenter nodes 0.2 ms and
10 Gbit/s.  A lost segment is modelled as a retransmission (libp2p runs over TCP or QUIC):
the message arrives one retransmission timeout later.  During a partition nothing crosses
between the listed regions and the rest.
"""

from __future__ import annotations

import random
from typing import Sequence

import numpy as np

from .scenario import Partition

__all__ = ["REGIONS", "Network", "place_nodes"]

# name, share of nodes, metro round trip (ms), jurisdiction advertised
REGIONS: tuple[tuple[str, float, float, str], ...] = (
    ("na-west", 0.12, 20, "US"), ("na-east", 0.16, 20, "US"), ("sa-east", 0.06, 25, "BR"),
    ("eu-west", 0.16, 15, "EU"), ("eu-central", 0.12, 12, "DE"), ("asia-east", 0.18, 20, "JP"),
    ("asia-southeast", 0.10, 25, "SG"), ("oceania", 0.04, 20, "AU"),
    ("africa-south", 0.03, 25, "ZA"),
)
_RTT_MS = np.array([
    [0, 65, 175, 140, 150, 105, 170, 140, 290],
    [65, 0, 115, 75, 90, 165, 215, 200, 230],
    [175, 115, 0, 185, 200, 260, 320, 310, 340],
    [140, 75, 185, 0, 20, 220, 160, 260, 160],
    [150, 90, 200, 20, 0, 230, 150, 250, 170],
    [105, 165, 260, 220, 230, 0, 70, 115, 300],
    [170, 215, 320, 160, 150, 70, 0, 95, 270],
    [140, 200, 310, 260, 250, 115, 95, 0, 330],
    [290, 230, 340, 160, 170, 300, 270, 330, 0],
], dtype=float)
for _i, _r in enumerate(REGIONS):
    _RTT_MS[_i, _i] = _r[2]
_OWD = _RTT_MS / 2000.0  # one-way, seconds
LAN_S = 0.00015


def _jitter(lo: object, hi: object) -> object:
    """Per-pair stretch in [1, 1.25]; works on ints and on uint64 arrays alike."""
    h = ((lo * 0x9E3779B1) ^ (hi * 0x85EBCA77)) & 0xFFFFFFFF  # type: ignore[operator]
    h = ((h ^ (h >> 15)) * 0x2C1B3C6D) & 0xFFFFFFFF
    h = h ^ (h >> 12)
    return 1.0 + 0.25 * ((h & 0xFFFF) / 65535.0)


def place_nodes(rng: np.random.Generator, datacenter: Sequence[bool]) -> dict[str, list]:
    """Region, LAN site, last mile (s) and uplink (bit/s) for each node.  Homes form sites
    of 1-3 machines, datacenter nodes racks of up to 8."""
    n = len(datacenter)
    shares = np.array([r[1] for r in REGIONS])
    region = rng.choice(len(REGIONS), size=n, p=shares / shares.sum()).tolist()
    home_access = rng.lognormal(np.log(0.006), 0.5, size=n).tolist()
    home_up = np.clip(rng.lognormal(np.log(30e6), 0.8, size=n), 5e6, 1e9).tolist()
    site = [0] * n
    next_site, open_sites = 0, {}  # (region, datacenter) -> (site id, room left)
    for i in range(n):
        key = (region[i], datacenter[i])
        current = open_sites.get(key)
        if current is None or current[1] <= 0:
            room = int(rng.integers(1, 9)) if datacenter[i] else int(rng.geometric(0.6))
            current = (next_site, room)
            next_site += 1
        site[i] = current[0]
        open_sites[key] = (current[0], current[1] - 1)
    access = [0.0002 if dc else home_access[i] for i, dc in enumerate(datacenter)]
    uplink = [1e10 if dc else home_up[i] for i, dc in enumerate(datacenter)]
    return {"region": region, "site": site, "access": access, "uplink": uplink}


class Network:
    """Delays, reachability and retransmissions between nodes (indices)."""

    def __init__(self, placement: dict[str, list], loss: float, partitions: Sequence[Partition],
                 rng: random.Random) -> None:
        self.region: list[int] = placement["region"]
        self.site: list[int] = placement["site"]
        self.access: list[float] = placement["access"]
        self.uplink: list[float] = placement["uplink"]
        self.region_np = np.array(self.region, dtype=np.int64)
        self.site_np = np.array(self.site, dtype=np.int64)
        self.access_np = np.array(self.access)
        self.uplink_np = np.array(self.uplink)
        self.loss = loss
        self.rng = rng
        names = [r[0] for r in REGIONS]
        self.partitions = tuple(partitions)
        self.partition_sides = []
        for p in partitions:
            unknown = set(p.side) - set(names)
            if unknown:
                raise ValueError(f"unknown regions in partition: {sorted(unknown)}")
            self.partition_sides.append(np.array([name in p.side for name in names]))
        self.cut: np.ndarray | None = None  # per region: which side, while partitioned
        self._cut_list: list[bool] | None = None

    def set_partition(self, index: int | None) -> None:
        """Start partition ``index`` of the scenario, or heal (None)."""
        self.cut = None if index is None else self.partition_sides[index]
        self._cut_list = None if self.cut is None else self.cut.tolist()

    def owd(self, a: int, b: int) -> float:
        """One-way propagation delay in seconds (no transmission time)."""
        if a == b:
            return 0.0
        if self.site[a] == self.site[b]:
            return LAN_S
        lo, hi = (a, b) if a < b else (b, a)
        base = _OWD[self.region[a], self.region[b]] * _jitter(lo, hi)  # type: ignore[operator]
        return float(base) + (self.access[lo] + self.access[hi])

    def owd_many(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """:meth:`owd` for arrays of pairs (same values)."""
        lo = np.minimum(a, b).astype(np.uint64)
        hi = np.maximum(a, b).astype(np.uint64)
        jit = _jitter(lo, hi)
        base = _OWD[self.region_np[a], self.region_np[b]] * jit  # type: ignore[operator]
        out = base + (self.access_np[lo.astype(np.int64)] + self.access_np[hi.astype(np.int64)])
        out = np.where(self.site_np[a] == self.site_np[b], LAN_S, out)
        return np.where(a == b, 0.0, out)

    def reachable(self, a: int, b: int) -> bool:
        cut = self._cut_list
        return cut is None or cut[self.region[a]] == cut[self.region[b]]

    def delay(self, a: int, b: int, size: int) -> float:
        """Time for a message of ``size`` bytes from a to b: propagation, transmission on
        a's uplink, and now and then a retransmission timeout."""
        d = self.owd(a, b) + size * 8.0 / self.uplink[a]
        if self.loss and self.rng.random() < self.loss:
            d += max(0.2, 4.0 * self.owd(a, b))
        return d
