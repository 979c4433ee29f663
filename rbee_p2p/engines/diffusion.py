"""Image engines: diffusers pipelines (torch) and a scripted fake.

A :class:`DiffusionEngine` owns one pipeline on one torch device (``cpu``, ``cuda:N``,
``mps``); its calls are queued on its own :class:`ModelThread`, like the text engines', but
each one runs on a fresh OS thread that ends with the call.  Why (measured, 2-core CPU):
libgomp (torch's and llama.cpp's OpenMP, one runtime in the process) keeps a pool of worker
threads for every thread that ran a parallel region, until that thread exits; once torch's
pool exists, the process has more OpenMP threads than cores, libgomp drops its spin-wait
from ~3 ms to 100 spins, and llama.cpp's per-token hand-offs turn into sleeps and wake-ups:
text decoding fell from ~97 to ~37 tokens/s after one image, for good.  With a thread per
call the pool goes away with the call: ~97 tokens/s again after each image, and the image
itself is as fast (thread start-up is microseconds next to a denoising step).  Models are
local: a diffusers folder (``model_index.json``) loads with
``DiffusionPipeline.from_pretrained(folder, local_files_only=True)`` (the Hugging Face hub
is never contacted); a single-file checkpoint (``.safetensors``/``.ckpt``, SD 1.x/2.x or
SDXL) loads with ``from_single_file``, which needs its family's config files from the hub
once (then cached; offline, set ``HF_HUB_OFFLINE=1`` and they come from the cache only).

torch, diffusers and transformers are the optional ``images`` extra; without them the node
starts and reports images as unavailable (:func:`images_unavailable_reason`).

Image engines can sit in the same :class:`~rbee_p2p.engines.scheduler.Scheduler` as text
engines (a per-model FIFO with a bounded queue); text calls into them fail with a clear
400 and vice versa.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import os
import random
import struct
import threading
import zlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import outcome
import trio

from ..errors import EngineFailure, InvalidRequest
from .base import ImageRequest, ModelCard
from .modelthread import ModelThread

__all__ = [
    "ImageRequest",
    "ImageJob",
    "ImageResult",
    "ImageEngine",
    "DiffusionEngine",
    "ScriptedImageEngine",
    "images_unavailable_reason",
    "prepare_environment",
    "OPENAI_SIZES",
    "QUALITIES",
    "MAX_STEPS",
    "png_bytes",
]

log = logging.getLogger(__name__)

IMAGES_EXTRA = "pip install 'rbee-p2p[images]'"
OPENAI_SIZES = ("256x256", "512x512", "1024x1024", "1536x1024", "1024x1536", "1792x1024",
                "1024x1792")
QUALITIES = ("auto", "standard", "hd", "low", "medium", "high")
MAX_STEPS = 150
_QUALITY_FACTOR = {"low": 0.5, "auto": 1.0, "standard": 1.0, "medium": 1.0, "high": 1.5,
                   "hd": 1.5}


def prepare_environment(offline: bool) -> None:
    """Before torch/diffusers are imported (huggingface_hub reads these once, at import):
    no telemetry, and with only local folders to load, ``HF_HUB_OFFLINE=1`` so that
    nothing can reach the hub.  A value the user set is kept."""
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    if offline:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")


def images_unavailable_reason() -> str | None:
    """None if torch + diffusers + transformers import, else why not (blocking: importing
    them takes seconds)."""
    import importlib.util

    try:
        for module in ("torch", "diffusers", "transformers"):
            if importlib.util.find_spec(module) is None:
                return f"{module} is not installed ({IMAGES_EXTRA})"
    except (ImportError, ValueError) as exc:
        return f"{getattr(exc, 'name', None) or 'torch'} is not installed ({IMAGES_EXTRA})"
    try:
        import diffusers  # noqa: F401
        import torch  # noqa: F401
    except ImportError as exc:
        return f"cannot import {exc.name or 'torch'}: {exc} ({IMAGES_EXTRA})"
    except Exception as exc:  # a broken install must not stop a text node
        return f"torch/diffusers failed to import: {type(exc).__name__}: {exc}"
    return None


@dataclass(frozen=True)
class ImageJob:
    """A request resolved against one model: everything the pipeline call needs."""

    prompt: str
    n: int
    width: int
    height: int
    steps: int
    seed: int
    guidance: float | None = None
    negative_prompt: str | None = None


@dataclass
class ImageResult:
    images: list[bytes] = field(default_factory=list)  # PNG files


def png_bytes(width: int, height: int, rgb: tuple[int, int, int]) -> bytes:
    """A solid-colour PNG, written without PIL (for the fake engine)."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(
            ">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    row = b"\x00" + bytes(rgb) * width
    return (b"\x89PNG\r\n\x1a\n"
            + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(row * height, 6)) + chunk(b"IEND", b""))


