"""Routing-policy benchmark (issue: programmable routing policies).

The time of one routing decision with 1,000 peers in the snapshot (4 models, 1-8 devices
each, varied load, speed, latency, price and jurisdiction; a request for one model, so
about half the peers are eligible), median over N decisions:
  - each built-in policy through routing.decide() (goal <= 1 ms);
  - Starlark example policies through PolicyRuntime.decide(), as the node routes: the
    worker process, the pipe and decide() around the script included (goal <= 10 ms);
and the same with every one of the 1,000 peers eligible (the worst case), and with 5% of
the peers' facts replaced before each decision (adverts changing: their JSON is rebuilt).

    python bench/policy.py [--decisions 200] [--peers 1000] [--seed 1]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import trio

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).parent))
from common import table  # noqa: E402

from rbee_p2p.policy_runtime.runtime import PolicyRuntime  # noqa: E402
from rbee_p2p.routing import (BUILTINS, DeviceFacts, ModelFacts, PeerFacts,  # noqa: E402
                              RequestFacts, Snapshot, TenantFacts, decide, eligible)

MODELS = ["llama-3.1-8b", "qwen2.5-7b", "mistral-7b", "sdxl-turbo"]
GPUS = [("NVIDIA H100 80GB HBM3", 80), ("NVIDIA A100-SXM4-40GB", 40),
        ("NVIDIA GeForce RTX 4090", 24), ("Apple M2 Max", 64)]
WHERE = ["DE", "FR", "NL", "EU", "US", "US", "GB", "JP"]
EXAMPLES = ["tiers.star", "least_loaded.star", "eu_cheapest.star"]
GIB = 1 << 30


def make_peer(rng: random.Random, i: int) -> PeerFacts:
    text = rng.sample(MODELS[:3], rng.choice([1, 1, 2, 3]))
    models = tuple(ModelFacts(m, tokens_per_s=rng.choice([0.0, rng.uniform(15, 400)]))
                   for m in text)
    if rng.random() < 0.2:
        models += (ModelFacts(MODELS[3], "image"),)
    gpu, mem = rng.choice(GPUS)
    count = rng.choice([0, 1, 1, 1, 2, 4, 8])
    devices = (DeviceFacts("cpu", "cpu", "cpu", 64 * GIB, rng.randint(4, 60) * GIB),) + tuple(
        DeviceFacts(f"cuda:{k}", "metal" if "Apple" in gpu else "cuda", gpu, mem * GIB,
                    rng.randint(1, mem) * GIB) for k in range(count))
    return PeerFacts(id=f"12D3KooW{i:06d}{rng.getrandbits(128):032x}", models=models,
                     devices=devices, queue_depth=rng.choice([0, 0, 1, 2, 5, 12, 16]),
                     active_jobs=rng.randint(0, 2), max_queue=16,
                     latency_ms=round(rng.uniform(0.5, 180), 1), jurisdiction=rng.choice(WHERE),
                     price=rng.randint(0, 2000), reputation=round(rng.random(), 2))


def snapshot(rng: random.Random, n: int, everyone: bool = False) -> Snapshot:
    peers = [make_peer(rng, i) for i in range(n)]
    if everyone:  # every peer serves the requested model and has room
        peers = [PeerFacts(**{**p.__dict__, "models": (ModelFacts(MODELS[0], tokens_per_s=99),),
                              "queue_depth": min(p.queue_depth, 15)}) for p in peers]
    local = PeerFacts(id="12D3KooWlocal", local=True,
                      models=(ModelFacts(MODELS[0], tokens_per_s=40),),
                      devices=(DeviceFacts("cpu", "cpu", "cpu", 32 * GIB, 16 * GIB),),
                      jurisdiction="DE")
    return Snapshot(local, tuple(peers))


def request(rng: random.Random) -> RequestFacts:
    tier = rng.choice(["enterprise", "pro", "free"])
    return RequestFacts(MODELS[0], max_tokens=rng.choice([64, 256, 1024]), prompt_tokens=200,
                        tenant=TenantFacts("acme", tier, rng.choice([None, None, "EU"])))


def bench_builtins(snap: Snapshot, reqs: list[RequestFacts]) -> list[tuple[str, float]]:
    """Median seconds of a decision by each built-in."""
    out = []
    for name, policy in BUILTINS.items():
        samples = []
        for r in reqs:
            t = time.perf_counter()
            decide(policy, r, snap, name)
            samples.append(time.perf_counter() - t)
        out.append((name, statistics.median(samples)))
    return out


async def bench_script(file: str, snap: Snapshot, reqs: list[RequestFacts],
                       churn: float, rng: random.Random) -> tuple[float, float]:
    """Median seconds of a whole decision, and of the worker's part (decode + script)."""
    runtime = PolicyRuntime(str(ROOT / "node" / "policies" / file), timeout_ms=200)
    totals, inside = [], []
    peers = list(snap.peers)
    async with runtime.opened():
        for _ in range(10):  # warm-up
            await runtime.decide(reqs[0], snap)
        for r in reqs:
            if churn:  # some adverts changed: new facts objects, their JSON is rebuilt
                for i in rng.sample(range(len(peers)), int(len(peers) * churn)):
                    peers[i] = PeerFacts(**{**peers[i].__dict__,
                                            "queue_depth": rng.randint(0, 15)})
                snap = Snapshot(snap.local, tuple(peers))
            t = time.perf_counter()
            outcome = await runtime.decide(r, snap)
            totals.append(time.perf_counter() - t)
            if outcome.fallback:
                raise SystemExit(f"{file}: the policy failed: {outcome.error}")
            inside.append(getattr(runtime._evaluator, "last_ms", 0.0) / 1000)
    assert runtime.status()["errors"] == 0, runtime.status()
    return statistics.median(totals), statistics.median(inside)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--decisions", type=int, default=200)
    parser.add_argument("--peers", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    cases = [("realistic", snapshot(rng, args.peers)),
             ("all eligible", snapshot(rng, args.peers, everyone=True))]
    reqs = [request(rng) for _ in range(args.decisions)]
    for label, snap in cases:
        seen = [len(e.everyone()) for e in (eligible(r, snap) for r in reqs)
                if isinstance(e, Snapshot)]
        print(f"\n{label}: {len(snap.everyone())} places in the snapshot, "
              f"{statistics.median(seen):.0f} eligible (median), {args.decisions} decisions")
        rows: list[list[object]] = [["policy", "median decision", "goal", "met"]]
        for name, value in bench_builtins(snap, reqs):
            rows.append([f"built-in {name}", f"{value * 1000:.2f} ms", "<= 1 ms",
                         "yes" if value <= 0.001 else "NO"])
        for file in EXAMPLES:
            for churn in (0.0, 0.05):
                total, inside = trio.run(bench_script, file, snap, reqs, churn, rng)
                what = f"starlark {file}" + (", 5% of adverts new" if churn else "")
                rows.append([what, f"{total * 1000:.2f} ms (worker {inside * 1000:.2f} ms)",
                             "<= 10 ms", "yes" if total <= 0.010 else "NO"])
        print(table(rows))


if __name__ == "__main__":
    main()
