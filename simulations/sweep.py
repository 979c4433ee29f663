"""One-at-a-time variations of a scenario, as a markdown table (how we chose the defaults).

``python -m simulations sweep simulations/scenarios/steady.toml --nodes 1000 --duration 30
--vary routing.probes=8,16,32 --vary routing.max_queue=1,4,16`` runs the scenario as is,
then once per listed value with only that setting changed.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from typing import Any

from .runner import run
from .scenario import Scenario, ScenarioError

__all__ = ["variations", "sweep"]


def _convert(text: str, like: Any) -> Any:
    if isinstance(like, bool):
        return text.lower() in ("1", "true", "yes")
    return type(like)(text)


def variations(sc: Scenario, specs: list[str]) -> list[tuple[str, Scenario]]:
    """("section.key=value", scenario) for each value of each ``section.key=v1,v2``."""
    out = [("as is", sc)]
    for spec in specs:
        name, _, values = spec.partition("=")
        section, _, key = name.partition(".")
        part = getattr(sc, section, None)
        if part is None or not hasattr(part, key) or not values:
            raise ScenarioError(f"cannot vary {spec!r}: expected section.key=v1,v2,...")
        for value in values.split(","):
            changed = replace(part, **{key: _convert(value, getattr(part, key))})
            out.append((f"{name}={value}", replace(sc, **{section: changed})))
    return out


def sweep(sc: Scenario, specs: list[str]) -> str:
    """Run every variation; a markdown table of the headline numbers."""
    rows = ["| variation | mean / p50 / p99 vs central | failed | retried | "
            "gossip B/s | probes B/s | wall s |", "|---|---|---|---|---|---|---|"]
    for label, variant in variations(sc, specs):
        result = run(variant)
        r, t = result.results, result.timing
        q, rq = r["routing_quality"], r["requests"]
        by = r["gossip"]["by_category_per_node_per_s"]
        rows.append(f"| {label} | {q.get('ratio_mean')} / {q.get('ratio_p50')} / "
                    f"{q.get('ratio_p99')} | {rq['failed']} | {rq['requests_retried']} | "
                    f"{r['gossip']['bytes_per_node_per_s_in']} | {by.get('probes', 0)} | "
                    f"{t['wall_s']} |")
        print(rows[-1], file=sys.stderr, flush=True)  # progress; the table goes to stdout
    return "\n".join(rows)