class ImageEngine(ABC):
    """One loaded image model."""

    card: ModelCard
    native_size: tuple[int, int] = (512, 512)
    default_steps: int = 30
    default_guidance: float | None = None

    def sizes(self) -> list[str]:
        """The sizes this model accepts: OpenAI's and its own native one."""
        native = f"{self.native_size[0]}x{self.native_size[1]}"
        return sorted({*OPENAI_SIZES, native}, key=lambda s: tuple(map(int, s.split("x"))))

    def prepare(self, request: ImageRequest) -> ImageJob:
        """Resolve size and steps.  Raises :class:`InvalidRequest` (a size this model does
        not know).  Text requests never get here (Dispatcher.engine_for refuses them)."""
        if request.size in (None, "auto"):
            width, height = self.native_size
        else:
            if request.size not in self.sizes():
                raise InvalidRequest(
                    f"Invalid size '{request.size}' for model '{self.card.name}'. Supported "
                    f"sizes are {', '.join(self.sizes())} and auto.", param="size")
            width, height = map(int, request.size.split("x"))
        steps = request.steps or max(1, min(MAX_STEPS, round(
            self.default_steps * _QUALITY_FACTOR[request.quality or "auto"])))
        seed = request.seed if request.seed is not None else random.getrandbits(63)
        guidance = request.guidance if request.guidance is not None else self.default_guidance
        return ImageJob(prompt=request.prompt, n=request.n, width=width, height=height,
                        steps=steps, seed=seed, guidance=guidance,
                        negative_prompt=request.negative_prompt)

    @abstractmethod
    async def generate(self, job: ImageJob) -> ImageResult:
        """Run the job.  Cancel-safe: cancelling stops the pipeline at its next step and
        returns once the model is free.  Raises :class:`EngineFailure`."""

    async def aclose(self) -> None:
        """Release the model.  Idempotent."""


class ScriptedImageEngine(ImageEngine):
    """A fake image model: trio-native, virtual-time friendly, no torch.  Each step takes
    ``step_seconds``; images are solid colours derived from prompt and seed."""

    def __init__(self, name: str = "fake-image", *, native: int = 64, steps: int = 4,
                 step_seconds: float = 0.01, fail: bool = False,
                 aliases: tuple[str, ...] = (), device: str = "cpu") -> None:
        self.card = ModelCard(name=name, path=f"scripted:{name}",
                              digest=hashlib.sha256(name.encode()).digest(), modality="image",
                              aliases=aliases, device=device)
        self.native_size = (native, native)
        self.default_steps = steps
        self.step_seconds = step_seconds
        self.fail = fail
        self.jobs: list[ImageJob] = []
        self.steps_run = 0
        self.cancelled = 0

    async def generate(self, job: ImageJob) -> ImageResult:
        self.jobs.append(job)
        try:
            for _ in range(job.steps):
                await trio.sleep(self.step_seconds)
                self.steps_run += 1
        except trio.Cancelled:
            self.cancelled += 1
            raise
        if self.fail:
            raise EngineFailure("image generation failed: scripted failure")
        out = []
        for i in range(job.n):
            h = hashlib.sha256(f"{job.prompt}|{job.seed}|{i}".encode()).digest()
            out.append(png_bytes(job.width, job.height, (h[0], h[1], h[2])))
        return ImageResult(images=out)


