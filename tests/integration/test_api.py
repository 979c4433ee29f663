"""The HTTP layer with the scripted engine: shapes, errors, queueing, cancellation."""

import json

import pytest
import trio

from rbee_p2p.config import NodeConfig
from rbee_p2p.engines.fake import ScriptedEngine
from rbee_p2p.node import Node


def make(tmp_path, engine=None, **config):
    engine = engine or ScriptedEngine("fake", script="hello world again", aliases=("alias",))
    node = Node(NodeConfig(home=tmp_path, default_model=False, **config), [engine], "peer")
    return node, engine, node.app.test_client()


def events(body: bytes):
    out = []
    for block in body.decode().split("\n\n"):
        if block:
            assert block.startswith("data: ")
            payload = block[len("data: "):]
            out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


CHAT = {"model": "fake", "messages": [{"role": "user", "content": "hi there"}], "max_tokens": 5}


async def test_chat_non_stream_shape(tmp_path, autojump_clock):
    _, _, client = make(tmp_path)
    r = await client.post("/v1/chat/completions", json=CHAT)
    assert r.status_code == 200
    body = await r.get_json()
    assert body["object"] == "chat.completion" and body["model"] == "fake"
    choice = body["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": "hello world again hello world",
                                 "refusal": None}
    assert choice["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": 2, "completion_tokens": 5, "total_tokens": 7}


async def test_chat_stream_shape_with_usage(tmp_path, autojump_clock):
    _, _, client = make(tmp_path)
    r = await client.post("/v1/chat/completions", json={
        **CHAT, "stream": True, "stream_options": {"include_usage": True}})
    assert r.status_code == 200 and r.mimetype == "text/event-stream"
    evs = events(await r.get_data())
    assert evs[-1] == "[DONE]"
    first, *middle, last, usage, _ = evs
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(e["choices"][0]["delta"]["content"] for e in middle) == \
        "hello world again hello world"
    assert all(e["object"] == "chat.completion.chunk" and e["usage"] is None for e in middle)
    assert last["choices"][0] == {"index": 0, "delta": {}, "logprobs": None,
                                  "finish_reason": "length"}
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 5


async def test_completions_and_stop(tmp_path, autojump_clock):
    _, _, client = make(tmp_path)
    r = await client.post("/v1/completions", json={"model": "alias", "prompt": "x",
                                                    "max_tokens": 5, "stop": ["again"]})
    body = await r.get_json()
    assert body["object"] == "text_completion"
    assert body["choices"][0]["text"] == "hello world"
    assert body["choices"][0]["finish_reason"] == "stop"
    r = await client.post("/v1/completions", json={"model": "fake", "prompt": "x",
                                                    "max_tokens": 3, "stream": True})
    evs = events(await r.get_data())
    assert "".join(e["choices"][0]["text"] for e in evs[:-1]) == "hello world again"
    assert evs[-2]["choices"][0]["finish_reason"] == "length"


async def test_embeddings_float_and_base64(tmp_path, autojump_clock):
    import base64
    import struct

    _, _, client = make(tmp_path)
    r = await client.post("/v1/embeddings", json={"model": "fake", "input": ["a b", "c"]})
    body = await r.get_json()
    assert [d["index"] for d in body["data"]] == [0, 1] and body["usage"]["prompt_tokens"] == 3
    r = await client.post("/v1/embeddings", json={"model": "fake", "input": "a b",
                                                   "encoding_format": "base64"})
    raw = base64.b64decode((await r.get_json())["data"][0]["embedding"])
    assert list(struct.unpack("<8f", raw)) == pytest.approx(body["data"][0]["embedding"])


async def test_models_health_status(tmp_path, autojump_clock):
    _, _, client = make(tmp_path)
    ids = [m["id"] for m in (await (await client.get("/v1/models")).get_json())["data"]]
    assert ids == ["fake", "alias"]
    assert (await client.get("/v1/models/alias")).status_code == 200
    assert (await client.get("/v1/models/nope")).status_code == 404
    assert (await (await client.get("/health")).get_json()) == {"status": "ok"}
    status = await (await client.get("/rbee/status")).get_json()
    assert status["peer_id"] == "peer" and status["models"][0]["name"] == "fake"
    assert {"queue_depth", "active", "digest"} <= set(status["models"][0])


