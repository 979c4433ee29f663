"""What a model file is: its kind, its GGUF header, its memory footprint, its digest.

**Footprints** are estimates, written to err high (override with ``memory_mb``):

- text (GGUF): ``(weights + KV cache) x 1.1 + 64 MiB``; weights are the file's size, the KV
  cache is read from the GGUF header: ``2 x layers x context x kv_heads x head_dim x 2 B``
  (f16 cache).  SmolLM2-135M at context 4096: ~266 MiB (measured RSS growth: ~242 MiB).
- image (diffusers): ``weights x 1.25 + 512 MiB``; weights are the tensors the pipeline
  will load (non-variant safetensors, else .bin, per component), counted at the dtype it
  loads them in (float16 on GPUs, float32 on the CPU) from the safetensors headers.  The
  extra covers activations and the VAE decode at the model's native size.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path
from typing import Any, Callable

from ..errors import ConfigError
from .base import file_digest

__all__ = ["MiB", "model_kind", "gguf_metadata", "estimate_footprint", "weight_variant",
           "folder_digest", "model_digest"]

MiB = 1 << 20
_SINGLE_FILE = (".safetensors", ".ckpt", ".pt", ".pth")


# -- what a model is --------------------------------------------------------------------------


def model_kind(path: Path) -> str:
    """``"text"`` for a GGUF file, ``"image"`` for a diffusers folder (``model_index.json``)
    or a single-file checkpoint.  Raises :class:`ConfigError` for anything else."""
    if path.is_dir():
        if (path / "model_index.json").is_file():
            return "image"
        raise ConfigError(f"{path} is a folder but not a diffusers pipeline (it has no "
                          "model_index.json); text models are single .gguf files")
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as exc:
        raise ConfigError(f"cannot read model {path}: {exc}") from None
    if magic == b"GGUF":
        return "text"
    if path.suffix.lower() == ".gguf":
        raise ConfigError(f"{path} is not a GGUF file (bad magic bytes)")
    if path.suffix.lower() in _SINGLE_FILE:
        return "image"
    raise ConfigError(f"{path}: unknown model format; use a .gguf file (text) or a "
                      "diffusers folder / .safetensors checkpoint (images)")


_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
                 10: "<Q", 11: "<q", 12: "<d"}


def gguf_metadata(path: Path, wanted: Callable[[str], bool] | None = None) -> dict[str, Any]:
    """The GGUF header's key/values (v2/v3), arrays as lists (string arrays skipped unless
    ``wanted``).  Raises ValueError on a malformed header."""
    with open(path, "rb") as f:
        def read(fmt: str) -> Any:
            size = struct.calcsize(fmt)
            data = f.read(size)
            if len(data) != size:
                raise ValueError("truncated GGUF header")
            return struct.unpack(fmt, data)[0]

        def string() -> str:
            n = read("<Q")
            if n > 1 << 24:
                raise ValueError("implausible string length in GGUF header")
            return f.read(n).decode("utf-8", errors="replace")

        def value(kind: int, keep: bool) -> Any:
            if kind in _GGUF_SCALARS:
                return read(_GGUF_SCALARS[kind])
            if kind == 8:
                return string()
            if kind == 9:
                item, count = read("<I"), read("<Q")
                if item in _GGUF_SCALARS and not keep:
                    f.seek(count * struct.calcsize(_GGUF_SCALARS[item]), 1)
                    return None
                items = [value(item, keep) for _ in range(count)]
                return items if keep else None
            raise ValueError(f"unknown GGUF value type {kind}")

        if f.read(4) != b"GGUF":
            raise ValueError("not a GGUF file")
        version = read("<I")
        if version < 2:
            raise ValueError(f"GGUF version {version} is too old")
        read("<Q")  # tensor count
        out: dict[str, Any] = {}
        for _ in range(read("<Q")):
            key = string()
            kind = read("<I")
            keep = wanted(key) if wanted else not key.startswith("tokenizer.")
            v = value(kind, keep)
            if keep:
                out[key] = v
        return out


def _kv_cache_bytes(path: Path, context: int) -> int:
    meta = gguf_metadata(path, wanted=lambda k: not k.startswith("tokenizer."))
    arch = meta.get("general.architecture", "llama")

    def num(key: str, default: int = 0) -> int:
        v = meta.get(f"{arch}.{key}", default)
        return int(max(v) if isinstance(v, list) and v else (v or default))

    layers, embd, heads = num("block_count"), num("embedding_length"), num("attention.head_count")
    kv_heads = num("attention.head_count_kv", heads)
    if not (layers and heads):
        return 0
    k_len = num("attention.key_length", embd // heads)
    v_len = num("attention.value_length", embd // heads)
    return layers * context * kv_heads * (k_len + v_len) * 2


def _safetensors_numel(path: Path) -> tuple[int, int]:
    """(float elements, bytes of non-float tensors) from a safetensors header."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > 100 * MiB:
            raise ValueError("implausible safetensors header")
        header = json.loads(f.read(n))
    floats = other = 0
    for name, t in header.items():
        if name == "__metadata__":
            continue
        numel = 1
        for dim in t["shape"]:
            numel *= dim
        if t["dtype"] in ("F16", "BF16", "F32", "F64"):
            floats += numel
        else:
            start, end = t["data_offsets"]
            other += end - start
    return floats, other


