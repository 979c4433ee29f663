"""Timestamps of a request's steps on its way through a node, for benchmarks.

With ``RBEE_TRACE=1`` in a node's environment each step prints one line to stderr,
``rbee-trace STEP REQUEST_ID NANOSECONDS`` (``time.perf_counter_ns``: CLOCK_MONOTONIC, the
same clock in every process of a machine), so ``bench/mesh.py`` can line up both nodes'
steps of a forwarded request.  Off by default: one attribute test per step.
"""

from __future__ import annotations

import os
import sys
import time

__all__ = ["ENABLED", "mark"]

ENABLED = os.environ.get("RBEE_TRACE") == "1"


def mark(step: str, request_id: bytes, at_ns: int | None = None) -> None:
    if ENABLED:
        print(f"rbee-trace {step} {request_id.hex()} {at_ns or time.perf_counter_ns()}",
              file=sys.stderr, flush=True)
