"""What a run records while it runs, and the invariant that every request ends once."""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np

__all__ = ["Metrics", "RequestEndedTwice"]


class RequestEndedTwice(RuntimeError):
    """A bug in the simulator: a request got two outcomes."""


class Metrics:
    def __init__(self, requests: int, nodes: int, warmup: float, end: float) -> None:
        self.warmup, self.end_t = warmup, end
        self.status: list[str] = [""] * requests  # "ok" | "failed"
        self.reason: list[str] = [""] * requests
        self.finish: list[float] = [math.nan] * requests
        self.executor: list[int] = [-1] * requests
        self.first: list[int] = [-1] * requests  # first place a job was sent to
        self.first_time: list[float] = [math.nan] * requests
        self.dispatched: list[float] = [math.nan] * requests  # when the job that ran was sent
        self.tries: list[int] = [0] * requests
        self.garbage: list[bool] = [False] * requests
        self.malicious_failures: list[int] = [0] * requests
        self.ended = 0
        self.busy = np.zeros(nodes)
        self.present = np.zeros(nodes)  # seconds present inside [warmup, end]
        self.gossip_in = np.zeros(nodes)
        self.gossip_out = np.zeros(nodes)
        self.bytes = defaultdict(float)  # category -> total bytes received in the window
        self.bins: dict[str, defaultdict[int, float]] = defaultdict(lambda: defaultdict(float))
        self.convergence: dict[str, list[float]] = defaultdict(list)
        self.staleness: list[float] = []
        self.retried = 0
        self.counters: dict[str, int] = defaultdict(int)

    def in_window(self, t: float) -> bool:
        return self.warmup <= t <= self.end_t

    def overlap(self, start: float, stop: float) -> float:
        return max(0.0, min(stop, self.end_t) - max(start, self.warmup))

    def end_request(self, rid: int, now: float, ok: bool, reason: str = "") -> None:
        """Record the one outcome of request ``rid``; a second one is a simulator bug."""
        if self.status[rid]:
            raise RequestEndedTwice(f"request {rid} ended twice ({self.status[rid]}, {reason})")
        self.status[rid] = "ok" if ok else "failed"
        self.reason[rid] = reason
        self.finish[rid] = now
        self.ended += 1

    def add_bin(self, series: str, t: float, value: float = 1.0) -> None:
        self.bins[series][int(t)] += value
