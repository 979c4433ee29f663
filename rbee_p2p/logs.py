"""Log lines that a peer can make us repeat: at most one a minute of each kind.

A swarm being joined, a flooding peer or a stream of bad messages would otherwise print a
line per message (py-libp2p's GossipSub warns "Rate limit exceeded" for every message over
its limit).  :class:`OncePerMinute` lets the first record of each kind (logger and message
template) through, drops the rest for a minute and then says how many it dropped.
"""

from __future__ import annotations

import logging
import time
from typing import Callable

__all__ = ["OncePerMinute", "quiet_repeats", "NOISY"]

NOISY = ("libp2p.pubsub.gossipsub", "rbee_p2p.mesh.membership", "rbee_p2p.mesh.executor",
         "rbee_p2p.mesh.service")
"""Loggers whose records peers can cause at will."""


class OncePerMinute(logging.Filter):
    """A filter passing one record of each (logger, template) per ``window_s``; the next one
    after the window carries "(N more like it)".  At most ``max_kinds`` kinds are tracked."""

    def __init__(self, window_s: float = 60.0, clock: Callable[[], float] = time.monotonic,
                 max_kinds: int = 1024) -> None:
        super().__init__()
        self.window_s, self.clock, self.max_kinds = window_s, clock, max_kinds
        self._kinds: dict[tuple[str, str], tuple[float, int]] = {}  # -> (passed at, dropped)

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, str(record.msg))
        now = self.clock()
        seen = self._kinds.get(key)
        if seen is not None and now - seen[0] < self.window_s:
            self._kinds[key] = (seen[0], seen[1] + 1)
            return False
        if seen is None and len(self._kinds) >= self.max_kinds:
            self._kinds.clear()  # rare: many kinds at once; start counting afresh
        if seen is not None and seen[1]:
            record.msg = f"{record.msg} ({seen[1]} more like it in the last "\
                         f"{self.window_s:.0f} s)"
        self._kinds[key] = (now, 0)
        return True


def quiet_repeats(names: tuple[str, ...] = NOISY) -> OncePerMinute:
    """Put one :class:`OncePerMinute` on each of these loggers (idempotent)."""
    for name in names:
        logger = logging.getLogger(name)
        for existing in logger.filters:
            if isinstance(existing, OncePerMinute):
                return existing
    shared = OncePerMinute()
    for name in names:
        logging.getLogger(name).addFilter(shared)
    return shared
