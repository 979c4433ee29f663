"""From what a run recorded to the numbers we report (results.json) and the summary table.

Everything here is a deterministic function of the run (no wall-clock time: that goes to
timing.json), so the same seed gives the same results.json byte for byte.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .hardware import MODELS
from .metrics import Metrics
from .scenario import Scenario
from .world import World

__all__ = ["summarize", "table"]


def _r(x: float, digits: int = 4) -> float | None:
    if x is None or not math.isfinite(x):
        return None
    return round(float(x), digits)


def _stats(values: list[float] | np.ndarray) -> dict[str, Any]:
    v = np.asarray(values, dtype=float)
    finite = v[np.isfinite(v)]
    if finite.size == 0:
        return {"n": int(v.size), "never": int(v.size)}
    return {"n": int(v.size), "never": int(v.size - finite.size),
            "median": _r(np.median(finite)), "p90": _r(np.percentile(finite, 90)),
            "max": _r(finite.max())}


def _quality(sc: Scenario, world: World, m: Metrics, central: np.ndarray) -> dict[str, Any]:
    tr = world.trace
    t = np.array(tr.time)
    dist = np.array(m.finish) - t
    ok = np.array([s == "ok" for s in m.status]) & ~np.array(m.garbage, dtype=bool)
    window = (t >= sc.warmup_s) & (t <= sc.duration_s)
    both = window & ok & np.isfinite(central)
    if not both.any():
        return {"n": 0}
    d, c = dist[both], central[both]
    out: dict[str, Any] = {"n": int(both.sum())}
    for name, fn in (("mean", np.mean), ("p50", np.median),
                     ("p99", lambda x: np.percentile(x, 99))):
        out[f"{name}_s"], out[f"central_{name}_s"] = _r(fn(d)), _r(fn(c))
        out[f"ratio_{name}"] = _r(fn(d) / fn(c))
    return out


def _cov(busy: np.ndarray, world: World, sc: Scenario) -> tuple[float, float]:
    span = sc.duration_s - sc.warmup_s
    whole = np.array([j <= sc.warmup_s and lv >= sc.duration_s and b is None
                      for j, lv, b in zip(world.join, world.leave, world.malicious)])
    util = busy[: len(whole)][whole] / span
    if util.size == 0 or util.mean() == 0:
        return math.nan, math.nan
    return float(util.std() / util.mean()), float(util.mean())


def _malicious(sc: Scenario, world: World, m: Metrics) -> dict[str, Any]:
    bad = np.array([b is not None for b in world.malicious])
    first = np.array(m.first)
    when = np.array(m.first_time)
    sent = first >= 0
    out: dict[str, Any] = {"nodes": int(bad.sum())}
    thirds = sc.warmup_s + (sc.duration_s - sc.warmup_s) * 2 / 3
    for name, lo, hi in (("share_before_warmup", 0.0, sc.warmup_s),
                         ("share_after_warmup", sc.warmup_s, sc.duration_s + 1e9),
                         ("share_last_third", thirds, sc.duration_s + 1e9)):
        sel = sent & (when >= lo) & (when < hi)
        out[name] = _r(bad[first[sel]].mean()) if sel.any() else None
    executor = np.array(m.executor)
    done = (executor >= 0) & (np.array(world.trace.time) >= sc.warmup_s)
    out["share_executed_after_warmup"] = _r(bad[executor[done]].mean()) if done.any() else None
    garbage = np.array(m.garbage, dtype=bool)
    failed_after_bad = np.array([s == "failed" for s in m.status]) & \
        (np.array(m.malicious_failures) > 0)
    out["requests_lost_to_malicious"] = int(garbage.sum() + failed_after_bad.sum())
    out["garbage_delivered"] = int(garbage.sum())
    out["requests_delayed_by_malicious"] = int((np.array(m.malicious_failures) > 0).sum())
    return out


def _partition(sc: Scenario, world: World, m: Metrics) -> dict[str, Any] | None:
    """Completed jobs whose entry and executor sit on different sides of the first
    partition, by when the job was sent: before, during, and from 5 s after the heal."""
    if not sc.network.partitions:
        return None
    p = sc.network.partitions[0]
    from .network import REGIONS

    side = np.array([REGIONS[r][0] in p.side for r in world.placement["region"]])
    out = {}
    for name, lo, hi in (("before", 0.0, p.start_s), ("during", p.start_s, p.end_s),
                         ("after", p.end_s + 5.0, math.inf)):
        ok = [rid for rid, t in enumerate(m.dispatched)  # by when the job was sent
              if lo <= t < hi and m.status[rid] == "ok" and m.executor[rid] >= 0]
        cross = sum(side[world.trace.entry[rid]] != side[m.executor[rid]] for rid in ok)
        out[f"cross_{name}"] = int(cross)
        out[f"completed_{name}"] = len(ok)
    return out


def _series(sc: Scenario, world: World, m: Metrics, central: np.ndarray) -> dict[str, Any]:
    tr = world.trace
    horizon = int(sc.duration_s) + 1
    t = np.array(tr.time, dtype=float)
    bins = t.astype(int)
    dist = np.array(m.finish) - t
    ok = np.array([s == "ok" for s in m.status])
    bad = np.array([b is not None for b in world.malicious])
    first = np.array(m.first)
    series: dict[str, list[Any]] = {"t": list(range(horizon))}
    arrivals, mean_d, mean_c, share, failed = [], [], [], [], []
    for b in range(horizon):
        sel = bins == b
        arrivals.append(int(sel.sum()))
        good = sel & ok
        mean_d.append(_r(dist[good].mean(), 3) if good.any() else None)
        cent = sel & np.isfinite(central)
        mean_c.append(_r(central[cent].mean(), 3) if cent.any() else None)
        sent = sel & (first >= 0)
        share.append(_r(bad[first[sent]].mean(), 3) if sent.any() else None)
        failed.append(int((sel & ~ok).sum()))
    series.update(arrivals=arrivals, mean_completion_s=mean_d, central_mean_completion_s=mean_c,
                  malicious_share=share, failed=failed)
    for name in ("gossip_bytes", "probe_bytes"):
        series[name] = [_r(m.bins[name].get(b, 0.0), 1) for b in range(horizon)]
    return series


QUANTILES = [1, 5, 10, 20, 30, 40, 50, 60, 70, 80, 90, 95, 97.5, 99, 99.5, 99.9]


def _distributions(sc: Scenario, world: World, m: Metrics, central: np.ndarray,
                   central_busy: np.ndarray) -> dict[str, Any]:
    """Compact shapes for the plots: completion-time quantiles and utilisation
    histograms."""
    t = np.array(world.trace.time)
    dist = np.array(m.finish) - t
    ok = np.array([s == "ok" for s in m.status]) & ~np.array(m.garbage, dtype=bool)
    window = (t >= sc.warmup_s) & (t <= sc.duration_s)
    both = window & ok & np.isfinite(central)
    out: dict[str, Any] = {"quantiles": QUANTILES}
    if both.any():
        out["completion_s"] = [_r(x, 3) for x in np.percentile(dist[both], QUANTILES)]
        out["central_completion_s"] = [_r(x, 3) for x in np.percentile(central[both], QUANTILES)]
    span = sc.duration_s - sc.warmup_s
    whole = np.array([j <= sc.warmup_s and lv >= sc.duration_s and b is None
                      for j, lv, b in zip(world.join, world.leave, world.malicious)])
    edges = np.linspace(0.0, 1.0, 21)
    for name, busy in (("utilisation_hist", m.busy), ("central_utilisation_hist", central_busy)):
        util = np.clip(busy[: len(whole)][whole] / span, 0.0, 1.0)
        out[name] = np.histogram(util, bins=edges)[0].tolist()
    return out


def summarize(sc: Scenario, world: World, m: Metrics, central: np.ndarray,
              central_busy: np.ndarray, info: dict[str, Any]) -> dict[str, Any]:
    """The results of one run as plain JSON data."""
    tr = world.trace
    reasons: dict[str, int] = {}
    for status, reason in zip(m.status, m.reason):
        if status == "failed":
            reasons[reason] = reasons.get(reason, 0) + 1
    node_seconds = float(m.present.sum())
    per_node = {k: _r(v / node_seconds, 2) for k, v in sorted(m.bytes.items())} \
        if node_seconds else {}
    gossip = sum(v for k, v in m.bytes.items() if k != "probes")
    cov, util = _cov(m.busy, world, sc)
    ccov, cutil = _cov(central_busy, world, sc)
    providers = [sum(1 for i in range(world.initial) if world.machines[i].model == k)
                 for k in range(len(MODELS))]
    return {
        "scenario": sc.as_dict(),
        "world": {**info, "nodes_total": world.count, "initial_nodes": world.initial,
                  "requests": len(tr),
                  "models": [{"name": MODELS[k].name, "providers": providers[k],
                              "capacity_rps": _r(world.capacity[k]),
                              "arrival_rps": _r(world.rates[k])} for k in range(len(MODELS))]},
        "requests": {"total": len(tr), "ended": m.ended,
                     "completed": sum(1 for s in m.status if s == "ok"),
                     "failed": sum(reasons.values()), "failed_by_reason": dict(sorted(
                         reasons.items())),
                     "requests_retried": sum(1 for n in m.tries if n > 1),
                     "attempts_failed": m.retried,
                     "attempt_failures": {k: v for k, v in sorted(m.counters.items())
                                          if k.startswith("failed_")}},
        "routing_quality": _quality(sc, world, m, central),
        "load_balance": {"cov_utilisation": _r(cov), "mean_utilisation": _r(util),
                         "central_cov_utilisation": _r(ccov), "central_mean_utilisation":
                         _r(cutil)},
        "gossip": {"bytes_per_node_per_s_in": _r(gossip / node_seconds, 1)
                   if node_seconds else None,
                   "bytes_per_node_per_s_out": _r(float(m.gossip_out.sum()) / node_seconds, 1)
                   if node_seconds else None,
                   "by_category_per_node_per_s": per_node},
        "convergence": {**{f"{k}_p99_s": _stats(v) for k, v in sorted(m.convergence.items())},
                        "load_info_age_s": _stats(m.staleness) if m.staleness else None},
        "malicious": _malicious(sc, world, m),
        "partition": _partition(sc, world, m),
        "views": {"checks": m.counters.get("view_checks", 0),
                  "mean_mismatch": _r(m.counters.get("view_mismatch_permille", 0) / 1000 /
                                      m.counters["view_checks"])} if m.counters.get(
                                          "view_checks") else None,
        "series": _series(sc, world, m, central),
        "distributions": _distributions(sc, world, m, central, central_busy),
    }


def _fmt(x: Any, unit: str = "") -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.3g}{unit}"
    return f"{x}{unit}"


def table(results: dict[str, Any], timing: dict[str, Any]) -> str:
    """The summary printed after a run."""
    q, g, c = results["routing_quality"], results["gossip"], results["convergence"]
    rq, lb, mal = results["requests"], results["load_balance"], results["malicious"]
    advert = c.get("advert_p99_s") or {}
    rows = [
        ("scenario", f"{results['scenario']['name']} ({results['scenario']['routing']['mode']})"),
        ("nodes (total incl. joins)", f"{results['scenario']['nodes']} "
                                      f"({results['world']['nodes_total']})"),
        ("wall time", _fmt(timing.get("wall_s"), " s")),
        ("requests: total / ok / failed", f"{rq['total']} / {rq['completed']} / {rq['failed']}"),
        ("failed by reason", ", ".join(f"{k} {v}" for k, v in rq["failed_by_reason"].items())
         or "-"),
        ("requests retried", _fmt(rq["requests_retried"])),
        ("completion mean / p50 / p99 (s)", f"{_fmt(q.get('mean_s'))} / {_fmt(q.get('p50_s'))}"
                                            f" / {_fmt(q.get('p99_s'))}"),
        ("central mean / p50 / p99 (s)", f"{_fmt(q.get('central_mean_s'))} / "
                                         f"{_fmt(q.get('central_p50_s'))} / "
                                         f"{_fmt(q.get('central_p99_s'))}"),
        ("ratio to central mean / p50 / p99", f"{_fmt(q.get('ratio_mean'))} / "
                                              f"{_fmt(q.get('ratio_p50'))} / "
                                              f"{_fmt(q.get('ratio_p99'))}"),
        ("utilisation CoV (central)", f"{_fmt(lb['cov_utilisation'])} "
                                      f"({_fmt(lb['central_cov_utilisation'])})"),
        ("gossip B/s per node in / out", f"{_fmt(g['bytes_per_node_per_s_in'])} / "
                                         f"{_fmt(g['bytes_per_node_per_s_out'])}"),
        ("  by category", ", ".join(f"{k} {v}" for k, v in
                                    g["by_category_per_node_per_s"].items()) or "-"),
        ("advert reaches 99% (median / max s)", f"{_fmt(advert.get('median'))} / "
                                                f"{_fmt(advert.get('max'))}"),
    ]
    if "load_p99_s" in c:
        rows.append(("load change seen by 99% (median s)", _fmt(c["load_p99_s"].get("median"))))
    if "join_p99_s" in c:
        rows.append(("join seen by 99% (median s)", _fmt(c["join_p99_s"].get("median"))))
    if c.get("load_info_age_s"):
        rows.append(("load info age at decision (median s)",
                     _fmt(c["load_info_age_s"].get("median"))))
    if mal["nodes"]:
        rows.append(("malicious share before / after warm-up / last third",
                     f"{_fmt(mal['share_before_warmup'])} / {_fmt(mal['share_after_warmup'])}"
                     f" / {_fmt(mal['share_last_third'])}"))
        rows.append(("requests lost to malicious", _fmt(mal["requests_lost_to_malicious"])))
    if results.get("partition"):
        p = results["partition"]
        rows.append(("cross-partition completions before / during / after",
                     f"{p['cross_before']} / {p['cross_during']} / {p['cross_after']}"))
    rows.append(("policy decisions/s (us each)", f"{_fmt(timing.get('decisions_per_s'))} "
                                                f"({_fmt(timing.get('us_per_decision'))})"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)