class DiffusionEngine(ImageEngine):
    """One diffusers pipeline on its own model thread.  Build with :meth:`load`."""

    def __init__(self, card: ModelCard, pipe: Any, thread: ModelThread, torch_device: str,
                 steps: int | None, guidance: float | None) -> None:
        self.card = card
        self._pipe = pipe
        self._thread = thread
        self._torch_device = torch_device
        params = inspect.signature(pipe.__call__).parameters
        self._accepts = set(params)
        default = params.get("num_inference_steps")
        self.default_steps = steps or (default.default if default is not None and isinstance(
            default.default, int) else 30)
        self.default_guidance = guidance
        scale = int(getattr(pipe, "vae_scale_factor", 8) or 8)
        sample = getattr(pipe, "default_sample_size", None)
        denoiser = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
        if not sample and denoiser is not None:
            sample = getattr(denoiser.config, "sample_size", None)
        if isinstance(sample, (list, tuple)):
            sample = sample[0]
        native = int(sample) * scale if sample else 512
        self.native_size = (native, native)

    @classmethod
    async def load(cls, name: str, path: Path, digest: bytes, *, device: str = "cpu",
                   aliases: tuple[str, ...] = (), steps: int | None = None,
                   guidance: float | None = None, threads: int | None = None) -> DiffusionEngine:
        """Load the pipeline on a new model thread.  Raises :class:`EngineFailure`."""
        from .hardware import torch_device

        tdev = torch_device(device)
        thread = ModelThread(name)

        def construct() -> Any:
            import torch

            if threads:
                torch.set_num_threads(threads)
            dtype = torch.float32 if tdev == "cpu" else torch.float16
            pipe = _load_pipeline(path, dtype)
            pipe = pipe.to(tdev)
            pipe.set_progress_bar_config(disable=True)  # loading shows progress; steps do not
            return pipe

        try:
            pipe = await thread.call(lambda: _on_fresh_thread(construct))
        except Exception as exc:
            thread.close()
            raise EngineFailure(f"cannot load image model {name} from {path}: "
                                f"{type(exc).__name__}: {exc}") from exc
        size = path.stat().st_size if path.is_file() else sum(
            p.stat().st_size for p in path.rglob("*")
            if p.is_file() and not any(s.startswith(".") for s in p.relative_to(path).parts))
        card = ModelCard(name=name, path=str(path), digest=digest, modality="image",
                         size_bytes=size, aliases=aliases, device=device)
        return cls(card, pipe, thread, tdev, steps, guidance)

    def _run(self, job: ImageJob, cancel: threading.Event) -> ImageResult:
        """On the model thread."""
        import io

        import torch

        kwargs: dict[str, Any] = {"prompt": job.prompt, "num_inference_steps": job.steps,
                                  "height": job.height, "width": job.width,
                                  "num_images_per_prompt": job.n,
                                  # a CPU generator: the same seed gives the same image on
                                  # every device (diffusers moves the noise over)
                                  "generator": torch.Generator("cpu").manual_seed(job.seed)}
        if job.guidance is not None and "guidance_scale" in self._accepts:
            kwargs["guidance_scale"] = job.guidance
        if job.negative_prompt and "negative_prompt" in self._accepts:
            kwargs["negative_prompt"] = job.negative_prompt
        if "callback_on_step_end" in self._accepts:
            def on_step(pipe: Any, step: int, timestep: Any, tensors: dict[str, Any]) -> Any:
                if cancel.is_set():
                    pipe._interrupt = True  # diffusers' own interrupt flag
                return tensors

            kwargs["callback_on_step_end"] = on_step
        try:
            images = self._pipe(**kwargs).images
        finally:
            if self._torch_device.startswith("cuda") and cancel.is_set():
                torch.cuda.empty_cache()
        if cancel.is_set():
            return ImageResult()
        out = []
        for image in images:
            buf = io.BytesIO()
            image.save(buf, format="PNG", compress_level=3)
            out.append(buf.getvalue())
        return ImageResult(images=out)

    async def generate(self, job: ImageJob) -> ImageResult:
        cancel = threading.Event()
        token = trio.lowlevel.current_trio_token()
        done = trio.Event()
        box: list[outcome.Outcome[ImageResult]] = []

        def work() -> None:
            box.append(outcome.capture(_on_fresh_thread, lambda: self._run(job, cancel)))
            try:
                token.run_sync_soon(done.set)
            except trio.RunFinishedError:
                pass

        self._thread.submit(work)
        try:
            await done.wait()
        finally:
            if not done.is_set():  # cancelled: interrupt, and wait until the model is free
                cancel.set()
                with trio.move_on_after(60, shield=True):
                    await done.wait()
        try:
            return box[0].unwrap()
        except Exception as exc:  # the node keeps serving; this request fails
            log.exception("image generation failed on %s", self.card.name)
            raise EngineFailure(f"image generation failed: {type(exc).__name__}: {exc}") \
                from exc

    async def aclose(self) -> None:
        if self._pipe is None:
            return

        def release() -> None:
            device = self._torch_device
            self._pipe = None
            import gc

            gc.collect()
            if device.startswith("cuda"):
                import torch

                torch.cuda.empty_cache()

        try:
            await self._thread.call(release)
        finally:
            self._thread.close()


