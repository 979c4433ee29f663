"""Starlark routing policies (pure): compile a policy file, evaluate its ``route``.

The contract (node/policies/README.md): a policy file defines
``def route(request, peers, local)`` and returns the ids of the places to try, best first
(peer dicts are accepted too), or calls ``reject(reason)``.  ``request`` is
:meth:`RequestFacts.as_dict`, ``peers`` the *eligible* places (this node included, with
``local`` true) as :meth:`PeerFacts.as_dict`, ``local`` this node's entry or None.  The
helpers in :data:`PRELUDE` are predefined; a policy may shadow them.  Names starting with
``rbee__`` are reserved.

Speed: converting Python values to Starlark costs ~22 us a peer, and even Starlark's own
``json.decode`` ~5-9 us, most of a decision with 1,000 peers.  So each peer's facts are
encoded once as a JSON fragment (:class:`FragmentCache`, while the facts object is the
same), decoded once into a :class:`PeerStore` where the evaluator keeps them, and a
decision sends only the fragments the store lacks plus the peers' keys in order
(:func:`delta_input`).  Nothing here reads a clock: the caller passes
``cancelled``, which the interpreter polls (every few thousand steps) and which stops
loops and long evaluations.  What polling cannot stop (one huge allocation or string, a
sort of millions) is the caller's business: the node evaluates in a worker process with resource
limits (``rbee_p2p/policy_runtime/worker.py``).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Container, Iterable

import starlark as sl

from .facts import Decision, PeerFacts, Policy, Ranked, Rejected, RequestFacts, Snapshot
from .policy import EU_MEMBERS, LOCAL_MARGIN

__all__ = [
    "ScriptError",
    "CompiledPolicy",
    "FragmentCache",
    "PeerStore",
    "Delta",
    "compile_policy",
    "delta_input",
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
rbee__encode = json.encode

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
    jobs = p["queue_depth"] + p["active_jobs"] + 1
    return jobs * (max(request["max_tokens"], 1) * 1000.0) / p["tokens_per_s"] + p["latency_ms"]

def least_loaded(peers):
    """Best first: the fewest jobs relative to the queue's size."""
    return sorted(peers, key = lambda p: rbee__score(p, load_of(p)))

def fastest(peers, request):
    """Best first: the soonest expected completion of request."""
    return sorted(peers, key = lambda p: rbee__score(p, expected_ms(p, request)))

def wait_ms(p, request):
    """Round trip plus the wait for the jobs ahead of request on p."""
    jobs = p["queue_depth"] + p["active_jobs"]
    return p["latency_ms"] + jobs * (max(request["max_tokens"], 1) * 1000.0) / p["tokens_per_s"]

def lowest_latency(peers, request = None):
    """Best first: the soonest first token (round trip + queue wait, as the built-in);
    without request, the shortest round trip."""
    if request == None:
        return sorted(peers, key = lambda p: rbee__score(p, p["latency_ms"]))
    return sorted(peers, key = lambda p: rbee__score(p, wait_ms(p, request)))

def cost(p, request):
    """Expected micro-credits for request on p (its model's prices)."""
    if request["modality"] == "image" or request["kind"] == "image":
        return float(request["max_tokens"] * p["price_image"])
    return (request["prompt_tokens"] * p["price_in"] +
            request["max_tokens"] * p["price_out"]) / 1000000.0

def cheapest(peers, request):
    """Best first: the lowest expected cost; among equal costs the fastest."""
    return sorted(peers, key = lambda p: (cost(p, request), rbee__score(p, expected_ms(p, request))))

def most_vram_free(peers):
    """Best first: the most free accelerator memory."""
    return sorted(peers, key = lambda p: (-vram_free(p), 0 if p["local"] else 1, p["id"]))
'''

HELPERS = ("filter", "ids", "with_model", "vram_free", "has_gpu", "with_gpu", "with_capacity",
           "in_jurisdiction", "load_of", "expected_ms", "wait_ms", "cost", "least_loaded",
           "fastest",
           "lowest_latency", "cheapest", "most_vram_free", "reject", "EU")
"""What every policy sees predefined (``reject`` is a host function)."""

_DRIVER = '''
def rbee__route(request, peers, local):
    # called with *args so that the interpreter does not inline a one-line route into
    # this frame: an error in it must be reported at its own line
    ranked = route(*(request, peers, local))
    if type(ranked) not in ("list", "tuple"):
        return ("bad", "route() must return a list of peer ids (or call reject(reason)), " +
                "not " + type(ranked))
    # one JSON text for Python: converting values costs ~1.5 us a string, ~20 us a dict
    ranked = [x["id"] if type(x) == "dict" and "id" in x else x for x in ranked]
    wrong = [type(x) for x in ranked if type(x) != "string"]
    if wrong:
        return ("bad", "route() must return peer ids (strings) or peer dicts, not " +
                wrong[0])
    return ("ok", rbee__encode(ranked))
