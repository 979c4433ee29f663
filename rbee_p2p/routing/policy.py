"""Built-in routing policies, residency, and :func:`decide` (pure).

A policy ranks the places that can run a request.  :func:`decide` first narrows the
snapshot to the *eligible* places — they serve the model, are not full, and satisfy the
tenant's residency — then asks the policy, then drops whatever the policy returned that
is not eligible: a policy (a Starlark script included) can reorder and refuse, never send
a request where residency forbids.  Nothing here reads a clock or does I/O, so the node
and the simulator run the same code.
"""

from __future__ import annotations

from typing import Callable, Iterable, Mapping

from .facts import PeerFacts, Policy, Ranked, Rejected, RequestFacts, Snapshot, Decision

__all__ = [
    "EU_MEMBERS",
    "satisfies",
    "eligible",
    "decide",
    "expected_ms",
    "fastest",
    "least_loaded",
    "lowest_latency",
    "cheapest",
    "local_only",
    "pinned",
    "BUILTINS",
    "LOCAL_MARGIN",
]

LOCAL_MARGIN = 0.1
"""This node wins unless a peer is expected to be more than 10% better: equal machines do
not bounce work across the network."""

EU_MEMBERS = frozenset({
    "AT", "BE", "BG", "HR", "CY", "CZ", "DK", "EE", "FI", "FR", "DE", "GR", "HU", "IE",
    "IT", "LV", "LT", "LU", "MT", "NL", "PL", "PT", "RO", "SK", "SI", "ES", "SE"})


def satisfies(jurisdiction: str, residency: str | None) -> bool:
    """Whether a node claiming ``jurisdiction`` may run work that must stay in ``residency``.
    "EU" is met by "EU" and by any member state's code; anything else must match exactly.
    A node that claims nothing satisfies no residency."""
    if not residency:
        return True
    claim, need = jurisdiction.strip().upper(), residency.strip().upper()
    if not claim:
        return False
    return claim == need or (need == "EU" and claim in EU_MEMBERS)


def eligible(request: RequestFacts, snapshot: Snapshot) -> Snapshot | Rejected:
    """The snapshot narrowed to places that serve the model, satisfy residency and have
    room; or why there are none.  (One pass: it runs twice per decision, on 1,000s of
    peers.)"""
    model, modality = request.model, request.modality
    residency = request.tenant.residency if request.tenant is not None else None
    serving = allowed = 0
    open_: list[PeerFacts] = []
    for p in snapshot.everyone():
        if not p.serves(model, modality):
            continue
        serving += 1
        if residency and not satisfies(p.jurisdiction, residency):
            continue
        allowed += 1
        if not p.full:
            open_.append(p)
    if not serving:
        return Rejected(f"no live node serves model {request.model}", "unavailable")
    if not allowed:
        return Rejected(f"no node in {residency} serves model {request.model}: the tenant's "
                        f"residency ({residency}) forbids running it elsewhere", "forbidden")
    if not open_:
        return Rejected(f"every node serving {request.model} is busy; retry later", "busy")
    local = next((p for p in open_ if p.local), None)
    return Snapshot(local=local, peers=tuple(p for p in open_ if not p.local),
                    now_ms=snapshot.now_ms)


def decide(policy: Policy, request: RequestFacts, snapshot: Snapshot, name: str = "") -> Decision:
    """Run ``policy`` on the eligible places.  The result holds only eligible ids, each once,
    in the policy's order; an empty ranking becomes a rejection."""
    narrowed = eligible(request, snapshot)
    if isinstance(narrowed, Rejected):
        return narrowed
    decision = policy(request, narrowed)
    if isinstance(decision, Rejected):
        return decision
    allowed = {p.id for p in narrowed.everyone()}
    seen: dict[str, None] = {}  # ordered, each once (a list would make this quadratic)
    for pid in decision.candidates:
        if pid in allowed:
            seen.setdefault(pid)
    if not seen:
        return Rejected(f"the routing policy chose no eligible node for {request.model}",
                        "forbidden", decision.policy or name)
    return Ranked(tuple(seen), decision.policy or name)