def _on_fresh_thread(fn: Callable[[], Any]) -> Any:
    """Run ``fn`` on a new OS thread, wait for it, return or raise its outcome.  The
    thread's OpenMP pool ends with it (see the module doc)."""
    box: list[outcome.Outcome[Any]] = []
    worker = threading.Thread(target=lambda: box.append(outcome.capture(fn)),
                              name=f"{threading.current_thread().name}:call", daemon=True)
    worker.start()
    worker.join()
    return box[0].unwrap()


def _load_pipeline(path: Path, dtype: Any) -> Any:
    """On the model thread: a folder with ``from_pretrained`` (local files only), a single
    file with ``from_single_file``."""
    from .footprint import weight_variant

    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    _quiet_transformers()
    if path.is_dir():
        from diffusers import DiffusionPipeline

        return DiffusionPipeline.from_pretrained(str(path), local_files_only=True,
                                                 variant=weight_variant(path),
                                                 **_dtype_arg(dtype))
    return _load_single_file(path, dtype)


def _quiet_transformers() -> None:
    """transformers warns about optional extras (torchvision, ...) that image generation
    does not use; keep its errors, drop that noise from the node's console."""
    try:
        import transformers

        transformers.logging.set_verbosity_error()
    except Exception:  # pragma: no cover - cosmetic only
        pass


def _dtype_arg(dtype: Any) -> dict[str, Any]:
    """diffusers renamed ``torch_dtype`` to ``dtype`` (0.36+); older ones only know the
    former."""
    try:
        from diffusers.utils import deprecation_utils

        if hasattr(deprecation_utils, "_resolve_dtype"):
            return {"dtype": dtype}
    except ImportError:
        pass
    return {"torch_dtype": dtype}


def _single_file_class(path: Path) -> Callable[..., Any]:
    import diffusers

    keys: list[str] = []
    if path.suffix.lower() == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
    if any(k.startswith("conditioner.embedders.1") for k in keys):
        return diffusers.StableDiffusionXLPipeline.from_single_file  # type: ignore[no-any-return]
    return diffusers.StableDiffusionPipeline.from_single_file  # type: ignore[no-any-return]


def _load_single_file(path: Path, dtype: Any) -> Any:
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    try:
        return _single_file_class(path)(str(path), local_files_only=offline, **_dtype_arg(dtype))
    except Exception as exc:
        raise RuntimeError(
            f"{exc}. Single-file checkpoints (SD 1.x/2.x, SDXL) need their family's config "
            "files from Hugging Face once; offline, use a diffusers folder instead "
            "(rbee-node pull REPO on a connected machine)") from exc
