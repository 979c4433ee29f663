"""Forwarding over an in-memory stream: the executor and the remote job, both real."""

import dataclasses
import logging
from contextlib import aclosing

import pytest
import samples
import trio
import trio.testing

from rbee_p2p.dispatch import Request, Stamp
from rbee_p2p.engines.base import ImageRequest, TextRequest
from rbee_p2p.engines.diffusion import ImageResult, ScriptedImageEngine
from rbee_p2p.engines.fake import ScriptedEngine
from rbee_p2p.engines.scheduler import Scheduler
from rbee_p2p.errors import Busy, EngineFailure, InvalidRequest, PeerRefused, PeerUnavailable
from rbee_p2p.mesh.remote import RemoteJob
from rbee_p2p.protocol.envelope import Verifier
from rbee_p2p.protocol.receipts import tokens_in_bound
from rbee_p2p.routing import TenantFacts

from forwarding import A, B, EU_TENANT, TIMING, Audit, Mem, call, collect, executor


async def test_forwarded_job_streams_and_the_receipt_verifies(mesh, autojump_clock):
    job, engine, _ = await mesh(call())
    assert await collect(job) == "alpha beta gamma alpha beta gamma"
    assert job.completion.completion_tokens == 6 and job.completion.finish_reason == "length"
    assert job.receipt.jurisdiction == "EU" and job.receipt.tokens_out == 6
    await trio.sleep(0.1)
    (kind_a, outcome_a, fa), = mesh.audits["A"].records
    (kind_b, outcome_b, fb), = mesh.audits["B"].records
    assert (kind_a, outcome_a, kind_b, outcome_b) == ("entry", "ok", "execute", "ok")
    assert fa["receipt"] == fb["receipt"] and fa["exec_peer"] == B.peer_id
    assert fb["entry_peer"] == A.peer_id and fb["tokens_out"] == 6


async def test_the_executor_accepts_at_once_and_a_loss_before_output_can_move(mesh,
                                                                              autojump_clock):
    slow = ScriptedEngine("fake", script="late", token_seconds=3.0)
    start = trio.current_time()
    job, _, _ = await mesh(call(), engine=slow)
    assert trio.current_time() - start < 1  # accepted, long before the first token
    await mesh.served[-1].aclose()  # the executor is gone before producing anything
    with pytest.raises(PeerUnavailable, match="before the first token"):
        await collect(job)


async def test_deadline_admission_refuses_what_it_would_finish_too_late(mesh, autojump_clock):
    from rbee_p2p.mesh.executor import now_ms

    # 6 tokens at the default 50 tok/s: ~120 ms of work here, nothing queued ahead
    with pytest.raises(Busy, match="after the requester's estimate"):
        await mesh(call(), admit_by_ms=now_ms() + 20)
    assert mesh.audits["B"].records[-1][:2] == ("execute", "rejected")
    job, _, _ = await mesh(call(), admit_by_ms=now_ms() + 10_000)
    assert job.request.admit_by_ms is not None
    assert await collect(job) == "alpha beta gamma alpha beta gamma"


async def test_tenant_travels_as_a_keyed_hash_and_residency_is_enforced(mesh, autojump_clock):
    ref = bytes(range(32))
    job, _, _ = await mesh(call(), stamp=Stamp(tenant_ref=ref, tenant=EU_TENANT), where="DE")
    assert job.request.tenant_ref == ref and job.request.residency == "EU"
    await collect(job)
    await trio.sleep(0.1)
    (_, _, fa), = mesh.audits["A"].records
    (_, _, fb), = mesh.audits["B"].records
    assert fa["tenant_ref"] == fb["tenant_ref"] == ref and fb["jurisdiction"] == "DE"
    # an executor outside the residency refuses (the requester tries another peer)
    with pytest.raises(PeerUnavailable, match="must stay in EU"):
        await mesh(call(), stamp=Stamp(tenant=EU_TENANT), where="US")
    assert mesh.audits["B"].records[-1][:2] == ("execute", "rejected")


