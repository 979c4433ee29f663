"""What routing sees of a peer (pure): its verified advert turned into :class:`PeerFacts`,
with what this node learnt of it -- the standing its jobs there earned (reputation) and the
measured round trip.

One implementation, called by the node's mesh (``rbee_p2p/mesh/peers.py``:
``PeerView.peers``; ``mesh/latency.py`` smooths its pings with :func:`smoothed_rtt`) and by
the simulator (``simulations/views.py``), so both rank the very same facts.
"""

from __future__ import annotations

from typing import Mapping

from ..protocol.messages import CapabilityAdvert, Price
from .facts import DeviceFacts, ModelFacts, PeerFacts
from .reputation import Standing, effective_speed, failure_penalty_ms, trust

__all__ = ["peer_facts", "smoothed_rtt", "RTT_ALPHA", "UNPROVEN_MS", "attested_jurisdiction"]

RTT_ALPHA = 0.3
"""Weight of a new sample in the smoothed round trip (an EWMA)."""
UNPROVEN_MS = 2_000.0
"""Added to the latency of a peer not yet proven (it never answered a ping, a probe or a job
of ours): until then its advert -- addresses included -- is only its word, and a dial to
it may fail.  Identities are free: a thousand that only advertise rank behind one that
answered."""


def smoothed_rtt(before_ms: float | None, sample_ms: float, alpha: float = RTT_ALPHA) -> float:
    """The smoothed round trip after one more sample (``before_ms`` None: the first)."""
    return sample_ms if before_ms is None else before_ms + alpha * (sample_ms - before_ms)


def attested_jurisdiction(peer: str, claim: str, attested: Mapping[str, str]) -> str:
    """Where a peer runs as far as residency goes: its advert's claim only when this node's
    operator attested the same for it (``attested``: peer id -> code, from configuration);
    otherwise nowhere ("") -- an advert alone never meets a residency rule."""
    return claim if claim and attested.get(peer) == claim else ""


def peer_facts(peer: str, advert: CapabilityAdvert, state: str, standing: Standing | None,
               timeout_s: float, rtt_ms: float = 0.0, *, jurisdiction: str,
               believe_claims: bool = False, proven: bool = True) -> PeerFacts:
    """What routing sees of a peer (``peer``: its base58 id; callers keep it, encoding
    costs): its advert, with the speed it claims capped by what it was measured to deliver
    (``reputation.effective_speed``; ``believe_claims``: not capped, in a private swarm)
    and discounted by how it kept its word so far, and as latency the measured round trip
    plus the time its failures are expected to cost (a failure costs ``timeout_s``: the
    requester's wait for a frame that never comes), plus :data:`UNPROVEN_MS` unless it is
    ``proven`` or claims are believed.  ``jurisdiction``: where it runs as this node knows
    it (:func:`attested_jurisdiction`)."""
    s = standing or Standing()
    return PeerFacts(
        id=peer,
        models=tuple(ModelFacts(m.name, m.modality,
                                effective_speed(s, m.tokens_per_s, believe=believe_claims),
                                m.device, _price(m.price)) for m in advert.models),
        devices=tuple(DeviceFacts(d.id, d.backend, d.name, d.mem_total, d.mem_free)
                      for d in advert.devices),
        queue_depth=advert.queue_depth, active_jobs=advert.active_jobs,
        max_queue=advert.max_queue, jurisdiction=jurisdiction,
        price=advert.price.output_per_mtok, state=state, reputation=trust(s),
        latency_ms=rtt_ms + failure_penalty_ms(s, timeout_s * 1000)
        + (0.0 if proven or believe_claims else UNPROVEN_MS))


def _price(price: Price | None) -> tuple[int, int, int] | None:
    return None if price is None else (price.input_per_mtok, price.output_per_mtok,
                                       price.per_image)
