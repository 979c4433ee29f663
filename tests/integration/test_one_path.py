"""The one request path through the node's HTTP app, every modality: a Starlark policy
that reads the request's kind, a pin of an image model to a peer, the audit log's entry
records of local embeddings and images, /v1/models listing peers' models, and SSE error
events that speak the error table.

Peers are real executors (their own dispatcher and scripted engines) reached through real
RemoteJobs over in-memory streams; time is virtual."""

import base64
import json
from contextlib import aclosing

import pytest
import samples
import trio
import trio.testing
from test_forward import TIMING, Audit, Mem, call

from rbee_p2p.api.schemas import Limits
from rbee_p2p.config import NodeConfig
from rbee_p2p.dispatch import Dispatcher, Stamp
from rbee_p2p.engines.diffusion import ScriptedImageEngine
from rbee_p2p.engines.fake import ScriptedEngine
from rbee_p2p.engines.scheduler import Scheduler
from rbee_p2p.errors import EngineFailure
from rbee_p2p.mesh.executor import Executor
from rbee_p2p.mesh.remote import RemoteJob
from rbee_p2p.node import Node
from rbee_p2p.policy_runtime import runtime as policy_runtime
from rbee_p2p.protocol.envelope import Verifier
from rbee_p2p.protocol.identity import NodeKey
from rbee_p2p.routing import ModelFacts, PeerFacts
from rbee_p2p.store.audit import AuditLog
from rbee_p2p.store.audit_read import export_rows
from rbee_p2p.store.writer import AuditWriter
from rbee_p2p.tenancy.tenants import TenantBook

A, B = samples.key_a(), samples.key_b()  # A takes the requests
C = NodeKey.from_seed(bytes([7]) * 32)
CHAT = {"model": "fake", "messages": [{"role": "user", "content": "hi there"}],
        "max_tokens": 6}
EMBED = {"model": "fake", "input": ["one", "two words"]}
IMAGE = {"model": "img", "prompt": "a bee", "size": "64x64"}


class Peers:
    """The entry node's Remote: each peer a real Executor over its own dispatcher, each
    job a real RemoteJob over an in-memory stream."""

    def __init__(self, nursery, key=A):
        self.nursery, self.key = nursery, key
        self.peers = {}  # peer id (str) -> (key, engines, executor, audit)
        self.tried, self.failed = [], []
        self.streams = []  # the executors' ends of the jobs' streams
        self.audit = Audit()  # the entry side's records of forwarded jobs

    def add(self, key, *engines, tokens_per_s=100.0):
        audit = Audit()
        dispatcher = Dispatcher(Scheduler(list(engines)), local_id=key.peer_id_str)
        executor = Executor(key, Verifier(), dispatcher.run_here, Limits(), audit=audit,
                            timing=TIMING)
        self.peers[key.peer_id_str] = (key, engines, executor, audit, tokens_per_s)
        return audit

    def facts(self, pid):
        _, engines, _, _, tps = self.peers[pid]
        return PeerFacts(id=pid, max_queue=16, models=tuple(
            ModelFacts(e.card.name, e.card.modality, tps) for e in engines))

    async def candidates(self, model, modality):
        return tuple(self.facts(pid) for pid in self.peers)

    def serves(self, model, modality):
        return any((model, modality) == (m.name, m.modality)
                   for pid in self.peers for m in self.facts(pid).models)

    def models(self):
        return [(m.name, m.modality, pid) for pid in self.peers for m in self.facts(pid).models]

    def report_failure(self, peer_id):
        self.failed.append(peer_id)

    async def start(self, peer_id, request, stamp):
        self.tried.append(peer_id)
        key, _, executor, _, _ = self.peers[peer_id]

        async def open_stream(peer, fresh):
            left, right = trio.testing.memory_stream_pair()
            self.streams.append(right)
            self.nursery.start_soon(executor.handle, Mem(right), self.key.peer_id)
            return Mem(left)

        return await RemoteJob.start(key.peer_id, open_stream, request, key=self.key,
                                     verifier=Verifier(), timing=TIMING, audit=self.audit,
                                     stamp=stamp)


def node(tmp_path, engines, *, peers=None, key=A, audit=None, **config):
    n = Node(NodeConfig(home=tmp_path, default_model=False, p2p=False, **config),
             list(engines), key=key, audit=audit)
    n.dispatcher.remote = peers
    return n


def auth(key):
    return {"Authorization": f"Bearer {key}"}


def sse_events(data: bytes):
    chunks = data.decode().split("\n\n")
    assert chunks[-2:] == ["data: [DONE]", ""]
    return [json.loads(c.removeprefix("data: ")) for c in chunks[:-2]]


