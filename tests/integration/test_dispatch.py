"""Dispatching between this node and (fake) peers: ranking, retries, errors."""

import pytest

from rbee_p2p.api.schemas import Limits, parse_chat
from rbee_p2p.dispatch import Dispatcher, LocalJob
from rbee_p2p.errors import PeerRefused, PeerUnavailable, Unreachable, spec
from rbee_p2p.engines.base import Completion
from rbee_p2p.engines.fake import ScriptedEngine
from rbee_p2p.engines.scheduler import Scheduler
from rbee_p2p.errors import Busy, InvalidRequest, ModelNotFound
from rbee_p2p.routing import ModelFacts, PeerFacts


class FakeJob:
    def __init__(self, peer, dies=False, fills=False):
        self.where = peer
        self.dies = dies  # accepted, then gone before the first token
        self.fills = fills  # accepted, then its queue was full after all
        self.request_id = bytes(16)
        self.items = []
        self.completion = Completion(completion_tokens=1, finish_reason="stop")

    async def batches(self):
        if self.dies:
            raise PeerUnavailable(f"{self.where} failed before the first token")
        if self.fills:
            raise Busy(f"{self.where} is full")
        yield [f"remote {self.where}"]


class FakeRemote:
    def __init__(self, peers, fail=(), busy=(), bad=(), dies=(), refuse=(), fills=()):
        self.peers_, self.fail, self.busy, self.bad = peers, set(fail), set(busy), set(bad)
        self.dies, self.refuse, self.fills = set(dies), set(refuse), set(fills)
        self.tried, self.failed = [], []
        self.gone = {}  # model -> seconds since its last peer went away

    def gone_since(self, model):
        return self.gone.get(model)

    async def candidates(self, model, modality):
        return tuple(PeerFacts(id=p, models=(ModelFacts("m", tokens_per_s=tps),), max_queue=16)
                     for p, tps in self.peers_.items())

    def serves(self, model, modality):
        return model == "m" and bool(self.peers_)

    def models(self):
        return [("m", "text", p) for p in self.peers_]

    async def start(self, peer_id, request, stamp):
        self.tried.append(peer_id)
        if peer_id in self.refuse:
            raise PeerRefused("not here")
        if peer_id in self.fail:
            raise PeerUnavailable("gone")
        if peer_id in self.busy:
            raise Busy("full")
        if peer_id in self.bad:
            raise InvalidRequest("context too long")
        return FakeJob(peer_id, peer_id in self.dies, peer_id in self.fills)

    def report_failure(self, peer_id):
        self.failed.append(peer_id)


def call(model="m", max_tokens=10):
    return parse_chat({"model": model, "messages": [{"role": "user", "content": "hi"}],
                       "max_tokens": max_tokens}, Limits()).request


def dispatcher(remote, local=True, busy_local=False):
    engines = [ScriptedEngine("m")] if local else []
    d = Dispatcher(Scheduler(engines), remote)
    if busy_local:
        d.tokens_per_s["m"] = 1.0  # measured as very slow: peers win
    return d


async def test_idle_local_wins_ties():
    job = await dispatcher(FakeRemote({"p": 0.0})).start(call())
    assert isinstance(job, LocalJob) and job.where is None


async def test_faster_peer_wins_and_failures_move_on():
    remote = FakeRemote({"a": 500.0, "": 400.0}, fail=["a"])
    job = await dispatcher(remote, busy_local=True).start(call())
    assert job.where == "" and remote.tried == ["a", ""] and remote.failed == ["a"]


async def test_a_peer_dying_after_accepting_hands_over_before_the_first_token():
    remote = FakeRemote({"a": 500.0, "b": 400.0, "c": 300.0}, dies=["a", "b"])
    job = await dispatcher(remote, busy_local=True).start(call())
    assert job.where == "a"  # accepted
    assert [b async for b in job.batches()] == [["remote c"]]
    assert job.where == "c" and remote.tried == ["a", "b", "c"]


async def test_a_peer_whose_queue_filled_after_accepting_hands_over_too():
    remote = FakeRemote({"a": 500.0, "b": 400.0}, fills=["a"])
    job = await dispatcher(remote, busy_local=True).start(call())
    assert [b async for b in job.batches()] == [["remote b"]]
    assert remote.tried == ["a", "b"] and remote.failed == []  # full is not a failure


async def test_a_peer_lost_with_no_candidate_left_is_a_plain_503_to_retry():
    """Issue 13, item 8: not a 500 carrying libp2p's words, nor "busy"."""
    remote = FakeRemote({"a": 500.0}, dies=["a"])
    job = await dispatcher(remote, local=False).start(call())
    with pytest.raises(Unreachable, match="can be reached right now") as info:
        [b async for b in job.batches()]
    assert spec(info.value).status == 503 and info.value.retry_after >= 1
    assert "first token" not in str(info.value)
    with pytest.raises(Unreachable):  # unreachable at once: the same
        await dispatcher(FakeRemote({"a": 1.0}, fail=["a"]), local=False).start(call())


