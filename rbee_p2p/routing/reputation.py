"""What a node learned about a peer from the jobs it sent there (pure).

A peer's advert is only its word.  The requester sees what really happened: the decode
speed it measured while the tokens streamed in, how long the job waited before its first
token compared with the queue the peer claimed, and whether the job failed (no answer
before the deadline, output that failed a spot check).  :class:`Standing` folds those
observations into two exponentially weighted averages, and :func:`trust` turns them into a
weight in (0, 1] that the node multiplies into its sampling weights and its speed estimate
for that peer.  Honest peers stay near 1; a peer that claims three times its speed or an
empty queue it does not have sinks within a few jobs.

Each node keeps its own standings (no gossip of reputations: nothing for a liar to forge).
No clock: old observations fade only as new ones arrive.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from .facts import DEFAULT_TOKENS_PER_S

__all__ = ["Standing", "after_job", "after_result", "claimed_wait_ms", "after_failure",
           "after_refusal", "trust", "effective_speed", "failure_penalty_ms", "MIN_TOKENS"]

WEIGHT = 0.5
"""How much one observation moves an average."""
WAIT_SLACK_MS = 2_000.0
"""Waits this much longer than claimed are normal noise (a queue estimate is rough)."""
FLOOR = 0.02
"""The lowest trust: even a bad peer is probed now and then, so it can redeem itself."""


@dataclass(frozen=True)
class Standing:
    pace: float = 1.0
    """Average of min(1, measured / claimed speed, claimed / observed wait)."""
    failures: float = 0.0
    """Average of 1 per failed job, 0 per good one."""
    jobs: int = 0
    measured_tokens_per_s: float = 0.0
    """Average speed its jobs were measured to stream at (0: none measured yet)."""


def after_job(standing: Standing, *, claimed_tokens_per_s: float, measured_tokens_per_s: float,
              claimed_wait_ms: float, observed_wait_ms: float,
              weight: float = WEIGHT) -> Standing:
    """A job came back and passed its checks.  ``claimed_*`` are what the peer's advert led
    us to expect when we chose it; ``measured_*`` / ``observed_*`` what we saw."""
    ratios = [1.0]
    if claimed_tokens_per_s > 0 and measured_tokens_per_s > 0:
        ratios.append(measured_tokens_per_s / claimed_tokens_per_s)
    ratios.append((max(claimed_wait_ms, 0.0) + WAIT_SLACK_MS)
                  / (max(observed_wait_ms, 0.0) + WAIT_SLACK_MS))
    kept = min(ratios)
    speed = standing.measured_tokens_per_s
    if measured_tokens_per_s > 0:
        speed = measured_tokens_per_s if speed <= 0 else (
            (1 - weight) * speed + weight * measured_tokens_per_s)
    return replace(standing, pace=(1 - weight) * standing.pace + weight * kept,
                   failures=(1 - weight) * standing.failures, jobs=standing.jobs + 1,
                   measured_tokens_per_s=speed)


MIN_TOKENS = 8
"""Jobs with fewer tokens than this say too little about a peer's speed to learn from."""


def claimed_wait_ms(queue_depth: int, active_jobs: int, max_tokens: int,
                    claimed_tokens_per_s: float) -> float:
    """The wait a peer's advert promised: the jobs it had, each as long as this one may be,
    at the speed it claimed (the default speed when it claimed none)."""
    speed = claimed_tokens_per_s if claimed_tokens_per_s > 0 else DEFAULT_TOKENS_PER_S
    return (queue_depth + active_jobs) * max_tokens / speed * 1000.0


def after_result(standing: Standing, *, claimed_tokens_per_s: float, queue_depth: int,
                 active_jobs: int, max_tokens: int, tokens: int, sent_s: float,
                 first_s: float, ended_s: float) -> Standing:
    """A text job came back: learn from what the requester saw against the advert it chose
    the peer by (its claimed speed and load).  ``sent_s``: when the job was sent,
    ``first_s`` / ``ended_s``: when its first and last tokens arrived (one clock, any
    origin).  Jobs of ``MIN_TOKENS`` tokens or fewer leave the standing as it was."""
    if tokens <= MIN_TOKENS:
        return standing
    measured = (tokens - 1) / max(ended_s - first_s, 1e-6)
    return after_job(standing, claimed_tokens_per_s=claimed_tokens_per_s,
                     measured_tokens_per_s=measured,
                     claimed_wait_ms=claimed_wait_ms(queue_depth, active_jobs, max_tokens,
                                                     claimed_tokens_per_s),
                     observed_wait_ms=(first_s - sent_s) * 1000.0)


def after_failure(standing: Standing, *, weight: float = WEIGHT) -> Standing:
    """A job sent there failed: no answer in time, dropped, or bad output."""
    return replace(standing, failures=(1 - weight) * standing.failures + weight,
                   jobs=standing.jobs + 1)


REFUSAL_PACE = 0.0
"""How a refusal counts: as a job that made no progress at all."""


def after_refusal(standing: Standing, *, weight: float = WEIGHT) -> Standing:
    """The peer said it had room when probed, then refused the job ("busy").  Honest peers
    do that now and then (another requester got there first); a peer that lies about its
    queue does it every time, and sinks."""
    pace = (1 - weight) * standing.pace + weight * REFUSAL_PACE
    return replace(standing, pace=pace)


def trust(standing: Standing) -> float:
    """A weight in [FLOOR, 1]: pace times the square of the success rate."""
    value = standing.pace * (1.0 - standing.failures) ** 2
    return min(1.0, max(FLOOR, value))


def effective_speed(standing: Standing, claimed_tokens_per_s: float, *,
                    believe: bool = False) -> float:
    """The speed to plan with: the claim, never above what the peer was measured to deliver
    (an unmeasured peer is planned at ``DEFAULT_TOKENS_PER_S`` at most, whatever it claims)
    unless claims are believed (``believe``: peers of one owner's private swarm),
    discounted by how it kept its word.  A claim of 0 (unmeasured at the peer) stays 0."""
    speed = claimed_tokens_per_s
    if not believe:
        speed = min(speed, standing.measured_tokens_per_s or DEFAULT_TOKENS_PER_S)
    return speed * min(1.0, max(FLOOR, standing.pace))


def failure_penalty_ms(standing: Standing, timeout_ms: float) -> float:
    """Expected time lost to a failed attempt there before trying elsewhere: with a failure
    rate f, f / (1 - f) wasted timeouts per success.  Add it to the peer's expected time."""
    f = min(standing.failures, 0.95)
    return f / (1.0 - f) * timeout_ms
