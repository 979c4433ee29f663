"""What this machine can run on: an honest hardware probe.

Devices are named the same way everywhere (config pins, status, capability adverts):
``cpu``, ``cuda:N``, ``metal:N``, ``rocm:N``, ``vulkan:N``.  ``N`` follows the order the
engines themselves use (CUDA's device order, as llama.cpp and torch see it).

Sources, each optional and each failing soft (a missing or broken library is reported in
``Hardware.backends`` and the probe goes on):

- **psutil** (and the cgroup limit, in a container): the CPU, its cores, RAM total/available;
- **llama.cpp**: ``llama_supports_gpu_offload()`` and ggml's backend device list with
  free/total memory (read through ctypes from the ggml libraries llama-cpp-python ships);
- **torch**: ``torch.cuda`` (``mem_get_info``) and ``torch.backends.mps``.  torch is only
  probed when asked (``use_torch=True``) or already imported: importing it costs ~1 s and
  ~200 MiB of RSS, so a text-only node does not pay for it;
- **NVML** (``pynvml``, from ``nvidia-ml-py``) when installed: the most accurate free/total
  memory for NVIDIA GPUs, and it creates no CUDA context.

A device lists the ``engines`` that can use it ("llama.cpp", "torch").  A GPU only NVML
sees (llama.cpp built without CUDA, torch not in use) is shown by ``status`` but not
advertised: nothing on this node could run on it.

The merge of what the sources saw (:func:`merge`) is pure, so it is tested with fakes.
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform
import re
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable

__all__ = [
    "Device",
    "Hardware",
    "RawDevice",
    "CpuInfo",
    "probe",
    "merge",
    "device_infos",
    "torch_device",
    "parse_device",
    "clip",
    "BACKENDS",
]

log = logging.getLogger(__name__)

BACKENDS = ("cpu", "cuda", "metal", "rocm", "vulkan")
_DEVICE_RE = re.compile(r"^(cpu|(cuda|metal|rocm|vulkan):(\d+))$")


def parse_device(text: str) -> tuple[str, int]:
    """``"cuda:1"`` -> ``("cuda", 1)``; ``"cpu"`` -> ``("cpu", 0)``; ``"mps"`` is
    ``metal:0``.  Raises ValueError for anything else."""
    text = text.strip().lower()
    if text == "mps":
        return "metal", 0
    if text == "cuda":
        return "cuda", 0
    m = _DEVICE_RE.match(text)
    if not m:
        raise ValueError(f"unknown device {text!r}; use auto, cpu, cuda:N, metal:0 (mps), "
                         "rocm:N or vulkan:N")
    return (m.group(2), int(m.group(3))) if m.group(2) else ("cpu", 0)


def torch_device(device_id: str) -> str:
    """The torch device string for one of our device ids (``metal:0`` -> ``mps``,
    ``rocm:N`` -> ``cuda:N``, as ROCm builds of torch name them)."""
    backend, index = parse_device(device_id)
    return {"cpu": "cpu", "metal": "mps"}.get(backend, f"cuda:{index}")


@dataclass(frozen=True)
class RawDevice:
    """One device as one source saw it."""

    backend: str
    index: int
    name: str
    mem_total: int
    mem_free: int
    pci: str | None = None  # PCI bus id, normalised "dddd:bb:dd.f", to match across sources


@dataclass(frozen=True)
class CpuInfo:
    name: str
    cores: int
    mem_total: int
    mem_free: int


@dataclass(frozen=True)
class Device:
    id: str  # "cpu", "cuda:0", "metal:0", ...
    backend: str  # one of BACKENDS
    name: str
    mem_total: int  # bytes (RAM for cpu; for metal, the GPU's working-set limit)
    mem_free: int
    sources: tuple[str, ...] = ()  # which probes saw it: psutil, llama.cpp, torch, nvml
    engines: tuple[str, ...] = ()  # which engines can use it: llama.cpp, torch
    cores: int = 0  # cpu only

    def as_dict(self) -> dict[str, Any]:
        out = {"id": self.id, "backend": self.backend, "name": self.name,
               "mem_total": self.mem_total, "mem_free": self.mem_free,
               "sources": list(self.sources), "engines": list(self.engines)}
        if self.backend == "cpu":
            out["cores"] = self.cores
        return out


@dataclass
class Hardware:
    devices: list[Device]
    backends: dict[str, Any] = field(default_factory=dict)  # what each source said

    def device(self, device_id: str) -> Device | None:
        return next((d for d in self.devices if d.id == device_id), None)

    def first(self, engine: str, backends: Iterable[str]) -> Device | None:
        """The first device ``engine`` can use among ``backends``, in that order."""
        for backend in backends:
            for d in self.devices:
                if d.backend == backend and engine in d.engines:
                    return d
        return None

    def as_dict(self) -> dict[str, Any]:
        return {"devices": [d.as_dict() for d in self.devices], "backends": self.backends}


# -- sources -------------------------------------------------------------------------------


def _cgroup_limit() -> tuple[int, int] | None:
    """(limit, usage) of this process's cgroup memory, when one is set."""
    for limit_file, usage_file in (("memory.max", "memory.current"),
                                   ("memory/memory.limit_in_bytes",
                                    "memory/memory.usage_in_bytes")):
        try:
            raw = (Path("/sys/fs/cgroup") / limit_file).read_text().strip()
            if raw == "max":
                return None
            limit = int(raw)
            usage = int((Path("/sys/fs/cgroup") / usage_file).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit < 1 << 60:  # v1 reports "no limit" as a huge number
            return limit, usage
    return None


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    if sys.platform == "darwin":
        try:
            import subprocess

            return subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"],
                                  capture_output=True, text=True, timeout=2).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    return platform.processor() or platform.machine() or "cpu"