def _weight_files(folder: Path, variant: str | None = None) -> list[Path]:
    """The weight files ``DiffusionPipeline.from_pretrained`` loads from ``folder``."""
    components = [folder]
    try:
        index = json.loads((folder / "model_index.json").read_text())
        components = [folder / k for k, v in index.items()
                      if not k.startswith("_") and isinstance(v, list) and v[0]]
    except (OSError, ValueError):
        pass
    out: list[Path] = []
    for comp in components:
        if not comp.is_dir():
            continue
        files = [p for p in comp.iterdir() if p.is_file() and p.suffix in (".safetensors", ".bin")]

        def is_variant(p: Path) -> bool:
            stem = p.name[: -len(p.suffix)]
            return len(stem.split(".")) > 1  # name.fp16.safetensors

        chosen = [p for p in files if (variant and p.name.split(".")[-2:-1] == [variant])
                  or (not variant and not is_variant(p))]
        safes = [p for p in chosen if p.suffix == ".safetensors"]
        out += safes or chosen
    return out


def weight_variant(folder: Path) -> str | None:
    """``"fp16"`` when a diffusers folder only has fp16-variant weights, else None (the
    default weights)."""
    if _weight_files(folder) or not _weight_files(folder, "fp16"):
        return None
    return "fp16"


def _image_weights(path: Path, dtype_bytes: int) -> int:
    files = [path] if path.is_file() else _weight_files(path, weight_variant(path))
    total = 0
    for f in files:
        if f.suffix == ".safetensors":
            try:
                floats, other = _safetensors_numel(f)
                total += floats * dtype_bytes + other
                continue
            except (OSError, ValueError, KeyError, TypeError):
                pass
        total += f.stat().st_size
    return total


def estimate_footprint(path: Path, kind: str, *, context: int = 4096,
                       device: str = "cpu") -> int:
    """Estimated bytes a model needs on its device (see the module doc for the formulas)."""
    if kind == "text":
        weights = path.stat().st_size
        try:
            kv = _kv_cache_bytes(path, context)
        except (OSError, ValueError, KeyError, TypeError):
            kv = context * 256 * 1024  # unreadable header: ~a 7B model's f16 cache
        return int((weights + kv) * 1.1) + 64 * MiB
    dtype_bytes = 4 if device == "cpu" else 2
    return int(_image_weights(path, dtype_bytes) * 1.25) + 512 * MiB


def folder_digest(path: Path, cache_dir: Path | None = None) -> bytes:
    """sha256 over a folder's manifest: each regular file's relative path and sha256, in
    sorted order (hidden files and folders, e.g. a download's ``.cache``, are skipped)."""
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        rel = p.relative_to(path)
        if any(part.startswith(".") for part in rel.parts) or not p.is_file():
            continue
        h.update(rel.as_posix().encode() + b"\0" + file_digest(p, cache_dir) + b"\n")
    return h.digest()


def model_digest(path: Path, cache_dir: Path | None = None) -> bytes:
    return folder_digest(path, cache_dir) if path.is_dir() else file_digest(path, cache_dir)