def _score(key: Callable[[PeerFacts], float]) -> Callable[[PeerFacts], tuple[float, int, str]]:
    """``key`` with this node's score discounted by LOCAL_MARGIN; on equal scores this
    node, then peer id (deterministic)."""
    discount = 1.0 - LOCAL_MARGIN

    def score(p: PeerFacts) -> tuple[float, int, str]:
        return (key(p) * discount, 0, p.id) if p.local else (key(p), 1, p.id)

    return score


def _ranked(name: str, places: Iterable[PeerFacts],
            key: Callable[[PeerFacts], float]) -> Ranked:
    """Best-first by ``key`` (see :func:`_score`)."""
    return Ranked(tuple(p.id for p in sorted(places, key=_score(key))), name)


def expected_ms(place: PeerFacts, request: RequestFacts) -> float:
    """Time until ``request`` would be complete there: the jobs ahead of it (assumed to be
    like it) plus its own run, plus the network round trip."""
    return _expected(request)(place)


def _expected(request: RequestFacts) -> Callable[[PeerFacts], float]:
    """:func:`expected_ms` for one request (what does not depend on the place, once)."""
    tokens_ms, model = max(request.max_tokens, 1) * 1000.0, request.model

    def ms(place: PeerFacts) -> float:
        return ((place.queue_depth + place.active_jobs + 1) * tokens_ms / place.speed(model)
                + place.latency_ms)

    return ms


def fastest(request: RequestFacts, snapshot: Snapshot) -> Decision:
    """Fastest expected completion (the default): queue x measured speed + latency."""
    return _ranked("fastest", snapshot.everyone(), _expected(request))


def least_loaded(request: RequestFacts, snapshot: Snapshot) -> Decision:
    """Fewest jobs queued or running relative to the queue's size."""
    return _ranked("least_loaded", snapshot.everyone(),
                   lambda p: (p.queue_depth + p.active_jobs) / max(p.max_queue, 1))


def lowest_latency(request: RequestFacts, snapshot: Snapshot) -> Decision:
    """Soonest first token: the measured round trip plus the wait for the jobs ahead (at
    the place's speed), so a near idle place beats a far busy one."""
    tokens_ms, model = max(request.max_tokens, 1) * 1000.0, request.model

    def wait_ms(p: PeerFacts) -> float:
        return p.latency_ms + (p.queue_depth + p.active_jobs) * tokens_ms / p.speed(model)

    return _ranked("lowest_latency", snapshot.everyone(), wait_ms)


def cheapest(request: RequestFacts, snapshot: Snapshot) -> Decision:
    """Lowest expected cost of this request (:meth:`PeerFacts.cost`: per-model prices
    where advertised); among equal costs the fastest."""
    fast = _score(_expected(request))
    places = sorted(snapshot.everyone(), key=lambda p: (p.cost(request), fast(p)))
    return Ranked(tuple(p.id for p in places), "cheapest")


def local_only(request: RequestFacts, snapshot: Snapshot) -> Decision:
    if snapshot.local is None:
        return Rejected(f"this node does not serve {request.model} (or is full) and the "
                        "routing policy is local-only", "forbidden", "local_only")
    return Ranked((snapshot.local.id,), "local_only")


def pinned(pins: Mapping[str, str], fallback: Policy = fastest) -> Policy:
    """Models pinned to a peer (its id) or a device (``cuda:0``, a word of a device's name
    such as ``H100``, or a backend): only matching places run them.  Unpinned models use
    ``fallback``."""
    def matches(place: PeerFacts, model: str, pin: str) -> bool:
        if place.id == pin:
            return True
        m = place.model(model)
        if m is not None and m.device == pin:
            return True
        return any(pin in (d.id, d.backend) or pin.lower() in d.name.lower().split()
                   for d in place.devices)

    def policy(request: RequestFacts, snapshot: Snapshot) -> Decision:
        pin = pins.get(request.model)
        if pin is None:
            return fallback(request, snapshot)
        places = [p for p in snapshot.everyone() if matches(p, request.model, pin)]
        if not places:
            return Rejected(f"model {request.model} is pinned to {pin}, which is not available",
                            "unavailable", "pinned")
        return _ranked("pinned", places, lambda p: expected_ms(p, request))

    return policy


BUILTINS: Mapping[str, Policy] = {
    "fastest": fastest,
    "least_loaded": least_loaded,
    "lowest_latency": lowest_latency,
    "cheapest": cheapest,
    "local_only": local_only,
}