async def test_a_receipt_outside_the_residency_is_an_error(mesh, autojump_clock):
    # an executor that accepts anything (claims nothing checks) but signs "US" in its receipt
    job, _, executor = await mesh(call(), stamp=Stamp(tenant=TenantFacts("t", residency="US")), where="US")
    job.stamp = Stamp(tenant=EU_TENANT)  # the requester required EU
    with pytest.raises(EngineFailure, match="outside the required EU"):
        await collect(job)
    assert mesh.failed == [B.peer_id]  # a lying receipt counts against the peer


async def test_stop_string_tokens_still_add_up(mesh, autojump_clock):
    job, _, _ = await mesh(call(stop="gamma"))
    assert await collect(job) == "alpha beta"
    assert job.completion.finish_reason == "stop" and job.completion.completion_tokens == 3


@pytest.mark.parametrize("make, error", [
    (lambda: call(model="other"), PeerRefused),  # not served there: try another peer
    (lambda: call(max_tokens=600), InvalidRequest),  # the peer's verdict: our request is bad
])
async def test_refusals(mesh, autojump_clock, make, error):
    with pytest.raises(error):
        await mesh(make())
    await trio.sleep(0.1)
    assert mesh.audits["A"].records == []


async def test_what_the_wire_cannot_carry_is_a_bad_request_before_a_stream_opens(
        mesh, autojump_clock):
    big = Request("completion", "fake", text=TextRequest(max_tokens=4, prompt="x" * (1 << 20)))
    with pytest.raises(InvalidRequest, match="too large to send to a peer"):
        await mesh(big)
    assert mesh.served == []  # no stream was opened


async def test_busy_peer(mesh, autojump_clock, nursery):
    engine = ScriptedEngine("fake", token_seconds=10)
    scheduler = Scheduler([engine], max_queue=0)
    nursery.start_soon(lambda: mesh(call(max_tokens=50), engine=engine, scheduler=scheduler))
    await trio.sleep(1)
    with pytest.raises(Busy):
        await mesh(call(), engine=engine, scheduler=scheduler)


async def test_silent_peer_is_detected_by_the_frame_timeout(mesh, autojump_clock):
    start = trio.current_time()
    with pytest.raises(PeerUnavailable, match="dead or frozen"):
        await mesh(call(), serve=False)
    assert trio.current_time() - start == pytest.approx(TIMING.frame_timeout_s, abs=0.1)


async def test_heartbeats_keep_a_slow_job_alive(mesh, autojump_clock):
    slow = ScriptedEngine("fake", script="slow words", token_seconds=7.0)  # > frame timeout
    job, _, _ = await mesh(call(max_tokens=3), engine=slow)
    assert await collect(job) == "slow words slow"


async def test_cancel_stops_the_peer_generation(mesh, autojump_clock):
    engine = ScriptedEngine("fake", token_seconds=0.5, batch=1)
    job, _, executor = await mesh(call(max_tokens=100), engine=engine)
    got = 0
    async with aclosing(job.batches()) as batches:
        async for _ in batches:
            got += 1
            if got == 3:
                break
    await trio.sleep(5)
    assert engine.generated <= 3 + 2  # in flight when the cancel arrived, plus one
    assert executor.served == 1
    outcomes = [(k, o) for k, o, _ in mesh.audits["B"].records + mesh.audits["A"].records]
    assert ("entry", "cancelled") in outcomes and ("execute", "cancelled") in outcomes


async def test_a_requester_hanging_up_is_no_error_on_the_executor(mesh, autojump_clock,
                                                                      caplog):
    caplog.set_level(logging.INFO, logger="rbee_p2p.mesh.executor")
    engine = ScriptedEngine("fake", token_seconds=0.5, batch=1)
    job, _, executor = await mesh(call(max_tokens=100), engine=engine)
    await job.frames.reset()  # gone without a Cancel: the stream just ends
    await trio.sleep(5)
    assert engine.generated <= 3 and executor.served == 1
    logged = [(r.levelname, r.getMessage()) for r in caplog.records
              if r.name == "rbee_p2p.mesh.executor"]
    assert logged and all(level == "INFO" and "ended early" in text for level, text in logged)


async def test_engine_failure_mid_stream_becomes_an_error(mesh, autojump_clock):
    job, _, _ = await mesh(call(max_tokens=20), engine=ScriptedEngine("fake", fail_at=5, batch=1))
    with pytest.raises(EngineFailure):
        await collect(job)