# -- (a) a Starlark policy that reads the request's kind, through the HTTP app -----------

NO_FREE_EMBEDDINGS = """
def route(request, peers, local):
    tenant = request["tenant"]
    if request["kind"] == "embedding" and tenant and tenant["tier"] == "free":
        reject("embeddings are not part of the free tier")
    return least_loaded(peers)
"""


async def test_a_starlark_policy_refuses_embeddings_for_one_tier_only(
        tmp_path, autojump_clock, monkeypatch):
    # the node's own wiring (config -> PolicyRuntime -> dispatcher), with the script
    # evaluated in-process (the worker process is tested in test_policy_worker.py)
    monkeypatch.setattr(policy_runtime, "WorkerEvaluator",
                        lambda *a, **k: policy_runtime.InProcessEvaluator())
    book = TenantBook.open(tmp_path)
    keys = {"free": book.add("freeloader", tier="free"), "pro": book.add("payer", tier="pro")}
    book.save()
    policy = tmp_path / "tiers.star"
    policy.write_text(NO_FREE_EMBEDDINGS)
    n = node(tmp_path, [ScriptedEngine("fake", script="a b c")], policy=str(policy))
    client = n.app.test_client()
    async with trio.open_nursery() as nursery:
        await nursery.start(n.policy.run)
        r = await client.post("/v1/embeddings", json=EMBED, headers=auth(keys["free"]))
        assert r.status_code == 403
        error = (await r.get_json())["error"]
        assert (error["type"], error["code"]) == ("permission_error", "forbidden")
        assert "embeddings are not part of the free tier" in error["message"]
        # the same tenant's chat, the other tier's embeddings: served
        r = await client.post("/v1/chat/completions", json=CHAT, headers=auth(keys["free"]))
        assert r.status_code == 200
        r = await client.post("/v1/embeddings", json=EMBED, headers=auth(keys["pro"]))
        assert r.status_code == 200 and len((await r.get_json())["data"]) == 2
        status = n.policy.status()
        assert status["policy"] == "starlark:tiers.star"
        assert (status["decisions"], status["fallbacks"], status["errors"]) == (3, 0, 0)
        nursery.cancel_scope.cancel()


# -- (b) a pin of an image model to a peer ------------------------------------------------

async def test_a_pinned_image_model_runs_on_its_peer_though_this_node_serves_it(
        tmp_path, autojump_clock, nursery):
    here = ScriptedImageEngine("img", steps=2)
    peers = Peers(nursery)
    on_b, on_c = ScriptedImageEngine("img", steps=2), ScriptedImageEngine("img", steps=2)
    # peers no faster than this node (not measured yet): without the pin, this idle node
    # runs its own model (the control)
    b_audit = peers.add(B, on_b, tokens_per_s=0.0)
    peers.add(C, on_c, tokens_per_s=0.0)
    free = node(tmp_path / "unpinned", [ScriptedImageEngine("img", steps=2)], peers=peers)
    r = await free.app.test_client().post("/v1/images/generations", json=IMAGE)
    assert r.status_code == 200 and peers.tried == []

    pinned = node(tmp_path / "pinned", [here], peers=peers, pins=(("img", C.peer_id_str),))
    r = await pinned.app.test_client().post("/v1/images/generations", json={**IMAGE, "n": 2})
    assert r.status_code == 200
    images = [base64.b64decode(d["b64_json"]) for d in (await r.get_json())["data"]]
    assert len(images) == 2 and all(i[:8] == b"\x89PNG\r\n\x1a\n" for i in images)
    assert peers.tried == [C.peer_id_str]
    assert (len(here.jobs), len(on_b.jobs), len(on_c.jobs)) == (0, 0, 1)
    assert b_audit.records == []
    (kind, outcome, fields), = peers.audit.records
    assert (kind, outcome, fields["exec_peer"]) == ("entry", "ok", C.peer_id)


# -- (c) the audit log's entry records of local embeddings and images ---------------------

@pytest.fixture
def lazy_clock():
    # virtual time that jumps only after 20 ms of real idleness: the audit writer's
    # thread (invisible to autojump) gets to write
    return trio.testing.MockClock(autojump_threshold=0.02)


