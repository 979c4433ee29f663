"""The node's policy runtime under trio's autojump clock, with the in-process evaluator
(the worker process is tested in test_policy_worker.py): built-ins, script decisions,
fallback on errors (logged and counted), hot reload, restart after a crash, bursts, the
dispatcher using it."""

import os

import pytest
import trio

from rbee_p2p.errors import ConfigError
from rbee_p2p.policy_runtime.runtime import FALLBACK, InProcessEvaluator, PolicyRuntime
from rbee_p2p.routing import (BUILTINS, ModelFacts, PeerFacts, Ranked, Rejected, RequestFacts,
                              Snapshot, TenantFacts, decide)
from rbee_p2p.routing.script import ScriptError

LEAST = "def route(request, peers, local):\n    return least_loaded(peers)\n"
REVERSED = "def route(request, peers, local):\n    return list(reversed(least_loaded(peers)))\n"
BROKEN = "X = 1\ndef route(request, peers, local)\n    return ids(peers)\n"  # no colon
FAILING = "def route(request, peers, local):\n    return peers[0]['missing']\n"
REJECTING = "def route(request, peers, local):\n    reject('closed for maintenance')\n"


def peer(pid, queue=0, tps=100.0, where="DE"):
    return PeerFacts(id=pid, models=(ModelFacts("m", tokens_per_s=tps),), queue_depth=queue,
                     max_queue=16, jurisdiction=where)


# least loaded: b, c, a; fastest: a (much faster despite its queue), c, b
SNAP = Snapshot(None, (peer("a", queue=4, tps=10000), peer("b", tps=10), peer("c", queue=1)))
REQ = RequestFacts("m", max_tokens=100)


def write(path, text, version):
    """Write ``text`` with a distinct mtime (no real waiting for the clock to tick)."""
    path.write_text(text)
    os.utime(path, ns=(version * 10**9, version * 10**9))


async def started(nursery, runtime):
    await nursery.start(runtime.run)
    return runtime


def runtime_for(path, **kw):
    return PolicyRuntime(str(path), evaluator=InProcessEvaluator, **kw)


async def test_builtins_decide_as_decide_does():
    for name, policy in BUILTINS.items():
        runtime = PolicyRuntime(name)
        await runtime.run()  # nothing to own: returns at once
        assert await runtime.route(REQ, SNAP) == decide(policy, REQ, SNAP, name)
        assert runtime.status() == {"policy": name, "decisions": 1}


async def test_unknown_policy_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="neither a built-in"):
        PolicyRuntime("fastestt")
    with pytest.raises(ConfigError, match="neither a built-in"):
        PolicyRuntime(str(tmp_path / "missing.star"))


async def test_script_decides_and_is_counted(tmp_path, autojump_clock):
    path = tmp_path / "least.star"
    write(path, LEAST, 1)
    async with trio.open_nursery() as nursery:
        runtime = await started(nursery, runtime_for(path))
        outcome = await runtime.decide(REQ, SNAP)
        assert outcome.decision == Ranked(("b", "c", "a"), "starlark:least.star")
        assert outcome.raw == outcome.decision and not outcome.fallback
        # nothing eligible: rejected before the script runs
        nothing = await runtime.route(RequestFacts("other"), SNAP)
        assert isinstance(nothing, Rejected) and nothing.kind == "unavailable"
        status = runtime.status()
        assert status["policy"] == "starlark:least.star" and status["loaded"] is True
        assert (status["decisions"], status["errors"], status["fallbacks"]) == (2, 0, 0)
        nursery.cancel_scope.cancel()


