"""The mesh's settings and the small pure helpers its parts share: the advert topic, the
DHT rendezvous key, reminder pacing and liveness limits, a size-capped dict."""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TypeVar

from ..protocol.cadence import (BUDGET_PER_S, CEILING_MS, liveness_limits_ms,
                                membership_interval_ms)
from ..protocol.identity import peer_id_to_str
from ..protocol.messages import DeviceInfo, ModelInfo
from ..routing.probing import PROBE_TIMEOUT_MS
from .executor import Timing, now_ms

__all__ = ["MeshConfig", "LocalInfo", "advert_topic", "rendezvous_key", "PROBE_ID", "now_ms",
           "reminder_interval_s", "liveness_s", "advert_ttl_ms", "Capped", "MAX_MODELS", "short"]

MAX_MODELS = 1024
"""Models remembered per node for routing (pools, large-swarm flags): requests name them."""

PROBE_ID = "/rbee/probe/1.0.0"
"""A stream on which a peer writes its current sealed advert (its load, now) and closes."""


@dataclass(frozen=True)
class MeshConfig:
    listen: tuple[str, ...] = ("/ip4/0.0.0.0/tcp/7834",)
    peers: tuple[str, ...] = ()  # static peers: multiaddrs with /p2p/<id>
    bootstrap: tuple[str, ...] = ()  # DHT bootstrap nodes
    swarm: str = "default"
    mdns: bool = True
    dht: bool = True
    psk: str | None = None  # private swarm: pre-shared key (libp2p pnet)
    allow: tuple[str, ...] | None = None  # private swarm: peer-ID allowlist
    jurisdiction: str = ""
    # peer id -> jurisdiction its operator attests (residency trusts only these; an advert's
    # claim alone meets no residency rule)
    attested: tuple[tuple[str, str], ...] = ()
    believe_claims: bool = False  # peers' own speed claims (a private swarm: one owner's)
    reach_interval_s: float = 300.0  # AutoNAT: ask connected peers to dial us back this often
    advert_interval_s: float = 1.0
    suspect_after_s: float = 3.0
    dead_after_s: float = 8.0
    mdns_interfaces: tuple[str, ...] = ()  # empty: all
    # large swarms (see simulations/README.md): reminders paced to a swarm-wide budget, load
    # not flooded but probed from a few sampled candidates per request
    advert_budget: float = BUDGET_PER_S  # large swarms: reminders a second, swarm-wide
    probe_above: int = 32  # more peers than this serve a model: sample and probe
    probes: int = 8  # candidates probed per request
    probe_timeout_s: float = PROBE_TIMEOUT_MS / 1000  # decide by then (the simulator's too)
    max_peers: int = 4096  # the peer table's cap: dead peers make room, then new ones wait
    ping_interval_s: float = 5.0  # latency: one ping per connected peer this often
    ping_concurrency: int = 4  # ... at most this many at once
    timing: Timing = field(default_factory=Timing)


@dataclass(frozen=True)
class LocalInfo:
    """What this node offers right now (for its advert)."""

    models: tuple[ModelInfo, ...]
    devices: tuple[DeviceInfo, ...]
    queue_depth: int
    active_jobs: int
    max_queue: int


def advert_topic(swarm: str) -> str:
    return f"rbee/{swarm}/adverts/1"


def rendezvous_key(swarm: str) -> str:
    """The DHT provider key under which a swarm's nodes find each other."""
    return hashlib.sha256(f"/rbee/swarm/{swarm}".encode()).hexdigest()


def reminder_interval_s(config: MeshConfig, known_peers: int) -> float:
    """Seconds between this node's advert reminders: ``advert_interval`` in a small swarm
    (up to ``probe_above`` peers: adverts carry the load routing uses); in a large one as
    long as keeps the whole swarm near ``advert_budget`` reminders a second (GossipSub hands
    every node several copies of each: the simulator measured 4 KB/s a node at 0.5 a
    second, 48 KB/s at 5)."""
    floor = int(config.advert_interval_s * 1000)
    if known_peers <= config.probe_above:
        return floor / 1000
    return membership_interval_ms(known_peers, budget_per_s=config.advert_budget,
                                  floor_ms=floor, ceiling_ms=max(floor, CEILING_MS)) / 1000


def liveness_s(config: MeshConfig, interval_s: float) -> tuple[float, float]:
    """(suspect_after, dead_after): as configured, or longer when reminders are sparser
    (suspect after three missed reminders, dead after six)."""
    suspect, dead, _ = liveness_limits_ms(int(interval_s * 1000))
    return max(config.suspect_after_s, suspect / 1000), max(config.dead_after_s, dead / 1000)


def advert_ttl_ms(dead_after_s: float) -> int:
    """How long our sealed advert stays valid: a little (5 s) longer than a peer waits
    before it calls us dead, at most 10 minutes (what a Verifier accepts)."""
    return min(int(dead_after_s * 1000) + 5000, 600_000)


class short:
    """A peer ID for a log line, formatted only if the line is written (base58 costs)."""

    __slots__ = ("peer",)

    def __init__(self, peer: bytes) -> None:
        self.peer = peer

    def __str__(self) -> str:
        return peer_id_to_str(self.peer)[:16]


K = TypeVar("K")
V = TypeVar("V")


class Capped(OrderedDict[K, V]):
    """A dict that keeps at most ``cap`` entries: setting a new key beyond it drops the
    oldest set (for state keyed by what clients send, e.g. model names)."""

    def __init__(self, cap: int) -> None:
        super().__init__()
        self.cap = cap

    def __setitem__(self, key: K, value: V) -> None:
        if key in self:
            self.move_to_end(key)
        super().__setitem__(key, value)
        while len(self) > self.cap:
            self.popitem(last=False)