def probe_cpu() -> CpuInfo:
    try:
        import psutil

        vm = psutil.virtual_memory()
        total, free = int(vm.total), int(vm.available)
    except ImportError:
        pages = os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else 0
        total = free = int(pages * os.sysconf("SC_PAGE_SIZE")) if pages else 0
    limit = _cgroup_limit()
    if limit and limit[0] < total:
        total, free = limit[0], min(free, max(0, limit[0] - limit[1]))
    return CpuInfo(name=_cpu_name(), cores=_cores(), mem_total=total, mem_free=free)


_GGML_BACKENDS = {"cuda": "cuda", "metal": "metal", "mtl": "metal", "rocm": "rocm",
                  "hip": "rocm", "vulkan": "vulkan"}


def _ggml_libs() -> tuple[Any, Any]:
    import llama_cpp

    lib_dir = Path(llama_cpp.__file__).parent / "lib"
    from llama_cpp import _ggml  # loads libggml (the registry) the way llama-cpp-python does

    libggml = _ggml.libggml
    base = None
    for name in ("libggml-base.so", "libggml-base.dylib", "ggml-base.dll"):
        if (lib_dir / name).exists():
            base = ctypes.CDLL(str(lib_dir / name))
            break
    if base is None:  # statically linked into libggml
        base = libggml
    c_p, c_s = ctypes.c_void_p, ctypes.c_size_t
    libggml.ggml_backend_dev_count.restype = c_s
    libggml.ggml_backend_dev_get.restype, libggml.ggml_backend_dev_get.argtypes = c_p, [c_s]
    for fn in ("ggml_backend_dev_name", "ggml_backend_dev_description"):
        getattr(base, fn).restype, getattr(base, fn).argtypes = ctypes.c_char_p, [c_p]
    base.ggml_backend_dev_type.restype, base.ggml_backend_dev_type.argtypes = ctypes.c_int, [c_p]
    base.ggml_backend_dev_memory.argtypes = [c_p, ctypes.POINTER(c_s), ctypes.POINTER(c_s)]
    base.ggml_backend_dev_backend_reg.restype = c_p
    base.ggml_backend_dev_backend_reg.argtypes = [c_p]
    base.ggml_backend_reg_name.restype, base.ggml_backend_reg_name.argtypes = ctypes.c_char_p, [c_p]
    return libggml, base


def probe_llama() -> tuple[dict[str, Any], list[RawDevice]]:
    """llama.cpp's view: GPU offload support and ggml's devices (GPUs only; the CPU is
    psutil's)."""
    import llama_cpp

    info: dict[str, Any] = {"gpu_offload": bool(llama_cpp.llama_supports_gpu_offload()),
                            "devices": []}
    raw: list[RawDevice] = []
    libggml, base = _ggml_libs()
    counters: dict[str, int] = {}
    for i in range(int(libggml.ggml_backend_dev_count())):
        dev = libggml.ggml_backend_dev_get(i)
        name = (base.ggml_backend_dev_name(dev) or b"").decode(errors="replace")
        desc = (base.ggml_backend_dev_description(dev) or b"").decode(errors="replace")
        kind = ("cpu", "gpu", "igpu", "accel", "meta")[min(base.ggml_backend_dev_type(dev), 4)]
        reg = (base.ggml_backend_reg_name(base.ggml_backend_dev_backend_reg(dev))
               or b"").decode(errors="replace")
        free, total = ctypes.c_size_t(), ctypes.c_size_t()
        base.ggml_backend_dev_memory(dev, ctypes.byref(free), ctypes.byref(total))
        info["devices"].append({"name": name, "description": desc, "type": kind,
                                "backend": reg, "mem_free": free.value,
                                "mem_total": total.value})
        backend = _GGML_BACKENDS.get(reg.lower())
        if kind in ("gpu", "igpu") and backend:
            index = counters.get(backend, 0)
            counters[backend] = index + 1
            raw.append(RawDevice(backend, index, desc or name, total.value, free.value))
    return info, raw


