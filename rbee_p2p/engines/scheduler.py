"""Fair, bounded admission in front of the engines.

Each model runs one job at a time (its model thread).  Requests wait in a FIFO
(``trio.CapacityLimiter`` is fair) of at most ``max_queue`` entries; beyond that they are
refused at once with :class:`Busy` and a Retry-After estimate.  Queue depth and active jobs
are observable (they feed the capability adverts).
"""

from __future__ import annotations

import math
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import AsyncIterator, Callable, Iterable

import trio

from ..errors import Busy, ModelNotFound, ModelUnavailable
from .base import TextEngine

__all__ = ["Scheduler", "ModelLoad"]


@dataclass(frozen=True)
class ModelLoad:
    queue_depth: int
    active: int


class _Slot:
    def __init__(self, engine: TextEngine) -> None:
        self.engine = engine
        self.limiter = trio.CapacityLimiter(1)
        self.mean_seconds = 1.0  # moving average of job durations, for Retry-After


class Scheduler:
    def __init__(self, engines: Iterable[TextEngine], max_queue: int = 16) -> None:
        self.max_queue = max_queue
        self._slots: dict[str, _Slot] = {}
        self._names: dict[str, str] = {}
        # configured here but not loaded (no room, no torch): name -> why (set by the node)
        self.unavailable: dict[str, str] = {}
        # called whenever queue depth or active jobs change (the mesh re-advertises)
        self.listeners: list[Callable[[], None]] = []
        for engine in engines:
            self._slots[engine.card.name] = _Slot(engine)
            for name in (engine.card.name, *engine.card.aliases):
                self._names[name] = engine.card.name

    @property
    def engines(self) -> list[TextEngine]:
        return [slot.engine for slot in self._slots.values()]

    def find(self, model: str) -> TextEngine | None:
        """The engine serving ``model`` (name or alias) here, or None."""
        name = self._names.get(model)
        return None if name is None else self._slots[name].engine

    def lookup(self, model: str) -> TextEngine:
        """The engine serving ``model`` (name or alias).  Raises :class:`ModelNotFound`."""
        try:
            return self._slots[self._names[model]].engine
        except KeyError:
            if model in self.unavailable:
                raise ModelUnavailable(self.unavailable[model], param="model") from None
            raise ModelNotFound(f"The model '{model}' does not exist or is not served by this "
                                "node", param="model") from None

    def load(self, name: str) -> ModelLoad:
        stats = self._slots[self._names[name]].limiter.statistics()
        return ModelLoad(queue_depth=stats.tasks_waiting, active=stats.borrowed_tokens)

    def check(self, engine: TextEngine) -> None:
        """Raise :class:`Busy` (with a Retry-After estimate) if ``engine``'s queue is full."""
        slot = self._slots[engine.card.name]
        stats = slot.limiter.statistics()
        if stats.borrowed_tokens and stats.tasks_waiting >= self.max_queue:
            wait = (stats.tasks_waiting + 1) * slot.mean_seconds
            raise Busy(f"model {engine.card.name} is busy ({stats.tasks_waiting} requests "
                       "queued); retry later", retry_after=max(1, math.ceil(wait)))

    @asynccontextmanager
    async def admit(self, engine: TextEngine) -> AsyncIterator[None]:
        """Wait for ``engine``'s turn (FIFO); :class:`Busy` at once if the queue is full.

        Cancel-safe: a cancelled waiter leaves the queue.
        """
        self.check(engine)
        slot = self._slots[engine.card.name]
        self._changed()  # one more waiting
        try:
            async with slot.limiter:
                self._changed()  # running
                start = trio.current_time()
                try:
                    yield
                finally:
                    elapsed = trio.current_time() - start
                    slot.mean_seconds = 0.8 * slot.mean_seconds + 0.2 * elapsed
        finally:
            self._changed()  # done (or gave up waiting)

    def _changed(self) -> None:
        for listener in self.listeners:
            listener()
