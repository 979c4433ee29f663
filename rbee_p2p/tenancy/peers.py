"""Peers' jobs, admitted like tenants' requests.

Every job a peer sends is signed by it, so the peer's identity is its tenant here: it gets
the swarm's per-peer limits (``peer_concurrent``, ``peer_rpm``, ``peer_tokens_per_day``;
``config.peer_limits``), with its tokens reserved at admission and refunded at the end,
as for a tenant.  How much of a model's queue peers may fill, and that local requests go
first, is the scheduler's part (``Scheduler.admit(remote=True)``).

In the open swarm a node with tenants serves only jobs that an entry node admitted for one
of *its* tenants (they carry a tenant reference): key-less work relayed by a stranger's
tenant-less node would otherwise get what this node's own users need a key for.  Members of
a private swarm share its key, so they are one owner: their key-less jobs are served.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

from ..errors import Forbidden
from ..protocol.identity import peer_id_to_str
from .tenants import Quotas, Tenant

__all__ = ["PeerGate", "PeerPass", "MAX_PEERS_COUNTED"]

MAX_PEERS_COUNTED = 4096
"""Peers whose usage is kept at once (idle ones are forgotten first)."""


@dataclass
class PeerPass:
    tenant: Tenant
    reserved: int
    finished: bool = False


class PeerGate:
    def __init__(self, limits: tuple[int, int, int], *, public: bool = False,
                 has_tenants: Callable[[], bool] = lambda: False,
                 clock: Callable[[], float] = time.time) -> None:
        concurrent, rpm, per_day = limits
        self.concurrent = concurrent or None
        self.rpm = rpm or None
        self.per_day = per_day or None
        self.public = public
        self.has_tenants = has_tenants
        self.clock = clock
        self.quotas = Quotas(cap=MAX_PEERS_COUNTED)
        self.keyless_refused = 0

    def admit(self, peer: bytes, model: str, reserve: int,
              tenant_ref: bytes | None, prompt: int = 0) -> PeerPass:
        """Admit one job of ``peer``.  Raises Forbidden (key-less work in the open swarm
        for a node with tenants) or QuotaExceeded (the peer is over a limit)."""
        if self.public and tenant_ref is None and self.has_tenants():
            self.keyless_refused += 1
            raise Forbidden("this node serves the open swarm only for requests its sender "
                            "admitted with an API key of its own tenants")
        tenant = Tenant(name=peer_id_to_str(peer), key_hash="", key_hint="",
                        rpm=self.rpm, tokens_per_day=self.per_day, concurrent=self.concurrent)
        held = self.quotas.admit(tenant, model, self.clock(), reserve, prompt)
        return PeerPass(tenant, held)

    def finish(self, admitted: PeerPass, tokens: int) -> None:
        """The job is over (any way): free its slot, count its tokens.  Idempotent."""
        if not admitted.finished:
            admitted.finished = True
            self.quotas.finish(admitted.tenant, tokens, self.clock(), admitted.reserved)

    def status(self) -> dict[str, Any]:
        return {"limits": {"concurrent": self.concurrent, "rpm": self.rpm,
                           "tokens_per_day": self.per_day},
                "keyless_refused": self.keyless_refused, "peers": len(self.quotas.usage)}