async def test_a_peer_dying_mid_stream_is_an_error_and_reported(nursery, autojump_clock):
    engine = ScriptedEngine("fake", token_seconds=0.1, batch=1)
    server = executor([engine])
    failed = []
    streams = []

    async def open_stream(peer, fresh):
        left, right = trio.testing.memory_stream_pair()
        streams.append(right)
        nursery.start_soon(server.handle, Mem(right), A.peer_id)
        return Mem(left)

    job = await RemoteJob.start(B.peer_id, open_stream, call(max_tokens=50), key=A,
                                verifier=Verifier(), timing=TIMING, on_failure=failed.append)
    got = []
    with pytest.raises(EngineFailure, match="mid-stream"):
        async with aclosing(job.batches()) as batches:
            async for batch in batches:
                got += batch
                if len(got) == 3:
                    await streams[0].aclose()  # the executor's side of the wire is cut
    assert failed == [B.peer_id]


async def test_a_dead_pre_opened_stream_is_replaced_by_a_fresh_one(nursery, autojump_clock):
    engine = ScriptedEngine("fake", script="ok", token_seconds=0.1)
    server = executor([engine])
    asked = []

    async def open_stream(peer, fresh):
        asked.append(fresh)
        left, right = trio.testing.memory_stream_pair()
        if fresh:
            nursery.start_soon(server.handle, Mem(right), A.peer_id)
        else:
            await right.aclose()  # the peer restarted since this stream was opened
        return Mem(left)

    job = await RemoteJob.start(B.peer_id, open_stream, call(max_tokens=2), key=A,
                                verifier=Verifier(), timing=TIMING)
    assert await collect(job) == "ok ok" and asked == [False, True]


async def test_a_request_signed_by_someone_else_is_refused(nursery, autojump_clock):
    """The executor only takes requests signed by the peer at the other end of the stream."""
    server = executor([ScriptedEngine("fake")])
    impostor = samples.NodeKey.from_seed(bytes([9]) * 32)

    async def open_stream(peer, fresh):
        left, right = trio.testing.memory_stream_pair()
        # the stream's authenticated remote is A, but the request will be signed by another
        nursery.start_soon(server.handle, Mem(right), A.peer_id)
        return Mem(left)

    with pytest.raises(PeerUnavailable, match="misdirected"):
        await RemoteJob.start(B.peer_id, open_stream, call(), key=impostor,
                              verifier=Verifier(), timing=TIMING)
    assert server.served == 0


class BigImages(ScriptedImageEngine):
    """An image model whose PNGs are given (one larger than a chunk), made slowly."""

    def __init__(self, pngs):
        super().__init__("painter")
        self.pngs = pngs

    async def generate(self, job):
        self.jobs.append(job)
        await trio.sleep(3)  # slower than a heartbeat: the requester must wait, not give up
        return ImageResult(list(self.pngs[:job.n]))


async def run_remote(nursery, server, request):
    async def open_stream(peer, fresh):
        left, right = trio.testing.memory_stream_pair()
        nursery.start_soon(server.handle, Mem(right), A.peer_id)
        return Mem(left)

    job = await RemoteJob.start(B.peer_id, open_stream, request, key=A, verifier=Verifier(),
                                timing=TIMING)
    assert await collect(job) == ""  # data, not text
    return job


async def test_images_are_forwarded_whole_even_when_larger_than_a_chunk(nursery, autojump_clock):
    pngs = [b"\x89PNG" + bytes(700 * 1024), b"\x89PNG small"]
    images = BigImages(pngs)
    server = executor([images])
    job = await run_remote(nursery, server, Request("image", "painter",
                                                   image=ImageRequest("a bee", n=2)))
    assert job.receipt.tokens_out == 2 and job.items == pngs
    assert [(j.prompt, j.n) for j in images.jobs] == [("a bee", 2)]
    with pytest.raises(PeerUnavailable):  # not an image model there: try another peer
        await run_remote(nursery, server, Request("image", "other", image=ImageRequest("x")))