async def test_reject_and_residency(tmp_path, autojump_clock):
    path = tmp_path / "p.star"
    write(path, REJECTING, 1)
    async with trio.open_nursery() as nursery:
        runtime = await started(nursery, runtime_for(path))
        assert await runtime.route(REQ, SNAP) == \
            Rejected("closed for maintenance", "forbidden", "starlark:p.star")
        # a script naming a peer outside the tenant's residency: dropped by decide()
        write(path, "def route(request, peers, local):\n    return ['us', 'de']\n", 2)
        await trio.sleep(1.5)
        eu = RequestFacts("m", tenant=TenantFacts("t", residency="EU"))
        outcome = await runtime.decide(eu, Snapshot(None, (peer("us", where="US"), peer("de"))))
        assert outcome.raw.candidates == ("us", "de")
        assert outcome.decision == Ranked(("de",), "starlark:p.star")
        nursery.cancel_scope.cancel()


async def test_runtime_errors_fall_back_logged_and_counted(tmp_path, autojump_clock, caplog):
    path = tmp_path / "bad.star"
    write(path, FAILING, 1)
    async with trio.open_nursery() as nursery:
        runtime = await started(nursery, runtime_for(path))
        for _ in range(3):
            outcome = await runtime.decide(REQ, SNAP)
            assert outcome.fallback and outcome.error.kind == "runtime"
            assert outcome.decision == decide(BUILTINS[FALLBACK], REQ, SNAP, FALLBACK)
        status = runtime.status()
        assert (status["decisions"], status["errors"], status["fallbacks"]) == (3, 3, 3)
        assert status["last_error"]["message"].startswith("bad.star:2:12: ")
        assert status["loaded"] is True  # the script is fine otherwise: no restart
        nursery.cancel_scope.cancel()
    warnings = [r for r in caplog.records if "bad.star:2:12" in r.getMessage()]
    assert len(warnings) == 1  # the same error is not logged for every request


async def test_hot_reload_broken_then_fixed(tmp_path, autojump_clock, caplog):
    path = tmp_path / "p.star"
    write(path, LEAST, 1)
    async with trio.open_nursery() as nursery:
        runtime = await started(nursery, runtime_for(path))
        assert (await runtime.route(REQ, SNAP)).candidates == ("b", "c", "a")
        write(path, REVERSED, 2)
        await trio.sleep(1.5)
        assert (await runtime.route(REQ, SNAP)).candidates == ("a", "c", "b")
        assert runtime.status()["reloads"] == 1
        # a broken version: logged with its line; the fallback decides meanwhile
        write(path, BROKEN, 3)
        await trio.sleep(1.5)
        outcome = await runtime.decide(REQ, SNAP)
        assert outcome.fallback and outcome.decision.policy == FALLBACK
        status = runtime.status()
        assert status["loaded"] is False and status["last_error"]["kind"] == "syntax"
        assert status["last_error"]["message"].startswith("p.star:2:")
        assert any("p.star:2:" in r.getMessage() for r in caplog.records)
        # fixed: used again, without a restart
        write(path, LEAST, 4)
        await trio.sleep(1.5)
        assert (await runtime.route(REQ, SNAP)).candidates == ("b", "c", "a")
        assert runtime.status()["loaded"] is True and runtime.status()["reloads"] == 2
        # a file being replaced (gone for a moment) keeps what is loaded
        path.unlink()
        await trio.sleep(1.5)
        assert (await runtime.route(REQ, SNAP)).candidates == ("b", "c", "a")
        nursery.cancel_scope.cancel()


async def test_a_broken_policy_stops_the_start(tmp_path, autojump_clock):
    path = tmp_path / "p.star"
    write(path, BROKEN, 1)
    with pytest.raises(ConfigError, match=r"p\.star:2:33: Parse error"):
        await runtime_for(path).run()
    # the dry run gets the ScriptError itself
    with pytest.raises(ScriptError) as info:
        async with runtime_for(path).opened():
            pass
    assert (info.value.kind, info.value.line) == ("syntax", 2)


class Crashing(InProcessEvaluator):
    """Dies on its first evaluation, as a worker killed for memory would (every one of them
    with ``always``)."""

    made = 0
    always = False

    def __init__(self):
        super().__init__()
        type(self).made += 1
        self.alive = True
        self.crash = self.always or type(self).made == 1

    async def evaluate(self, request, snapshot):
        if self.crash:
            self.alive = False
            raise ScriptError("crash", "the policy worker died (killed by SIGABRT)")
        return await super().evaluate(request, snapshot)


