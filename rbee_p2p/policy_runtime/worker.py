"""The Starlark policy worker: a child process that compiles and evaluates one policy.

Why a process: the interpreter polls for cancellation between steps, which stops loops,
but one huge operation (``[0] * 2000000000``, ``"a" * 2000000000``) cannot be interrupted,
and a failed allocation aborts the whole process (Rust aborts on allocation failure).
So policies run here, under ``RLIMIT_AS`` (address space), ``RLIMIT_CPU`` (re-armed
before every request, so an orphaned worker cannot spin) and no core dumps; the node
kills it when it overruns its deadline and starts another (rbee_p2p/policy_runtime/runtime.py).

Wire format, both ways, on the worker's stdin/stdout: frames of a 4-byte big-endian
header length, a 4-byte body length, a JSON header, a body (UTF-8).  Requests:
``{"op": "load", "seq", "name", "timeout_ms"}`` with the policy source as body;
``{"op": "route", "seq", "timeout_ms", "request", "order", "local", "new", "lens",
"forget"}`` (see :class:`~rbee_p2p.routing.script.Delta`) with the new peer fragments back
to back as body.  The worker keeps the fragments it was sent (a PeerStore) until told to
forget them.  Replies (empty body): ``{"seq", "ok": true}`` (loaded),
``{"seq", "ranked": [ids]}``, ``{"seq", "rejected": reason}``, ``{"seq", "missing": key}``
(a fragment it does not hold: send them all again) or ``{"seq", "error":
ScriptError.as_dict()}``, each with ``"ms"``, the request's time in the worker.  One
request at a time; the worker exits at end of input.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import struct
import sys
import time
from typing import Any, BinaryIO, Callable, Sequence

from ..routing import Rejected
from ..routing.script import CompiledPolicy, PeerStore, ScriptError, compile_policy

__all__ = ["encode_frame", "FrameReader", "MAX_FRAME", "main"]

MAX_FRAME = 64 * 1024 * 1024
"""Largest header + body accepted (a 1,000-peer snapshot is ~0.5 MB)."""
_PREFIX = struct.Struct(">II")


def encode_frame(header: dict[str, Any], body: bytes = b"") -> bytes:
    head = json.dumps(header, separators=(",", ":")).encode()
    if len(head) + len(body) > MAX_FRAME:
        raise ValueError(f"frame of {len(head) + len(body)} bytes is over {MAX_FRAME}")
    return b"".join((_PREFIX.pack(len(head), len(body)), head, body))


class FrameReader:
    """Sans-I/O: feed bytes, take whole frames.  Raises ValueError on a bad frame."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> None:
        self._buf += data

    def next(self) -> tuple[dict[str, Any], bytes] | None:
        if len(self._buf) < _PREFIX.size:
            return None
        hlen, blen = _PREFIX.unpack_from(self._buf)
        if hlen + blen > MAX_FRAME:
            raise ValueError(f"frame of {hlen + blen} bytes is over {MAX_FRAME}")
        end = _PREFIX.size + hlen + blen
        if len(self._buf) < end:
            return None
        header = json.loads(bytes(self._buf[_PREFIX.size:_PREFIX.size + hlen]))
        body = bytes(self._buf[_PREFIX.size + hlen:end])
        del self._buf[:end]
        if not isinstance(header, dict):
            raise ValueError("frame header is not a JSON object")
        return header, body


def _read_exactly(stream: BinaryIO, n: int) -> bytes | None:
    data = stream.read(n)
    return data if data is not None and len(data) == n else None


def _read_frame(stream: BinaryIO) -> tuple[dict[str, Any], bytes] | None:
    prefix = _read_exactly(stream, _PREFIX.size)
    if prefix is None:
        return None
    hlen, blen = _PREFIX.unpack(prefix)
    if hlen + blen > MAX_FRAME:
        raise ValueError(f"frame of {hlen + blen} bytes is over {MAX_FRAME}")
    rest = _read_exactly(stream, hlen + blen)
    if rest is None:
        return None
    header = json.loads(rest[:hlen])
    return header, rest[hlen:]


