"""POST /v1/images/generations and image URLs through the node's HTTP app.

The first part uses the scripted engines and virtual time: shapes, errors, URL expiry,
text and images side by side, per-device limiters, queue limits, admission.  The second
part loads the tiny random-weight diffusers pipeline (tests/tinydiffusion.py) through the
same code path as real models and checks real PNGs (skipped without torch/diffusers).
"""

import base64
import json
from pathlib import Path

import pytest
import trio

from rbee_p2p.config import ModelSpec, NodeConfig
from rbee_p2p.engines import diffusion, footprint
from rbee_p2p.engines.admission import load_models
from rbee_p2p.engines.footprint import MiB
from rbee_p2p.engines.diffusion import ScriptedImageEngine
from rbee_p2p.engines.fake import ScriptedEngine
from rbee_p2p.engines.hardware import CpuInfo, merge
from rbee_p2p.node import Node

CHAT = {"model": "text", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
IMG = {"model": "img", "prompt": "a red cat", "size": "64x64"}


def make(tmp_path, *engines, **config):
    engines = engines or (ScriptedEngine("text", script="hello world again"),
                          ScriptedImageEngine("img", native=64, steps=4, step_seconds=0.5))
    node = Node(NodeConfig(home=tmp_path, default_model=False, p2p=False, **config),
                list(engines), "peer")
    return node, node.app.test_client()


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


async def test_b64_json_response_shape(tmp_path, autojump_clock):
    node, client = make(tmp_path)
    r = await client.post("/v1/images/generations", json={**IMG, "n": 2, "seed": 5})
    assert r.status_code == 200
    body = await r.get_json()
    assert set(body) == {"created", "data", "size", "quality", "output_format"}
    assert body["size"] == "64x64" and body["output_format"] == "png"
    images = [base64.b64decode(d["b64_json"]) for d in body["data"]]
    assert [png_size(i) for i in images] == [(64, 64), (64, 64)] and images[0] != images[1]
    again = await (await client.post("/v1/images/generations",
                                     json={**IMG, "n": 2, "seed": 5})).get_json()
    assert again["data"] == body["data"]  # same seed, same images
    status = await (await client.get("/rbee/status")).get_json()
    assert status["images"]["images_generated"] == {"img": 4}
    assert [m["requests_served"] for m in status["models"] if m["name"] == "img"] == [2]


async def test_the_default_model_is_the_first_image_model(tmp_path, autojump_clock):
    _, client = make(tmp_path)
    r = await client.post("/v1/images/generations", json={"prompt": "a bee"})
    assert r.status_code == 200 and (await r.get_json())["size"] == "64x64"


async def test_url_images_are_served_for_a_limited_time(tmp_path, autojump_clock):
    _, client = make(tmp_path, image_url_ttl=60)
    r = await client.post("/v1/images/generations", json={**IMG, "response_format": "url"})
    url = (await r.get_json())["data"][0]["url"]
    assert url.startswith("http://") and "/v1/images/files/" in url and url.endswith(".png")
    path = url[url.index("/v1/"):]
    got = await client.get(path)
    assert got.status_code == 200 and got.mimetype == "image/png"
    assert png_size(await got.get_data()) == (64, 64)
    assert "max-age" in got.headers["Cache-Control"]
    await trio.sleep(61)
    gone = await client.get(path)
    assert gone.status_code == 404
    error = (await gone.get_json())["error"]
    assert error["code"] == "image_not_found" and "expired" in error["message"]
    assert (await client.get("/v1/images/files/guess.png")).status_code == 404


@pytest.mark.parametrize("body, status, param, code", [
    ({**IMG, "size": "100x100"}, 400, "size", None),
    ({**IMG, "n": 5}, 400, "n", None),
    ({**IMG, "prompt": ""}, 400, "prompt", None),
    ({**IMG, "model": "nope"}, 404, "model", "model_not_found"),
    ({**IMG, "model": "text"}, 400, "model", None),
    ({**IMG, "size": "64x64", "response_format": "file"}, 400, "response_format", None),
    ({**IMG, "unknown": 1}, 400, "unknown", None),
])
async def test_bad_input_is_openai_shaped(tmp_path, autojump_clock, body, status, param, code):
    _, client = make(tmp_path, max_images=4)
    r = await client.post("/v1/images/generations", json=body)
    assert r.status_code == status
    error = (await r.get_json())["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert (error["param"], error["code"]) == (param, code)
    assert error["type"] == "invalid_request_error"


async def test_image_models_are_listed_and_refuse_text(tmp_path, autojump_clock):
    _, client = make(tmp_path)
    ids = [m["id"] for m in (await (await client.get("/v1/models")).get_json())["data"]]
    assert ids == ["text", "img"]
    r = await client.post("/v1/chat/completions", json={**CHAT, "model": "img"})
    assert r.status_code == 400 and (await r.get_json())["error"]["param"] == "model"
    r = await client.post("/v1/embeddings", json={"model": "img", "input": "x"})
    assert r.status_code == 400


async def test_generation_failure_is_500_and_the_node_keeps_serving(tmp_path, autojump_clock):
    engine = ScriptedImageEngine("img", fail=True)
    node, client = make(tmp_path, ScriptedEngine("text"), engine)
    r = await client.post("/v1/images/generations", json=IMG)
    assert r.status_code == 500
    error = (await r.get_json())["error"]
    assert (error["type"], error["code"]) == ("server_error", "engine_failure")
    assert (await client.post("/v1/chat/completions", json=CHAT)).status_code == 200
    engine.fail = False
    assert (await client.post("/v1/images/generations", json=IMG)).status_code == 200
    assert node.dispatcher.failures == {"img": 1}


async def test_text_and_images_run_side_by_side(tmp_path, autojump_clock):
    # an image takes 10 s; text answers in 0.5 s; neither waits for the other
    text = ScriptedEngine("text", token_seconds=0.1)
    image = ScriptedImageEngine("img", steps=10, step_seconds=1.0)
    _, client = make(tmp_path, text, image)
    done: dict[str, float] = {}

    async def post(name, path, body):
        r = await client.post(path, json=body)
        assert r.status_code == 200
        done[name] = trio.current_time()

    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(post, "image", "/v1/images/generations", IMG)
        await trio.sleep(0.01)
        for i in range(5):  # a burst of text behind the image
            nursery.start_soon(post, f"text{i}", "/v1/chat/completions", CHAT)
        await trio.sleep(0.01)
        nursery.start_soon(post, "image2", "/v1/images/generations", IMG)
    texts = sorted(done[f"text{i}"] - start for i in range(5))
    assert texts[0] < 1 and texts[-1] < done["image"] - start
    # text jobs queue among themselves (one model, FIFO: 0.5 s each) ...
    assert texts[-1] == pytest.approx(2.52, abs=0.05)
    # ... and the image jobs are not delayed by them
    assert done["image"] - start == pytest.approx(10, abs=0.05)
    assert done["image2"] - start == pytest.approx(20, abs=0.05)


async def test_one_image_job_per_device_at_a_time(tmp_path, autojump_clock):
    a = ScriptedImageEngine("a", step_seconds=1, steps=4, device="cpu")
    b = ScriptedImageEngine("b", step_seconds=1, steps=4, device="cpu")
    c = ScriptedImageEngine("c", step_seconds=1, steps=4, device="cuda:0")
    _, client = make(tmp_path, a, b, c)
    done: dict[str, float] = {}

    async def post(model):
        r = await client.post("/v1/images/generations", json={"model": model, "prompt": "x"})
        assert r.status_code == 200
        done[model] = trio.current_time()

    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        for model in ("a", "b", "c"):
            nursery.start_soon(post, model)
            await trio.sleep(0.001)
    assert done["a"] - start == pytest.approx(4, abs=0.05)
    assert done["b"] - start == pytest.approx(8, abs=0.05)  # same device as a: after it
    assert done["c"] - start == pytest.approx(4, abs=0.05)  # another device: alongside


async def test_a_full_image_queue_is_503_with_retry_after(tmp_path, autojump_clock):
    node, client = make(tmp_path, ScriptedImageEngine("img", step_seconds=1), max_queue=1)
    codes = []

    async def post():
        codes.append((await client.post("/v1/images/generations", json=IMG)).status_code)

    async with trio.open_nursery() as nursery:
        for _ in range(2):  # one runs, one waits
            nursery.start_soon(post)
            await trio.sleep(0.1)
        r = await client.post("/v1/images/generations", json=IMG)
        assert r.status_code == 503 and int(r.headers["Retry-After"]) >= 1
        assert (await r.get_json())["error"]["code"] == "overloaded"
    assert codes == [200, 200]


async def test_a_cancelled_request_stops_the_job_and_frees_the_model(tmp_path, autojump_clock):
    engine = ScriptedImageEngine("img", steps=100, step_seconds=1)
    node, _ = make(tmp_path, engine)
    from rbee_p2p.api.images import parse_images

    call = parse_images(IMG, node.images.limits)
    with trio.move_on_after(5):
        await node.images.generate(call, "img", "http://x/", node.gate.admit(None, "img"))
    assert engine.cancelled == 1 and engine.steps_run <= 5
    assert node.scheduler.load("img").active == 0
    assert node.capacity.limiter("cpu", "image").borrowed_tokens == 0


# -- admission and "images unavailable" through load_models (the node's loading path) ----

def gguf(path: Path) -> Path:
    path.write_bytes(b"GGUF" + bytes(64))
    return path


def sd_folder(path: Path) -> Path:
    path.mkdir()
    (path / "model_index.json").write_text("{}")
    return path


async def fake_loader(p, digest, config):
    if p.kind == "image":
        return ScriptedImageEngine(p.name, device=p.device)
    return ScriptedEngine(p.name)


HW = merge(CpuInfo("cpu", 2, 8 << 30, 8 << 30), llama=[])


async def test_a_model_that_does_not_fit_is_not_loaded_and_refused_clearly(
        tmp_path, autojump_clock, capsys, monkeypatch):
    monkeypatch.setattr(diffusion, "images_unavailable_reason", lambda: None)  # fake engines
    config = NodeConfig(home=tmp_path, default_model=False, p2p=False,
                        memory_budget_mb=(("cpu", 1000),), models=(
                            ModelSpec("small", gguf(tmp_path / "s.gguf"), memory_mb=600),
                            ModelSpec("big", sd_folder(tmp_path / "sd"), memory_mb=700,
                                      aliases=("big-alias",))))
    engines, capacity = await load_models(config, hardware=HW, loader=fake_loader)
    assert [e.card.name for e in engines] == ["small"]
    out = capsys.readouterr().out
    assert "not loading model big: needs ~700 MiB on cpu, but only 400 MiB" in out
    assert "loaded model small on cpu" in out
    node = Node(config, engines, "peer", capacity=capacity)
    client = node.app.test_client()
    reason = ("needs ~700 MiB on cpu, but only 400 MiB of its 1000 MiB budget is left "
              "(in use: small); raise memory_budget_mb or memory_headroom, or pin it to "
              "another device")
    for body, said in (({"model": "big", "prompt": "x"}, "model 'big' is not loaded on this node"),
                       ({"model": "big-alias", "prompt": "x"},
                        "model 'big' is not loaded on this node"),
                       ({"prompt": "x"}, "images are unavailable on this node")):
        r = await client.post("/v1/images/generations", json=body)
        assert r.status_code == 503
        error = (await r.get_json())["error"]
        assert (error["code"], error["param"]) == ("model_unavailable", "model")
        assert "Retry-After" not in r.headers
        assert error["message"] == f"{said}: {reason}"
    r = await client.post("/v1/chat/completions", json={**CHAT, "model": "big"})
    assert r.status_code == 503
    assert (await client.post("/v1/chat/completions", json={**CHAT, "model": "small"})
            ).status_code == 200
    status = await (await client.get("/rbee/status")).get_json()
    assert status["unavailable"][0]["name"] == "big"
    cpu = status["devices"][0]
    assert (cpu["budget"], cpu["used"], cpu["models"]) == (1000 * MiB, 600 * MiB, ["small"])
    for engine in engines:
        await capacity.unload(engine)
    assert "unloaded model small from cpu (freed ~600 MiB)" in capsys.readouterr().out


async def test_without_torch_the_node_starts_and_says_images_are_unavailable(
        tmp_path, autojump_clock, monkeypatch, capsys):
    monkeypatch.setattr(diffusion, "images_unavailable_reason",
                        lambda: "torch is not installed (pip install 'rbee-p2p[images]')")
    config = NodeConfig(home=tmp_path, default_model=False, p2p=False, models=(
        ModelSpec("t", gguf(tmp_path / "t.gguf"), memory_mb=10),
        ModelSpec("sd", sd_folder(tmp_path / "sd"))))
    engines, capacity = await load_models(config, hardware=HW, loader=fake_loader)
    assert [e.card.name for e in engines] == ["t"]
    assert "images are unavailable on this node: torch is not installed" in capsys.readouterr().out
    node = Node(config, engines, "peer", capacity=capacity)
    client = node.app.test_client()
    r = await client.post("/v1/images/generations", json={"prompt": "a cat"})
    assert r.status_code == 503
    assert "rbee-p2p[images]" in (await r.get_json())["error"]["message"]
    status = await (await client.get("/rbee/status")).get_json()
    assert status["images"]["available"] is False
    assert (await client.post("/v1/chat/completions", json={**CHAT, "model": "t"})
            ).status_code == 200


async def test_the_advert_shows_pinned_devices(tmp_path, autojump_clock):
    config = NodeConfig(home=tmp_path, default_model=False, p2p=False, models=(
        ModelSpec("pinned", gguf(tmp_path / "p.gguf"), device="cpu", memory_mb=1),
        ModelSpec("free", gguf(tmp_path / "f.gguf"), memory_mb=1)))
    engines, capacity = await load_models(config, hardware=HW, loader=fake_loader)
    infos = {m.name: m for m in capacity.model_infos(engines)}
    assert infos["pinned"].device == "cpu" and infos["free"].device is None
    assert [d.id for d in capacity.current_device_infos()] == ["cpu"]


# -- the tiny real diffusers pipeline ---------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    from tinydiffusion import SKIP_REASON, build_in_subprocess, images_installed

    if not images_installed():
        pytest.skip(SKIP_REASON)
    return build_in_subprocess(tmp_path_factory.mktemp("models") / "tiny-sd")


async def real_node(tmp_path, tiny_sd, **config):
    config = NodeConfig(home=tmp_path, default_model=False, p2p=False,
                        models=(ModelSpec("tiny", tiny_sd),), **config)
    engines, capacity = await load_models(config)
    return Node(config, engines, "peer", capacity=capacity), engines, capacity


async def test_the_tiny_pipeline_serves_real_pngs(tmp_path, tiny_sd, capsys):
    from io import BytesIO

    from PIL import Image

    node, engines, capacity = await real_node(tmp_path, tiny_sd)
    try:
        out = capsys.readouterr()
        assert "loading model tiny (image, ~" in out.out and "loaded model tiny on cpu" in out.out
        assert "Loading pipeline components" in out.err  # diffusers' own progress bar
        engine = engines[0]
        assert isinstance(engine, diffusion.DiffusionEngine)
        assert engine.native_size == (64, 64) and engine.card.modality == "image"
        client = node.app.test_client()
        body = {"model": "tiny", "prompt": "a red cat", "steps": 2, "seed": 42, "n": 2}
        r = await client.post("/v1/images/generations", json=body)
        assert r.status_code == 200
        data = (await r.get_json())["data"]
        images = [Image.open(BytesIO(base64.b64decode(d["b64_json"]))) for d in data]
        assert [(i.format, i.size, i.mode) for i in images] == [("PNG", (64, 64), "RGB")] * 2
        again = (await (await client.post("/v1/images/generations", json=body)).get_json())
        assert again["data"] == data  # the seed makes it reproducible
        other = await (await client.post("/v1/images/generations",
                                         json={**body, "seed": 43})).get_json()
        assert other["data"] != data
        r = await client.post("/v1/images/generations",
                              json={**body, "n": 1, "size": "256x256", "steps": 1})
        assert Image.open(BytesIO(base64.b64decode(
            (await r.get_json())["data"][0]["b64_json"]))).size == (256, 256)
        # a failing pipeline call is a 500; the node goes on serving
        pipe = engine._pipe
        engine._pipe = lambda **kw: (_ for _ in ()).throw(RuntimeError("CUDA out of memory"))
        r = await client.post("/v1/images/generations", json=body)
        assert r.status_code == 500 and "out of memory" in (await r.get_json())["error"][
            "message"]
        engine._pipe = pipe
        assert (await client.post("/v1/images/generations", json=body)).status_code == 200
    finally:
        for e in engines:
            await capacity.unload(e)


async def test_the_tiny_pipeline_refused_by_a_small_budget(tmp_path, tiny_sd, capsys):
    node, engines, _ = await real_node(tmp_path, tiny_sd, memory_budget_mb=(("cpu", 64),))
    assert engines == []
    assert "not loading model tiny: needs ~" in capsys.readouterr().out
    r = await node.app.test_client().post("/v1/images/generations",
                                         json={"model": "tiny", "prompt": "x"})
    assert r.status_code == 503
    assert "64 MiB budget" in (await r.get_json())["error"]["message"]


def test_the_footprint_estimate_of_the_tiny_pipeline(tiny_sd):
    weights = footprint._image_weights(tiny_sd, 4)
    files = sum(p.stat().st_size for p in footprint._weight_files(tiny_sd))
    assert 0.9 * files < weights <= files  # float32 on the CPU: about the file sizes
    assert footprint.estimate_footprint(tiny_sd, "image") == int(weights * 1.25) + 512 * MiB
    assert json.loads((tiny_sd / "model_index.json").read_text())["_class_name"] == \
        "StableDiffusionPipeline"


async def test_a_single_file_checkpoint_offline_fails_with_a_clear_message(
        tmp_path, tiny_sd, monkeypatch):
    """Single files need their family's configs from the hub; offline that is an error
    that says what to do (and the hub is not contacted)."""
    from rbee_p2p.errors import EngineFailure

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    junk = tmp_path / "model.safetensors"
    header = json.dumps({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode()
    junk.write_bytes(len(header).to_bytes(8, "little") + header + bytes(8))
    config = NodeConfig(home=tmp_path, default_model=False, p2p=False,
                        models=(ModelSpec("junk", junk),))
    with pytest.raises(EngineFailure, match="need their family's config files"):
        await load_models(config)


async def test_cancelling_a_real_generation_interrupts_the_pipeline(tmp_path, tiny_sd):
    node, engines, capacity = await real_node(tmp_path, tiny_sd)
    engine = engines[0]
    unet = engine._pipe.unet
    calls = []
    forward = unet.forward
    unet.forward = lambda *a, **kw: calls.append(1) or forward(*a, **kw)
    try:
        job = engine.prepare(diffusion.ImageRequest(prompt="a cat", steps=150))
        with trio.CancelScope() as scope:
            scope.cancel()  # the caller gives up before the first step is done
            await engine.generate(job)
        assert scope.cancelled_caught
        assert len(calls) <= 2  # interrupted after its first step, not 150
        calls.clear()
        result = await engine.generate(engine.prepare(diffusion.ImageRequest(prompt="x",
                                                                             steps=3)))
        assert len(result.images) == 1 and len(calls) == 3  # the model is free again
    finally:
        unet.forward = forward
        for e in engines:
            await capacity.unload(e)


async def test_a_tenant_allowed_only_the_image_model_may_leave_model_out(tmp_path,
                                                                          autojump_clock):
    from rbee_p2p.tenancy.tenants import TenantBook

    book = TenantBook.open(tmp_path)
    key = book.add("acme", models=("img",))
    book.save()
    node, client = make(tmp_path)
    headers = {"Authorization": f"Bearer {key}"}
    body = {k: v for k, v in IMG.items() if k != "model"}
    r = await client.post("/v1/images/generations", json=body, headers=headers)
    assert r.status_code == 200  # the default model ("img") is what the allow-list checks
    node.images.default_model = lambda: "text"  # a default the tenant may not use
    r = await client.post("/v1/images/generations", json=body, headers=headers)
    assert r.status_code == 403
