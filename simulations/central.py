"""The omniscient central scheduler: the yardstick for routing quality.

Same world, same trace, same hardware and network.  It knows every queue exactly, every
job's true length, and the future of churn: each request, in arrival order, goes to the
honest node serving its model that minimises its completion time

    send (entry -> node, incl. transmission) + wait for the node's FIFO to drain
    + prefill + decode on that node + result back (node -> entry)

among nodes present at arrival that will still be there when the job ends and that the
entry can reach (partitions).  It never retries, never probes, never meets a malicious node.
No real scheduler can do better on these FIFO machines; the ratio distributed/central is
the price of having no centre.
"""

from __future__ import annotations

import numpy as np

from .hardware import MODELS
from .network import Network
from .world import World

__all__ = ["central_schedule"]


def central_schedule(world: World, net: Network, warmup: float,
                     end: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Completion time of each request (nan if no node could run it), the executor of
    each, and each node's busy seconds inside [warmup, end]."""
    tr = world.trace
    count = world.count
    speed = np.array([m.tokens_per_s for m in world.machines])
    prefill = np.array([m.prefill_per_s for m in world.machines])
    join = np.array(world.join)
    leave = np.array(world.leave)
    honest = np.array([b is None for b in world.malicious])
    model_of = np.array([m.model for m in world.machines])
    servers = [np.flatnonzero((model_of == m) & honest) for m in range(len(MODELS))]
    free = np.zeros(count)
    busy = np.zeros(count)
    completion = np.full(len(tr), np.nan)
    executor = np.full(len(tr), -1, dtype=np.int64)
    partitions = [(p.start_s, p.end_s, side) for p, side in
                  zip(net.partitions, net.partition_sides)]
    uplink = net.uplink_np
    for rid in range(len(tr)):
        t, e, m = tr.time[rid], tr.entry[rid], tr.model[rid]
        nodes = servers[m]
        if nodes.size == 0:
            continue
        entry = np.full(nodes.size, e)
        there = net.owd_many(entry, nodes) + (4 * tr.prompt[rid] + 300) * 8.0 / uplink[e]
        back = net.owd_many(nodes, entry) + (4 * tr.output[rid] + 400) * 8.0 / uplink[nodes]
        start = np.maximum(t + there, free[nodes])
        work = tr.prompt[rid] / prefill[nodes] + tr.output[rid] / speed[nodes]
        done = start + work
        ok = (join[nodes] <= t) & (leave[nodes] > done)
        for p_start, p_end, side in partitions:
            if p_start <= t < p_end:
                ok &= side[net.region_np[nodes]] == side[net.region_np[e]]
        if not ok.any():
            continue
        total = np.where(ok, done + back - t, np.inf)
        best = int(np.argmin(total))
        node = int(nodes[best])
        completion[rid] = float(total[best])
        executor[rid] = node
        free[node] = float(done[best])
        busy[node] += max(0.0, min(float(done[best]), end) - max(float(start[best]), warmup))
    return completion, executor, busy