def _limit(memory_mb: int) -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if memory_mb > 0:
        size = memory_mb * 1024 * 1024
        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        if hard != resource.RLIM_INFINITY:
            size = min(size, hard)
        resource.setrlimit(resource.RLIMIT_AS, (size, hard))


def _arm_cpu(cpu_s: int) -> None:
    """Allow ``cpu_s`` more CPU seconds from now (SIGXCPU ends the process after that)."""
    import resource

    if cpu_s <= 0:
        return
    usage = resource.getrusage(resource.RUSAGE_SELF)
    soft = int(usage.ru_utime + usage.ru_stime) + cpu_s
    _, hard = resource.getrlimit(resource.RLIMIT_CPU)
    if hard != resource.RLIM_INFINITY:
        soft = min(soft, hard)
    resource.setrlimit(resource.RLIMIT_CPU, (soft, hard))


def _deadline(timeout_ms: float) -> Callable[[], bool]:
    end = time.monotonic() + timeout_ms / 1000.0
    return lambda: time.monotonic() > end


def _fragments(header: dict[str, Any], body: str) -> list[tuple[str, str]]:
    """The new fragments: ``body`` holds their texts back to back, ``lens`` their lengths
    (characters) and ``new`` their keys."""
    out, at = [], 0
    for key, size in zip(header.get("new", ()), header.get("lens", ())):
        out.append((str(key), body[at:at + int(size)]))
        at += int(size)
    if at != len(body):
        raise ValueError("fragment lengths do not add up to the body")
    return out


def serve(inp: BinaryIO, out: BinaryIO, cpu_s: int = 0) -> None:
    """Answer frames from ``inp`` on ``out`` until end of input."""
    compiled: CompiledPolicy | None = None
    store = PeerStore()  # kept across policy versions: peer facts do not depend on them
    while True:
        frame = _read_frame(inp)
        if frame is None:
            return
        header, body = frame
        reply: dict[str, Any] = {"seq": header.get("seq")}
        started = time.perf_counter()
        _arm_cpu(cpu_s)
        try:
            cancelled = _deadline(float(header.get("timeout_ms", 1000)))
            if header.get("op") == "load":
                compiled = None
                compiled = compile_policy(str(header.get("name", "policy.star")),
                                          body.decode(), cancelled)
                reply["ok"] = True
            elif header.get("op") == "route":
                store.update(_fragments(header, body.decode()), header.get("forget", ()))
                if compiled is None:
                    raise ScriptError("contract", "no policy is loaded")
                try:
                    decision = compiled.evaluate(store, header["request"], header["order"],
                                                 header.get("local"), cancelled)
                except KeyError as exc:  # the node's idea of what we hold is wrong
                    reply["missing"] = str(exc.args[0])
                else:
                    if isinstance(decision, Rejected):
                        reply["rejected"] = decision.reason
                    else:
                        reply["ranked"] = list(decision.candidates)
            else:
                raise ScriptError("contract", f"unknown operation {header.get('op')!r}")
        except ScriptError as exc:
            reply["error"] = exc.as_dict()
        except Exception as exc:  # MemoryError under RLIMIT_AS, bad UTF-8, ...: report it
            reply["error"] = ScriptError("runtime", f"policy worker: {type(exc).__name__}: "
                                         f"{exc}").as_dict()
        reply["ms"] = round((time.perf_counter() - started) * 1000, 3)
        out.write(encode_frame(reply))
        out.flush()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rbee_p2p.policy_runtime",
                                     description="Starlark routing-policy worker (internal)")
    parser.add_argument("--memory-mb", type=int, default=512,
                        help="address-space limit (0: none)")
    parser.add_argument("--cpu-s", type=int, default=5,
                        help="CPU seconds one request may use before the process is ended")
    args = parser.parse_args(argv)
    # Ctrl-C on the node reaches its whole process group: the node ends this process when
    # it has finished (or at the end of its input), not the terminal
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # the protocol owns the original stdin/stdout: nothing else may write to them
    inp = os.fdopen(os.dup(0), "rb", buffering=1024 * 1024)
    out = os.fdopen(os.dup(1), "wb", buffering=0)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    _limit(args.memory_mb)  # after the imports: the interpreter is loaded, policies are not
    try:
        serve(inp, out, args.cpu_s)
    except BrokenPipeError:
        pass
    return 0
