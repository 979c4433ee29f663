"""The event loop: a heap of (time, seq, callback, args) in virtual seconds.

No real sleeps and no trio: a callback runs at its virtual time and schedules more.  The
sequence number makes equal times run in scheduling order, so a run is a pure function of
its inputs and seed.
"""

from __future__ import annotations

import heapq
from typing import Any, Callable

__all__ = ["Loop", "EPOCH_MS"]

EPOCH_MS = 1_790_000_000_000
"""Virtual time 0 as wall-clock milliseconds (what protocol code receives as ``now_ms``)."""


class Loop:
    def __init__(self) -> None:
        self.now = 0.0
        self._heap: list[tuple[float, int, Callable[..., Any], tuple[Any, ...]]] = []
        self._seq = 0
        self.events = 0

    def at(self, when: float, callback: Callable[..., Any], *args: Any) -> None:
        """Run ``callback(*args)`` at virtual time ``when`` (not before now)."""
        self._seq += 1
        heapq.heappush(self._heap, (max(when, self.now), self._seq, callback, args))

    def after(self, delay: float, callback: Callable[..., Any], *args: Any) -> None:
        self.at(self.now + delay, callback, *args)

    def now_ms(self) -> int:
        return EPOCH_MS + int(self.now * 1000.0)

    def run(self, until: float, done: Callable[[], bool] = lambda: False) -> None:
        """Run events in time order while their time is <= ``until``; stop early once
        ``done()`` holds (checked every 1000 events: it may cost something)."""
        heap, pop = self._heap, heapq.heappop
        count = 0
        while heap:
            when, _, callback, args = heap[0]
            if when > until:
                break
            pop(heap)
            self.now = when
            callback(*args)
            count += 1
            if count % 1000 == 0 and done():
                break
        self.events += count
