"""A node's way out (Ctrl-C, SIGTERM): new work is refused at once, running work -- local
requests and the jobs run for peers alike -- goes on for the drain's time, and whatever
still runs then is ended with :class:`~rbee_p2p.errors.ShuttingDown`: an SSE error event
and ``[DONE]`` to an HTTP client, an error frame to a peer (whose entry node tries the
next candidate if nothing was sent yet), never a bare cut."""

from __future__ import annotations

from contextlib import contextmanager
from typing import AsyncIterator, Iterator, TypeVar

import trio

from ..errors import ShuttingDown

__all__ = ["Drain"]

T = TypeVar("T")


class Drain:
    """``stop()`` refuses new work (:meth:`check`); ``cut()`` ends the running work:
    every wait inside :meth:`cuttable` is cancelled and raises ShuttingDown."""

    def __init__(self) -> None:
        self.stopping = False
        self.is_cut = False
        self.running = 0  # jobs inside working()
        self._scopes: set[trio.CancelScope] = set()
        self._changed = trio.Event()

    def stop(self) -> None:
        self.stopping = True

    def cut(self) -> None:
        self.stopping = self.is_cut = True
        for scope in list(self._scopes):
            scope.cancel()

    def check(self) -> None:
        """Raises ShuttingDown once the node is stopping (for new work)."""
        if self.stopping:
            raise ShuttingDown("this node is shutting down; try again (another node may "
                               "serve it)")

    @contextmanager
    def cuttable(self) -> Iterator[None]:
        """Run the block until the drain is cut; then raise ShuttingDown.  Wrap waits for
        the next output, never a ``yield`` (a cancel scope must not span one)."""
        scope = trio.CancelScope()
        if self.is_cut:
            scope.cancel()
        self._scopes.add(scope)
        try:
            with scope:
                yield
        finally:
            self._scopes.discard(scope)
        if scope.cancelled_caught:
            raise ShuttingDown("this node is shutting down: the answer was cut short at the "
                               "end of its drain")

    async def through(self, items: AsyncIterator[T]) -> AsyncIterator[T]:
        """``items`` until they end or the drain is cut (then ShuttingDown); for an async
        generator that yields them on (the wait is cuttable, its ``yield`` is not)."""
        while True:
            with self.cuttable():
                try:
                    item = await items.__anext__()
                except StopAsyncIteration:
                    return
            yield item

    @contextmanager
    def working(self) -> Iterator[None]:
        """Count a job as running (what :meth:`idle` waits for)."""
        self.running += 1
        try:
            yield
        finally:
            self.running -= 1
            self._changed.set()
            self._changed = trio.Event()

    async def idle(self) -> None:
        """Until no job counted by :meth:`working` runs."""
        while self.running:
            await self._changed.wait()
