"""``python -m simulations run SCENARIO.toml [--nodes N] [--seed S] [--out DIR]``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .runner import run, write
from .report import table
from .scenario import ScenarioError, load

RESULTS = Path(__file__).parent / "results"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simulations",
                                     description="Discrete-event simulator of rbee swarms.")
    sub = parser.add_subparsers(dest="command", required=True)
    cmd = sub.add_parser("run", help="run one scenario, print a summary, write results")
    cmd.add_argument("scenario", type=Path, help="a scenario file (TOML)")
    cmd.add_argument("--nodes", type=int, help="number of nodes at the start")
    cmd.add_argument("--seed", type=int, help="random seed (same seed: same results)")
    cmd.add_argument("--duration", type=float, help="seconds of arrivals (virtual)")
    cmd.add_argument("--mode", choices=["sample", "flood"], help="advert/routing design")
    cmd.add_argument("--out", type=Path,
                     help="results folder (default simulations/results/<name>-<nodes>n-s<seed>)")
    cmd.add_argument("--no-plots", action="store_true", help="write no PNG")
    var = sub.add_parser("sweep", help="vary one setting at a time; print a markdown table")
    var.add_argument("scenario", type=Path)
    var.add_argument("--nodes", type=int)
    var.add_argument("--seed", type=int)
    var.add_argument("--duration", type=float)
    var.add_argument("--vary", action="append", default=[], metavar="SECTION.KEY=V1,V2",
                     help="e.g. routing.probes=8,16 (repeatable)")
    args = parser.parse_args(argv)
    try:
        sc = load(args.scenario)
    except (ScenarioError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    sc = sc.with_overrides(nodes=args.nodes, seed=args.seed, duration_s=args.duration)
    if args.command == "sweep":
        from .sweep import sweep

        try:
            print(sweep(sc, args.vary))
        except ScenarioError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        return 0
    if args.mode:
        from dataclasses import replace

        sc = replace(sc, routing=replace(sc.routing, mode=args.mode))
    out = args.out or RESULTS / f"{sc.name}-{sc.routing.mode}-{sc.nodes}n-s{sc.seed}"
    print(f"running {sc.name}: {sc.nodes} nodes, {sc.routing.mode} design, seed {sc.seed}, "
          f"{sc.duration_s:g} s of arrivals", flush=True)
    result = run(sc)
    files = write(result, out, plots=not args.no_plots)
    print(table(result.results, result.timing))
    print("wrote " + ", ".join(str(f) for f in files))
    return 0


if __name__ == "__main__":
    sys.exit(main())