'''

# PeerStore: a batch of peer fragments decoded into a frozen module; an index of them all;
# a decision reading peers from the index (the driver module is new each time)
_CHUNK = "P = json.decode(rbee__text)\nrbee__text = None\n"
_STORED = '''
load("rbee__policy", "rbee__route")
load("rbee__index", "ALL")
rbee__in = json.decode(rbee__input)
rbee__local = rbee__in["local"]
rbee__result = rbee__route(rbee__in["request"], [ALL[k] for k in rbee__in["order"]],
                           None if rbee__local == None else ALL[rbee__local])
'''

_GLOBALS = sl.Globals.extended_by([sl.LibraryExtension.Json, sl.LibraryExtension.StructType])
_DIALECT = sl.Dialect.extended()
_PRELUDE_AST = sl.parse("rbee_prelude.star", PRELUDE, _DIALECT)
_DRIVER_AST = sl.parse("rbee_driver.star", _DRIVER, _DIALECT)
_CHUNK_AST = sl.parse("rbee_chunk.star", _CHUNK, _DIALECT)
_STORED_AST = sl.parse("rbee_stored.star", _STORED, _DIALECT)
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

    def evaluate(self, store: PeerStore, request: dict[str, Any], order: list[str],
                 local: str | None, cancelled: Cancelled = _never) -> Ranked | Rejected:
        """``route`` on ``request`` (:meth:`RequestFacts.as_dict`) and the peers held in
        ``store`` as ``order`` (fragment keys, ``local`` among them): Ranked(ids as
        returned) or Rejected(reason, "forbidden") when it called ``reject``.  Raises
        ScriptError, or KeyError naming a fragment ``store`` lacks."""
        missing = [k for k in order if k not in store]
        if missing or (local is not None and local not in store):
            raise KeyError(missing[0] if missing else local)
        self._box.reason = None
        watch = _Watch(cancelled)
        module = sl.Module()
        module["rbee__input"] = json.dumps({"request": request, "order": order,
                                            "local": local}, separators=(",", ":"))
        modules = {"rbee__policy": self._frozen, "rbee__index": store.index()}
        try:
            sl.eval_with(_options(watch), module, _STORED_AST, _GLOBALS,
                         sl.FileLoader(modules.__getitem__))
        except sl.StarlarkError as exc:
            if self._box.reason is not None:
                return Rejected(self._box.reason, "forbidden", self.label)
            if watch.fired:
                raise _translate("timeout", exc, self.name,
                                 "cancelled: the policy ran past its deadline") from None
            raise _translate("runtime", exc, self.name) from None
        result = module["rbee__result"]
        assert isinstance(result, list) and len(result) == 2  # ("ok", JSON) or ("bad", why)
        status, value = str(result[0]), str(result[1])
        if status != "ok":
            raise ScriptError("contract", value, self.name)
        return Ranked(tuple(str(i) for i in json.loads(value)), self.label)


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


@dataclass(slots=True)
class _Fragment:
    peer: PeerFacts  # held: keeps id(peer) unique while the entry lives
    key: str
    text: str
    used: int  # the last decision that used it


class FragmentCache:
    """Each peer's JSON for a model, reused while the peer's facts object is the same one
    (PeerFacts are frozen; the node keeps a peer's object until its advert changes).
    Each distinct text has a key of its own, never reused for another text: what a
    :class:`PeerStore` knows it by.  A new advert saying the same as the last one (the
    same text) keeps the key, so nothing new is sent or decoded.  Texts no decision used
    for ``max_idle`` decisions are forgotten (checked every ``max_idle`` decisions)."""

    def __init__(self, max_idle: int = 16) -> None:
        self.max_idle = max_idle
        self._texts: dict[tuple[int, str], _Fragment] = {}
        self._keys: dict[str, str] = {}  # text -> key
        self._serial = 0
        self._decision = 0

    def entry(self, peer: PeerFacts, model: str) -> tuple[str, str]:
        """(key, JSON text) of ``peer.as_dict(model)``."""
        slot = (id(peer), model)
        hit = self._texts.get(slot)
        if hit is None or hit.peer is not peer:
            text = json.dumps(peer.as_dict(model), separators=(",", ":"))
            key = self._keys.get(text)
            if key is None:
                self._serial += 1
                key = self._keys[text] = str(self._serial)
            hit = self._texts[slot] = _Fragment(peer, key, text, 0)
        hit.used = self._decision
        return hit.key, hit.text

    def next_decision(self) -> list[str]:
        """Count a decision; return the keys of the texts forgotten now, if any."""
        self._decision += 1
        if self._decision % self.max_idle:
            return []
        cutoff = self._decision - self.max_idle
        self._texts = {s: f for s, f in self._texts.items() if f.used >= cutoff}
        live = {f.text for f in self._texts.values()}
        gone = [key for text, key in self._keys.items() if text not in live]
        self._keys = {text: key for text, key in self._keys.items() if text in live}
        return gone

    def __len__(self) -> int:
        return len(self._keys)


@dataclass(frozen=True)
class Delta:
    """What an evaluator holding a :class:`PeerStore` needs for one decision: the request,
    the peers as fragment keys (this node first), the fragments the store lacks, and the
    ones it may forget."""

    request: dict[str, Any]
    order: list[str]
    local: str | None
    new: list[tuple[str, str]]
    forget: list[str]


def delta_input(request: RequestFacts, snapshot: Snapshot, cache: FragmentCache,
                known: Container[str]) -> Delta:
    """The decision's input for a store that holds the fragments in ``known``."""
    forget = [k for k in cache.next_decision() if k in known]
    model = request.model
    order, new = [], []
    for place in snapshot.everyone():
        key, text = cache.entry(place, model)
        order.append(key)
        if key not in known:
            new.append((key, text))
    local = order[0] if snapshot.local is not None else None
    return Delta(request.as_dict(), order, local, new, forget)


class PeerStore:
    """Peer fragments decoded once and kept between decisions (in the evaluator).

    Decoding JSON is most of a Starlark decision's cost (~5-9 us a peer); adverts change a
    few peers at a time.  Each batch of new fragments is decoded into a frozen module (a
    *chunk*); an index module maps every key to its value (rebuilt when chunks change,
    ~0.15 us an entry).  Chunks are re-decoded into one when there are more than
    ``max_chunks`` or when forgotten fragments outnumber live ones (so memory stays within
    a few times what the live peers need).  Values are frozen: policies cannot mutate them.
    """

    def __init__(self, max_chunks: int = 16) -> None:
        self.max_chunks = max_chunks
        self._texts: dict[str, str] = {}  # live key -> JSON text
        self._chunk_of: dict[str, int] = {}  # live key -> its chunk
        self._chunks: dict[int, tuple[sl.FrozenModule, int]] = {}  # chunk -> (module, size)
        self._serial = 0
        self._index: sl.FrozenModule | None = None
        self.decoded = 0  # fragments decoded so far (for tests and benchmarks)

    def __contains__(self, key: object) -> bool:
        return key in self._texts

    def __len__(self) -> int:
        return len(self._texts)

    def update(self, new: Iterable[tuple[str, str]], forget: Iterable[str] = ()) -> None:
        """Add fragments (key, JSON text of a peer) and forget others.  Raises ScriptError
        ("runtime") for a text that is not a JSON object."""
        for key in forget:
            self._texts.pop(key, None)
            self._chunk_of.pop(key, None)
        fresh = [(k, t) for k, t in new if k not in self._texts]
        if fresh:
            self._add_chunk(fresh)
        live = Counter(self._chunk_of.values())  # chunk -> its live fragments
        if len(live) != len(self._chunks):  # a chunk with no live fragment left
            self._chunks = {c: v for c, v in self._chunks.items() if c in live}
            self._index = None
        total = sum(size for _, size in self._chunks.values())
        if total > 2 * len(self._texts) + 64:  # mostly forgotten: decode the live afresh
            keep: set[int] = set()
        elif len(self._chunks) > self.max_chunks:  # many batches: merge the smaller half
            by_size = sorted(live, key=lambda c: live[c])
            keep = set(by_size[len(self._chunks) - self.max_chunks // 2:])
        else:
            return
        redo = [(k, t) for k, t in self._texts.items() if self._chunk_of[k] not in keep]
        self._chunks = {c: v for c, v in self._chunks.items() if c in keep}
        if redo:
            self._add_chunk(redo)
        self._index = None

    def _add_chunk(self, fragments: list[tuple[str, str]]) -> None:
        self._serial += 1
        module = sl.Module()
        module["rbee__text"] = "{" + ",".join(f'"{k}":{t}' for k, t in fragments) + "}"
        try:
            sl.eval(module, _CHUNK_AST, _GLOBALS)
        except sl.StarlarkError as exc:
            raise ScriptError("runtime", f"bad peer facts: {exc}") from None
        self._chunks[self._serial] = (module.freeze(), len(fragments))
        for key, text in fragments:
            self._texts[key] = text
            self._chunk_of[key] = self._serial
        self.decoded += len(fragments)
        self._index = None

    def index(self) -> sl.FrozenModule:
        """The module whose ``ALL`` maps every key held to its decoded peer."""
        if self._index is None:
            names = [f"c{c}" for c in self._chunks]
            source = "".join(f'load("{n}", {n} = "P")\n' for n in names) + "ALL = {}\n" + \
                "".join(f"ALL.update({n})\n" for n in names)
            modules = {f"c{c}": module for c, (module, _) in self._chunks.items()}
            index = sl.Module()
            sl.eval(index, sl.parse("rbee_index.star", source, _DIALECT), _GLOBALS,
                    sl.FileLoader(modules.__getitem__))
            self._index = index.freeze()
        return self._index


def script_policy(compiled: CompiledPolicy, cancelled: Cancelled = _never) -> Policy:
    """A :data:`Policy` evaluating ``compiled`` in this process (tests, the simulator; the
    node uses a worker process), with its own fragment cache and store.  Raises
    ScriptError; use it through :func:`decide`."""
    cache, store = FragmentCache(), PeerStore()

    def policy(request: RequestFacts, snapshot: Snapshot) -> Decision:
        delta = delta_input(request, snapshot, cache, store)
        store.update(delta.new, delta.forget)
        return compiled.evaluate(store, delta.request, delta.order, delta.local, cancelled)

    policy.__name__ = compiled.label
    return policy
