"""One run: build the world, run the swarm, run the central baseline, write the results."""

from __future__ import annotations

import gc
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .central import central_schedule
from .report import summarize, table
from .scenario import Scenario
from .swarm import Swarm
from .world import build_world

__all__ = ["Run", "run", "write"]


@dataclass
class Run:
    results: dict[str, Any]  # deterministic for a seed
    timing: dict[str, Any]  # wall-clock measurements of this machine


def run(sc: Scenario) -> Run:
    """Simulate ``sc``; pure apart from CPU time (no files, no network)."""
    started = time.perf_counter()
    world = build_world(sc)
    built = time.perf_counter()
    swarm = Swarm(sc, world)
    # millions of long-lived objects: full collections would rescan them all the time
    gc.collect()
    gc.freeze()
    thresholds = gc.get_threshold()
    gc.set_threshold(200_000, 50, 1000)
    try:
        metrics = swarm.run()
    finally:
        gc.set_threshold(*thresholds)
        gc.unfreeze()
    swarm.finish_presence()
    simulated = time.perf_counter()
    central, _, central_busy = central_schedule(world, swarm.net, sc.warmup_s, sc.duration_s)
    done = time.perf_counter()
    router = swarm.requests.router
    info = {"crypto": "real" if swarm.wire.real else "fast", "observers": len(swarm.tables),
            "events": swarm.loop.events, "virtual_end_s": round(swarm.loop.now, 3),
            "adverts_sealed": swarm.wire.sealed, "adverts_to_peer_tables":
            swarm.wire.verified_count}
    results = summarize(sc, world, metrics, central, central_busy, info)
    results["invariants"] = {
        "every_request_ended_once": metrics.ended == len(world.trace),
        "unfinished": results["requests"]["failed_by_reason"].get("unfinished", 0)}
    timing = {"wall_s": round(done - started, 2), "world_s": round(built - started, 2),
              "swarm_s": round(simulated - built, 2), "central_s": round(done - simulated, 2),
              "events_per_s": round(swarm.loop.events / max(simulated - built, 1e-9)),
              "decisions": router.decisions,
              "decisions_per_s": round(router.decisions / router.seconds) if router.seconds
              else None,
              "us_per_decision": round(1e6 * router.seconds / router.decisions, 2)
              if router.decisions else None,
              "places_per_decision": round(router.places / router.decisions, 1)
              if router.decisions else None}
    return Run(results, timing)


def write(result: Run, out: Path, plots: bool = True) -> list[Path]:
    """results.json, timing.json, summary.txt and (with matplotlib) summary.png."""
    out.mkdir(parents=True, exist_ok=True)
    files = [out / "results.json", out / "timing.json", out / "summary.txt"]
    files[0].write_text(json.dumps(result.results, indent=1, sort_keys=True) + "\n")
    files[1].write_text(json.dumps(result.timing, indent=1, sort_keys=True) + "\n")
    files[2].write_text(table(result.results, result.timing) + "\n")
    if plots:
        from .plots import plot

        png = plot(result.results, out / "summary.png")
        if png is not None:
            files.append(png)
    return files
