"""Model kinds, footprint estimates, placement and memory admission, and their settings."""

import json
import struct
from pathlib import Path

import pytest

from rbee_p2p.config import ModelSpec, default_model_path, load_config, parse_model_arg
from rbee_p2p.engines.admission import budgets, plan
from rbee_p2p.engines.footprint import (MiB, estimate_footprint, folder_digest, gguf_metadata,
                                        model_kind, weight_variant)
from rbee_p2p.engines.hardware import CpuInfo, RawDevice, merge
from rbee_p2p.errors import ConfigError

GiB = 1 << 30
CPU = CpuInfo(name="cpu", cores=4, mem_total=16 * GiB, mem_free=12 * GiB)


def write_safetensors(path: Path, tensors: dict[str, tuple[str, list[int]]]) -> None:
    """A valid safetensors file of zeros: {name: (dtype, shape)}."""
    sizes = {"F32": 4, "F16": 2, "I64": 8}
    header, offset = {}, 0
    for name, (dtype, shape) in tensors.items():
        n = sizes[dtype]
        for dim in shape:
            n *= dim
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(offset))


def diffusers_folder(root: Path, fp16_only: bool = False) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"], "safety_checker": [None, None]}))
    for comp in ("unet", "vae"):
        (root / comp).mkdir()
        (root / comp / "config.json").write_text("{}")
        name = "diffusion_pytorch_model.fp16.safetensors"
        write_safetensors(root / comp / name, {"w": ("F16", [1024, 256])})
        if not fp16_only:
            write_safetensors(root / comp / "diffusion_pytorch_model.safetensors",
                              {"w": ("F32", [1024, 256]), "step": ("I64", [1])})
    return root


def test_model_kinds(tmp_path):
    assert model_kind(default_model_path()) == "text"
    assert model_kind(diffusers_folder(tmp_path / "sd")) == "image"
    ckpt = tmp_path / "model.safetensors"
    write_safetensors(ckpt, {"w": ("F16", [4])})
    assert model_kind(ckpt) == "image"
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="not a diffusers pipeline"):
        model_kind(tmp_path / "empty")
    (tmp_path / "bad.gguf").write_bytes(b"nope")
    with pytest.raises(ConfigError, match="not a GGUF file"):
        model_kind(tmp_path / "bad.gguf")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ConfigError, match="unknown model format"):
        model_kind(tmp_path / "notes.txt")


def test_text_footprint_reads_the_kv_cache_shape_from_the_gguf_header():
    path = default_model_path()
    meta = gguf_metadata(path)
    assert meta["general.architecture"] == "llama" and meta["llama.block_count"] == 30
    assert not any(k.startswith("tokenizer.") for k in meta)  # the vocabulary is skipped
    kv = 30 * 4096 * 3 * (64 + 64) * 2  # layers x context x kv heads x (k+v dims) x f16
    expected = int((path.stat().st_size + kv) * 1.1) + 64 * MiB
    assert estimate_footprint(path, "text", context=4096) == expected
    assert estimate_footprint(path, "text", context=512) < expected


def test_image_footprint_counts_the_weights_loaded_at_the_device_dtype(tmp_path):
    folder = diffusers_folder(tmp_path / "sd")
    floats = 2 * 1024 * 256
    on_cpu = int((floats * 4 + 2 * 8) * 1.25) + 512 * MiB  # float32, plus the int64 tensors
    on_gpu = int((floats * 2 + 2 * 8) * 1.25) + 512 * MiB  # loaded as float16
    assert estimate_footprint(folder, "image", device="cpu") == on_cpu
    assert estimate_footprint(folder, "image", device="cuda:0") == on_gpu
    assert weight_variant(folder) is None
    assert weight_variant(diffusers_folder(tmp_path / "fp16", fp16_only=True)) == "fp16"


def test_folder_digest_covers_every_file_but_hidden_ones(tmp_path):
    folder = diffusers_folder(tmp_path / "sd")
    first = folder_digest(folder, tmp_path / "cache")
    (folder / ".cache").mkdir()
    (folder / ".cache" / "x.incomplete").write_text("partial download")
    assert folder_digest(folder, tmp_path / "cache") == first
    (folder / "unet" / "config.json").write_text('{"changed": 1}')
    assert folder_digest(folder, tmp_path / "cache") != first


def spec(name, device="auto", kind_path=Path("/m"), **kw):
    return ModelSpec(name=name, path=kind_path, device=device, **kw)


def fixed(sizes):
    return lambda s, kind, device: sizes[s.name]


def test_admission_in_config_order_refuses_what_does_not_fit():
    hw = merge(CPU, llama=[])
    limits = {"cpu": 1000 * MiB}
    placed = plan([spec("a"), spec("b"), spec("c")], ["text", "image", "text"], hw, limits,
                  footprint=fixed({"a": 600 * MiB, "b": 500 * MiB, "c": 300 * MiB}))
    a, b, c = placed
    assert (a.device, a.reason, c.reason) == ("cpu", None, None)
    assert b.reason.startswith("needs ~500 MiB on cpu, but only 400 MiB of its 1000 MiB "
                               "budget is left (in use: a)")
    assert "memory_budget_mb" in b.reason