def probe_torch() -> tuple[dict[str, Any], list[RawDevice]]:
    """torch's view: CUDA/ROCm devices (``mem_get_info``) and Apple's MPS."""
    import torch

    hip = bool(getattr(torch.version, "hip", None))
    info: dict[str, Any] = {"version": torch.__version__, "cuda": torch.cuda.is_available(),
                            "mps": bool(getattr(torch.backends, "mps", None)
                                        and torch.backends.mps.is_available())}
    raw: list[RawDevice] = []
    if info["cuda"]:
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            try:
                free, total = torch.cuda.mem_get_info(i)
            except RuntimeError:
                free, total = 0, int(props.total_memory)
            pci = None
            if hasattr(props, "pci_bus_id"):
                pci = f"{getattr(props, 'pci_domain_id', 0):04x}:{props.pci_bus_id:02x}:" \
                      f"{getattr(props, 'pci_device_id', 0):02x}.0"
            raw.append(RawDevice("rocm" if hip else "cuda", i, props.name, int(total),
                                 int(free), pci))
    if info["mps"]:
        total = int(torch.mps.recommended_max_memory()) if hasattr(
            torch.mps, "recommended_max_memory") else probe_cpu().mem_total
        used = int(torch.mps.driver_allocated_memory()) if hasattr(
            torch.mps, "driver_allocated_memory") else 0
        raw.append(RawDevice("metal", 0, f"Apple {platform.machine()} GPU (MPS)", total,
                             max(0, total - used)))
    return info, raw


def _norm_pci(text: str) -> str:
    """"00000000:65:00.0" (NVML) and "0000:65:00.0" (ggml) -> "0000:65:00.0"."""
    parts = text.lower().replace(".", ":").split(":")
    try:
        nums = [int(p, 16) for p in parts]
    except ValueError:
        return text.lower()
    if len(nums) == 3:
        nums = [0, *nums]
    return f"{nums[0]:04x}:{nums[1]:02x}:{nums[2]:02x}.{nums[3] if len(nums) > 3 else 0}"


def probe_nvml() -> tuple[dict[str, Any], list[RawDevice]]:
    import pynvml

    pynvml.nvmlInit()
    try:
        raw = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = pynvml.nvmlDeviceGetName(h)
            mem = pynvml.nvmlDeviceGetMemoryInfo(h)
            bus = pynvml.nvmlDeviceGetPciInfo(h).busId
            raw.append(RawDevice(
                "cuda", i, name.decode() if isinstance(name, bytes) else str(name),
                int(mem.total), int(mem.free),
                _norm_pci(bus.decode() if isinstance(bus, bytes) else str(bus))))
        driver = pynvml.nvmlSystemGetDriverVersion()
        info = {"driver": driver.decode() if isinstance(driver, bytes) else str(driver),
                "devices": len(raw)}
        return info, raw
    finally:
        pynvml.nvmlShutdown()


# -- merging -------------------------------------------------------------------------------


