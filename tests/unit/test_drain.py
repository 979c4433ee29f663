"""The node's way out (dispatch.drain): new work refused once stopping, running work cut
cleanly -- with ShuttingDown, never a bare cancellation -- at the drain's end.  Virtual
time."""

import pytest
import trio
import trio.testing

from rbee_p2p.dispatch.drain import Drain
from rbee_p2p.errors import ERRORS, Busy, ShuttingDown


async def slow_items(n, every=1.0):
    for i in range(n):
        await trio.sleep(every)
        yield i


def test_new_work_is_refused_once_stopping_as_a_503_with_retry():
    drain = Drain()
    drain.check()
    drain.stop()
    with pytest.raises(ShuttingDown) as refused:
        drain.check()
    assert isinstance(refused.value, Busy) and refused.value.retry_after > 0
    assert ERRORS[ShuttingDown].status == 503 and ERRORS[ShuttingDown].code == "node_stopping"


async def test_running_work_goes_on_until_the_cut_then_ends_with_shutting_down(autojump_clock):
    drain = Drain()
    got, ended = [], []

    async def stream():
        try:
            async for item in drain.through(slow_items(100)):
                got.append(item)
        except ShuttingDown as exc:
            ended.append((trio.current_time(), str(exc)))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(stream)
        drain.stop()  # stopping does not touch running work
        await trio.sleep(10.5)
        drain.cut()
    assert got == list(range(10))  # every item before the cut, none after
    assert ended == [(10.5, ended[0][1])] and "shutting down" in ended[0][1]


async def test_a_wait_started_after_the_cut_ends_at_once_and_idle_counts_jobs(autojump_clock):
    drain = Drain()
    drain.cut()
    started = trio.current_time()
    with pytest.raises(ShuttingDown):
        with drain.cuttable():
            await trio.sleep(100)
    assert trio.current_time() == started
    finished = []

    async def job(seconds):
        with drain.working():
            await trio.sleep(seconds)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(job, 3)
        nursery.start_soon(job, 5)
        await trio.testing.wait_all_tasks_blocked()
        assert drain.running == 2
        await drain.idle()
        finished.append(trio.current_time() - started)
    assert finished == [5] and drain.running == 0


async def test_items_that_end_before_the_cut_end_normally(autojump_clock):
    drain = Drain()
    assert [i async for i in drain.through(slow_items(3))] == [0, 1, 2]