def test_memory_mb_overrides_the_estimate():
    hw = merge(CPU, llama=[])
    placed = plan([spec("a", memory_mb=2000)], ["text"], hw, {"cpu": 1000 * MiB},
                  footprint=fixed({"a": 1}))
    assert placed[0].footprint == 2000 * MiB and "needs ~2.0 GiB" in placed[0].reason


def test_auto_placement_and_pinning():
    llama = [RawDevice("cuda", 0, "RTX", 24 * GiB, 24 * GiB)]
    torch = [RawDevice("cuda", 0, "RTX", 24 * GiB, 24 * GiB)]
    hw = merge(CPU, llama=llama, torch=torch)
    limits = budgets(hw, 0.1)
    specs = [spec("t-cpu"), spec("t-gpu", gpu_layers=20), spec("t-pinned", device="cuda:0"),
             spec("img"), spec("img-cpu", device="cpu"), spec("gone", device="cuda:3")]
    kinds = ["text", "text", "text", "image", "image", "image"]
    p = {x.name: x for x in plan(specs, kinds, hw, limits, footprint=lambda *a: GiB)}
    assert (p["t-cpu"].device, p["t-cpu"].gpu_layers, p["t-cpu"].pinned) == ("cpu", 0, False)
    assert (p["t-gpu"].device, p["t-gpu"].gpu_layers) == ("cuda:0", 20)
    # pinned to a GPU means the whole model on it
    assert (p["t-pinned"].device, p["t-pinned"].gpu_layers, p["t-pinned"].pinned) == \
        ("cuda:0", -1, True)
    assert (p["img"].device, p["img-cpu"].device, p["img-cpu"].pinned) == ("cuda:0", "cpu", True)
    assert p["gone"].reason.startswith("pinned to cuda:3, but no such device here")


def test_text_auto_stays_on_the_cpu_when_llama_cpp_cannot_offload():
    hw = merge(CPU, llama=[], torch=[RawDevice("cuda", 0, "RTX", GiB, GiB)])
    placed = plan([spec("t", gpu_layers=99), spec("pin", device="cuda:0")], ["text", "text"],
                  hw, budgets(hw, 0.1), footprint=lambda *a: MiB)
    assert (placed[0].device, placed[0].gpu_layers) == ("cpu", 0)
    assert "llama.cpp cannot use it" in placed[1].reason


def test_images_unavailable_marks_image_models_only():
    hw = merge(CPU, llama=[])
    placed = plan([spec("t"), spec("i")], ["text", "image"], hw, {"cpu": GiB},
                  images_reason="torch is not installed", footprint=lambda *a: MiB)
    assert placed[0].reason is None and placed[1].reason == "torch is not installed"


def test_budgets_headroom_free_memory_and_overrides():
    hw = merge(CPU, llama=[RawDevice("cuda", 0, "RTX", 24 * GiB, 2 * GiB)])
    b = budgets(hw, 0.25)
    assert b["cpu"] == 12 * GiB  # min(16 GiB x 0.75, 12 GiB free)
    assert b["cuda:0"] == 2 * GiB  # another process holds the rest
    assert budgets(hw, 0.25, {"cpu": 100})["cpu"] == 100 * MiB


def test_memory_settings_in_the_config_file(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('memory_headroom = 0.2\nmax_images = 2\nimage_url_ttl = 30\n'
                   'image_store_mb = 8\n[memory_budget_mb]\ncpu = 4096\n"cuda:0" = 20000\n'
                   'mps = 1000\n[[models]]\npath = "/x/sd-1.5"\ndevice = "mps"\nsteps = 4\n'
                   'guidance = 0.0\nmemory_mb = 3000\n')
    config = load_config(cfg, env={"RBEE_HOME": str(tmp_path)})
    assert config.memory_headroom == 0.2 and config.max_images == 2
    assert (config.image_url_ttl, config.image_store_mb) == (30, 8)
    assert dict(config.memory_budget_mb) == {"cpu": 4096, "cuda:0": 20000, "metal:0": 1000}
    m = config.models[0]
    assert (m.name, m.device, m.steps, m.guidance, m.memory_mb) == \
        ("sd-1", "mps", 4, 0.0, 3000)  # a file-like path: the stem


def test_a_folder_model_is_named_after_the_whole_folder(tmp_path):
    folder = diffusers_folder(tmp_path / "sd-1.5")
    assert parse_model_arg(str(folder)).name == "sd-1.5"


@pytest.mark.parametrize("text, match", [
    ("memory_headroom = 1.5", "memory_headroom"),
    ("max_images = 0", "max_images"),
    ("[memory_budget_mb]\ngpu = 10", "unknown device"),
    ("[memory_budget_mb]\ncpu = 'lots'", "whole number of MiB"),
    ("memory_budget_mb = 3", "table"),
    ("[[models]]\npath = '/x'\ndevice = 'gpu0'", "unknown device"),
])
def test_bad_memory_settings(tmp_path, text, match):
    cfg = tmp_path / "c.toml"
    cfg.write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_config(cfg, env={"RBEE_HOME": str(tmp_path)})
