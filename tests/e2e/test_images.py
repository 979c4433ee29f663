"""Images on a real node process: the tiny diffusers pipeline beside SmolLM2, the official
openai SDK, concurrent text + image requests, memory admission from a config file, and a
node without torch.  Bounded real time; processes are killed by PID."""

from __future__ import annotations

import base64
import importlib.util
import shutil
import subprocess
import time
from io import BytesIO
from pathlib import Path

import httpx
import openai
import pytest
import trio
from nodeproc import NodeProcess, running, sdk

pytestmark = pytest.mark.e2e
HELLO = [{"role": "user", "content": "Say hello in five words."}]


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    """Built in a child process: torch's OpenMP threads stay out of the test process, where
    they would compete with the in-process llama.cpp tests that follow."""
    from tinydiffusion import SKIP_REASON, build_in_subprocess, images_installed

    if not images_installed():
        pytest.skip(SKIP_REASON)
    return build_in_subprocess(tmp_path_factory.mktemp("models") / "tiny-sd")


@pytest.fixture(scope="module")
def node(tmp_path_factory, tiny_sd):
    with running(tmp_path_factory.mktemp("node"), "--no-p2p", "--model",
                       f"tiny={tiny_sd}") as proc:
        yield proc


@pytest.fixture(scope="module")
def client(node):
    with sdk(node) as c:
        yield c


def image(data: bytes):
    from PIL import Image

    return Image.open(BytesIO(data))


def test_loading_shows_progress(node):
    out = node.output()
    assert "loading model tiny (image, ~" in out and "loaded model tiny on cpu" in out
    assert "Loading pipeline components" in out  # diffusers' progress bar
    assert "serving smollm2, tiny on" in out


def test_images_generate_through_the_openai_sdk(client):
    r = client.images.generate(model="tiny", prompt="a red cat", size="64x64", n=2,
                               extra_body={"steps": 2, "seed": 1})
    pictures = [image(base64.b64decode(d.b64_json)) for d in r.data]
    assert [(p.format, p.size) for p in pictures] == [("PNG", (64, 64))] * 2
    assert r.created > 0


def test_url_images(client):
    r = client.images.generate(model="tiny", prompt="a bee", response_format="url",
                               quality="low")
    url = r.data[0].url
    assert url.startswith("http://127.0.0.1:") and url.endswith(".png")
    got = httpx.get(url, timeout=10)
    assert got.status_code == 200 and got.headers["content-type"] == "image/png"
    assert image(got.content).size == (64, 64)


