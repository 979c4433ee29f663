"""Heterogeneous hardware: real GPUs and CPUs, the models they can hold, and their speed.

Token generation (decode) in llama.cpp is bound by memory bandwidth: every token reads all
weights once, so tokens/s ~ efficiency x bandwidth / model bytes.  With efficiency 0.65 on
GPUs and Apple silicon and 0.55 on CPUs this matches published llama.cpp figures within
about 20% (RTX 4090 + 8B Q4_K_M: ~134 tok/s; M2 Max: ~53; Ryzen 7950X: ~9).  Prompt
processing (prefill) is compute bound: tokens/s ~ 0.35 x FP16 FLOP/s / (2 x parameters).
Memory and bandwidth are the vendors' spec-sheet numbers; the population shares are our
guess at a mixed community swarm with some rented datacenter GPUs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Device", "Model", "DEVICES", "MODELS", "Machine", "sample_machines"]


@dataclass(frozen=True)
class Device:
    name: str
    backend: str  # cpu | cuda | metal | rocm  (DeviceInfo.backend)
    datacenter: bool
    mem_gb: float  # memory a model may use (unified memory: 75% of RAM)
    bandwidth_gbs: float
    tflops16: float
    share: float  # of the swarm population

    @property
    def efficiency(self) -> float:
        return 0.55 if self.backend == "cpu" else 0.65


@dataclass(frozen=True)
class Model:
    name: str
    params_b: float
    size_gb: float  # Q4_K_M GGUF
    weight: float  # preference when a machine can hold several models


DEVICES: tuple[Device, ...] = (
    Device("NVIDIA H100 SXM 80GB", "cuda", True, 80, 3350, 989, 0.02),
    Device("NVIDIA A100 80GB", "cuda", True, 80, 2039, 312, 0.03),
    Device("NVIDIA L40S", "cuda", True, 48, 864, 362, 0.02),
    Device("NVIDIA A10G", "cuda", True, 24, 600, 125, 0.04),
    Device("NVIDIA L4", "cuda", True, 24, 300, 121, 0.03),
    Device("NVIDIA GeForce RTX 4090", "cuda", False, 24, 1008, 165, 0.14),
    Device("NVIDIA GeForce RTX 3090", "cuda", False, 24, 936, 71, 0.10),
    Device("NVIDIA GeForce RTX 4080", "cuda", False, 16, 717, 97, 0.06),
    Device("NVIDIA GeForce RTX 3060 12GB", "cuda", False, 12, 360, 25, 0.10),
    Device("NVIDIA GeForce RTX 4060 Ti 16GB", "cuda", False, 16, 288, 22, 0.06),
    Device("AMD Radeon RX 7900 XTX", "rocm", False, 24, 960, 61, 0.03),
    Device("Apple M2 Max 64GB", "metal", False, 48, 400, 13.6, 0.07),
    Device("Apple M3 Pro 36GB", "metal", False, 27, 150, 7.4, 0.06),
    Device("Apple M1 16GB", "metal", False, 12, 68, 2.6, 0.06),
    Device("AMD Ryzen 9 7950X DDR5", "cpu", False, 48, 83, 1.5, 0.04),
    Device("Intel Core i7 laptop DDR4", "cpu", False, 10, 51, 0.5, 0.06),
    Device("Intel Xeon Gold 6338 8ch DDR4", "cpu", True, 200, 204, 3.0, 0.02),
)

MODELS: tuple[Model, ...] = (
    Model("llama-3.1-8b", 8.0, 4.9, 0.40),
    Model("qwen2.5-14b", 14.8, 9.0, 0.25),
    Model("qwen2.5-32b", 32.8, 19.9, 0.20),
    Model("llama-3.3-70b", 70.6, 42.5, 0.15),
)

KV_HEADROOM = 1.2
"""A model needs its weights plus ~20% for the KV cache and buffers."""


@dataclass(frozen=True)
class Machine:
    device: int  # index into DEVICES
    model: int  # index into MODELS: the one model this node serves
    tokens_per_s: float  # decode
    prefill_per_s: float


def speeds(device: Device, model: Model) -> tuple[float, float]:
    decode = device.efficiency * device.bandwidth_gbs / model.size_gb
    prefill = 0.35 * device.tflops16 * 1e12 / (2 * model.params_b * 1e9)
    return decode, max(prefill, decode)


def sample_machines(rng: np.random.Generator, count: int) -> list[Machine]:
    """``count`` machines: a device by population share, then one model it can hold,
    chosen by the models' weights."""
    shares = np.array([d.share for d in DEVICES])
    picks = rng.choice(len(DEVICES), size=count, p=shares / shares.sum())
    draws = rng.random(count)
    out = []
    for index, u in zip(picks.tolist(), draws.tolist()):
        device = DEVICES[index]
        fits = [i for i, m in enumerate(MODELS) if m.size_gb * KV_HEADROOM <= device.mem_gb]
        weights = np.array([MODELS[i].weight for i in fits])
        cumulative = np.cumsum(weights / weights.sum())
        model = fits[min(int(np.searchsorted(cumulative, u, side="right")), len(fits) - 1)]
        decode, prefill = speeds(device, MODELS[model])
        out.append(Machine(index, model, decode, prefill))
    return out
