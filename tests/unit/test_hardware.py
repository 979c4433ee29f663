"""The hardware probe: the real one on this (CPU-only) machine, and the merge with fakes."""

import json

import pytest

from rbee_p2p.engines import hardware
from rbee_p2p.engines.hardware import (
    CpuInfo,
    RawDevice,
    device_infos,
    merge,
    parse_device,
    probe,
    torch_device,
)
from rbee_p2p.protocol.messages import DeviceInfo
from rbee_p2p.protocol.schema import from_wire, to_wire

GiB = 1 << 30
CPU = CpuInfo(name="Test CPU", cores=8, mem_total=64 * GiB, mem_free=60 * GiB)


def test_probe_on_this_machine():
    hw = probe(use_torch=False)
    cpu = hw.devices[0]
    assert (cpu.id, cpu.backend) == ("cpu", "cpu")
    assert cpu.cores >= 1 and cpu.name
    assert 0 < cpu.mem_free <= cpu.mem_total
    llama = hw.backends["llama.cpp"]
    assert llama["available"] is True and isinstance(llama["gpu_offload"], bool)
    # ggml's device list always has the CPU backend, with its memory
    assert any(d["type"] == "cpu" and d["mem_total"] > 0 for d in llama["devices"])
    assert hw.backends["torch"] == {"probed": False}
    assert "nvml" in hw.backends
    gpus_seen = llama["gpu_offload"] or hw.backends["nvml"].get("devices")
    if not gpus_seen:  # this CPU-only machine: the CPU and nothing else
        assert [d.id for d in hw.devices] == ["cpu"]
        assert cpu.engines == ("llama.cpp",)
    json.dumps(hw.as_dict())  # status-ready


def test_probe_with_torch_when_installed():
    pytest.importorskip("torch", reason="torch is the optional images extra")
    import torch

    hw = probe(use_torch=True)
    info = hw.backends["torch"]
    assert info["available"] is True and info["cuda"] == torch.cuda.is_available()
    assert "torch" in hw.devices[0].engines
    if not (torch.cuda.is_available() or info["mps"]):
        assert not [d for d in hw.devices if "torch" in d.engines and d.id != "cpu"]


def test_the_advert_devices_are_valid_protocol_values():
    infos = device_infos(probe(use_torch=False))
    assert infos[0].id == "cpu" and infos[0].backend == "cpu"
    for info in infos:
        assert from_wire(DeviceInfo, to_wire(info)) == info


def test_a_failing_source_is_reported_not_raised(monkeypatch):
    def broken():
        raise RuntimeError("driver exploded")

    monkeypatch.setattr(hardware, "probe_llama", broken)
    hw = probe(use_torch=False)
    assert hw.backends["llama.cpp"] == {"available": False,
                                        "error": "RuntimeError: driver exploded"}
    assert [d.id for d in hw.devices][:1] == ["cpu"]


def test_merge_matches_cuda_devices_across_sources_by_pci_bus():
    torch = [RawDevice("cuda", 0, "NVIDIA RTX 4090", 24 * GiB, 20 * GiB, "0000:65:00.0"),
             RawDevice("cuda", 1, "NVIDIA A100", 80 * GiB, 79 * GiB, "0000:17:00.0")]
    llama = [RawDevice("cuda", 0, "NVIDIA GeForce RTX 4090", 24 * GiB, 21 * GiB),
             RawDevice("cuda", 1, "NVIDIA A100-SXM4-80GB", 80 * GiB, 78 * GiB)]
    # NVML counts in PCI order (the A100 first) and reports its own free memory
    nvml = [RawDevice("cuda", 0, "NVIDIA A100-SXM4-80GB", 80 * GiB, 70 * GiB, "0000:17:00.0"),
            RawDevice("cuda", 1, "NVIDIA GeForce RTX 4090", 24 * GiB, 10 * GiB,
                      "0000:65:00.0")]
    hw = merge(CPU, llama=llama, torch=torch, nvml=nvml)
    assert [d.id for d in hw.devices] == ["cpu", "cuda:0", "cuda:1"]
    rtx, a100 = hw.devices[1:]
    assert (rtx.name, rtx.mem_free) == ("NVIDIA GeForce RTX 4090", 10 * GiB)
    assert (a100.name, a100.mem_free) == ("NVIDIA A100-SXM4-80GB", 70 * GiB)
    assert rtx.sources == ("torch", "llama.cpp", "nvml")
    assert rtx.engines == ("torch", "llama.cpp")
    assert hw.devices[0].engines == ("llama.cpp", "torch")
    assert hw.first("llama.cpp", ("cuda",)) is rtx


def test_merge_without_pci_ids_matches_by_position_when_counts_agree():
    llama = [RawDevice("cuda", 0, "GPU", 8 * GiB, 7 * GiB)]
    nvml = [RawDevice("cuda", 0, "NVIDIA T4", 16 * GiB, 15 * GiB, "0000:01:00.0")]
    hw = merge(CPU, llama=llama, nvml=nvml)
    assert hw.device("cuda:0").name == "NVIDIA T4" and hw.device("cuda:0").mem_total == 16 * GiB


def test_a_gpu_only_nvml_sees_is_shown_but_not_advertised():
    nvml = [RawDevice("cuda", 0, "NVIDIA L4", 24 * GiB, 23 * GiB, "0000:01:00.0")]
    hw = merge(CPU, llama=[], nvml=nvml)
    gpu = hw.device("cuda:0")
    assert gpu is not None and gpu.engines == () and gpu.sources == ("nvml",)
    assert [i.id for i in device_infos(hw)] == ["cpu"]


def test_merge_metal_and_rocm():
    torch = [RawDevice("metal", 0, "Apple arm64 GPU (MPS)", 48 * GiB, 40 * GiB)]
    llama = [RawDevice("metal", 0, "Apple M3 Max", 48 * GiB, 48 * GiB),
             RawDevice("rocm", 0, "AMD Radeon RX 7900 XTX", 24 * GiB, 23 * GiB)]
    hw = merge(CPU, llama=llama, torch=torch)
    assert [d.id for d in hw.devices] == ["cpu", "metal:0", "rocm:0"]
    assert hw.device("metal:0").engines == ("torch", "llama.cpp")
    assert {i.backend for i in device_infos(hw)} == {"cpu", "metal", "rocm"}


def test_long_names_are_clipped_to_protocol_limits():
    llama = [RawDevice("cuda", 0, "Ğ" * 200, GiB, GiB)]
    info = device_infos(merge(CPU, llama=llama))[1]
    assert len(info.name.encode()) <= 128
    assert from_wire(DeviceInfo, to_wire(info)) == info


@pytest.mark.parametrize("text, parsed, torch_name", [
    ("cpu", ("cpu", 0), "cpu"), ("cuda:1", ("cuda", 1), "cuda:1"),
    ("CUDA", ("cuda", 0), "cuda:0"), ("mps", ("metal", 0), "mps"),
    ("metal:0", ("metal", 0), "mps"), ("rocm:2", ("rocm", 2), "cuda:2"),
])
def test_device_names(text, parsed, torch_name):
    assert parse_device(text) == parsed
    assert torch_device(text) == torch_name


@pytest.mark.parametrize("text", ["gpu", "cuda:x", "tpu:0", "", "auto"])
def test_bad_device_names(text):
    with pytest.raises(ValueError, match="unknown device"):
        parse_device(text)
