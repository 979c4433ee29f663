"""A tiny random-weight Stable Diffusion pipeline, built offline from configs.

``build_tiny_pipeline(folder)`` writes a real diffusers folder (``model_index.json``,
unet/vae/text_encoder/tokenizer/scheduler, safetensors weights) that the node loads through
exactly the code path real models take.  Native size 64x64; a step takes milliseconds on a
CPU.  The CLIP tokenizer gets a tiny vocabulary written here (letters and a few words), so
nothing is downloaded: the Hugging Face hub is never contacted (HF_HUB_OFFLINE=1).

``require_images()`` skips the calling test module, with the reason, when torch or
diffusers are not installed (``pip install -e '.[test]'`` without the images extra).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

SKIP_REASON = ("image tests need torch + diffusers + transformers: "
               "pip install torch==2.13.0 && pip install -e '.[test,images]'")


def images_installed() -> bool:
    import importlib.util

    try:
        return all(importlib.util.find_spec(m) is not None
                   for m in ("torch", "diffusers", "transformers"))
    except (ImportError, ValueError):
        return False


def require_images() -> None:
    import pytest

    if not images_installed():
        pytest.skip(SKIP_REASON, allow_module_level=True)


WORDS = ["a", "an", "the", "red", "blue", "green", "cat", "dog", "bee", "honey", "sky",
         "photo", "of", "painting", "tree", "house"]


def _vocab(folder: Path) -> tuple[Path, Path]:
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "!": 2}
    for c in "abcdefghijklmnopqrstuvwxyz0123456789":
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    merges = ["#version: 0.2"]
    for w in WORDS:  # whole words as merges of their letters, like CLIP's BPE
        if len(w) < 2:
            continue
        parts = list(w[:-1]) + [w[-1] + "</w>"]
        while len(parts) > 1:
            a, b = parts[0], parts[1]
            merges.append(f"{a} {b}")
            merged = a + b
            vocab.setdefault(merged, len(vocab))
            parts = [merged, *parts[2:]]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("\n".join(dict.fromkeys(merges)) + "\n")
    return folder / "vocab.json", folder / "merges.txt"


def build_tiny_pipeline(folder: Path, seed: int = 0) -> Path:
    """Write the tiny pipeline to ``folder`` (created) and return it."""
    import torch
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=8, in_channels=4,
        out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
        norm_num_groups=32)
    vae = AutoencoderKL(
        block_out_channels=[32, 32, 32, 32], in_channels=3, out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
        latent_channels=4, norm_num_groups=32, sample_size=64)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    vocab_file, merges_file = _vocab(folder.parent / (folder.name + "-vocab"))
    tokenizer = CLIPTokenizer(str(vocab_file), str(merges_file), model_max_length=77)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=32, intermediate_size=37,
        layer_norm_eps=1e-05, num_attention_heads=4, num_hidden_layers=2,
        vocab_size=len(json.loads(vocab_file.read_text())), max_position_embeddings=77))
    pipe = StableDiffusionPipeline(unet=unet, vae=vae, scheduler=scheduler,
                                   text_encoder=text_encoder, tokenizer=tokenizer,
                                   safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(str(folder))
    return folder


def build_in_subprocess(folder: Path, timeout: float = 300) -> Path:
    """``build_tiny_pipeline`` in a child process: torch's OpenMP worker threads (kept for
    the life of the thread that ran torch) stay out of the test process, where they would
    slow down the llama.cpp tests (see rbee_p2p/engines/diffusion.py)."""
    import subprocess
    import sys

    subprocess.run([sys.executable, __file__, str(folder)], check=True, timeout=timeout,
                   capture_output=True)
    return folder


if __name__ == "__main__":  # python tests/tinydiffusion.py DIR: make one to play with
    import sys

    print(build_tiny_pipeline(Path(sys.argv[1] if len(sys.argv) > 1 else "tiny-sd")))
