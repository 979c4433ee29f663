"""Images: request validation, size/steps resolution, the URL store, the PNG writer."""

import zlib

import pytest
import trio

from rbee_p2p.api.images import ImageLimits, ImageStore, parse_images
from rbee_p2p.engines.base import TextRequest
from rbee_p2p.engines.diffusion import ImageRequest, ScriptedImageEngine, png_bytes
from rbee_p2p.errors import InvalidRequest

LIMITS = ImageLimits(max_images=4)


def test_minimal_request_and_defaults():
    call = parse_images({"prompt": "a red cat"}, LIMITS)
    assert call.model is None and call.response_format == "b64_json"
    assert call.request == ImageRequest(prompt="a red cat")


def test_every_field():
    call = parse_images({"model": "sd", "prompt": "a bee", "n": 4, "size": "512x512",
                         "response_format": "url", "quality": "hd", "output_format": "png",
                         "seed": -1, "steps": 12, "guidance_scale": 0, "negative_prompt": "x",
                         "user": "me", "stream": False}, LIMITS)
    r = call.request
    assert (call.model, call.response_format) == ("sd", "url")
    assert (r.n, r.size, r.quality, r.steps, r.guidance, r.negative_prompt) == \
        (4, "512x512", "hd", 12, 0.0, "x")
    assert r.seed == 2**63 - 1  # any 64-bit seed, folded into torch's range


@pytest.mark.parametrize("body, param", [
    ({}, "prompt"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": "   "}, "prompt"),
    ({"prompt": 3}, "prompt"),
    ({"prompt": "x" * 32001}, "prompt"),
    ({"prompt": "x", "n": 5}, "n"),
    ({"prompt": "x", "n": 0}, "n"),
    ({"prompt": "x", "n": 1.5}, "n"),
    ({"prompt": "x", "size": "big"}, "size"),
    ({"prompt": "x", "size": "512x"}, "size"),
    ({"prompt": "x", "size": 512}, "size"),
    ({"prompt": "x", "response_format": "jpeg"}, "response_format"),
    ({"prompt": "x", "quality": "ultra"}, "quality"),
    ({"prompt": "x", "output_format": "webp"}, "output_format"),
    ({"prompt": "x", "steps": 0}, "steps"),
    ({"prompt": "x", "steps": 151}, "steps"),
    ({"prompt": "x", "guidance_scale": -1}, "guidance_scale"),
    ({"prompt": "x", "guidance_scale": True}, "guidance_scale"),
    ({"prompt": "x", "seed": "1"}, "seed"),
    ({"prompt": "x", "model": ""}, "model"),
    ({"prompt": "x", "style": "vivid"}, "style"),
    ({"prompt": "x", "stream": True}, "stream"),
    ({"prompt": "x", "temperature": 1}, "temperature"),
])
def test_bad_requests_name_the_parameter(body, param):
    with pytest.raises(InvalidRequest) as info:
        parse_images(body, LIMITS)
    assert info.value.param == param


def test_n_above_the_configured_limit_says_the_limit():
    with pytest.raises(InvalidRequest, match="at most 2 images"):
        parse_images({"prompt": "x", "n": 3}, ImageLimits(max_images=2))


def test_sizes_steps_and_quality_resolve_against_the_model():
    engine = ScriptedImageEngine("m", native=64, steps=20)
    job = engine.prepare(ImageRequest(prompt="p"))
    assert (job.width, job.height, job.steps) == (64, 64, 20) and job.seed >= 0
    assert "64x64" in engine.sizes() and "1024x1024" in engine.sizes()
    job = engine.prepare(ImageRequest(prompt="p", size="1792x1024", quality="low", seed=7))
    assert (job.width, job.height, job.steps, job.seed) == (1792, 1024, 10, 7)
    assert engine.prepare(ImageRequest(prompt="p", quality="hd")).steps == 30
    assert engine.prepare(ImageRequest(prompt="p", quality="high", steps=3)).steps == 3
    assert engine.prepare(ImageRequest(prompt="p", size="auto")).width == 64
    with pytest.raises(InvalidRequest, match="Supported sizes are") as info:
        engine.prepare(ImageRequest(prompt="p", size="100x100"))
    assert info.value.param == "size"


def test_text_calls_into_an_image_model_and_back_are_refused():
    from rbee_p2p.dispatch import Dispatcher, Request
    from rbee_p2p.engines.fake import ScriptedEngine
    from rbee_p2p.engines.scheduler import Scheduler

    d = Dispatcher(Scheduler([ScriptedImageEngine("m"), ScriptedEngine("t")]))
    with pytest.raises(InvalidRequest, match="is an image model") as info:
        d.engine_for(Request("completion", "m", text=TextRequest(max_tokens=5, prompt="hi")))
    assert info.value.param == "model"
    with pytest.raises(InvalidRequest, match=r"does not generate images; use an image model \(m\)"):
        d.engine_for(Request("image", "t", image=ImageRequest(prompt="a cat")))


def png_pixels(data: bytes) -> tuple[int, int, bytes]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    idat = data.index(b"IDAT")
    length = int.from_bytes(data[idat - 4:idat], "big")
    return width, height, zlib.decompress(data[idat + 4:idat + 4 + length])


def test_png_writer():
    w, h, raw = png_pixels(png_bytes(3, 2, (1, 2, 3)))
    assert (w, h) == (3, 2) and raw == (b"\x00" + b"\x01\x02\x03" * 3) * 2


async def test_url_store_expires_and_stays_bounded(autojump_clock):
    store = ImageStore(ttl=60, max_bytes=100, max_count=3)
    a = store.put(b"a" * 40)
    assert store.get(a)[0] == b"a" * 40 and store.get("nope") is None
    await trio.sleep(30)
    b = store.put(b"b" * 40)
    c = store.put(b"c" * 40)  # over 100 bytes: the oldest goes
    assert store.get(a) is None and store.get(b) and store.get(c)
    d, _ = store.put(b"d"), store.put(b"e")  # over 3 images: the oldest goes
    assert store.get(b) is None and len(store) == 3
    await trio.sleep(31)
    assert store.get(c) is not None and store.get(c)[1] == pytest.approx(29, abs=0.01)
    await trio.sleep(30)
    assert store.get(c) is None and store.get(d) is None and len(store) == 0
    with pytest.raises(InvalidRequest, match="b64_json"):
        store.put(b"x" * 101)
    assert len({store.put(b"z") for _ in range(3)}) == 3  # fresh random ids


def test_pipeline_calls_run_on_a_thread_that_ends_with_the_call():
    """torch's OpenMP pool lives as long as the thread that made it; a thread per call
    keeps it from slowing llama.cpp down afterwards (engines/diffusion.py)."""
    import threading

    from rbee_p2p.engines.diffusion import _on_fresh_thread

    worker = _on_fresh_thread(threading.current_thread)
    assert worker is not threading.current_thread() and not worker.is_alive()
    with pytest.raises(ValueError, match="boom"):
        _on_fresh_thread(lambda: (_ for _ in ()).throw(ValueError("boom")))
