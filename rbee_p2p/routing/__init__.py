"""Routing: pure functions (request facts incl. tenant, peer snapshot incl. now) -> ranked
candidates or a rejection.  Built-in policies live in :mod:`.policy`, the Starlark runtime in
:mod:`.script`.

Like ``rbee_p2p.protocol`` this package is sans-I/O: no trio, libp2p, sockets or clock.
"""

from .facts import (DEFAULT_MAX_QUEUE, DEFAULT_TOKENS_PER_S, Decision, DeviceFacts, ModelFacts,
                    PeerFacts, Policy, Ranked, Rejected, RequestFacts, Snapshot, TenantFacts,
                    charge)
from .policy import (BUILTINS, EU_MEMBERS, LOCAL_MARGIN, cheapest, decide, eligible, expected_ms,
                     fastest, least_loaded, local_only, lowest_latency, pinned, satisfies)

__all__ = [
    "DEFAULT_MAX_QUEUE", "DEFAULT_TOKENS_PER_S", "Decision", "DeviceFacts", "ModelFacts",
    "PeerFacts", "Policy", "Ranked", "Rejected", "RequestFacts", "Snapshot", "TenantFacts",
    "BUILTINS", "EU_MEMBERS", "LOCAL_MARGIN", "cheapest", "decide", "eligible", "expected_ms",
    "fastest", "least_loaded", "local_only", "lowest_latency", "pinned", "satisfies",
    "charge",
]
