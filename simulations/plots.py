"""One PNG per run (matplotlib, optional): completion times against the central scheduler,
the run over time, utilisation, gossip traffic.  Without matplotlib the run still writes
its JSON and says how to get the plots."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

__all__ = ["plot", "have_matplotlib"]


def have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def plot(results: dict[str, Any], path: Path) -> Path | None:
    """Write the summary figure to ``path``; None (with a message) without matplotlib."""
    if not have_matplotlib():
        print("plots skipped: matplotlib is not installed (pip install -e '.[sim]')",
              file=sys.stderr)
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sc = results["scenario"]
    fig, axes = plt.subplots(2, 2, figsize=(10, 6.6))
    _completion(axes[0][0], results)
    _timeline(axes[0][1], results)
    _utilisation(axes[1][0], results)
    _traffic(axes[1][1], results)
    fig.suptitle(f"{sc['name']}: {sc['nodes']} nodes, {sc['routing']['mode']} design, "
                 f"seed {sc['seed']}", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=72)
    plt.close(fig)
    return path


def _completion(ax: Any, results: dict[str, Any]) -> None:
    d = results["distributions"]
    if "completion_s" not in d:
        return
    q = [x / 100 for x in d["quantiles"]]
    ax.plot(d["completion_s"], q, label="swarm", color="tab:blue")
    ax.plot(d["central_completion_s"], q, label="central (omniscient)", color="tab:gray",
            linestyle="--")
    ax.set_xscale("log")
    ax.set_xlabel("request completion time (s)")
    ax.set_ylabel("fraction of requests")
    r = results["routing_quality"]
    ax.set_title(f"completion: mean {r.get('ratio_mean')}x, p99 {r.get('ratio_p99')}x central",
                 fontsize=9)
    ax.legend(fontsize=8)


def _shade(ax: Any, results: dict[str, Any]) -> None:
    sc = results["scenario"]
    for s in sc["workload"]["surges"]:
        ax.axvspan(s["start_s"], s["end_s"], color="orange", alpha=0.15)
    for p in sc["network"]["partitions"]:
        ax.axvspan(p["start_s"], p["end_s"], color="red", alpha=0.12)
    ax.axvline(sc["warmup_s"], color="black", linewidth=0.6, linestyle=":")


def _timeline(ax: Any, results: dict[str, Any]) -> None:
    s = results["series"]
    t = s["t"]
    ax.plot(t, [x if x is not None else float("nan") for x in s["mean_completion_s"]],
            label="swarm mean completion", color="tab:blue")
    ax.plot(t, [x if x is not None else float("nan") for x in s["central_mean_completion_s"]],
            label="central", color="tab:gray", linestyle="--")
    ax.set_xlabel("time (s, by arrival)")
    ax.set_ylabel("mean completion (s)")
    twin = ax.twinx()
    twin.bar(t, s["arrivals"], width=1.0, color="tab:green", alpha=0.2)
    twin.bar(t, s["failed"], width=1.0, color="tab:red", alpha=0.6)
    twin.set_ylabel("arrivals (green), failed (red) per s")
    _shade(ax, results)
    ax.set_title("over time (orange: surge, red: partition)", fontsize=9)
    ax.legend(fontsize=7, loc="upper left")


def _utilisation(ax: Any, results: dict[str, Any]) -> None:
    d = results["distributions"]
    edges = [i / 20 for i in range(21)]
    centres = [(a + b) / 2 for a, b in zip(edges, edges[1:])]
    ax.bar([c - 0.012 for c in centres], d["utilisation_hist"], width=0.024, label="swarm")
    ax.bar([c + 0.012 for c in centres], d["central_utilisation_hist"], width=0.024,
           label="central", color="tab:gray")
    lb = results["load_balance"]
    ax.set_title(f"utilisation of honest nodes: CoV {lb['cov_utilisation']} "
                 f"(central {lb['central_cov_utilisation']})", fontsize=9)
    ax.set_xlabel("busy fraction after warm-up")
    ax.set_ylabel("nodes")
    ax.legend(fontsize=8)


def _traffic(ax: Any, results: dict[str, Any]) -> None:
    """Received bytes per node per second, averaged over 5 s (floods come in lumps)."""
    s = results["series"]
    nodes = results["scenario"]["nodes"]
    t = s["t"]

    def smooth(values: list[Any]) -> list[float]:
        raw = [(x or 0.0) / nodes / 1000 for x in values]
        return [sum(raw[max(0, i - 4): i + 1]) / len(raw[max(0, i - 4): i + 1])
                for i in range(len(raw))]

    ax.plot(t, smooth(s["gossip_bytes"]), color="tab:purple", label="gossip (adverts, IHAVE)")
    if any(s.get("probe_bytes") or []):
        ax.plot(t, smooth(s["probe_bytes"]), color="tab:olive", label="probes")
    ax.axhline(10, color="red", linewidth=0.6, linestyle=":")
    ax.set_xlabel("time (s)")
    ax.set_ylabel("KB/s per node (5 s mean)")
    if max(smooth(s["gossip_bytes"]) + [0.0]) > 100:
        ax.set_yscale("log")
    ax.legend(fontsize=7, loc="upper left")
    if results["malicious"]["nodes"]:
        twin = ax.twinx()
        share = [x if x is not None else float("nan") for x in s["malicious_share"]]
        twin.plot(t, share, color="tab:red", alpha=0.5, linewidth=0.8)
        twin.set_ylabel("share of jobs sent to malicious (red)")
        twin.set_ylim(0, 1)
    g = results["gossip"]
    ax.set_title(f"traffic: gossip {g['bytes_per_node_per_s_in']} B/s per node "
                 "(dotted: 10 KB/s)", fontsize=9)
    _shade(ax, results)