@pytest.mark.parametrize(
    "path, payload, status, param",
    [
        ("/v1/chat/completions", b"{not json", 400, None),
        ("/v1/chat/completions", {**CHAT, "messages": []}, 400, "messages"),
        ("/v1/chat/completions", {**CHAT, "max_tokens": 600}, 400, "max_tokens"),
        ("/v1/chat/completions", {**CHAT, "model": "gpt-9"}, 404, "model"),
        ("/v1/completions", {"model": "fake", "prompt": 5}, 400, "prompt"),
        ("/v1/embeddings", {"model": "gpt-9", "input": "x"}, 404, "model"),
        ("/v1/nothing", {}, 404, None),
    ],
)
async def test_errors_are_openai_shaped(tmp_path, autojump_clock, path, payload, status, param):
    _, _, client = make(tmp_path, max_tokens=1000)
    if isinstance(payload, bytes):
        r = await client.post(path, data=payload, headers={"Content-Type": "application/json"})
    else:
        r = await client.post(path, json=payload)
    assert r.status_code == status
    error = (await r.get_json())["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param


async def test_context_overflow_is_400(tmp_path, autojump_clock):
    _, _, client = make(tmp_path, engine=ScriptedEngine("fake", context=10))
    r = await client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 9})
    assert r.status_code == 400
    assert "context" in (await r.get_json())["error"]["message"]


async def test_body_too_large_is_413(tmp_path, autojump_clock):
    _, _, client = make(tmp_path, max_body_bytes=1000)
    r = await client.post("/v1/chat/completions", json={**CHAT, "messages": [
        {"role": "user", "content": "x" * 2000}]})
    assert r.status_code == 413
    assert (await r.get_json())["error"]["type"] == "invalid_request_error"


async def test_wrong_method_is_405(tmp_path, autojump_clock):
    _, _, client = make(tmp_path)
    r = await client.get("/v1/chat/completions")
    assert r.status_code == 405 and "error" in await r.get_json()


async def test_engine_failure_is_500_and_the_node_keeps_serving(tmp_path, autojump_clock):
    engine = ScriptedEngine("fake", fail_at=2)
    _, _, client = make(tmp_path, engine=engine)
    r = await client.post("/v1/chat/completions", json=CHAT)
    assert r.status_code == 500 and (await r.get_json())["error"]["type"] == "server_error"
    r = await client.post("/v1/chat/completions", json={**CHAT, "stream": True})
    evs = events(await r.get_data())
    assert "error" in evs[-2] and evs[-1] == "[DONE]"  # error event before [DONE]
    engine.fail_at = None
    assert (await client.post("/v1/chat/completions", json=CHAT)).status_code == 200


async def test_full_queue_is_503_with_retry_after_and_fifo(tmp_path, autojump_clock):
    engine = ScriptedEngine("fake", token_seconds=1.0)
    node, _, client = make(tmp_path, engine=engine, max_queue=2)
    order = []

    async def call(i):
        r = await client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 3})
        order.append((i, r.status_code))

    async with trio.open_nursery() as nursery:
        for i in range(3):  # one runs, two wait
            nursery.start_soon(call, i)
            await trio.sleep(0.1)
        assert node.scheduler.load("fake").queue_depth == 2
        assert node.scheduler.load("fake").active == 1
        r = await client.post("/v1/chat/completions", json=CHAT)
        assert r.status_code == 503
        assert int(r.headers["Retry-After"]) >= 1
        assert (await r.get_json())["error"]["code"] == "overloaded"
    assert order == [(0, 200), (1, 200), (2, 200)]  # first come, first served


async def test_closing_a_stream_ends_the_job_and_frees_the_model(tmp_path, autojump_clock):
    """The serving layer's part; that the real engine stops within one token of the cancel
    is tests/e2e/test_llama_engine.py's (the scripted engine only runs when pulled)."""
    engine = ScriptedEngine("fake", token_seconds=0.5, batch=1)
    node, _, _ = make(tmp_path, engine=engine)
    from rbee_p2p.api.schemas import parse_chat

    call = parse_chat({**CHAT, "max_tokens": 100, "stream": True}, node.limits)
    admitted = node.gate.admit(None, "fake")
    job = await node.serving.start(call, admitted)
    received = 0
    with trio.CancelScope() as scope:
        async for _ in node.serving.stream(call, job, admitted):
            received += 1
            if received == 4:  # role chunk + 3 token chunks
                scope.cancel()
    await trio.sleep(5)
    assert engine.generated <= 3 + 1
    assert engine.runs[0].finish_reason == "cancelled"
    assert node.scheduler.load("fake").active == 0