def merge(cpu: CpuInfo, *, llama: list[RawDevice] | None = None,
          torch: list[RawDevice] | None = None, nvml: list[RawDevice] | None = None,
          backends: dict[str, Any] | None = None) -> Hardware:
    """Combine what the sources saw into one device list (pure).

    GPUs are numbered in the engines' order (torch's, else llama.cpp's).  NVML devices are
    matched to them by PCI bus id when both know it (NVML counts in PCI order and ignores
    ``CUDA_VISIBLE_DEVICES``), else by position; NVML's memory figures win when matched.
    """
    cpu_engines = tuple(e for e, present in (("llama.cpp", llama is not None),
                                             ("torch", torch is not None)) if present)
    devices: dict[str, Device] = {"cpu": Device(
        "cpu", "cpu", cpu.name, cpu.mem_total, cpu.mem_free, ("psutil",), cpu_engines,
        cpu.cores)}
    for source, engine, found in (("torch", "torch", torch), ("llama.cpp", "llama.cpp", llama)):
        for raw in found or ():
            did = f"{raw.backend}:{raw.index}"
            old = devices.get(did)
            if old is None:
                devices[did] = Device(did, raw.backend, raw.name, raw.mem_total, raw.mem_free,
                                      (source,), (engine,))
            else:
                devices[did] = replace(old, sources=(*old.sources, source),
                                       engines=(*old.engines, engine))
    pci_of = {f"cuda:{r.index}": r.pci for r in (torch or []) if r.pci and r.backend == "cuda"}
    cuda = [d for d in devices.values() if d.backend == "cuda"]
    for pos, raw in enumerate(nvml or ()):
        match = None
        if raw.pci and pci_of:
            match = next((d for d in cuda if pci_of.get(d.id) == raw.pci), None)
        elif not pci_of and pos < len(cuda) and len(cuda) == len(nvml or ()):
            match = cuda[pos]
        if match is not None:
            devices[match.id] = replace(match, name=raw.name, mem_total=raw.mem_total,
                                        mem_free=raw.mem_free,
                                        sources=(*match.sources, "nvml"))
        elif not cuda:  # seen by NVML only: no engine here can use it
            did = f"cuda:{raw.index}"
            devices.setdefault(did, Device(did, "cuda", raw.name, raw.mem_total, raw.mem_free,
                                           ("nvml",), ()))
    order = {b: i for i, b in enumerate(BACKENDS)}
    listed = sorted(devices.values(),
                    key=lambda d: (order.get(d.backend, 9), parse_device(d.id)[1]))
    return Hardware(devices=listed, backends=dict(backends or {}))


def probe(use_torch: bool | None = None) -> Hardware:
    """Probe every source (blocking: call it from a worker thread in async code).

    ``use_torch``: None probes torch only if it is already imported (see the module doc).
    Never raises: a failing source is recorded in ``backends[name]["error"]``.
    """
    backends: dict[str, Any] = {}
    cpu = probe_cpu()
    backends["psutil"] = {"cores": cpu.cores, "mem_total": cpu.mem_total}
    found: dict[str, list[RawDevice] | None] = {"llama": None, "torch": None, "nvml": None}
    if use_torch is None:
        use_torch = "torch" in sys.modules
    for key, name, fn, wanted in (("llama", "llama.cpp", probe_llama, True),
                                  ("torch", "torch", probe_torch, use_torch),
                                  ("nvml", "nvml", probe_nvml, True)):
        if not wanted:
            backends[name] = {"probed": False}
            continue
        try:
            info, raw = fn()
        except ImportError as exc:
            backends[name] = {"available": False, "error": f"not installed ({exc.name})"}
            continue
        except Exception as exc:  # a broken driver must not stop the node
            log.info("hardware probe: %s failed: %s", name, exc)
            backends[name] = {"available": False, "error": f"{type(exc).__name__}: {exc}"}
            continue
        backends[name] = {"available": True, **info}
        found[key] = raw
    return merge(cpu, llama=found["llama"], torch=found["torch"], nvml=found["nvml"],
                 backends=backends)


def refresh(hw: Hardware) -> Hardware:
    """The same devices with current free memory (cheap sources only: psutil, NVML, and
    torch/ggml if they were probed).  Never raises."""
    try:
        fresh = probe(use_torch="torch" in sys.modules and hw.backends.get("torch", {}).get(
            "available", False))
    except Exception:  # pragma: no cover - probe() does not raise; belt and braces
        return hw
    free = {d.id: d.mem_free for d in fresh.devices}
    return Hardware([replace(d, mem_free=free.get(d.id, d.mem_free)) for d in hw.devices],
                    hw.backends)


def clip(text: str, limit: int) -> str:
    """At most ``limit`` UTF-8 bytes (the protocol's MaxLen counts bytes), whole chars."""
    return text.encode()[:limit].decode(errors="ignore")


def device_infos(hw: Hardware) -> tuple[Any, ...]:
    """The capability advert's devices (``protocol.messages.DeviceInfo``): the CPU and every
    device an engine here can use."""
    from ..protocol.messages import DeviceInfo

    return tuple(DeviceInfo(id=clip(d.id, 32), backend=d.backend, name=clip(d.name, 128),
                            mem_total=max(0, d.mem_total), mem_free=max(0, d.mem_free))
                 for d in hw.devices if d.engines or d.backend == "cpu")[:16]
