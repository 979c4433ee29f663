"""Which models this node loads, on which device, and whether they fit: memory admission.

Every configured model gets a :class:`Placement`: its kind (text: a GGUF file; image: a
diffusers folder or a single-file checkpoint), the device it runs on (pinned in the config,
or chosen: ``auto``), and an estimated memory footprint.  Models are admitted in config
order; a model whose footprint does not fit what is left of its device's budget is not
loaded, and requests for it get a clear 503 (``model_unavailable``) instead of an
out-of-memory crash later.  Nothing is evicted or loaded on demand: what fits at start-up
stays loaded until the node stops.

**Budgets.** A device's budget is ``memory_budget_mb[device]`` when configured, else
``min(total x (1 - memory_headroom), free at start-up)``; for the CPU, total and free are
RAM (or the container's cgroup limit).  Metal shares RAM with the CPU on Apple machines:
the two budgets are kept apart, so leave headroom accordingly.

**Footprints** are estimates, written to err high (override with ``memory_mb``): see
footprint.py.

Loading and unloading are printed on the console and logged.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Iterable

import trio

from .footprint import MiB, estimate_footprint, model_digest, model_kind
from .hardware import Hardware, clip, device_infos, parse_device, probe, refresh

if TYPE_CHECKING:
    from ..config import ModelSpec, NodeConfig

__all__ = ["Placement", "Capacity", "plan", "budgets", "load_models"]

log = logging.getLogger(__name__)
_GPU_ORDER_TEXT = ("cuda", "rocm", "metal", "vulkan")
_GPU_ORDER_IMAGE = ("cuda", "rocm", "metal")


@dataclass(frozen=True)
class Placement:
    """Where one configured model goes, and whether it is loaded."""

    spec: ModelSpec
    kind: str  # "text" | "image"
    device: str  # resolved device id
    pinned: bool  # the config named the device (not "auto")
    footprint: int  # estimated bytes on ``device``
    gpu_layers: int = 0  # text: layers offloaded (-1: all)
    reason: str | None = None  # why it is not loaded; None: load it

    @property
    def name(self) -> str:
        return self.spec.name


def _fmt(n: int) -> str:
    return f"{n / (1 << 30):.1f} GiB" if n >= 1 << 30 else f"{n / MiB:.0f} MiB"


def _resolve(spec: ModelSpec, kind: str, hw: Hardware,
             images_reason: str | None) -> tuple[str, bool, int, str | None]:
    """(device, pinned, gpu_layers, reason-not-loaded)."""
    engine = "torch" if kind == "image" else "llama.cpp"
    requested = (spec.device or "auto").strip().lower()
    if kind == "image" and images_reason:
        return (requested if requested != "auto" else "cpu"), requested != "auto", 0, \
            images_reason
    if requested == "auto":
        if kind == "image":
            dev = hw.first("torch", _GPU_ORDER_IMAGE)
            return (dev.id if dev else "cpu"), False, 0, None
        dev = hw.first("llama.cpp", _GPU_ORDER_TEXT) if spec.gpu_layers else None
        return (dev.id if dev else "cpu"), False, (spec.gpu_layers if dev else 0), None
    backend, index = parse_device(requested)
    device_id = "cpu" if backend == "cpu" else f"{backend}:{index}"
    if backend == "cpu":
        return "cpu", True, 0, None
    found = hw.device(device_id)
    if found is None or engine not in found.engines:
        seen = ", ".join(d.id for d in hw.devices if engine in d.engines or d.id == "cpu")
        why = "no such device" if found is None else f"{engine} cannot use it"
        return device_id, True, 0, (f"pinned to {device_id}, but {why} here (devices "
                                    f"{engine} can use: {seen})")
    return device_id, True, (spec.gpu_layers or -1) if kind == "text" else 0, None


def budgets(hw: Hardware, headroom: float, overrides: dict[str, int] | None = None
            ) -> dict[str, int]:
    """Bytes each device may hold (see the module doc).  ``overrides`` are in MiB."""
    overrides = overrides or {}
    out = {}
    for d in hw.devices:
        if d.id in overrides:
            out[d.id] = int(overrides[d.id]) * MiB
        else:
            out[d.id] = max(0, min(int(d.mem_total * (1 - headroom)), d.mem_free))
    return out


def plan(specs: Iterable[ModelSpec], kinds: Iterable[str], hw: Hardware,
         limits: dict[str, int], images_reason: str | None = None,
         footprint: Callable[[ModelSpec, str, str], int] | None = None) -> list[Placement]:
    """Place and admit models in order (pure but for reading model headers)."""
    def default_footprint(spec: ModelSpec, kind: str, device: str) -> int:
        return estimate_footprint(spec.path, kind, context=spec.context, device=device)

    footprint = footprint or default_footprint
    used: dict[str, int] = {}
    holders: dict[str, list[str]] = {}
    out = []
    for spec, kind in zip(specs, kinds):
        device, pinned, layers, reason = _resolve(spec, kind, hw, images_reason)
        need = spec.memory_mb * MiB if spec.memory_mb else footprint(spec, kind, device)
        if reason is None:
            budget = limits.get(device, 0)
            have = used.get(device, 0)
            if have + need > budget:
                held = f" (in use: {', '.join(holders[device])})" if holders.get(device) else ""
                reason = (f"needs ~{_fmt(need)} on {device}, but only {_fmt(max(0, budget - have))}"
                          f" of its {_fmt(budget)} budget is left{held}; raise "
                          f"memory_budget_mb or memory_headroom, or pin it to another device")
            else:
                used[device] = have + need
                holders.setdefault(device, []).append(spec.name)
        out.append(Placement(spec, kind, device, pinned, need, layers, reason))
    return out


# -- the running node's view --------------------------------------------------------------------


@dataclass
class Capacity:
    """Devices, budgets, what is loaded where, and the per-device limiters."""

    hardware: Hardware
    limits: dict[str, int]
    placements: list[Placement] = field(default_factory=list)
    images_reason: str | None = None  # why images are unavailable, if they are
    loaded: set[str] = field(default_factory=set)
    _limiters: dict[tuple[str, str], trio.CapacityLimiter] = field(default_factory=dict)
    _refreshed: float = 0.0
    _watched: bool = False  # watch_devices keeps the hardware current, off the loop

    @property
    def unavailable(self) -> dict[str, str]:
        """Served name (and alias) -> why that configured model is not loaded."""
        out = {}
        for p in self.placements:
            if p.reason and p.name not in self.loaded:
                for name in (p.name, *p.spec.aliases):
                    out[name] = f"model '{p.name}' is not loaded on this node: {p.reason}"
        return out

    def placement(self, name: str) -> Placement | None:
        return next((p for p in self.placements if p.name == name), None)

    def limiter(self, device: str, modality: str) -> trio.CapacityLimiter:
        """One job at a time per (device, modality): an image job never waits for text on
        the same device, nor text for an image (the text scheduler's per-model queues sit
        in front of text).  Created lazily inside the trio run."""
        key = (device, modality)
        if key not in self._limiters:
            self._limiters[key] = trio.CapacityLimiter(1)
        return self._limiters[key]

    def used(self, device: str) -> int:
        return sum(p.footprint for p in self.placements
                   if p.device == device and p.name in self.loaded)

    async def watch_devices(self, interval_s: float = 30.0,
                            reprobe: Callable[[Hardware], Hardware] = refresh, *,
                            task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                            ) -> None:
        """Re-probe the devices' free memory every ``interval_s`` in a worker thread (the
        probe blocks: NVML, ggml, psutil), so the adverts carry current numbers without
        stalling the event loop.  Runs until cancelled (cancel-safe: a probe in flight
        finishes in its thread and is discarded); ``reprobe`` never raises (see
        :func:`refresh`)."""
        self._watched = True
        task_status.started()
        while True:
            await trio.sleep(interval_s)
            self.hardware = await trio.to_thread.run_sync(reprobe, self.hardware,
                                                          abandon_on_cancel=True)

    def current_device_infos(self) -> tuple[Any, ...]:
        """The advert's devices as last probed (never probes)."""
        return device_infos(self.hardware)

    def _fresh(self) -> Hardware:
        if self._watched:
            return self.hardware  # kept current off the loop
        now = time.monotonic()
        if now - self._refreshed > 1.0:
            self.hardware = refresh(self.hardware)
            self._refreshed = now
        return self.hardware

    def status(self) -> dict[str, Any]:
        """``devices`` (probe + budget + what is loaded), ``unavailable``, ``images``."""
        hw = self._fresh()
        devices = []
        for d in hw.devices:
            models = [p.name for p in self.placements if p.device == d.id and p.name in
                      self.loaded]
            devices.append({**d.as_dict(), "budget": self.limits.get(d.id, 0),
                            "used": self.used(d.id), "models": models})
        unavailable = [{"name": p.name, "kind": p.kind, "device": p.device,
                        "footprint": p.footprint, "reason": p.reason}
                       for p in self.placements if p.reason and p.name not in self.loaded]
        return {"devices": devices, "backends": hw.backends, "unavailable": unavailable,
                "images": {"available": self.images_reason is None,
                           "reason": self.images_reason}}

    def model_infos(self, engines: Iterable[Any]) -> tuple[Any, ...]:
        """``protocol.messages.ModelInfo`` values for the advert; ``device`` is set for
        models the config pins to a device (routing must run them there, nowhere else)."""
        from ..protocol.messages import ModelInfo

        out = []
        for e in engines:
            card, p = e.card, self.placement(e.card.name)
            out.append(ModelInfo(name=clip(card.name, 128), digest=card.digest,
                                 modality=card.modality, context=card.context,
                                 size_bytes=card.size_bytes,
                                 device=clip(card.device, 32) if p and p.pinned else None))
        return tuple(out)[:64]

    @classmethod
    def for_engines(cls, engines: Iterable[Any], config: NodeConfig,
                    hardware: Hardware | None = None) -> Capacity:
        """A view for engines built outside :func:`load_models` (tests, embedding)."""
        hw = hardware or probe()
        cap = cls(hw, budgets(hw, config.memory_headroom, dict(config.memory_budget_mb)))
        from ..config import ModelSpec

        for e in engines:
            spec = ModelSpec(name=e.card.name, path=Path(e.card.path),
                             aliases=tuple(e.card.aliases), device=e.card.device)
            cap.placements.append(Placement(spec, e.card.modality, e.card.device, False,
                                            e.card.size_bytes))
            cap.loaded.add(e.card.name)
        return cap

    async def unload(self, engine: Any) -> None:
        """Close one engine (shielded) and say so."""
        name = engine.card.name
        with trio.CancelScope(shield=True):
            try:
                await engine.aclose()
            finally:
                self.loaded.discard(name)
                p = self.placement(name)
                where = f" from {p.device} (freed ~{_fmt(p.footprint)})" if p else ""
                log.info("unloaded model %s%s", name, where)
                print(f"unloaded model {name}{where}", flush=True)


