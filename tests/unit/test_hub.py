"""``rbee-node pull`` (offline it fails fast; which files it takes) and ``rbee-node devices``."""

import json
import socket

import pytest

from rbee_p2p.cli import main
from rbee_p2p.cli.pull import PullError, select_files, status_lines

SD_REPO = [
    "README.md", "model_index.json", "v1-5-pruned.ckpt", "v1-5-pruned.safetensors",
    "feature_extractor/preprocessor_config.json", "safety_checker/config.json",
    "safety_checker/model.safetensors", "scheduler/scheduler_config.json",
    "text_encoder/config.json", "text_encoder/model.safetensors",
    "text_encoder/model.fp16.safetensors", "text_encoder/pytorch_model.bin",
    "tokenizer/merges.txt", "tokenizer/vocab.json", "tokenizer/tokenizer_config.json",
    "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
    "unet/diffusion_pytorch_model.fp16.safetensors", "unet/diffusion_pytorch_model.bin",
    "vae/config.json", "vae/diffusion_pytorch_model.bin",  # .bin only
]


def test_a_diffusers_repo_gets_configs_tokenizer_and_one_set_of_weights():
    files = select_files(SD_REPO)
    assert files == sorted([
        "model_index.json", "scheduler/scheduler_config.json", "text_encoder/config.json",
        "text_encoder/model.safetensors", "tokenizer/merges.txt", "tokenizer/tokenizer_config.json",
        "tokenizer/vocab.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
        "vae/config.json", "vae/diffusion_pytorch_model.bin"])
    fp16 = select_files(SD_REPO, variant="fp16")
    assert "unet/diffusion_pytorch_model.fp16.safetensors" in fp16
    assert "unet/diffusion_pytorch_model.safetensors" not in fp16


def test_gguf_repos_need_one_file_or_a_choice():
    assert select_files(["README.md", "m-Q4_K_M.gguf"]) == ["m-Q4_K_M.gguf"]
    with pytest.raises(PullError, match="pick one with --include"):
        select_files(["m-Q4_K_M.gguf", "m-Q8_0.gguf"])
    assert select_files(["m-Q4_K_M.gguf", "m-Q8_0.gguf"], include=["*Q8_0*"]) == ["m-Q8_0.gguf"]
    with pytest.raises(PullError, match="neither"):
        select_files(["README.md", "weights.pt"])
    with pytest.raises(PullError, match="no file matches"):
        select_files(["a.gguf"], include=["*.bin"])


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once the socket is closed


def test_pull_offline_fails_at_once_with_a_clear_message(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("RBEE_HOME", str(tmp_path))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    assert main(["pull", "stabilityai/sd-turbo", "--timeout", "2"]) == 1
    err = capsys.readouterr().err
    assert "cannot reach http://127.0.0.1:" in err and "--model PATH" in err
    assert not (tmp_path / "models").exists()


def test_pull_refuses_when_hf_hub_offline_is_set(monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["pull", "stabilityai/sd-turbo"]) == 1
    assert "HF_HUB_OFFLINE is set" in capsys.readouterr().err


def test_devices_command(capsys):
    assert main(["devices", "--no-torch"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("cpu: ") and "llama.cpp: available" in out and "not probed" in out
    assert main(["devices", "--json", "--no-torch"]) == 0
    probed = json.loads(capsys.readouterr().out)
    assert probed["devices"][0]["id"] == "cpu" and "llama.cpp" in probed["backends"]


def test_status_lines_for_people():
    lines = status_lines({
        "devices": [{"id": "cpu", "backend": "cpu", "name": "Xeon", "cores": 2,
                     "mem_total": 8 << 30, "mem_free": 6 << 30, "budget": 5 << 30,
                     "used": 1 << 30, "engines": ["llama.cpp"]}],
        "images": {"available": False, "reason": "torch is not installed"},
        "unavailable": [{"name": "sdxl", "kind": "image", "reason": "torch is not installed"}]})
    assert lines == [
        "devices",
        "  cpu: Xeon (cpu, 2 cores) 6.0 GiB free of 8.0 GiB; budget 5.0 GiB, models use ~1.0 "
        "GiB [llama.cpp]",
        "images   unavailable: torch is not installed",
        "not loaded  sdxl (image): torch is not installed"]
