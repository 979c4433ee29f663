"""``rbee-node pull`` (models from Hugging Face) and ``rbee-node devices`` (the local probe).

``pull REPO`` downloads what a node needs from a Hugging Face repo into
``$RBEE_HOME/models/<owner>--<name>`` (or ``--dir``) with huggingface_hub's progress bars;
an interrupted pull resumes where it stopped (partial files are kept and continued).
For a diffusers repo (``model_index.json``) it takes the configs, tokenizers and one set of
weights (safetensors, without variants, unless ``--variant fp16``); for a GGUF repo the one
``.gguf`` file (or those ``--include`` names).  Offline it fails at once: it first checks
that the hub (``$HF_ENDPOINT``, default https://huggingface.co) answers a TCP connect within
``--timeout`` seconds, and refuses when ``HF_HUB_OFFLINE`` is set.

Top-level imports stay light: the CLI imports this module for every command.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import socket
import sys
from pathlib import Path
from typing import Any, Iterable
from urllib.parse import urlsplit

__all__ = ["add_commands", "select_files", "check_online", "cmd_pull", "cmd_devices",
           "status_lines"]

DEFAULT_ENDPOINT = "https://huggingface.co"
_KEEP = ("*.json", "*.txt", "*.model", "*.tiktoken")  # configs, vocabularies, merges
_SKIP_DIRS = ("safety_checker/", "feature_extractor/")  # not needed to generate images


class PullError(Exception):
    pass


def check_online(endpoint: str, timeout: float) -> None:
    """Raise :class:`PullError` unless ``endpoint`` accepts a TCP connection within
    ``timeout`` seconds (or ``HF_HUB_OFFLINE`` is set)."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise PullError("HF_HUB_OFFLINE is set: pulling needs the network.  Unset it, or copy "
                        "a model to this machine and serve it with --model PATH")
    url = urlsplit(endpoint)
    host = url.hostname or ""
    port = url.port or (443 if url.scheme == "https" else 80)
    import threading

    # name resolution has no timeout of its own (an offline resolver may retry for long):
    # resolve on a daemon thread, so that a hung lookup cannot delay the exit either
    found: list[Any] = []

    def resolve() -> None:
        try:
            found.append(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM))
        except OSError as exc:
            found.append(exc)

    worker = threading.Thread(target=resolve, daemon=True)
    worker.start()
    worker.join(timeout)
    offline = ("pulling needs the network.  Offline, copy a diffusers folder or a .gguf file "
               "to this machine and serve it with --model PATH")
    try:
        if not found:
            raise PullError(f"cannot resolve {host} within {timeout:g} s: {offline}")
        if isinstance(found[0], OSError):
            raise found[0]
        with socket.create_connection(found[0][0][4][:2], timeout=timeout):
            pass
    except OSError as exc:
        raise PullError(f"cannot reach {endpoint} ({exc.strerror or exc}): {offline}") \
            from None


def select_files(files: Iterable[str], include: Iterable[str] = (),
                 variant: str | None = None) -> list[str]:
    """Which of a repo's files a node needs (see the module doc).  Raises PullError."""
    files = sorted(files)
    include = list(include)
    if include:
        chosen = [f for f in files if any(fnmatch.fnmatch(f, p) for p in include)]
        if not chosen:
            raise PullError(f"no file matches {', '.join(include)}")
        return chosen
    if "model_index.json" in files:
        keep = [f for f in files if any(fnmatch.fnmatch(f, p) for p in _KEEP)
                and not f.startswith(_SKIP_DIRS)]
        weights: list[str] = []
        folders = sorted({f.split("/")[0] for f in files if "/" in f})
        for folder in folders:
            if f"{folder}/" in _SKIP_DIRS:
                continue
            mine = [f for f in files if f.startswith(folder + "/") and f.count("/") == 1
                    and f.endswith((".safetensors", ".bin"))]

            def variant_of(f: str) -> str | None:
                parts = f.rsplit("/", 1)[1].split(".")
                return parts[-2] if len(parts) > 2 else None

            for ext in (".safetensors", ".bin"):
                picked = [f for f in mine if f.endswith(ext) and variant_of(f) == variant]
                if not picked and variant is None:  # only variants there: take fp16
                    picked = [f for f in mine if f.endswith(ext) and variant_of(f) == "fp16"]
                if picked:
                    weights += picked
                    break
        return sorted(set(keep + weights))
    ggufs = [f for f in files if f.endswith(".gguf")]
    if len(ggufs) == 1:
        return ggufs
    if ggufs:
        listing = "\n  ".join(ggufs[:30])
        raise PullError(f"the repo has {len(ggufs)} GGUF files; pick one with --include "
                        f"NAME:\n  {listing}")
    raise PullError("the repo has neither a model_index.json (a diffusers image model) nor "
                    ".gguf files (a text model); name files with --include")