async def test_embeddings_are_forwarded(nursery, autojump_clock):
    import struct

    engine = ScriptedEngine("fake")
    job = await run_remote(nursery, executor([engine]),
                           Request("embedding", "fake", inputs=("a b", "c")))
    expected = (await engine.embed(["a b", "c"])).vectors
    got = [list(struct.unpack("<8f", a)) for a in job.items]
    assert len(got) == 2 and all(g == pytest.approx(e) for g, e in zip(got, expected))
    assert job.receipt.tokens_in == 3


async def test_a_request_past_its_deadline_is_refused_and_tried_elsewhere(autojump_clock):
    import dataclasses

    late = dataclasses.replace(TIMING, deadline_s=-1.0)
    server = executor([ScriptedEngine("fake")])
    async with trio.open_nursery() as nursery:
        async def open_stream(peer, fresh):
            left, right = trio.testing.memory_stream_pair()
            nursery.start_soon(server.handle, Mem(right), A.peer_id)
            return Mem(left)

        with pytest.raises(PeerUnavailable, match="deadline"):
            await RemoteJob.start(B.peer_id, open_stream, call(), key=A,
                                  verifier=Verifier(), timing=late)
    assert server.served == 0


async def test_the_receipt_charges_the_executors_price_for_the_tokens_it_ran(mesh):
    # 1,000,000 micro-credits per million prompt tokens, 2,000,000 per million completion
    # tokens: one and two micro-credits a token
    job, _, _ = await mesh(call(max_tokens=3), prices={"fake": (1_000_000, 2_000_000, 0)})
    await collect(job)
    receipt = job.receipt
    assert receipt.tokens_out == 3 and receipt.tokens_in > 0
    assert receipt.price == receipt.tokens_in + 2 * receipt.tokens_out
    unpriced, _, _ = await mesh(call(max_tokens=3), prices={"other": (5, 5, 5)})
    await collect(unpriced)
    assert unpriced.receipt.price == 0


async def test_a_peer_ignoring_max_tokens_is_cut_off_and_marked(mesh, autojump_clock):
    engine = ScriptedEngine("fake", token_seconds=0.1, batch=2)
    server = executor([engine], where="EU")
    honest_run = server.run

    def lying_run(request, **kwargs):  # generates 200 tokens whatever was asked
        text = dataclasses.replace(request.text, max_tokens=200)
        return honest_run(dataclasses.replace(request, text=text), **kwargs)

    server.run = lying_run
    job, _, _ = await mesh(call(max_tokens=4), engine=engine, server=server)
    got = []
    with pytest.raises(EngineFailure, match="overrun"):
        async with aclosing(job.batches()) as batches:
            async for batch in batches:
                got += batch
    assert len(got) <= 4 and mesh.failed[-1] == B.peer_id
    await trio.sleep(5)
    assert engine.generated < 20  # the executor was told to stop


async def test_a_receipt_inflating_the_prompt_is_charged_at_the_entry_nodes_bound(
        mesh, autojump_clock):
    class Inflating(ScriptedEngine):
        async def stream(self, prepared, completion):
            async for batch in super().stream(prepared, completion):
                completion.prompt_tokens = 4_000_000_000  # what its receipt will claim
                yield batch

    job, _, _ = await mesh(call(max_tokens=3), engine=Inflating("fake"))
    await collect(job)
    assert job.receipt.tokens_in == 4_000_000_000  # signed, kept as evidence
    bound = tokens_in_bound(job.request)
    assert job.completion.prompt_tokens == bound < 1000 and mesh.failed == [B.peer_id]


async def test_refusals_are_audited_at_most_ten_a_minute_per_peer(mesh, autojump_clock):
    audit = Audit()
    server = executor([ScriptedEngine("fake")], where="EU", audit=audit)
    for _ in range(25):  # a peer asking for a model B does not serve, again and again
        with pytest.raises(PeerRefused):
            await mesh(call(model="other"), server=server)
    await trio.sleep(0.1)
    assert len(audit.records) == 10 and server.unrecorded_refusals == 15
    await trio.sleep(60)  # a minute later it is recorded again
    with pytest.raises(PeerRefused):
        await mesh(call(model="other"), server=server)
    await trio.sleep(0.1)
    assert len(audit.records) == 11


# -- peers' jobs are admitted per peer, and never crowd out local requests (issue 13) -----
