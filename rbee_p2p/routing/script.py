"""Starlark routing policies (pure): compile a policy file, evaluate its ``route``.

The contract (node/policies/README.md): a policy file defines
``def route(request, peers, local)`` and returns the ids of the places to try, best first
(peer dicts are accepted too), or calls ``reject(reason)``.  ``request`` is
:meth:`RequestFacts.as_dict`, ``peers`` the *eligible* places (this node included, with
``local`` true) as :meth:`PeerFacts.as_dict`, ``local`` this node's entry or None.  The
helpers in :data:`PRELUDE` are predefined; a policy may shadow them.  Names starting with
``rbee__`` are reserved.

Speed: converting Python values to Starlark costs ~22 us a peer, so the input travels as
ONE JSON text (each peer's fragment cached, :class:`FragmentCache`) that Starlark decodes
itself with ``json.decode`` (~5-9 us a peer).  Nothing here reads a clock: the caller passes
``cancelled``, which the interpreter polls (every few thousand steps) and which stops
loops and long evaluations.  What polling cannot stop (one huge allocation, a huge string
repeat) is the caller's business: the node evaluates in a worker process with resource
limits (``rbee_p2p/policyworker.py``).
"""

from __future__ import annotations

import json
import re
from typing import Any, Callable

import starlark as sl

from .facts import Decision, PeerFacts, Policy, Ranked, Rejected, RequestFacts, Snapshot
from .policy import EU_MEMBERS, LOCAL_MARGIN

__all__ = [
    "ScriptError",
    "CompiledPolicy",
    "FragmentCache",
    "compile_policy",
    "encode_input",
    "script_policy",
    "label",
    "PRELUDE",
    "HELPERS",
    "MAX_CALLSTACK",
]

MAX_CALLSTACK = 64
"""Deepest Starlark call stack (route -> helper -> sort key -> ... is well under 10)."""

Cancelled = Callable[[], bool]

PRELUDE = f'''
EU = {sorted(EU_MEMBERS)!r}
rbee__decode = json.decode

def filter(pred, xs):
    """The items of xs for which pred(item) is true."""
    return [x for x in xs if pred(x)]

def ids(peers):
    """Peer dicts -> their ids."""
    return [p["id"] for p in peers]

def with_model(peers, model):
    """Peers that serve model."""
    return [p for p in peers if model in p["models"]]

def vram_free(peer):
    """Free bytes on the peer's roomiest accelerator (not the CPU); 0 without one."""
    best = 0
    for d in peer["devices"]:
        if d["backend"] != "cpu" and d["mem_free"] > best:
            best = d["mem_free"]
    return best

def has_gpu(peer, name):
    """Whether one of the peer's accelerators is named like name (e.g. "H100")."""
    name = name.lower()
    for d in peer["devices"]:
        if d["backend"] != "cpu" and name in d["name"].lower():
            return True
    return False

def with_gpu(peers, name):
    """Peers with an accelerator named like name (e.g. "H100", "A100", "4090")."""
    return [p for p in peers if has_gpu(p, name)]

def with_capacity(peers, min_free = 0):
    """Peers whose queue is not full and, if min_free > 0, with at least min_free bytes
    free on an accelerator."""
    return [p for p in peers if p["queue_depth"] < p["max_queue"] and
            (min_free <= 0 or vram_free(p) >= min_free)]

def in_jurisdiction(peers, code):
    """Peers that claim jurisdiction code; "EU" also matches the member states."""
    code = code.upper()
    return [p for p in peers if p["jurisdiction"].upper() == code or
            (code == "EU" and p["jurisdiction"].upper() in EU)]

def rbee__score(p, k):
    # as the built-in policies: this node wins unless a peer is more than
    # {LOCAL_MARGIN:.0%} better; ties go to this node, then the lower id
    return (k * {1.0 - LOCAL_MARGIN!r} if p["local"] else k, 0 if p["local"] else 1, p["id"])

def load_of(p):
    """Jobs queued or running relative to the queue's size."""
    return (p["queue_depth"] + p["active_jobs"]) / max(p["max_queue"], 1)

def expected_ms(p, request):
    """Time until request would be complete on p (as the built-in fastest policy)."""
    run_ms = max(request["max_tokens"], 1) / p["tokens_per_s"] * 1000.0
    return (p["queue_depth"] + p["active_jobs"] + 1) * run_ms + p["latency_ms"]

def least_loaded(peers):
    """Best first: the fewest jobs relative to the queue's size."""
    return sorted(peers, key = lambda p: rbee__score(p, load_of(p)))

def fastest(peers, request):
    """Best first: the soonest expected completion of request."""
    return sorted(peers, key = lambda p: rbee__score(p, expected_ms(p, request)))

def lowest_latency(peers):
    """Best first: the shortest network round trip."""
    return sorted(peers, key = lambda p: rbee__score(p, p["latency_ms"]))

def cheapest(peers, request):
    """Best first: the lowest price; among equal prices the fastest."""
    return sorted(peers, key = lambda p: (p["price"], rbee__score(p, expected_ms(p, request))))

def most_vram_free(peers):
    """Best first: the most free accelerator memory."""
    return sorted(peers, key = lambda p: (-vram_free(p), 0 if p["local"] else 1, p["id"]))
'''

