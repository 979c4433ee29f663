"""The node's routing policy: a built-in by name, or a Starlark file run in a worker process.

:class:`PolicyRuntime` is the dispatcher's router.  Every decision goes through
:func:`rbee_p2p.routing.decide`, so eligibility (model, room) and the tenant's residency
hold whatever a script returns.  A script policy is compiled and evaluated by a
:class:`WorkerEvaluator` (a child process under resource limits, ``worker.py``);
its task (:meth:`PolicyRuntime.run`) owns that process, restarts it when it dies or is
killed for overrunning its deadline, and reloads the file when it changes (polled every
``reload_s``).  Whenever the script cannot decide (it failed, timed out, crashed its
worker, or its current version does not compile) the request is routed by the built-in
``fastest`` policy instead: logged, and counted in :meth:`PolicyRuntime.status`.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Mapping, Protocol

import trio

from ..errors import ConfigError
from .worker import FrameReader, encode_frame
from ..routing import (BUILTINS, Decision, Policy, Ranked, Rejected, RequestFacts, Snapshot,
                      decide, eligible, pinned)
from ..routing.script import (CompiledPolicy, FragmentCache, PeerStore, ScriptError,
                             compile_policy, delta_input, label)

__all__ = ["PolicyRuntime", "Outcome", "Evaluator", "WorkerEvaluator", "InProcessEvaluator",
           "parse_spec",
           "DEFAULT_TIMEOUT_MS", "FALLBACK"]

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_MS = 50
"""How long one Starlark decision may take before the built-in decides instead."""
FALLBACK = "fastest"
LOAD_TIMEOUT_MS = 1000  # a policy's top-level code (constants, mostly)
START_S = 10.0  # a fresh worker: Python and starlark-pyo3 start (~0.1 s idle, more under load)
RESTART_INTERVAL_S = 1.0  # a script that kills every worker must not keep the CPU busy
RESTART_MAX_S = 60.0
LOG_INTERVAL_S = 10.0  # the same error is logged at most this often


def parse_spec(spec: str) -> str | Path:
    """A built-in's name, or the path of a policy file.  Raises ConfigError."""
    spec = spec.strip()
    if spec in BUILTINS:
        return spec
    path = Path(spec).expanduser()
    if not path.is_file():
        raise ConfigError(f"policy {spec!r} is neither a built-in ({', '.join(BUILTINS)}) "
                          "nor a policy file (.star) that exists")
    return path


def _grace_s(timeout_ms: float) -> float:
    """How long past its own deadline a worker gets before it is killed: it stops loops
    itself at the deadline; only what it cannot interrupt runs into this."""
    return max(0.010, timeout_ms / 2000.0)


class Evaluator(Protocol):
    """Where a script policy runs.  ``alive`` is false after a crash or a kill; the
    runtime then makes a new one."""

    @property
    def alive(self) -> bool: ...

    async def load(self, name: str, source: str) -> None:
        """Compile ``source`` (reported as ``name``), replacing any earlier policy.
        Raises ScriptError."""
        ...

    async def evaluate(self, request: RequestFacts, snapshot: Snapshot) -> Ranked | Rejected:
        """The loaded policy on ``request`` and the (eligible) places of ``snapshot``.
        Raises ScriptError."""
        ...

    async def aclose(self) -> None: ...


