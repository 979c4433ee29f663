"""Peers' jobs admitted per peer like tenants, over the in-memory forwarding of
forwarding.py: concurrency, daily tokens reserved at admission, key-less work in the open
swarm, local requests first, peers giving way while local users are active."""

import pytest
import trio
from forwarding import Stamp, call, collect, executor

from rbee_p2p.engines.fake import ScriptedEngine
from rbee_p2p.engines.scheduler import Scheduler
from rbee_p2p.errors import Busy, PeerRefused
from rbee_p2p.routing import TenantFacts


async def test_a_peer_over_its_concurrency_is_refused_and_its_slot_comes_back(mesh, nursery,
                                                                            autojump_clock):
    from rbee_p2p.tenancy.peers import PeerGate

    gate = PeerGate((1, 0, 0))
    engine = ScriptedEngine("fake", script="alpha beta gamma", token_seconds=1.0)
    scheduler = Scheduler([engine])
    server = executor(scheduler=scheduler, where="EU", peers=gate)
    first, _, _ = await mesh(call(max_tokens=3), server=server)
    with pytest.raises(Busy, match="1 concurrent requests"):  # a second one at once
        await mesh(call(), server=server)
    assert await collect(first) == "alpha beta gamma"
    await trio.sleep(0.1)
    again, _, _ = await mesh(call(max_tokens=3), server=server)  # the slot was freed
    assert await collect(again) == "alpha beta gamma"
    usage = gate.quotas.status()[next(iter(gate.quotas.usage))]
    assert usage["in_flight"] == 0 and usage["reserved"] == 0 and usage["tokens"] > 6


async def test_a_peers_daily_tokens_are_reserved_at_admission(mesh, nursery, autojump_clock):
    from rbee_p2p.tenancy.peers import PeerGate

    gate = PeerGate((0, 0, 40))  # 40 tokens a day; each job reserves prompt + max_tokens
    server = executor([ScriptedEngine("fake", token_seconds=1.0)], where="EU", peers=gate)
    admitted = refused = 0
    async with trio.open_nursery() as n:
        async def one():
            nonlocal admitted, refused
            try:
                await collect((await mesh(call(max_tokens=30), server=server))[0])
                admitted += 1
            except Busy:
                refused += 1
        for _ in range(5):  # concurrent: they cannot all pass one check
            n.start_soon(one)
    # a later one is admitted only while what is left holds its prompt, and takes what is
    # left of the reservation: the day overshoots by at most one request's max_tokens,
    # never by the whole burst
    assert 1 <= admitted <= 2 and refused == 5 - admitted
    (usage,) = gate.quotas.status().values()
    assert 30 < usage["tokens_today"] <= 40 + 30 and usage["reserved"] == 0


async def test_key_less_work_in_the_open_swarm_needs_tenants_of_the_sender(mesh,
                                                                           autojump_clock):
    """B has tenants: a key-less job relayed by a tenant-less stranger is refused; one that
    its sender admitted for a tenant of its own (a tenant_ref) is served."""
    from rbee_p2p.tenancy.peers import PeerGate

    gate = PeerGate((0, 0, 0), public=True, has_tenants=lambda: True)
    server = executor([ScriptedEngine("fake", script="alpha")], where="EU", peers=gate)
    with pytest.raises(PeerRefused, match="API key of its own tenants"):
        await mesh(call(), server=server)
    stamp = Stamp(tenant_ref=b"r" * 32, tenant=TenantFacts("t"))
    job, _, _ = await mesh(call(max_tokens=1), server=server, stamp=stamp)
    assert await collect(job) == "alpha"
    private = PeerGate((0, 0, 0), public=False, has_tenants=lambda: True)  # one owner
    job, _, _ = await mesh(call(max_tokens=1), server=executor(
        [ScriptedEngine("fake", script="alpha")], where="EU", peers=private))
    assert await collect(job) == "alpha"


async def test_local_requests_wait_behind_one_job_at_most_whatever_peers_queue(
        mesh, nursery, autojump_clock):
    from rbee_p2p.dispatch import Dispatcher

    engine = ScriptedEngine("fake", script="alpha", token_seconds=1.0)
    scheduler = Scheduler([engine], max_queue=8, remote_share=0.5)
    server = executor(scheduler=scheduler, where="EU")
    order = []

    async def remote(i):
        try:
            job, _, _ = await mesh(call(max_tokens=2), server=server)
            await collect(job)
            order.append(f"peer{i}")
        except Busy:
            order.append("refused")

    for i in range(6):  # one runs, 4 wait (the peers' share of 8), one is refused
        nursery.start_soon(remote, i)
        await trio.sleep(0.01)
    await trio.sleep(0.1)
    assert order == ["refused"] and scheduler.load("fake").queue_depth == 4
    local = Dispatcher(scheduler)._local_job(engine, call(max_tokens=2), Stamp())
    started = trio.current_time()
    await collect(local)
    order.append("local")
    # the local job ran right after the job that was running (2 tokens at 1 s each)
    assert trio.current_time() - started <= 2 * 2 + 0.5
    await trio.sleep(20)
    assert order == ["refused", "peer0", "local", "peer1", "peer2", "peer3", "peer4"]


async def test_peers_give_way_while_this_nodes_own_users_are_active(mesh, nursery,
                                                                    autojump_clock):
    """peer_yield_s: from a local request's admission until peer_yield_s after it ends,
    peers' jobs are refused (their entry nodes go elsewhere) -- queued ones too, when their
    turn comes -- so a user chatting back to back waits behind no stranger's job but the
    one running when it first came; after the quiet time peers are served again."""
    from rbee_p2p.dispatch import Dispatcher

    engine = ScriptedEngine("fake", script="alpha", token_seconds=1.0)
    scheduler = Scheduler([engine], max_queue=8, peer_yield_s=10.0)
    server = executor(scheduler=scheduler, where="EU")
    outcomes = []

    async def remote():
        try:
            job, _, _ = await mesh(call(max_tokens=2), server=server)
            await collect(job)
            outcomes.append("served")
        except Busy as exc:
            outcomes.append("refused" if "own users" in str(exc) else str(exc))

    nursery.start_soon(remote)  # running when the user comes
    await trio.sleep(0.1)
    nursery.start_soon(remote)  # waiting in the queue
    await trio.sleep(0.1)
    dispatcher = Dispatcher(scheduler)
    waits = []
    for _ in range(3):  # the user, back to back
        started = trio.current_time()
        await collect(dispatcher._local_job(engine, call(max_tokens=2), Stamp()))
        waits.append(trio.current_time() - started)
        nursery.start_soon(remote)  # a peer trying meanwhile
        await trio.sleep(0.5)
    assert waits[0] <= 4.5 and all(w <= 2.5 for w in waits[1:]), waits  # one job ahead, once
    await trio.sleep(5)
    assert outcomes == ["served", "refused", "refused", "refused", "refused"], outcomes
    assert scheduler.yielded == 4
    await trio.sleep(10)  # the user went quiet: peers are served again
    await remote()
    assert outcomes[-1] == "served"
