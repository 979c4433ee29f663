"""The routing policy runtime: Starlark policies in a sandboxed worker process (I/O around
the pure ``routing`` package): ``runtime.PolicyRuntime`` (hot reload, fallbacks) and the
worker's own program (``worker.py``, run as ``python -m rbee_p2p.policy_runtime``: the package's __main__, so the worker
module is imported once)."""

from .runtime import FALLBACK, PolicyRuntime, parse_spec

__all__ = ["PolicyRuntime", "FALLBACK", "parse_spec"]
