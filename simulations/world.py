"""The world of one run, drawn up front from the seed: machines, where they sit, when they
join and leave, who is malicious, and the request trace.

Both the swarm and the central baseline replay the same world, so they face identical
arrivals, token counts, hardware and churn.  Offered load is defined per model: arrivals of
requests for a model x their mean service time on its honest servers' average capacity =
``load`` (0.8 means the honest machines serving a model would be 80% busy if work were
spread perfectly).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .hardware import DEVICES, MODELS, Machine, sample_machines
from .network import place_nodes
from .scenario import Scenario

__all__ = ["World", "Trace", "build_world"]


@dataclass
class Trace:
    """Requests in arrival order (parallel lists)."""

    time: list[float] = field(default_factory=list)
    entry: list[int] = field(default_factory=list)
    model: list[int] = field(default_factory=list)
    prompt: list[int] = field(default_factory=list)
    output: list[int] = field(default_factory=list)
    max_tokens: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.time)


@dataclass
class World:
    initial: int
    machines: list[Machine]
    placement: dict[str, list]
    join: list[float]
    leave: list[float]  # inf: stays
    crash: list[bool]  # a leave without goodbye
    malicious: list[str | None]
    rates: list[float]  # requests/s per model (before surges and bursts)
    capacity: list[float]  # honest requests/s per model at the initial population
    trace: Trace

    @property
    def count(self) -> int:
        return len(self.machines)


def _tokens(rng: np.random.Generator, median: float, sigma: float, lo: int, hi: np.ndarray | int,
            size: int) -> np.ndarray:
    values = np.rint(rng.lognormal(np.log(median), sigma, size=size))
    return np.clip(values, lo, hi).astype(np.int64)


def _mean_work(sc: Scenario, rng: np.random.Generator) -> tuple[float, float]:
    """Mean prompt and output tokens of the workload (large sample)."""
    w = sc.workload
    n = 200_000
    caps = rng.choice(w.max_tokens, size=n, p=np.array(w.max_tokens_weights) /
                      sum(w.max_tokens_weights))
    prompt = _tokens(rng, w.prompt_tokens_median, w.tokens_sigma, 8, 8000, n)
    output = _tokens(rng, w.output_tokens_median, w.tokens_sigma, 1, caps, n)
    return float(prompt.mean()), float(output.mean())


def _churn(sc: Scenario, rng: np.random.Generator) -> tuple[list[float], list[float], int]:
    """Join and leave times: the initial nodes at 0, then Poisson joins that keep the
    population near ``nodes``; sessions are exponential.  Nobody leaves after arrivals
    stop (the swarm drains)."""
    n, mean, end = sc.nodes, sc.churn.mean_session_s, sc.duration_s
    join = [0.0] * n
    if mean > 0:
        t = 0.0
        while True:
            t += float(rng.exponential(mean / n))
            if t >= end:
                break
            join.append(t)
    sessions = rng.exponential(mean, size=len(join)) if mean > 0 else np.full(len(join), np.inf)
    leave = [j + s if j + s < end else float("inf") for j, s in zip(join, sessions.tolist())]
    return join, leave, n


def _multiplier(sc: Scenario, rng: np.random.Generator) -> tuple[list[tuple[float, float]], float]:
    """Piecewise-constant rate multiplier as (start, factor) steps, and its maximum."""
    w = sc.workload
    points: list[tuple[float, float]] = []
    if w.arrivals == "bursty":
        base = 1.0 / (w.burst_fraction * w.burst_factor + 1 - w.burst_fraction)
        off_mean = w.burst_mean_s * (1 - w.burst_fraction) / w.burst_fraction
        t, on = 0.0, False
        while t < sc.duration_s:
            points.append((t, base * (w.burst_factor if on else 1.0)))
            t += float(rng.exponential(w.burst_mean_s if on else off_mean))
            on = not on
    else:
        points.append((0.0, 1.0))
    factor = [(t, f) for t, f in points]
    for surge in w.surges:  # surges multiply whatever runs then
        factor = [(t, f * (surge.factor if surge.start_s <= t < surge.end_s else 1.0))
                  for t, f in _split(factor, surge.start_s, surge.end_s)]
    return factor, max(f for _, f in factor)


def _split(steps: list[tuple[float, float]], *cuts: float) -> list[tuple[float, float]]:
    out = list(steps)
    for cut in cuts:
        before = [f for t, f in out if t <= cut]
        if before and all(t != cut for t, _ in out):
            out.append((cut, before[-1]))
        out.sort()
    return out


def build_world(sc: Scenario) -> World:
    """Everything random about a run except what happens inside it."""
    seeds = np.random.SeedSequence(sc.seed).spawn(6)
    rng_nodes, rng_place, rng_churn, rng_trace, rng_mal, rng_work = (
        np.random.default_rng(s) for s in seeds)
    join, leave, initial = _churn(sc, rng_churn)
    count = len(join)
    machines = sample_machines(rng_nodes, count)
    placement = place_nodes(rng_place, [DEVICES[m.device].datacenter for m in machines])
    crash = (rng_churn.random(count) < sc.churn.crash_fraction).tolist()
    malicious: list[str | None] = [None] * count
    bad = rng_mal.random(count) < sc.malicious.fraction
    kinds = sc.malicious.kinds
    for i in np.flatnonzero(bad).tolist():
        malicious[i] = kinds[int(rng_mal.integers(len(kinds)))]
    mean_prompt, mean_out = _mean_work(sc, rng_work)
    capacity = [0.0] * len(MODELS)
    for i in range(initial):
        m = machines[i]
        if malicious[i] is None:
            capacity[m.model] += 1.0 / (mean_prompt / m.prefill_per_s + mean_out / m.tokens_per_s)
    rates = [sc.workload.load * c for c in capacity]
    trace = _trace(sc, rng_trace, rates, join, leave)
    return World(initial, machines, placement, join, leave, crash, malicious, rates, capacity,
                 trace)


def _trace(sc: Scenario, rng: np.random.Generator, rates: list[float], join: list[float],
           leave: list[float]) -> Trace:
    """Arrivals by thinning a Poisson process at the peak rate; each request enters at a
    node present at that moment, picked uniformly."""
    w = sc.workload
    total = sum(rates)
    steps, peak = _multiplier(sc, rng)
    if total <= 0:
        return Trace()
    count = int(rng.poisson(total * peak * sc.duration_s))
    times = np.sort(rng.uniform(0.0, sc.duration_s, size=count))
    step_t = np.array([t for t, _ in steps])
    step_f = np.array([f for _, f in steps])
    factor = step_f[np.searchsorted(step_t, times, side="right") - 1]
    times = times[rng.random(count) < factor / peak]
    n = len(times)
    probs = np.array(rates) / total
    models = rng.choice(len(rates), size=n, p=probs)
    caps = rng.choice(w.max_tokens, size=n, p=np.array(w.max_tokens_weights) /
                      sum(w.max_tokens_weights))
    prompt = _tokens(rng, w.prompt_tokens_median, w.tokens_sigma, 8, 8000, n)
    output = _tokens(rng, w.output_tokens_median, w.tokens_sigma, 1, caps, n)
    picks = rng.random(n).tolist()
    entries = _entries(times.tolist(), picks, join, leave)
    return Trace(times.tolist(), entries, models.tolist(), prompt.tolist(), output.tolist(),
                 caps.tolist())


def _entries(times: list[float], picks: list[float], join: list[float],
             leave: list[float]) -> list[int]:
    """Sweep arrivals and churn in time order, keeping the present nodes in a list with
    O(1) removal."""
    changes = sorted([(t, 1, i) for i, t in enumerate(join)] +
                     [(t, 0, i) for i, t in enumerate(leave) if t != float("inf")])
    present: list[int] = []
    pos: dict[int, int] = {}
    out = []
    c = 0
    for t, u in zip(times, picks):
        while c < len(changes) and changes[c][0] <= t:
            _, is_join, node = changes[c]
            c += 1
            if is_join:
                pos[node] = len(present)
                present.append(node)
            else:
                index = pos.pop(node)
                last = present.pop()
                if last != node:
                    present[index] = last
                    pos[last] = index
        out.append(present[min(int(u * len(present)), len(present) - 1)])
    return out