HELPERS = ("filter", "ids", "with_model", "vram_free", "has_gpu", "with_gpu", "with_capacity",
           "in_jurisdiction", "load_of", "expected_ms", "least_loaded", "fastest",
           "lowest_latency", "cheapest", "most_vram_free", "reject", "EU")
"""What every policy sees predefined (``reject`` is a host function)."""

_DRIVER = '''
def rbee__main(text):
    d = rbee__decode(text)
    ranked = route(d["request"], d["peers"], d["local"])
    # plain ids or a description of what is wrong (no value is left that Python cannot take)
    if type(ranked) not in ("list", "tuple"):
        return {"rbee__bad": "route() must return a list of peer ids (or call reject(reason)), not " + type(ranked)}
    out = []
    for item in ranked:
        if type(item) == "dict" and type(item.get("id")) == "string":
            item = item["id"]
        if type(item) != "string":
            return {"rbee__bad": "route() must return peer ids (strings) or peer dicts, not " + type(item)}
        out.append(item)
    return out
'''

_GLOBALS = sl.Globals.extended_by([sl.LibraryExtension.Json, sl.LibraryExtension.StructType])
_DIALECT = sl.Dialect.extended()
_PRELUDE_AST = sl.parse("rbee_prelude.star", PRELUDE, _DIALECT)
_DRIVER_AST = sl.parse("rbee_driver.star", _DRIVER, _DIALECT)
_LOCATION = re.compile(r"^ *--> (?P<file>.+):(?P<line>\d+):(?P<column>\d+)$", re.M)
_FRAME = re.compile(r"^ *\* (?P<file>.+):(?P<line>\d+), in ", re.M)


def _never() -> bool:
    return False


def label(name: str) -> str:
    """What decisions made by policy file ``name`` carry as their policy."""
    return f"starlark:{name.rsplit('/', 1)[-1]}"


class ScriptError(Exception):
    """A policy that cannot be used, or one evaluation that failed.

    ``kind``: "syntax" (does not parse), "load" (its top-level code failed), "contract"
    (no ``route``, or ``route`` returned something else than ids), "runtime" (``route``
    failed), "timeout" (cancelled), "crash" (the evaluator died: set by the caller).
    ``file``/``line``/``column`` locate it when Starlark said where (0 otherwise);
    ``detail`` is Starlark's full report (traceback and source excerpt).
    """

    def __init__(self, kind: str, message: str, file: str = "", line: int = 0,
                 column: int = 0, detail: str = "") -> None:
        super().__init__(message)
        self.kind, self.message, self.file = kind, message, file
        self.line, self.column, self.detail = line, column, detail

    @property
    def where(self) -> str:
        if not self.file:
            return ""
        if not self.line:
            return self.file
        return f"{self.file}:{self.line}" + (f":{self.column}" if self.column else "")

    def __str__(self) -> str:
        return f"{self.where}: {self.message}" if self.where else self.message

    def as_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "message": self.message, "file": self.file,
                "line": self.line, "column": self.column, "detail": self.detail}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ScriptError:
        return cls(str(data.get("kind", "runtime")), str(data.get("message", "")),
                   str(data.get("file", "")), int(data.get("line", 0)),
                   int(data.get("column", 0)), str(data.get("detail", "")))


def _translate(kind: str, exc: BaseException, name: str, message: str = "") -> ScriptError:
    """Starlark's rendered error -> a ScriptError located in the policy file when possible.

    Starlark reports a location only inside its message (`` --> file:line:column`` under
    the error, ``* file:line, in fn`` per traceback frame); this is the one place that
    reads it.  An error inside a helper is located at the policy's innermost call."""
    text = str(exc)
    message = message or next((ln[len("error: "):] for ln in text.splitlines()
                               if ln.startswith("error: ")),
                              text.strip().splitlines()[0] if text.strip() else kind)
    spots = [(m["file"], int(m["line"]), int(m["column"])) for m in _LOCATION.finditer(text)]
    spots += [(m["file"], int(m["line"]), 0) for m in reversed(list(_FRAME.finditer(text)))]
    mine = [s for s in spots if s[0] == name]
    file, line, column = mine[0] if mine else (name, 0, 0)
    return ScriptError(kind, message, file, line, column, text)


class _Watch:
    """``cancelled`` that remembers whether it fired."""

    def __init__(self, cancelled: Cancelled) -> None:
        self.cancelled, self.fired = cancelled, False

    def __call__(self) -> bool:
        if self.cancelled():
            self.fired = True
        return self.fired


class _Reject(Exception):
    pass


class _RejectBox:
    """The host function ``reject(reason)``: remembers the reason and stops the script."""

    def __init__(self) -> None:
        self.reason: str | None = None

    def __call__(self, reason: object = "rejected by the routing policy") -> None:
        self.reason = str(reason)
        raise _Reject(self.reason)