class WorkerEvaluator:
    """A ``python -m rbee_p2p.policy_runtime`` (worker.py) child.  Each exchange is shielded from
    outside cancellation and bounded by its own deadline (so the pipe never holds half a
    frame); past the deadline plus a grace the child is killed and this evaluator is dead.
    """

    def __init__(self, timeout_ms: float = DEFAULT_TIMEOUT_MS, memory_mb: int = 512,
                 cpu_s: int = 5, start_s: float = START_S) -> None:
        self.timeout_ms, self.memory_mb, self.cpu_s, self.start_s = (
            timeout_ms, memory_mb, cpu_s, start_s)
        self._proc: trio.Process | None = None
        self._reader = FrameReader()
        self._seq = 0
        self._fresh = False
        self._dead = False
        self.last_ms = 0.0  # the worker's own time for the last request (JSON decode + script)
        self._cache = FragmentCache()  # each peer's facts as JSON, while they do not change
        self._sent: set[str] = set()  # the fragments the worker holds

    @property
    def alive(self) -> bool:
        return not self._dead

    async def _spawn(self) -> None:
        root = str(Path(__file__).resolve().parent.parent)  # this very rbee_p2p, not another
        env = {**os.environ, "RUST_BACKTRACE": "0",
               "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH"))
                                             if p)}
        self._proc = await trio.lowlevel.open_process(
            [sys.executable, "-m", "rbee_p2p.policy_runtime", "--memory-mb",
             str(self.memory_mb), "--cpu-s", str(self.cpu_s)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
        self._fresh = True

    async def load(self, name: str, source: str) -> None:
        if self._dead:
            raise ScriptError("crash", "the policy worker is not running")
        if self._proc is None:
            await self._spawn()
        extra = self.start_s if self._fresh else 0.0
        self._fresh = False
        reply = await self._call({"op": "load", "name": name, "timeout_ms": LOAD_TIMEOUT_MS},
                                 source.encode(), LOAD_TIMEOUT_MS, extra)
        if "error" in reply:
            raise ScriptError.from_dict(reply["error"])

    async def evaluate(self, request: RequestFacts, snapshot: Snapshot) -> Ranked | Rejected:
        if self._dead or self._proc is None:
            raise ScriptError("crash", "the policy worker is not running")
        for _ in range(2):
            delta = delta_input(request, snapshot, self._cache, self._sent)
            header = {"op": "route", "timeout_ms": self.timeout_ms, "request": delta.request,
                      "order": delta.order, "local": delta.local,
                      "new": [k for k, _ in delta.new], "lens": [len(t) for _, t in delta.new],
                      "forget": delta.forget}
            reply = await self._call(header, "".join(t for _, t in delta.new).encode(),
                                     self.timeout_ms)
            self._sent.update(k for k, _ in delta.new)
            self._sent.difference_update(delta.forget)
            self.last_ms = float(reply.get("ms", 0.0))
            if "missing" not in reply:
                break
            log.warning("the policy worker lacks peer facts %s: sending all again",
                        reply["missing"])
            self._sent.clear()
        if "error" in reply:
            raise ScriptError.from_dict(reply["error"])
        if "rejected" in reply:
            return Rejected(str(reply["rejected"]), "forbidden")
        if "ranked" not in reply:  # still missing after sending everything: start afresh
            await self._kill()
            raise ScriptError("crash", "the policy worker lost track of the peers")
        return Ranked(tuple(str(i) for i in reply["ranked"]))

    async def _call(self, header: dict[str, Any], body: bytes, timeout_ms: float,
                    extra_s: float = 0.0) -> dict[str, Any]:
        proc = self._proc
        assert proc is not None and proc.stdin is not None and proc.stdout is not None
        self._seq += 1
        header["seq"] = self._seq
        frame = encode_frame(header, body)
        reply: dict[str, Any] | None = None
        with trio.CancelScope(shield=True):  # a half-sent frame would poison the pipe
            with trio.move_on_after(timeout_ms / 1000.0 + _grace_s(timeout_ms) + extra_s) \
                    as deadline:
                try:
                    await proc.stdin.send_all(frame)
                    reply = await self._receive(proc.stdout)
                except (trio.BrokenResourceError, trio.ClosedResourceError, ValueError):
                    reply = None
            if reply is not None and reply.get("seq") == self._seq:
                return reply
            code = await self._kill()
        if deadline.cancelled_caught:
            raise ScriptError("timeout", f"the policy ran past its deadline ({timeout_ms:g} "
                              "ms); its worker was killed")
        raise ScriptError("crash", f"the policy worker died ({_exit(code)}): out of memory "
                          "or CPU time?")

    async def _receive(self, stream: trio.abc.ReceiveStream) -> dict[str, Any] | None:
        while True:
            frame = self._reader.next()
            if frame is not None:
                return frame[0]
            data = await stream.receive_some(1 << 16)
            if not data:
                return None
            self._reader.feed(data)

    async def _kill(self) -> int | None:
        self._dead = True
        proc, self._proc = self._proc, None
        self._sent.clear()
        if proc is None:
            return None
        with trio.CancelScope(shield=True):
            proc.kill()
            code = await proc.wait()
            for stream in (proc.stdin, proc.stdout):
                if stream is not None:
                    await stream.aclose()
        self._reader = FrameReader()
        return code

    async def aclose(self) -> None:
        await self._kill()


class InProcessEvaluator:
    """Compiles and evaluates in this process, polling ``cancelled``: for tests and the
    simulator.  Nothing stops one huge allocation here; the node uses WorkerEvaluator."""

    alive = True

    def __init__(self, cancelled: Callable[[], bool] = lambda: False) -> None:
        self._cancelled = cancelled
        self._compiled: CompiledPolicy | None = None
        self._cache, self._store = FragmentCache(), PeerStore()

    async def load(self, name: str, source: str) -> None:
        await trio.lowlevel.checkpoint()
        self._compiled = None
        self._compiled = compile_policy(name, source, self._cancelled)

    async def evaluate(self, request: RequestFacts, snapshot: Snapshot) -> Ranked | Rejected:
        await trio.lowlevel.checkpoint()
        if self._compiled is None:
            raise ScriptError("contract", "no policy is loaded")
        delta = delta_input(request, snapshot, self._cache, self._store)
        self._store.update(delta.new, delta.forget)
        return self._compiled.evaluate(self._store, delta.request, delta.order, delta.local,
                                       self._cancelled)

    async def aclose(self) -> None:
        self._compiled = None


def _exit(code: int | None) -> str:
    if code is None:
        return "no exit status"
    if code < 0:
        import signal

        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"


@dataclass(frozen=True)
class Outcome:
    """One decision: what the node does (``decision``), what the script itself said
    (``raw``, before eligibility and residency), why the fallback decided (``error``)."""

    decision: Decision
    raw: Decision | None = None
    error: ScriptError | None = None
    fallback: bool = False
    ms: float = 0.0


class PolicyRuntime:
    """The routing policy named by ``spec`` (a built-in or a ``.star`` file).

    ``route`` is a :data:`rbee_p2p.dispatch.Router`; for a file, :meth:`run` must be
    running (the node's services nursery) or :meth:`opened` entered, else the fallback
    decides.  Raises ConfigError for an unknown spec.
    """

    def __init__(self, spec: str = FALLBACK, *, timeout_ms: float = DEFAULT_TIMEOUT_MS,
                 pins: Mapping[str, str] | None = None, memory_mb: int = 512,
                 reload_s: float = 1.0,
                 restart_s: float = RESTART_INTERVAL_S,
                 evaluator: Callable[[], Evaluator] | None = None) -> None:
        target = parse_spec(spec)
        self.path = target if isinstance(target, Path) else None
        self.builtin: Policy | None = BUILTINS[target] if isinstance(target, str) else None
        if pins:
            if self.builtin is None:
                raise ConfigError("pins work with a built-in policy; a Starlark policy pins "
                                  "models itself")
            self.builtin = pinned(dict(pins), self.builtin)
        self.name = target if isinstance(target, str) else label(target.name)
        self.timeout_ms, self.reload_s = timeout_ms, reload_s
        self.restart_s = self._restart_wait = restart_s
        self._make: Callable[[], Evaluator] = evaluator or (
            lambda: WorkerEvaluator(timeout_ms, memory_mb))
        self._evaluator: Evaluator | None = None
        self._usable = False  # the current version is compiled in a live evaluator
        self._source: str | None = None
        self._stamp: tuple[int, int] | None = None  # (mtime_ns, size) of that source
        self._lock = trio.Lock()  # one exchange with the evaluator at a time
        self._restart = trio.Event()
        self._logged: tuple[str, float] = ("", 0.0)
        self.loaded_at: float | None = None
        self.decisions = self.errors = self.fallbacks = self.timeouts = 0
        self.restarts = self.reloads = 0
        self.last_error: ScriptError | None = None

    # -- deciding ------------------------------------------------------------------------

    async def route(self, request: RequestFacts, snapshot: Snapshot) -> Decision:
        return (await self.decide(request, snapshot)).decision

    async def decide(self, request: RequestFacts, snapshot: Snapshot) -> Outcome:
        """Decide where ``request`` runs.  Never raises for the script's faults (the
        fallback decides).  Cancel-safe; takes at most ~1.5x ``timeout_ms`` waiting for
        an earlier decision plus as much for its own."""
        self.decisions += 1
        if self.builtin is not None:
            started = time.perf_counter()
            decision = decide(self.builtin, request, snapshot, self.name)
            return Outcome(decision, ms=(time.perf_counter() - started) * 1000.0)
        narrowed = eligible(request, snapshot)
        if isinstance(narrowed, Rejected):  # nothing to choose from: the script is moot
            return Outcome(narrowed)
        evaluator = self._evaluator
        if not self._usable or evaluator is None:
            return self._fallback(request, narrowed, self.last_error)
        with trio.move_on_after(self.timeout_ms / 1000.0 + _grace_s(self.timeout_ms)):
            async with self._lock:
                if not self._usable or evaluator is not self._evaluator:
                    return self._fallback(request, narrowed, self.last_error)
                started = time.perf_counter()
                try:
                    raw = await evaluator.evaluate(request, narrowed)
                except ScriptError as exc:
                    self._failed(exc)
                    if not evaluator.alive:
                        self._usable = False
                        self._restart.set()
                    return self._fallback(request, narrowed, exc)
                ms = (time.perf_counter() - started) * 1000.0
                self._restart_wait = self.restart_s
                raw = _labelled(raw, self.name)
                return Outcome(decide(lambda _r, _s: raw, request, narrowed, self.name),
                               raw=raw, ms=ms)
        # waited too long for earlier decisions (a burst): do not queue behind them
        return self._fallback(request, narrowed, None)

    def _fallback(self, request: RequestFacts, snapshot: Snapshot,
                  error: ScriptError | None) -> Outcome:
        self.fallbacks += 1
        return Outcome(decide(BUILTINS[FALLBACK], request, snapshot, FALLBACK),
                       error=error, fallback=True)

    def _failed(self, exc: ScriptError) -> None:
        self.errors += 1
        if exc.kind == "timeout":
            self.timeouts += 1
        self.last_error = exc
        text, at = self._logged
        now = time.monotonic()
        if str(exc) != text or now - at >= LOG_INTERVAL_S:
            self._logged = (str(exc), now)
            log.warning("routing policy %s failed (%s): %s; %s decides (errors so far: %d)",
                        self.name, exc.kind, exc, FALLBACK, self.errors)

    # -- lifetime ------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """Own the worker and watch the file until cancelled.  Raises ConfigError when
        the file cannot be read or does not compile at start-up."""
        if self.path is None:
            task_status.started()
            return
        async with self.opened(strict=False):
            task_status.started()
            while True:
                with trio.move_on_after(self.reload_s):
                    await self._restart.wait()
                if self._restart.is_set():
                    self._restart = trio.Event()
                    await self._respawn()
                await self._reload_if_changed()

    @asynccontextmanager
    async def opened(self, strict: bool = True) -> AsyncIterator[PolicyRuntime]:
        """Start the evaluator and load the file; stop it on exit.  Raises ScriptError
        (``strict``) or ConfigError when the file is unreadable or does not compile."""
        if self.path is None:
            yield self
            return
        try:
            source, stamp = self._read()
            if not await self._load(source, stamp):
                assert self.last_error is not None
                if strict:
                    raise self.last_error
                raise ConfigError(f"routing policy {self.last_error}")
            yield self
        finally:
            with trio.CancelScope(shield=True):
                if self._evaluator is not None:
                    await self._evaluator.aclose()
                self._evaluator, self._usable = None, False

    def _read(self) -> tuple[str, tuple[int, int]]:
        assert self.path is not None
        try:
            st = self.path.stat()
            return self.path.read_text(), (st.st_mtime_ns, st.st_size)
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read the routing policy {self.path}: {exc}") from None

    async def _load(self, source: str, stamp: tuple[int, int], why: str = "start") -> bool:
        """Compile ``source`` in the evaluator (a new one if it is dead).  ``why``:
        "start" (errors are the caller's to report), "change" or "restart"."""
        assert self.path is not None
        self._source, self._stamp = source, stamp
        async with self._lock:
            self._usable = False
            if self._evaluator is None or not self._evaluator.alive:
                if self._evaluator is not None:
                    await self._evaluator.aclose()
                self._evaluator = self._make()
            try:
                await self._evaluator.load(self.path.name, source)
            except ScriptError as exc:
                self.last_error = exc
                self.errors += 1
                if why != "start":
                    log.error("routing policy %s does not load: %s; %s decides until it is "
                              "changed", self.path, exc, FALLBACK)
                return False
        self._usable = True
        self.loaded_at = time.time()
        if why == "change":
            self.reloads += 1
            log.warning("routing policy %s reloaded", self.path)
        elif why == "restart":
            log.warning("routing policy %s: its worker was restarted", self.path)
        return True

    async def _respawn(self) -> None:
        """A new worker with the current source after ``restart_s``, doubled (up to
        RESTART_MAX_S) while every new one dies before a decision succeeds."""
        await trio.sleep(self._restart_wait)
        self._restart_wait = min(self._restart_wait * 2, RESTART_MAX_S)
        if self._source is not None and self._stamp is not None and not self._usable:
            self.restarts += 1
            await self._load(self._source, self._stamp, "restart")

    async def _reload_if_changed(self) -> None:
        assert self.path is not None
        try:
            st = self.path.stat()
        except OSError:
            return  # being replaced, or gone: keep what is loaded
        if (st.st_mtime_ns, st.st_size) == self._stamp:
            return
        try:
            source, stamp = self._read()
        except ConfigError as exc:
            log.warning("%s; keeping the loaded version", exc)
            return
        await self._load(source, stamp, "change")

    def status(self) -> dict[str, Any]:
        """For GET /rbee/status."""
        out: dict[str, Any] = {"policy": self.name, "decisions": self.decisions}
        if self.path is None:
            return out
        err = self.last_error
        out.update({
            "file": str(self.path), "loaded": self._usable, "loaded_at": self.loaded_at,
            "timeout_ms": self.timeout_ms, "fallback": FALLBACK, "reloads": self.reloads,
            "errors": self.errors, "fallbacks": self.fallbacks, "timeouts": self.timeouts,
            "restarts": self.restarts,
            "last_error": None if err is None else {"kind": err.kind, "message": str(err)}})
        return out


def _labelled(decision: Ranked | Rejected, name: str) -> Ranked | Rejected:
    if isinstance(decision, Ranked):
        return Ranked(decision.candidates, name)
    return Rejected(decision.reason, decision.kind, name)
