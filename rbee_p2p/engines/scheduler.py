"""Fair, bounded admission in front of the engines.

Each model runs one job at a time (its model thread).  Requests wait in FIFO order, at
most ``max_queue`` of them; beyond that they are refused at once with :class:`Busy` and a
Retry-After estimate.  Jobs run for peers (``remote``) wait behind every local request and
may fill at most ``remote_share`` of the queue: a flood from peers never makes a local
request wait for more than the job that is running, nor refuses it.  With ``peer_yield_s``
peers give way altogether while this node's own users are active: from a local request's
admission until ``peer_yield_s`` after it ended, a peer's job is refused (Busy: its entry
node tries elsewhere) rather than started, so a user chatting here never waits behind a
stranger's job but the first.  Queue depth and active jobs are observable (they feed the
capability adverts).
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


class _Turn:
    """One job at a time; the waiting local jobs first, then peers' (each FIFO).  The turn
    passes straight to the next waiter, who cannot be cancelled once handed it."""

    def __init__(self) -> None:
        self.busy = False
        self.local = trio.lowlevel.ParkingLot()
        self.remote = trio.lowlevel.ParkingLot()

    @property
    def waiting(self) -> int:
        return len(self.local) + len(self.remote)

    async def acquire(self, remote: bool) -> None:
        await trio.lowlevel.checkpoint_if_cancelled()
        if not self.busy:
            self.busy = True
            await trio.lowlevel.cancel_shielded_checkpoint()
            return
        await (self.remote if remote else self.local).park()  # woken holding the turn

    def release(self) -> None:
        for lot in (self.local, self.remote):
            if lot:
                lot.unpark()
                return
        self.busy = False


class _Slot:
    def __init__(self, engine: TextEngine) -> None:
        self.engine = engine
        self.turn = _Turn()
        self.mean_seconds = 1.0  # moving average of job durations, for Retry-After
        self.local_jobs = 0  # local jobs waiting or running
        self.local_until = -math.inf  # peers give way until then (trio time)


class Scheduler:
    def __init__(self, engines: Iterable[TextEngine], max_queue: int = 16,
                 remote_share: float = 0.5, peer_yield_s: float = 0.0) -> None:
        self.max_queue = max_queue
        self.peer_yield_s = peer_yield_s
        self.yielded = 0  # peers' jobs refused while local users were active
        # peers' jobs waiting: their share, at least one (if any may wait)
        self.remote_queue = min(max_queue, max(1, int(max_queue * remote_share)))
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
        turn = self._slots[self._names[name]].turn
        return ModelLoad(queue_depth=turn.waiting, active=int(turn.busy))

    def check(self, engine: TextEngine, remote: bool = False) -> None:
        """Raise :class:`Busy` (with a Retry-After estimate) if ``engine``'s queue is full,
        or (``remote``) peers' share of it."""
        slot = self._slots[engine.card.name]
        if remote:
            self._give_way(slot)
        turn = slot.turn
        waiting = len(turn.remote) if remote else turn.waiting
        limit = self.remote_queue if remote else self.max_queue
        if turn.busy and waiting >= limit:
            wait = (turn.waiting + 1) * slot.mean_seconds
            who = "requests from peers" if remote else "requests"
            raise Busy(f"model {engine.card.name} is busy ({waiting} {who} queued); retry "
                       "later", retry_after=max(1, math.ceil(wait)))

    @asynccontextmanager
    async def admit(self, engine: TextEngine, remote: bool = False) -> AsyncIterator[None]:
        """Wait for ``engine``'s turn (local jobs first, each kind FIFO); :class:`Busy` at
        once if the queue is full.  Cancel-safe: a cancelled waiter leaves the queue."""
        self.check(engine, remote)
        slot = self._slots[engine.card.name]
        self._changed()  # one more waiting
        if not remote:
            slot.local_jobs += 1
        try:
            await slot.turn.acquire(remote)
            try:
                if remote:
                    self._give_way(slot)  # a local user came while it waited
                self._changed()  # running
                start = trio.current_time()
                try:
                    yield
                finally:
                    elapsed = trio.current_time() - start
                    slot.mean_seconds = 0.8 * slot.mean_seconds + 0.2 * elapsed
            finally:
                slot.turn.release()
        finally:
            if not remote:
                slot.local_jobs -= 1
                slot.local_until = trio.current_time() + self.peer_yield_s
            self._changed()  # done (or gave up waiting)

    def _give_way(self, slot: _Slot) -> None:
        """Raise Busy for a peer's job while this node's own users are active."""
        if self.peer_yield_s > 0 and (slot.local_jobs > 0
                                      or trio.current_time() < slot.local_until):
            self.yielded += 1
            raise Busy(f"model {slot.engine.card.name} is in use by this node's own users; "
                       "peers' jobs go elsewhere for now",
                       retry_after=max(1, math.ceil(self.peer_yield_s)))

    def _changed(self) -> None:
        for listener in self.listeners:
            listener()