def cmd_pull(args: argparse.Namespace) -> int:
    from ..config import data_dir

    endpoint = os.environ.get("HF_ENDPOINT", DEFAULT_ENDPOINT).rstrip("/")
    try:
        check_online(endpoint, args.timeout)
        try:
            from huggingface_hub import HfApi, snapshot_download
        except ImportError:
            raise PullError("pulling needs huggingface_hub: pip install huggingface_hub "
                            "(it comes with pip install 'rbee-p2p[images]')") from None
        try:
            files = HfApi(endpoint=endpoint).list_repo_files(args.repo, revision=args.revision)
        except Exception as exc:
            raise PullError(f"cannot list {args.repo}: {type(exc).__name__}: {exc}") from None
        wanted = select_files(files, args.include, args.variant)
        target = Path(args.dir).expanduser() if args.dir else \
            data_dir() / "models" / args.repo.replace("/", "--")
        print(f"pulling {len(wanted)} file(s) of {args.repo} into {target} (interrupted pulls "
              "resume)", flush=True)
        try:
            snapshot_download(args.repo, revision=args.revision, allow_patterns=wanted,
                              local_dir=str(target), endpoint=endpoint)
        except Exception as exc:
            raise PullError(f"download failed ({type(exc).__name__}: {exc}); run the same "
                            "command again to resume") from None
    except PullError as exc:
        print(f"rbee-node: error: {exc}", file=sys.stderr)
        return 1
    model = target if "model_index.json" in wanted else target / wanted[0]
    name = args.repo.rsplit("/", 1)[-1]
    print(f"pulled {args.repo} to {model}\nserve it: rbee-node start --model {name}={model}")
    return 0


def _gib(n: int) -> str:
    return f"{n / (1 << 30):.1f} GiB"


def status_lines(status: dict[str, Any]) -> list[str]:
    """The devices and unavailable models of a node's /rbee/status, for people."""
    lines = []
    if status.get("devices"):
        lines.append("devices")
        for d in status["devices"]:
            cores = f", {d['cores']} cores" if d.get("cores") else ""
            engines = ", ".join(d.get("engines", [])) or "no engine here can use it"
            lines.append(f"  {d['id']}: {d['name']} ({d['backend']}{cores}) "
                         f"{_gib(d['mem_free'])} free of {_gib(d['mem_total'])}; "
                         f"budget {_gib(d.get('budget', 0))}, models use ~"
                         f"{_gib(d.get('used', 0))} [{engines}]")
    images = status.get("images") or {}
    if images and not images.get("available", True):
        lines.append(f"images   unavailable: {images.get('reason')}")
    for m in status.get("unavailable", []):
        lines.append(f"not loaded  {m['name']} ({m['kind']}): {m['reason']}")
    return lines


def cmd_devices(args: argparse.Namespace) -> int:
    from ..engines.hardware import probe

    hw = probe(use_torch=not args.no_torch)
    if args.json:
        print(json.dumps(hw.as_dict(), indent=2))
        return 0
    for d in hw.devices:
        cores = f", {d.cores} cores" if d.cores else ""
        print(f"{d.id}: {d.name} ({d.backend}{cores}) {_gib(d.mem_free)} free of "
              f"{_gib(d.mem_total)} [{', '.join(d.engines) or 'no engine here can use it'}]")
    for name, info in hw.backends.items():
        if name == "psutil":
            continue
        if info.get("probed") is False:
            print(f"{name}: not probed (--no-torch)")
        elif info.get("available"):
            extra = {k: v for k, v in info.items() if k not in ("available", "devices")}
            print(f"{name}: available {json.dumps(extra)}")
        else:
            print(f"{name}: unavailable: {info.get('error')}")
    return 0


def add_commands(sub: Any) -> None:
    """Add ``pull`` and ``devices`` to the CLI's subparsers."""
    p = sub.add_parser("pull", help="download a model from Hugging Face (resumable)",
                       description=__doc__.split("\n\n")[1])
    p.add_argument("repo", metavar="REPO", help="owner/name on Hugging Face")
    p.add_argument("--include", action="append", default=[], metavar="GLOB",
                   help="only these files (repeatable), e.g. '*Q4_K_M.gguf'")
    p.add_argument("--variant", metavar="V", help="diffusers weight variant, e.g. fp16")
    p.add_argument("--revision", metavar="REV", help="branch, tag or commit")
    p.add_argument("--dir", metavar="DIR", help="where to put it (default "
                   "$RBEE_HOME/models/OWNER--NAME)")
    p.add_argument("--timeout", type=float, default=5.0, metavar="S",
                   help="seconds to wait for the hub before giving up (default 5)")
    p.set_defaults(func=cmd_pull)
    d = sub.add_parser("devices", help="probe this machine's devices (what a node would "
                       "advertise)")
    d.add_argument("--json", action="store_true", help="print JSON for scripts")
    d.add_argument("--no-torch", action="store_true", help="do not import torch to probe")
    d.set_defaults(func=cmd_devices)