def _options(watch: _Watch) -> sl.EvalOptions:
    return sl.EvalOptions(check_cancelled=watch, max_callstack_size=MAX_CALLSTACK)


class CompiledPolicy:
    """A policy file, compiled and its top-level code run: ready to evaluate, many times.
    Not thread-safe (one evaluation at a time)."""

    def __init__(self, name: str, frozen: sl.FrozenModule, box: _RejectBox) -> None:
        self.name = name
        self.label = label(name)
        self._frozen, self._box = frozen, box

    def evaluate(self, text: str, cancelled: Cancelled = _never) -> Ranked | Rejected:
        """``route`` on :func:`encode_input`'s ``text``: Ranked(ids as returned) or
        Rejected(reason, "forbidden") when it called ``reject``.  Raises ScriptError."""
        self._box.reason = None
        watch = _Watch(cancelled)
        try:
            value = self._frozen.call_with(_options(watch), "rbee__main", text).value
        except sl.StarlarkError as exc:
            if self._box.reason is not None:
                return Rejected(self._box.reason, "forbidden", self.label)
            if watch.fired:
                raise _translate("timeout", exc, self.name,
                                 "cancelled: the policy ran past its deadline") from None
            raise _translate("runtime", exc, self.name) from None
        if isinstance(value, dict):
            raise ScriptError("contract", str(value.get("rbee__bad")), self.name)
        assert isinstance(value, list)
        return Ranked(tuple(value), self.label)


def compile_policy(name: str, source: str, cancelled: Cancelled = _never) -> CompiledPolicy:
    """Parse ``source`` (reported as file ``name``), run its top-level code (bounded by
    ``cancelled``) and check that it defines ``route``.  Raises ScriptError: "syntax",
    "load", "timeout" or "contract"."""
    try:
        ast = sl.parse(name, source, _DIALECT)
    except sl.StarlarkError as exc:
        raise _translate("syntax", exc, name) from None
    module = sl.Module()
    box = _RejectBox()
    module.add_callable("reject", box)
    sl.eval(module, _PRELUDE_AST, _GLOBALS)
    watch = _Watch(cancelled)
    try:
        sl.eval_with(_options(watch), module, ast, _GLOBALS)
    except sl.StarlarkError as exc:
        if watch.fired:
            raise _translate("timeout", exc, name, "cancelled: the policy's top-level code "
                             "ran past its deadline") from None
        raise _translate("load", exc, name) from None
    try:
        sl.eval(module, _DRIVER_AST, _GLOBALS)  # fails only when route is not defined
    except sl.StarlarkError as exc:
        raise ScriptError("contract", "the policy defines no route(request, peers, local)",
                          name, 0, 0, str(exc)) from None
    return CompiledPolicy(name, module.freeze(), box)


class FragmentCache:
    """Each peer's JSON for a model, reused while the peer's facts object is the same one
    (PeerFacts are frozen; the node keeps a peer's object until its advert changes)."""

    def __init__(self) -> None:
        self._texts: dict[tuple[int, str], tuple[PeerFacts, str]] = {}

    def text(self, peer: PeerFacts, model: str) -> str:
        key = (id(peer), model)
        hit = self._texts.get(key)
        if hit is not None and hit[0] is peer:  # holding the object keeps its id unique
            return hit[1]
        text = json.dumps(peer.as_dict(model), separators=(",", ":"))
        self._texts[key] = (peer, text)
        return text

    def prune(self, keep: tuple[PeerFacts, ...]) -> None:
        """Forget peers not in ``keep`` once the cache has grown well past it."""
        if len(self._texts) > 2 * len(keep) + 64:
            alive = {id(p) for p in keep}
            self._texts = {k: v for k, v in self._texts.items() if k[0] in alive}

    def __len__(self) -> int:
        return len(self._texts)


def encode_input(request: RequestFacts, snapshot: Snapshot,
                 cache: FragmentCache | None = None) -> str:
    """The JSON text ``rbee__main`` decodes: request, local and peers (all of
    ``snapshot.everyone()``, this node first)."""
    cache = cache if cache is not None else FragmentCache()
    model = request.model
    places = snapshot.everyone()
    local = cache.text(snapshot.local, model) if snapshot.local is not None else "null"
    return "".join(('{"request":', json.dumps(request.as_dict(), separators=(",", ":")),
                    ',"local":', local, ',"peers":[',
                    ",".join([cache.text(p, model) for p in places]), "]}"))


def script_policy(compiled: CompiledPolicy, cancelled: Cancelled = _never,
                  cache: FragmentCache | None = None) -> Policy:
    """A :data:`Policy` evaluating ``compiled`` in this process (tests, the simulator; the
    node uses a worker process).  Raises ScriptError; use it through :func:`decide`."""
    def policy(request: RequestFacts, snapshot: Snapshot) -> Decision:
        return compiled.evaluate(encode_input(request, snapshot, cache), cancelled)

    policy.__name__ = compiled.label
    return policy