async def test_audit_export_shows_local_embeddings_and_images(tmp_path, lazy_clock):
    book = TenantBook.open(tmp_path)
    key = book.add("acme")
    book.save()
    log = AuditLog(tmp_path / "audit.log", A)
    writer = AuditWriter(log)
    n = node(tmp_path, [ScriptedEngine("fake"), ScriptedImageEngine("img", steps=2)],
             audit=writer)
    client = n.app.test_client()
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        r = await client.post("/v1/embeddings", json=EMBED, headers=auth(key))
        assert r.status_code == 200
        r = await client.post("/v1/images/generations", json=IMAGE, headers=auth(key))
        assert r.status_code == 200
        writer.close()
    log.close()
    rows = list(export_rows(tmp_path / "audit.log", book.ref("acme")))
    assert [(r["kind"], r["outcome"], r["model"]) for r in rows] == [
        ("entry", "ok", "fake"), ("entry", "ok", "img")]
    for row in rows:
        assert row["entry_peer"] == row["exec_peer"] == A.peer_id_str
        assert row["request_id"] and row["model_digest"]
    assert rows[0]["tokens_in"] == 3  # "one" + "two words"
    assert rows[1]["tokens_out"] == 1  # one image


# -- (d) /v1/models lists peers' models ------------------------------------------------

async def test_models_lists_peers_models_once_each_with_where_they_run(
        tmp_path, autojump_clock, nursery):
    peers = Peers(nursery)
    peers.add(B, ScriptedEngine("fake"), ScriptedImageEngine("img"))
    peers.add(C, ScriptedEngine("fake"))
    client = node(tmp_path, [], peers=peers).app.test_client()
    r = await client.get("/v1/models")
    assert r.status_code == 200
    body = await r.get_json()
    by_id = {m["id"]: m for m in body["data"]}
    assert sorted(m["id"] for m in body["data"]) == ["fake", "img"]  # one entry per name
    fake, img = by_id["fake"], by_id["img"]
    assert (fake["local"], fake["peer_count"], fake["modality"]) == (False, 2, "text")
    assert sorted(fake["peers"]) == sorted([B.peer_id_str, C.peer_id_str])
    assert (img["local"], img["peers"], img["peer_count"], img["modality"]) == (
        False, [B.peer_id_str], 1, "image")
    r = await client.get("/v1/models/img")
    assert r.status_code == 200 and (await r.get_json()) == img
    r = await client.get("/v1/models/nope")
    assert r.status_code == 404
    assert (await r.get_json())["error"]["code"] == "model_not_found"
    # and a request for a peer's model runs there
    r = await client.post("/v1/chat/completions", json=CHAT)
    assert r.status_code == 200 and peers.tried[0] in (B.peer_id_str, C.peer_id_str)


# -- (e) an error mid-stream is an SSE event in the table's terms --------------------------

async def stream_failing(client):
    r = await client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 20,
                                                        "stream": True})
    assert r.status_code == 200
    return sse_events(await r.get_data())


@pytest.mark.parametrize("where", ["local", "peer"])
async def test_a_failure_mid_stream_is_an_error_event_with_the_tables_type_and_code(
        tmp_path, autojump_clock, nursery, where):
    failing = ScriptedEngine("fake", script="a b c d e f g h", fail_at=6, batch=1)
    if where == "local":
        client = node(tmp_path, [failing]).app.test_client()
    else:
        peers = Peers(nursery)
        peers.add(B, failing)
        client = node(tmp_path, [], peers=peers).app.test_client()
    events = await stream_failing(client)
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events[:-1])
    assert text == "a b c d e f"  # the output before the failure reached the client
    error = events[-1]["error"]
    assert (error["type"], error["code"]) == ("server_error", "engine_failure")
    assert "scripted failure" in error["message"]


# -- a forwarded job's entry record: error when the peer is lost, cancelled when the client
#    leaves -------------------------------------------------------------------------------

@pytest.mark.parametrize("ending", ["peer lost", "client gone"])
async def test_a_forwarded_job_that_ends_early_is_audited_as_what_happened(
        autojump_clock, nursery, ending):
    peers = Peers(nursery)
    executed = peers.add(B, ScriptedEngine("fake", token_seconds=0.1, batch=1))
    job = await peers.start(B.peer_id_str, call(max_tokens=50), Stamp())
    got = []
    if ending == "peer lost":
        with pytest.raises(EngineFailure, match="mid-stream"):
            async with aclosing(job.batches()) as batches:
                async for batch in batches:
                    got += batch
                    if len(got) == 3:
                        await peers.streams[-1].aclose()  # the executor's side is cut
    else:
        async with aclosing(job.batches()) as batches:
            async for batch in batches:
                got += batch
                if len(got) == 3:
                    break
    await trio.sleep(1)
    (kind, outcome, fields), = peers.audit.records
    assert (kind, outcome) == ("entry", "error" if ending == "peer lost" else "cancelled")
    assert fields["exec_peer"] == B.peer_id
    assert [r[:2] for r in executed.records] == [("execute", "cancelled")]
