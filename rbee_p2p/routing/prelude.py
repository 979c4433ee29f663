"""The helpers every Starlark routing policy sees predefined (see node/policies/README.md).

Starlark source, kept apart from the evaluator (script.py); the built-ins' arithmetic
(expected time, load, cost) is the same as routing/policy.py's.
"""

from __future__ import annotations

from .policy import EU_MEMBERS, LOCAL_MARGIN

__all__ = ["PRELUDE", "HELPERS"]

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
           "fastest", "lowest_latency", "cheapest", "most_vram_free", "reject", "EU")
"""What every policy sees predefined (``reject`` is a host function)."""