Loader = Callable[[Placement, bytes, "NodeConfig"], Awaitable[Any]]


async def _default_loader(p: Placement, digest: bytes, config: NodeConfig) -> Any:
    spec = p.spec
    if p.kind == "image":
        from .diffusion import DiffusionEngine

        return await DiffusionEngine.load(spec.name, spec.path, digest, device=p.device,
                                          aliases=spec.aliases, steps=spec.steps,
                                          guidance=spec.guidance, threads=spec.threads)
    from .llama import LlamaEngine, LlamaSettings

    backend, index = parse_device(p.device)
    settings = LlamaSettings(context=spec.context, threads=spec.threads,
                             gpu_layers=p.gpu_layers, main_gpu=index,
                             split_mode=None if backend == "cpu" else 0)
    return await LlamaEngine.load(spec.name, spec.path, digest, settings,
                                  aliases=spec.aliases, device=p.device)


async def load_models(config: NodeConfig, *, hardware: Hardware | None = None,
                      loader: Loader | None = None) -> tuple[list[Any], Capacity]:
    """Probe, place, admit and load every configured model (once; they stay loaded).

    Prints progress on the console.  Models that do not fit, or whose engine is not
    installed, are reported and skipped (the node still starts).  Raises
    :class:`ConfigError` for unusable model paths and ``EngineFailure`` when an admitted
    model fails to load (engines loaded so far are closed first).
    """
    from .diffusion import images_unavailable_reason, prepare_environment

    specs = config.served_models()
    kinds = [model_kind(s.path) for s in specs]
    images_reason = None
    if "image" in kinds:
        prepare_environment(offline=all(s.path.is_dir() for s, k in zip(specs, kinds)
                                        if k == "image"))
        images_reason = await trio.to_thread.run_sync(images_unavailable_reason)
        if images_reason:
            print(f"images are unavailable on this node: {images_reason}", flush=True)
    if hardware is None:
        hardware = await trio.to_thread.run_sync(
            probe, "image" in kinds and images_reason is None)
    limits = budgets(hardware, config.memory_headroom, dict(config.memory_budget_mb))
    placements = await trio.to_thread.run_sync(
        lambda: plan(specs, kinds, hardware, limits, images_reason))
    capacity = Capacity(hardware, limits, placements, images_reason)
    loader = loader or _default_loader
    engines: list[Any] = []
    try:
        for p in placements:
            if p.reason:
                log.warning("not loading model %s: %s", p.name, p.reason)
                print(f"not loading model {p.name}: {p.reason}", flush=True)
                continue
            started = time.perf_counter()
            print(f"loading model {p.name} ({p.kind}, ~{_fmt(p.footprint)} on {p.device}"
                  f"{', pinned' if p.pinned else ''}) from {p.spec.path} ...", flush=True)
            digest = await trio.to_thread.run_sync(model_digest, p.spec.path,
                                                   config.home / "cache")
            engine = await loader(p, digest, config)
            engines.append(engine)
            capacity.loaded.add(p.name)
            extra = f", context {engine.card.context}" if p.kind == "text" else ""
            msg = (f"loaded model {p.name} on {p.device} ({engine.card.size_bytes / 1e6:.0f} MB"
                   f"{extra}) in {time.perf_counter() - started:.1f}s")
            log.info("%s", msg)
            print(msg, flush=True)
    except BaseException:
        for engine in engines:
            await capacity.unload(engine)
        raise
    return engines, capacity
