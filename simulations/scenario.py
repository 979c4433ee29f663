"""Scenarios: TOML files read into frozen, validated settings.

Every setting has a default, so a scenario file names only what makes it special; an
unknown key is an error (a typo must not silently run the default).  See
``scenarios/*.toml`` for annotated examples.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from rbee_p2p.mesh.settings import MeshConfig
from rbee_p2p.routing.probing import PROBE_TIMEOUT_MS

__all__ = ["Scenario", "Workload", "Surge", "Routing", "Gossip", "Network", "Partition",
           "Churn", "Malicious", "Sim", "load", "parse", "ScenarioError"]


_NODE = MeshConfig()  # the node's defaults, where a setting mirrors one of the node's


class ScenarioError(ValueError):
    """A scenario file is malformed or names an unknown setting."""


@dataclass(frozen=True)
class Surge:
    """Arrivals multiplied by ``factor`` between ``start_s`` and ``end_s`` (flash crowd)."""

    start_s: float
    end_s: float
    factor: float


@dataclass(frozen=True)
class Workload:
    load: float = 0.8  # offered load: arrivals x mean work / total capacity, per model
    arrivals: str = "poisson"  # "poisson" or "bursty" (on/off modulated Poisson)
    burst_factor: float = 3.0  # bursty: rate multiplier while a burst is on
    burst_fraction: float = 0.1  # bursty: share of time in bursts
    burst_mean_s: float = 3.0  # bursty: mean burst length
    prompt_tokens_median: float = 400.0
    output_tokens_median: float = 180.0
    tokens_sigma: float = 0.9  # lognormal shape of both token counts
    max_tokens: tuple[int, ...] = (256, 512, 1024)
    max_tokens_weights: tuple[float, ...] = (0.5, 0.3, 0.2)
    surges: tuple[Surge, ...] = ()


@dataclass(frozen=True)
class Routing:
    """How requests are routed.  In the sample design the weights, pool, probe draw, quorum,
    what is ranked and the admission deadline are the node's own code
    (``rbee_p2p.routing.probing``); only how many probes and the probe timeout are settings,
    as on the node (``MeshConfig.probes`` / ``probe_timeout_s``)."""

    mode: str = "sample"  # "sample" (pools + probes) or "flood" (load gossip: a small
    # swarm's node, at any size)
    probes: int = 32  # sample: candidates probed per request (node: MeshConfig.probes)
    probe_wait_s: float = PROBE_TIMEOUT_MS / 1000  # sample: decide by then at the latest
    rtt_latency: bool = True  # rank with the measured round trip in latency_ms, as the node
    # does (mesh/latency.py: pings every ping_interval_s, smoothed_rtt); False leaves it out
    max_rounds: int = 3  # plan -> try the ranked places; again after a backoff
    backoff_s: float = 1.0
    connect_timeout_s: float = 3.0  # a job sent to a vanished peer fails after this
    crash_detect_s: float = 1.0  # a crashed executor's stream ends this long after
    stream_timeout_s: float = _NODE.timing.frame_timeout_s  # a result cut off by a partition
    # is given up after this (no frame for that long: mesh/remote.py)
    deadline_s: float = _NODE.timing.deadline_s  # a request not done this long after arrival
    # fails (Timing.deadline_s, mesh/remote.py)
    reputation: bool = True  # weigh peers by what jobs sent to them showed
    max_queue: int = 2  # the node's admission limit (rbee-node: 16; flood.toml uses that)
    admission: str = "deadline"  # "queue": refuse when full; "deadline": also refuse a job
    # the node would finish after the deadline the requester derived from the policy's
    # estimate (routing.probing.admit_by_ms / refuses): someone else got there first


@dataclass(frozen=True)
class Gossip:
    degree: int = 6  # GossipSub D, D_lo, D_hi, D_lazy (py-libp2p settings of the node)
    degree_low: int = 4
    degree_high: int = 12
    lazy: int = 6
    heartbeat_s: float = 1.0
    history_gossip: int = 3  # heartbeats of message ids advertised in IHAVE
    hop_ms: float = 1.0  # validation + forwarding per hop
    advert_interval_s: float = _NODE.advert_interval_s  # flood: periodic advert
    # (MeshConfig; Membership.publish, mesh/membership.py)
    advert_min_gap_s: float = 0.25  # flood: at most 4 adverts a second
    advert_debounce_s: float = 0.1  # flood: wait after a load change
    membership_budget_per_s: float = _NODE.advert_budget  # sample: swarm-wide reminder
    # budget (adverts/s; MeshConfig.advert_budget)
    membership_floor_s: float = 30.0


@dataclass(frozen=True)
class Partition:
    """Between ``start_s`` and ``end_s`` the regions in ``side`` reach no other region."""

    start_s: float
    end_s: float
    side: tuple[str, ...]


@dataclass(frozen=True)
class Network:
    loss: float = 0.001  # share of messages that need a retransmission (TCP/QUIC)
    partitions: tuple[Partition, ...] = ()


@dataclass(frozen=True)
class Churn:
    mean_session_s: float = 0.0  # 0: nobody joins or leaves
    crash_fraction: float = 0.5  # leaves that are crashes (no goodbye) rather than graceful


@dataclass(frozen=True)
class Malicious:
    fraction: float = 0.0
    kinds: tuple[str, ...] = ("liar", "dropper", "garbage")
    speed_lie: float = 3.0  # liars claim this times their speed and an empty queue
    detect_garbage: float = 0.5  # chance a spot check catches a garbage answer
    drop_timeout_s: float = _NODE.timing.frame_timeout_s  # no frame by then: the requester
    # gives up (Timing.frame_timeout_s)


@dataclass(frozen=True)
class Sim:
    crypto: str = "auto"  # "real" (Ed25519 per advert), "fast" (sizes only), "auto"
    observers: int = 16  # nodes that run a real PeerTable (all nodes if nodes <= 64)
    drain_s: float = 700.0  # after arrivals stop, how long unfinished requests may run
    check_views: bool = False  # observers also compute the compact view and compare


@dataclass(frozen=True)
class Scenario:
    name: str = "unnamed"
    description: str = ""
    nodes: int = 50
    seed: int = 1
    duration_s: float = 60.0  # arrivals stop here
    warmup_s: float = 15.0  # metrics count requests arriving after this
    workload: Workload = field(default_factory=Workload)
    routing: Routing = field(default_factory=Routing)
    gossip: Gossip = field(default_factory=Gossip)
    network: Network = field(default_factory=Network)
    churn: Churn = field(default_factory=Churn)
    malicious: Malicious = field(default_factory=Malicious)
    sim: Sim = field(default_factory=Sim)

    def with_overrides(self, **changes: Any) -> Scenario:
        """A copy with top-level settings replaced (None values ignored)."""
        return replace(self, **{k: v for k, v in changes.items() if v is not None})

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_NESTED = {"workload": Workload, "routing": Routing, "gossip": Gossip, "network": Network,
           "churn": Churn, "malicious": Malicious, "sim": Sim}
_LISTS = {("workload", "surge"): ("surges", Surge), ("network", "partition"): ("partitions",
                                                                              Partition)}


def _build(cls: type, data: dict[str, Any], where: str) -> Any:
    known = {f.name: f for f in fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key not in known:
            raise ScenarioError(f"{where}: unknown setting {key!r}")
        if isinstance(value, list):
            value = tuple(value)
        kwargs[key] = value
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ScenarioError(f"{where}: {exc}") from None


def parse(data: dict[str, Any]) -> Scenario:
    """A scenario from parsed TOML; raises :class:`ScenarioError`."""
    top: dict[str, Any] = {}
    for key, value in data.items():
        if key in _NESTED:
            section = dict(value)
            for (sec, item), (attr, cls) in _LISTS.items():
                if sec == key and item in section:
                    section[attr] = tuple(_build(cls, x, f"{key}.{item}")
                                          for x in section.pop(item))
            top[key] = _build(_NESTED[key], section, key)
        else:
            top[key] = value
    scenario: Scenario = _build(Scenario, top, "scenario")
    _check(scenario)
    return scenario


def _check(s: Scenario) -> None:
    problems = []
    if s.nodes < 2:
        problems.append("nodes must be at least 2")
    if not 0 <= s.warmup_s < s.duration_s:
        problems.append("need 0 <= warmup_s < duration_s")
    if s.routing.mode not in ("sample", "flood"):
        problems.append("routing.mode is 'sample' or 'flood'")
    if s.routing.admission not in ("queue", "deadline"):
        problems.append("routing.admission is 'queue' or 'deadline'")
    if s.workload.arrivals not in ("poisson", "bursty"):
        problems.append("workload.arrivals is 'poisson' or 'bursty'")
    if len(s.workload.max_tokens) != len(s.workload.max_tokens_weights):
        problems.append("workload.max_tokens and max_tokens_weights differ in length")
    if s.sim.crypto not in ("real", "fast", "auto"):
        problems.append("sim.crypto is 'real', 'fast' or 'auto'")
    if not 0 <= s.malicious.fraction < 1:
        problems.append("malicious.fraction is in [0, 1)")
    bad = set(s.malicious.kinds) - {"liar", "dropper", "garbage"}
    if bad:
        problems.append(f"unknown malicious kinds {sorted(bad)}")
    if problems:
        raise ScenarioError(f"scenario {s.name!r}: " + "; ".join(problems))


def load(path: str | Path) -> Scenario:
    """Read a scenario file; raises :class:`ScenarioError` (or OSError)."""
    try:
        data = tomllib.loads(Path(path).read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ScenarioError(f"{path}: {exc}") from None
    data.setdefault("name", Path(path).stem)
    return parse(data)