async def test_a_model_whose_peers_just_left_is_503_then_404_once_forgotten():
    remote = FakeRemote({})
    remote.gone["m"] = 12.0
    with pytest.raises(Unreachable, match="went away 12 s ago") as info:
        await dispatcher(remote, local=False).start(call())
    assert spec(info.value).code == "model_unreachable"
    remote.gone.clear()  # long gone (or never served): it does not exist
    with pytest.raises(ModelNotFound):
        await dispatcher(remote, local=False).start(call())


async def test_a_refusing_peer_is_skipped_without_a_mark_against_it():
    remote = FakeRemote({"a": 500.0, "b": 400.0}, refuse=["a"])
    job = await dispatcher(remote, local=False).start(call())
    assert job.where == "b" and remote.tried == ["a", "b"] and remote.failed == []
    with pytest.raises(PeerRefused):  # refused everywhere: that refusal (a 502)
        await dispatcher(FakeRemote({"a": 1.0}, refuse=["a"]), local=False).start(call())


def test_what_the_wire_cannot_carry_is_refused_while_parsing():
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}] * 1025}
    with pytest.raises(InvalidRequest, match="at most 1024 messages"):
        parse_chat(body, Limits())
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stop": "é" * 129}
    with pytest.raises(InvalidRequest, match="longer than 256 bytes"):
        parse_chat(body, Limits())


async def test_all_peers_failing_falls_back_to_local():
    remote = FakeRemote({"a": 500.0}, fail=["a"])
    job = await dispatcher(remote, busy_local=True).start(call())
    assert job.where is None


async def test_without_local_model_errors_surface():
    remote = FakeRemote({"a": 100.0}, fail=["a"])
    with pytest.raises(Unreachable):
        await dispatcher(remote, local=False).start(call())
    with pytest.raises(Busy):
        await dispatcher(FakeRemote({"a": 1.0}, busy=["a"]), local=False).start(call())


async def test_a_bad_request_is_not_retried_elsewhere():
    remote = FakeRemote({"a": 500.0, "": 400.0}, bad=["a"])
    with pytest.raises(InvalidRequest):
        await dispatcher(remote, local=False).start(call())
    assert remote.tried == ["a"]


async def test_unknown_model_is_404_even_with_peers():
    with pytest.raises(ModelNotFound):
        await dispatcher(FakeRemote({"a": 1.0})).start(call("nope"))


async def test_remote_job_is_served_by_the_api(tmp_path, autojump_clock):
    from rbee_p2p.config import NodeConfig
    from rbee_p2p.node import Node

    node = Node(NodeConfig(home=tmp_path, default_model=False), [], "peer")
    node.dispatcher.remote = FakeRemote({"a": 100.0})
    client = node.app.test_client()
    r = await client.post("/v1/chat/completions", json={
        "model": "m", "messages": [{"role": "user", "content": "hi"}]})
    assert (await r.get_json())["choices"][0]["message"]["content"] == "remote a"


async def test_no_reachable_peer_is_a_server_error_not_a_bad_request(tmp_path, autojump_clock):
    from rbee_p2p.config import NodeConfig
    from rbee_p2p.node import Node

    node = Node(NodeConfig(home=tmp_path, default_model=False), [], "peer")
    node.dispatcher.remote = FakeRemote({"a": 100.0}, fail=["a"])
    r = await node.app.test_client().post("/v1/chat/completions", json={
        "model": "m", "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 503  # no peer could be reached: retry later, not a 400
    assert int(r.headers["Retry-After"]) >= 1
    error = (await r.get_json())["error"]
    assert error["type"] == "server_error" and error["code"] == "model_unreachable"
    assert "gone" not in error["message"]  # the transport's words stay in the log


def test_a_peers_request_is_held_to_the_parsers_limits():
    from rbee_p2p.dispatch import Request
    from rbee_p2p.dispatch.request import Limits as NodeLimits
    from rbee_p2p.engines.base import ImageRequest, TextRequest

    limits = NodeLimits(max_prompt_chars=10, max_messages=2)
    image = ImageRequest(prompt="a cat", negative_prompt="x" * 11)
    with pytest.raises(InvalidRequest) as info:
        limits.check(Request("image", "m", image=image))
    assert info.value.param == "negative_prompt"
    text = TextRequest(max_tokens=4, messages=[{"role": "user", "content": "hi"}] * 3)
    with pytest.raises(InvalidRequest, match="at most 2 messages"):
        limits.check(Request("chat", "m", text=text))
    text = TextRequest(max_tokens=4, prompt="hi", stop=("x" * 257,))
    with pytest.raises(InvalidRequest, match="longer than 256 bytes"):
        limits.check(Request("completion", "m", text=text))
