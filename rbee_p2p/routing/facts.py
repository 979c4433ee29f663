"""What a routing policy sees: plain, frozen values (pure).

A decision is a function of (request facts, a snapshot of this node and the live peers).
The tenant travels inside the request facts; ``now_ms`` inside the snapshot.  The same
values feed the built-in policies, Starlark scripts (as plain dicts, :meth:`as_dict`) and
the simulator.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Union

__all__ = [
    "ModelFacts",
    "DeviceFacts",
    "PeerFacts",
    "TenantFacts",
    "RequestFacts",
    "Snapshot",
    "Ranked",
    "Rejected",
    "Decision",
    "Policy",
    "DEFAULT_TOKENS_PER_S",
    "DEFAULT_MAX_QUEUE",
    "charge",
]

DEFAULT_TOKENS_PER_S = 50.0
"""Assumed speed of a model nobody has measured yet."""
DEFAULT_MAX_QUEUE = 64


def charge(input_per_mtok: int, output_per_mtok: int, per_image: int, *, tokens_in: int = 0,
           tokens_out: int = 0, images: int = 0) -> int:
    """Micro-credits for a job at these prices: tokens at their price per million (rounded
    down, once, over the sum), plus images.  The executor charges this for what it ran;
    routing estimates it for what a request asks."""
    return ((tokens_in * input_per_mtok + tokens_out * output_per_mtok) // 1_000_000
            + images * per_image)


@dataclass(frozen=True)
class ModelFacts:
    name: str
    modality: str = "text"
    tokens_per_s: float = 0.0  # measured by the node that serves it; 0 = not yet measured
    device: str | None = None  # the device it is pinned to, if any
    # its price there (micro-credits); None: the place's advert-wide price
    price: tuple[int, int, int] | None = None  # (input per Mtok, output per Mtok, per image)

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "modality": self.modality,
                "tokens_per_s": self.tokens_per_s, "device": self.device}


@dataclass(frozen=True)
class DeviceFacts:
    id: str  # "cpu", "cuda:0", "metal:0"
    backend: str
    name: str
    mem_total: int
    mem_free: int

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "backend": self.backend, "name": self.name,
                "mem_total": self.mem_total, "mem_free": self.mem_free}


@dataclass(frozen=True)
class PeerFacts:
    """One place that can run work: this node (``local``) or a peer, as its advert says."""

    id: str  # base58 peer id
    local: bool = False
    models: tuple[ModelFacts, ...] = ()
    devices: tuple[DeviceFacts, ...] = ()
    queue_depth: int = 0
    active_jobs: int = 0
    max_queue: int = DEFAULT_MAX_QUEUE
    latency_ms: float = 0.0  # round trip as measured by this node; 0 for itself
    jurisdiction: str = ""
    price: int = 0  # micro-credits per million output tokens
    reputation: float = 1.0  # 0..1
    state: str = "alive"  # "alive" or "suspect"

    def model(self, name: str) -> ModelFacts | None:
        for m in self.models:
            if m.name == name:
                return m
        return None

    def serves(self, name: str, modality: str | None = None) -> bool:
        m = self.model(name)
        return m is not None and (modality is None or m.modality == modality)

    def speed(self, name: str) -> float:
        for m in self.models:
            if m.name == name:
                return m.tokens_per_s if m.tokens_per_s > 0 else DEFAULT_TOKENS_PER_S
        return DEFAULT_TOKENS_PER_S

    def cost(self, request: RequestFacts) -> float:
        """Expected micro-credits for ``request`` here (unrounded, for ranking): the prompt
        estimate at the model's input price plus ``max_tokens`` at its output price, or
        ``max_tokens`` (n) images at its image price; a model without its own price costs
        the place's ``price`` per million output tokens."""
        m = self.model(request.model)
        tin, tout, image = m.price if m is not None and m.price is not None else (
            0, self.price, 0)
        if request.modality == "image" or request.kind == "image":
            return float(request.max_tokens * image)
        return (request.prompt_tokens * tin + request.max_tokens * tout) / 1_000_000

    @property
    def full(self) -> bool:
        return self.queue_depth >= self.max_queue

    def as_dict(self, model: str | None = None) -> dict[str, Any]:
        """Plain data for scripts (the Starlark contract, node/policies/README.md):
        ``tokens_per_s`` is ``model``'s measured speed, else the default estimate;
        ``price_in`` / ``price_out`` / ``price_image`` its prices (as :meth:`cost`)."""
        m = self.model(model) if model is not None else None
        tin, tout, image = m.price if m is not None and m.price is not None else (
            0, self.price, 0)
        return {
            "id": self.id, "local": self.local,
            "models": [m.name for m in self.models],
            "devices": [d.as_dict() for d in self.devices],
            "queue_depth": self.queue_depth, "active_jobs": self.active_jobs,
            "max_queue": self.max_queue,
            "tokens_per_s": self.speed(model) if model is not None else 0.0,
            "latency_ms": self.latency_ms, "jurisdiction": self.jurisdiction,
            "price": self.price, "reputation": self.reputation, "state": self.state,
            "price_in": tin, "price_out": tout, "price_image": image,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PeerFacts:
        """The inverse of :meth:`as_dict` for dry runs and tests; every key but ``id`` is
        optional.  ``models`` holds names (each at ``tokens_per_s``) or
        :meth:`ModelFacts.as_dict` tables.  Raises ValueError or TypeError."""
        if not isinstance(data, Mapping) or not isinstance(data.get("id"), str):
            raise ValueError(f"a peer needs a string id: {data!r}")
        speed = float(data.get("tokens_per_s", 0.0))
        models = tuple(ModelFacts(m, tokens_per_s=speed) if isinstance(m, str)
                       else ModelFacts(str(m["name"]), str(m.get("modality", "text")),
                                       float(m.get("tokens_per_s", speed)), m.get("device"))
                       for m in data.get("models", ()))
        devices = tuple(DeviceFacts(str(d.get("id", d.get("backend", "cpu"))),
                                    str(d.get("backend", "cpu")), str(d.get("name", "")),
                                    int(d.get("mem_total", 0)), int(d.get("mem_free", 0)))
                        for d in data.get("devices", ()))
        return cls(id=data["id"], local=bool(data.get("local", False)), models=models,
                   devices=devices, queue_depth=int(data.get("queue_depth", 0)),
                   active_jobs=int(data.get("active_jobs", 0)),
                   max_queue=int(data.get("max_queue", DEFAULT_MAX_QUEUE)),
                   latency_ms=float(data.get("latency_ms", 0.0)),
                   jurisdiction=str(data.get("jurisdiction", "")),
                   price=int(data.get("price", 0)),
                   reputation=float(data.get("reputation", 1.0)),
                   state=str(data.get("state", "alive")))


@dataclass(frozen=True)
class TenantFacts:
    id: str  # the tenant's name on the entry node; peers see only a keyed hash of it
    tier: str = "default"
    residency: str | None = None  # "EU", "US", ...: where its requests may run


@dataclass(frozen=True)
class RequestFacts:
    model: str
    modality: str = "text"
    max_tokens: int = 256
    prompt_tokens: int = 0
    tenant: TenantFacts | None = None
    kind: str = ""  # "chat", "completion", "embedding", "image" ("" when not said)

    @property
    def tokens_estimate(self) -> int:
        return self.prompt_tokens + self.max_tokens

    def as_dict(self) -> dict[str, Any]:
        tenant = self.tenant
        return {
            "model": self.model, "modality": self.modality, "kind": self.kind,
            "max_tokens": self.max_tokens,
            "prompt_tokens": self.prompt_tokens, "tokens": self.tokens_estimate,
            "tenant": None if tenant is None else
            {"id": tenant.id, "tier": tenant.tier, "residency": tenant.residency},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RequestFacts:
        """The inverse of :meth:`as_dict` (``tokens`` is derived, so ignored); only
        ``model`` is required.  Raises ValueError or TypeError."""
        if not isinstance(data, Mapping) or not isinstance(data.get("model"), str):
            raise ValueError(f"a request needs a string model: {data!r}")
        t = data.get("tenant")
        tenant = None if t is None else TenantFacts(
            str(t["id"]), str(t.get("tier") or "default"),
            None if t.get("residency") is None else str(t["residency"]))
        return cls(model=data["model"], modality=str(data.get("modality", "text")),
                   max_tokens=int(data.get("max_tokens", 256)),
                   prompt_tokens=int(data.get("prompt_tokens", 0)), tenant=tenant,
                   kind=str(data.get("kind", "")))


@dataclass(frozen=True)
class Snapshot:
    """This node (None when it serves nothing useful) and the live peers, at ``now_ms``."""

    local: PeerFacts | None
    peers: tuple[PeerFacts, ...] = ()
    now_ms: int = 0

    def everyone(self) -> tuple[PeerFacts, ...]:
        return self.peers if self.local is None else (self.local, *self.peers)


@dataclass(frozen=True)
class Ranked:
    """Where to try, best first (peer ids; this node's own id means run it here)."""

    candidates: tuple[str, ...]
    policy: str = ""


@dataclass(frozen=True)
class Rejected:
    """No place may or can run the request.  ``kind``: "forbidden" (residency, policy
    said no), "busy" (every eligible place is full), "unavailable" (nobody serves it)."""

    reason: str
    kind: str = "forbidden"
    policy: str = ""


Decision = Union[Ranked, Rejected]
Policy = Callable[[RequestFacts, Snapshot], Decision]