def test_bad_input_through_the_sdk(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.images.generate(model="tiny", prompt="x", size="100x100")
    assert info.value.body["param"] == "size"
    with pytest.raises(openai.BadRequestError) as info:
        client.images.generate(model="tiny", prompt="x", n=9)
    assert info.value.body["param"] == "n"
    with pytest.raises(openai.BadRequestError) as info:
        client.images.generate(model="tiny", prompt="")
    assert info.value.body["param"] == "prompt"
    with pytest.raises(openai.NotFoundError):
        client.images.generate(model="dall-e-9", prompt="x")
    with pytest.raises(openai.BadRequestError):  # a text model cannot draw
        client.images.generate(model="smollm2", prompt="x")
    assert client.images.generate(model="tiny", prompt="x", extra_body={"steps": 1}).data


def test_text_and_images_at_the_same_time(node):
    """Four 20-step images and four chat completions at once: all succeed, and text is
    answered while images are being made.  Timings are printed (no thresholds)."""
    timings: dict[str, list[float]] = {"image": [], "chat": []}
    spans: dict[str, list[tuple[float, float]]] = {"image": [], "chat": []}

    async def main() -> None:
        async with httpx.AsyncClient(base_url=node.url, timeout=120) as c:
            async def one(kind: str) -> None:
                start = time.monotonic()
                if kind == "image":
                    r = await c.post("/v1/images/generations", json={
                        "model": "tiny", "prompt": "a red cat", "steps": 20})
                else:
                    r = await c.post("/v1/chat/completions", json={
                        "model": "smollm2", "messages": HELLO, "max_tokens": 24})
                assert r.status_code == 200, r.text
                end = time.monotonic()
                timings[kind].append(end - start)
                spans[kind].append((start, end))

            async def alone(kind: str) -> float:
                start = time.monotonic()
                await one(kind)
                return time.monotonic() - start

            solo = {k: await alone(k) for k in ("image", "chat")}
            for k in timings:
                timings[k].clear()
                spans[k].clear()
            async with trio.open_nursery() as nursery:
                for _ in range(4):
                    nursery.start_soon(one, "image")
                    nursery.start_soon(one, "chat")
            print(f"\nalone: image {solo['image']:.3f}s, chat {solo['chat']:.3f}s; together: "
                  f"images {[round(t, 3) for t in sorted(timings['image'])]}, chats "
                  f"{[round(t, 3) for t in sorted(timings['chat'])]}")

    trio.run(main)
    assert len(timings["image"]) == 4 and len(timings["chat"]) == 4
    first_chat_done = min(end for _, end in spans["chat"])
    last_image_done = max(end for _, end in spans["image"])
    assert first_chat_done < last_image_done  # text did not wait for the image queue


def test_status_shows_devices_and_the_image_model(node):
    exe = shutil.which("rbee-node")
    out = subprocess.run([exe, "status", "--url", node.url], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0
    assert "tiny: image on cpu" in out.stdout and "smollm2" in out.stdout
    assert "devices\n  cpu: " in out.stdout and "budget" in out.stdout
    status = httpx.get(node.url + "/rbee/status", timeout=10).json()
    assert status["images"]["available"] is True
    cpu = status["devices"][0]
    assert cpu["id"] == "cpu" and set(cpu["models"]) == {"smollm2", "tiny"}
    assert "torch" in cpu["engines"] and "llama.cpp" in cpu["engines"]


def test_a_model_over_the_configured_budget_is_refused(tmp_path, tiny_sd):
    config = tmp_path / "rbee-node.toml"
    config.write_text(f'[memory_budget_mb]\ncpu = 300\n[[models]]\nname = "tiny"\n'
                      f'path = "{tiny_sd}"\n')
    proc = NodeProcess(tmp_path / "home", "--no-p2p", "--config", str(config))
    try:
        proc.wait_ready()
        out = proc.output()
        assert "loaded model smollm2 on cpu" in out  # ~266 MiB: fits in 300
        assert "not loading model tiny: needs ~" in out and "300 MiB budget" in out
        r = httpx.post(proc.url + "/v1/images/generations",
                       json={"model": "tiny", "prompt": "x"}, timeout=30)
        assert r.status_code == 503 and r.json()["error"]["code"] == "model_unavailable"
        status = proc.status()
        assert [m["name"] for m in status["unavailable"]] == ["tiny"]
        assert proc.interrupt() == 0
        assert "unloaded model smollm2 from cpu" in proc.output()
    finally:
        proc.kill()


def test_a_node_without_torch_starts_and_says_images_are_unavailable(tmp_path, monkeypatch):
    hide = tmp_path / "hide-torch" / "torch"
    hide.mkdir(parents=True)
    (hide / "__init__.py").write_text(
        "raise ImportError(\"No module named 'torch' (hidden by the test)\", name='torch')\n")
    folder = tmp_path / "sd"
    folder.mkdir()
    (folder / "model_index.json").write_text("{}")  # never loaded: torch is missing
    monkeypatch.setenv("PYTHONPATH", str(hide.parent))
    proc = NodeProcess(tmp_path / "home", "--no-p2p", "--model", f"sd={folder}")
    try:
        proc.wait_ready()
        # with the images extra, torch (hidden) is what fails; in a bare venv diffusers is
        # missing first (torch is found: the hiding stub)
        missing = [m for m in ("diffusers", "transformers") if importlib.util.find_spec(m) is None]
        reason = f"{missing[0]} is not installed" if missing else "cannot import torch"
        assert f"images are unavailable on this node: {reason}" in proc.output()
        r = httpx.post(proc.url + "/v1/images/generations", json={"prompt": "a cat"},
                       timeout=30)
        assert r.status_code == 503
        error = r.json()["error"]
        assert error["code"] == "model_unavailable" and "rbee-p2p[images]" in error["message"]
        assert proc.status()["images"]["available"] is False
        chat = httpx.post(proc.url + "/v1/chat/completions", json={
            "model": "smollm2", "messages": HELLO, "max_tokens": 4}, timeout=60)
        assert chat.status_code == 200
    finally:
        proc.kill()


def test_tiny_pipeline_helper_writes_a_real_diffusers_folder(tiny_sd: Path):
    assert (tiny_sd / "model_index.json").is_file()
    assert (tiny_sd / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert (tiny_sd / "tokenizer").is_dir()


def test_loading_a_local_folder_never_contacts_the_hub(tmp_path, tiny_sd, monkeypatch):
    import socket
    import threading

    hub = socket.socket()
    hub.bind(("127.0.0.1", 0))
    hub.listen()
    hub.settimeout(0.2)
    contacted: list[object] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, addr = hub.accept()
            except OSError:
                continue
            contacted.append(addr)
            conn.close()

    watcher = threading.Thread(target=accept, daemon=True)
    watcher.start()
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{hub.getsockname()[1]}")
    proc = NodeProcess(tmp_path / "home", "--no-p2p", "--no-default-model", "--model",
                       f"tiny={tiny_sd}")
    try:
        proc.wait_ready()
        r = httpx.post(proc.url + "/v1/images/generations",
                       json={"prompt": "a cat", "steps": 1}, timeout=60)
        assert r.status_code == 200
    finally:
        proc.kill()
        stop.set()
        watcher.join(5)
        hub.close()
    assert contacted == []


def test_images_are_forwarded_through_the_mesh(tmp_path, tiny_sd):
    """A has no image model; C has the tiny pipeline: A's image request runs on C."""
    c = NodeProcess(tmp_path / "c", "--no-default-model", "--model", f"tiny={tiny_sd}")
    a = None
    try:
        c.wait_ready()
        a = NodeProcess(tmp_path / "a", "--no-default-model", "--peer", c.addr)
        a.wait_ready()
        a.wait_for(lambda s: any(p["id"] == c.peer_id and "tiny" in p["models"]
                                 for p in s["peers"]), 20, "C's image model at A")
        with openai.OpenAI(base_url=a.url + "/v1", api_key="x", max_retries=0,
                           timeout=60) as client:
            r = client.images.generate(model="tiny", prompt="a bee", size="64x64", n=2,
                                       extra_body={"steps": 2, "seed": 3})
            assert [image(base64.b64decode(d.b64_json)).size for d in r.data] == [(64, 64)] * 2
            url = client.images.generate(model="tiny", prompt="a bee", size="64x64",
                                         response_format="url",
                                         extra_body={"steps": 2}).data[0].url
        assert url.startswith(a.url)  # served by A, the node the client talks to
        assert image(httpx.get(url, timeout=30).content).format == "PNG"
        assert c.status()["images"]["images_generated"] == {"tiny": 3}
    finally:
        for node in (a, c):
            if node is not None:
                node.kill()