async def test_a_dead_evaluator_is_replaced(tmp_path, autojump_clock):
    path = tmp_path / "p.star"
    write(path, LEAST, 1)
    Crashing.made = 0
    async with trio.open_nursery() as nursery:
        runtime = await started(nursery, PolicyRuntime(str(path), evaluator=Crashing))
        outcome = await runtime.decide(REQ, SNAP)
        assert outcome.fallback and outcome.error.kind == "crash"
        # until the new one is up, the fallback decides without trying the dead one
        assert (await runtime.decide(REQ, SNAP)).fallback
        await trio.sleep(runtime.restart_s + 0.1)
        assert (await runtime.route(REQ, SNAP)).candidates == ("b", "c", "a")
        status = runtime.status()
        assert (status["restarts"], status["errors"], status["fallbacks"]) == (1, 1, 2)
        assert Crashing.made == 2
        nursery.cancel_scope.cancel()


class AlwaysCrashing(Crashing):
    made = 0
    always = True


async def test_restarts_back_off_while_every_worker_dies(tmp_path, autojump_clock):
    path = tmp_path / "p.star"
    write(path, LEAST, 1)
    AlwaysCrashing.made = 0
    async with trio.open_nursery() as nursery:
        runtime = await started(nursery, PolicyRuntime(str(path), evaluator=AlwaysCrashing))
        start = trio.current_time()
        restarted_at = []
        for _ in range(4):
            assert (await runtime.decide(REQ, SNAP)).error.kind == "crash"
            made = AlwaysCrashing.made
            while AlwaysCrashing.made == made:
                await trio.sleep(0.01)
            restarted_at.append(round(trio.current_time() - start))
        assert restarted_at == [1, 1 + 2, 1 + 2 + 4, 1 + 2 + 4 + 8]
        assert runtime.status()["restarts"] == 4
        nursery.cancel_scope.cancel()


class Slow(InProcessEvaluator):
    async def evaluate(self, request, snapshot):
        await trio.sleep(0.04)
        return await super().evaluate(request, snapshot)


async def test_a_burst_falls_back_instead_of_queueing(tmp_path, autojump_clock):
    path = tmp_path / "p.star"
    write(path, LEAST, 1)
    outcomes = []
    async with trio.open_nursery() as nursery:
        runtime = await started(nursery, PolicyRuntime(str(path), evaluator=Slow,
                                                       timeout_ms=50))
        start = trio.current_time()

        async def one():
            outcomes.append(await runtime.decide(REQ, SNAP))

        async with trio.open_nursery() as burst:
            for _ in range(6):
                burst.start_soon(one)
        assert trio.current_time() - start <= 0.08  # 50 ms + the grace, not 6 x 40 ms
        nursery.cancel_scope.cancel()
    assert sum(not o.fallback for o in outcomes) >= 1
    assert sum(o.fallback and o.error is None for o in outcomes) >= 4


async def test_the_dispatcher_routes_by_the_script(tmp_path, autojump_clock):
    from rbee_p2p.dispatch import Dispatcher, Request, Stamp
    from rbee_p2p.engines.base import TextRequest
    from rbee_p2p.engines.fake import ScriptedEngine
    from rbee_p2p.engines.scheduler import Scheduler

    path = tmp_path / "p.star"
    write(path, "def route(request, peers, local):\n"
                "    return sorted(ids(peers), reverse = True)\n", 1)
    async with trio.open_nursery() as nursery:
        runtime = await started(nursery, runtime_for(path))
        dispatcher = Dispatcher(Scheduler([ScriptedEngine("m")]), local_id="local",
                                router=runtime.route)
        _, ranked = await dispatcher.plan(Request("chat", REQ.model, text=TextRequest(
            max_tokens=REQ.max_tokens, prompt="x")), Stamp())
        assert ranked == Ranked(("local",), "starlark:p.star")
        nursery.cancel_scope.cancel()
