"""Starlark policies, evaluated in this process (routing/script.py): table-driven decisions,
the helpers against the built-ins, errors with their lines, reject(), residency, the
sandbox's cancellation.  The worker process is tested in tests/integration."""

import json
import random
from pathlib import Path

import pytest

from rbee_p2p.routing import (BUILTINS, DeviceFacts, ModelFacts, PeerFacts, Ranked, Rejected,
                              RequestFacts, Snapshot, TenantFacts, decide)
from rbee_p2p.routing.script import (HELPERS, FragmentCache, PeerStore, ScriptError,
                                     compile_policy, delta_input, script_policy)

EXAMPLES = Path(__file__).parents[2] / "node" / "policies"
GIB = 1 << 30


def gpu(name, free_gib=40, total_gib=80):
    return DeviceFacts("cuda:0", "cuda", name, total_gib * GIB, free_gib * GIB)


def place(pid, tps=100.0, queue=0, active=0, max_queue=16, latency=0.0, where="DE", price=0,
          models=("m",), devices=(), reputation=1.0):
    return PeerFacts(id=pid, local=pid == "me",
                     models=tuple(ModelFacts(n, tokens_per_s=tps) for n in models),
                     devices=devices, queue_depth=queue, active_jobs=active, max_queue=max_queue,
                     latency_ms=latency, jurisdiction=where, price=price, reputation=reputation)


def snap(*places):
    local = next((p for p in places if p.local), None)
    return Snapshot(local=local, peers=tuple(p for p in places if not p.local))


def req(tier=None, residency=None, model="m", max_tokens=100):
    tenant = None if tier is None and residency is None else \
        TenantFacts("t", tier or "default", residency)
    return RequestFacts(model=model, max_tokens=max_tokens, tenant=tenant)


def run(source, request, *places, name="p.star"):
    decision = decide(script_policy(compile_policy(name, source)), request, snap(*places))
    return list(decision.candidates) if isinstance(decision, Ranked) else decision


def example(name):
    return (EXAMPLES / name).read_text()


H100, A100 = gpu("NVIDIA H100 80GB HBM3"), gpu("NVIDIA A100-SXM4-40GB", 20, 40)
FARM = [place("h1", tps=300, queue=4, devices=(H100,), price=900),
        place("h2", tps=300, devices=(H100,), where="US", price=1000),
        place("a1", tps=150, devices=(A100,), where="FR", price=400),
        place("a2", tps=150, queue=15, devices=(A100,), price=300, reputation=0.5),
        place("me", tps=20, price=0)]


@pytest.mark.parametrize("file, request_, places, expected", [
    # enterprise -> H100s (fastest first), others -> A100s
    ("tiers.star", req("enterprise"), FARM, ["h2", "h1"]),
    ("tiers.star", req("pro"), FARM, ["a1", "a2"]),
    ("tiers.star", req(), FARM, ["a1", "a2"]),
    # no H100 with room: anything with room, least loaded first
    ("tiers.star", req("enterprise"), [place("h1", queue=16, devices=(H100,)), *FARM[2:]],
     ["me", "a1", "a2"]),
    # the tenant's residency removes the US H100 before the policy sees it
    ("tiers.star", req("enterprise", "EU"), FARM, ["h1"]),
    # EU peers only, cheapest first
    ("eu_cheapest.star", req(), FARM, ["me", "a2", "a1", "h1"]),
    ("eu_cheapest.star", req(), [FARM[1]],
     Rejected("no peer in the EU can run m now", "forbidden", "starlark:eu_cheapest.star")),
    ("least_loaded.star", req(), FARM, ["me", "a1", "h2", "h1", "a2"]),  # ties: here, id
    # reputation first; the free tier only on peers that charge nothing
    ("trusted.star", req(), FARM, ["h2", "a1", "h1", "me", "a2"]),
    ("trusted.star", req("free"), FARM, ["me"]),
    ("trusted.star", req("free"), FARM[:2],
     Rejected("no free peer serves m", "forbidden", "starlark:trusted.star")),
])
def test_example_policies(file, request_, places, expected):
    assert run(example(file), request_, *places, name=file) == expected


def test_every_example_is_tested():
    tested = {"tiers.star", "eu_cheapest.star", "least_loaded.star", "trusted.star"}
    assert {p.name for p in EXAMPLES.glob("*.star")} == tested


def random_places(rng, n):
    return [place(f"p{i:03d}" if i else "me", tps=rng.choice([0, 20, 50, 100, 300]),
                  queue=rng.randint(0, 16), active=rng.randint(0, 2), max_queue=16,
                  latency=rng.choice([0.0, 1.5, 20.0, 80.0]), price=rng.randint(0, 3),
                  where=rng.choice(["DE", "US"]))
            for i in range(n)]


@pytest.mark.parametrize("builtin, source", [
    ("least_loaded", "def route(request, peers, local):\n    return least_loaded(peers)\n"),
    ("fastest", "def route(request, peers, local):\n    return fastest(peers, request)\n"),
    ("lowest_latency",
     "def route(request, peers, local):\n    return lowest_latency(peers, request)\n"),
    ("cheapest", "def route(request, peers, local):\n    return cheapest(peers, request)\n"),
])
@pytest.mark.parametrize("seed", range(8))
def test_helpers_rank_as_the_builtins(builtin, source, seed):
    rng = random.Random(seed)
    places = random_places(rng, rng.randint(1, 40))
    request = req(residency=rng.choice([None, "EU"]), max_tokens=rng.choice([1, 100]))
    assert decide(script_policy(compile_policy("p.star", source)), request, snap(*places)) \
        .candidates == decide(BUILTINS[builtin], request, snap(*places)).candidates


@pytest.mark.parametrize("body, expected", [
    ('return ids(with_model(peers, "other"))', ["b"]),
    ("return most_vram_free(peers)", ["b", "a", "me"]),
    ("return with_capacity(peers, 30 * 1024 * 1024 * 1024)", ["b"]),
    ('return with_gpu(peers, "a100")', ["a"]),
    ("return filter(lambda p: p['local'], peers)", ["me"]),
    ("return [local['id']] if local else []", ["me"]),
    ('return in_jurisdiction(peers, "EU")', ["me", "b"]),
    ('return in_jurisdiction(peers, "us")', ["a"]),
    ("return [p['id'] for p in peers if vram_free(p) > 0 and load_of(p) < 0.5]", ["b"]),
    ("return sorted(ids(peers), reverse = True)", ["me", "b", "a"]),
    ('return [p["id"] for p in peers if p["tokens_per_s"] == 50.0]', ["me"]),  # unmeasured
    # a helper may be shadowed
    ("return least_loaded(peers)\n\ndef least_loaded(peers):\n    return [peers[-1]]", ["b"]),
    ("return [x['id'] for x in peers if x['id'] in EU + ['a']]", ["a"]),
])
def test_helpers(body, expected):
    places = [place("a", devices=(A100,), queue=9, where="US"),
              place("b", devices=(H100,), models=("m", "other"), where="FR"),
              place("me", tps=0, devices=(DeviceFacts("cpu", "cpu", "cpu", 64 * GIB, 32 * GIB),))]
    source = f"def route(request, peers, local):\n    {body}\n"
    assert run(source, req(), *places) == expected


def test_request_and_peers_are_plain_data():
    source = '''
def route(request, peers, local):
    p = peers[0]
    if request["tenant"]["tier"] != "gold" or request["tokens"] != 130 or local != None:
        fail("request: " + str(request))
    if p["devices"][0]["mem_free"] != 40 * 1024 * 1024 * 1024 or p["jurisdiction"] != "DE":
        fail("peer: " + str(p))
    return [p["id"]]
'''
    request = RequestFacts("m", max_tokens=100, prompt_tokens=30, tenant=TenantFacts("t", "gold"))
    assert run(source, request, place("a", devices=(H100,))) == ["a"]


def test_reject_gives_a_rejection_with_the_reason():
    source = ('def route(request, peers, local):\n'
              '    if request["tenant"]["tier"] == "banned":\n'
              '        reject("tenant " + request["tenant"]["id"] + " is banned")\n'
              '    return ids(peers)\n')
    assert run(source, req("banned"), place("a")) == \
        Rejected("tenant t is banned", "forbidden", "starlark:p.star")
    assert run(source, req("gold"), place("a")) == ["a"]
    # return reject(...) works as well; the reason is what the policy said
    assert run("def route(r, p, l):\n    return reject('no')\n", req(), place("a")).reason == "no"


def test_residency_holds_whatever_the_script_returns():
    """The script names a US peer it was never shown: decide() drops it."""
    source = 'def route(request, peers, local):\n    return ["us"] + ids(peers)\n'
    places = [place("us", where="US"), place("de", where="DE")]
    assert run(source, req(residency="EU"), *places) == ["de"]
    assert run(source, req(), *places) == ["us", "de"]
    only_us = 'def route(request, peers, local):\n    return ["us"]\n'
    decision = run(only_us, req(residency="EU"), *places)
    assert isinstance(decision, Rejected) and decision.kind == "forbidden"
    # full peers and peers without the model are never candidates either
    assert run('def route(r, p, l):\n    return ["full", "other", "de"]\n', req(),
               place("full", queue=16), place("other", models=("x",)), place("de")) == ["de"]


def test_the_script_sees_only_eligible_places():
    source = 'def route(request, peers, local):\n    return [str(len(peers))]\n'
    policy = script_policy(compile_policy("p.star", source))
    places = [place("a", where="US"), place("b", queue=16), place("c"), place("me")]
    assert policy(req(residency="EU"), snap(*places)) == Ranked(("4",), "starlark:p.star")
    decision = decide(lambda r, s: Ranked((str(len(s.everyone())),)), req(residency="EU"),
                      snap(*places))
    assert decision == Rejected(decision.reason, "forbidden", "")  # "2" is no place


@pytest.mark.parametrize("source, kind, line, column, words", [
    ("def route(request, peers, local):\n    x = [1, 2\n    return x\n",
     "syntax", 3, 5, "Parse error"),
    ("def route(request, peers, local)\n    return []\n", "syntax", 1, 33, "Parse error"),
    ("LIMIT = 1 // 0\n", "load", 1, 9, "division by zero"),
    ("x = 1\n", "contract", 0, 0, "defines no route"),
    ("def route(request, peers, local):\n    return undefined\n", "load", 2, 12,
     "not found"),
])
def test_compile_errors_name_the_line(source, kind, line, column, words):
    with pytest.raises(ScriptError) as info:
        compile_policy("bad.star", source)
    err = info.value
    assert (err.kind, err.file, err.line, err.column) == (kind, "bad.star", line, column)
    assert words in err.message and words in str(err)
    if line:
        assert str(err).startswith(f"bad.star:{line}:")


@pytest.mark.parametrize("body, kind, line, words", [
    ("return 1 // 0", "runtime", 2, "division by zero"),
    ('return peers[0]["nope"]', "runtime", 2, "nope"),
    ("return least_loaded(5)", "runtime", 2, ""),  # failed in a helper: the call's line
    ("return 5", "contract", 0, "list of peer ids"),
    ("return [1]", "contract", 0, "peer ids (strings)"),
    ("return lambda x: x", "contract", 0, "function"),
    ('fail("policy says no")', "runtime", 2, "policy says no"),
])
def test_runtime_errors(body, kind, line, words):
    policy = compile_policy("bad.star", f"def route(request, peers, local):\n    {body}\n")
    with pytest.raises(ScriptError) as info:
        decide(script_policy(policy), req(), snap(place("a")))
    err = info.value
    assert (err.kind, err.line) == (kind, line) and words in err.message


def cancel_after(n):
    polls = [0]

    def cancelled():
        polls[0] += 1
        return polls[0] > n

    return cancelled


@pytest.mark.parametrize("body", [
    "for i in range(1000000000):\n        pass",
    "x = []\n    for i in range(1000000000):\n        x.append([i])",
    "for p in peers:\n        for i in range(1000000000):\n            pass",
    "return [str(i) for i in range(1000000000)]",
])
def test_long_evaluations_are_cancelled(body):
    """Nothing here reads a clock: the caller's check says when (here: after 50 polls).
    Loops poll it; one native operation (``sorted`` of a huge list, ``[0] * N``) does not:
    the worker process's deadline stops those (tests/integration/test_policy_worker.py)."""
    policy = compile_policy("loop.star", f"def route(request, peers, local):\n    {body}\n")
    with pytest.raises(ScriptError) as info:
        decide(script_policy(policy, cancel_after(50)), req(), snap(place("a")))
    assert info.value.kind == "timeout" and info.value.line in (2, 3)


def test_top_level_code_is_cancelled_too():
    with pytest.raises(ScriptError) as info:
        compile_policy("top.star", "X = [i for i in range(1000000000)]\n", cancel_after(50))
    assert info.value.kind == "timeout" and info.value.line == 1


def test_deep_recursion_is_stopped():
    source = ("def deep(n):\n    return deep(n + 1)\n\n"
              "def route(request, peers, local):\n    return deep(0)\n")
    with pytest.raises(ScriptError) as info:
        decide(script_policy(compile_policy("rec.star", source)), req(), snap(place("a")))
    assert info.value.kind == "runtime"


@pytest.mark.parametrize("source", [
    "def route(request, peers, local):\n    print('x')\n    return []\n",
    "load('other.star', 'x')\ndef route(request, peers, local):\n    return []\n",
])
def test_no_io_from_scripts(source):
    with pytest.raises(ScriptError):
        compile_policy("io.star", source)


def test_a_policy_is_reusable_and_rejections_do_not_stick():
    source = ('def route(request, peers, local):\n'
              '    if request["tenant"]:\n        reject("tenants elsewhere")\n'
              '    return ids(peers)\n')
    policy = script_policy(compile_policy("p.star", source))
    for _ in range(3):
        assert isinstance(decide(policy, req("x"), snap(place("a"))), Rejected)
        assert decide(policy, req(), snap(place("a"))).candidates == ("a",)


def test_fragments_are_encoded_once_and_sent_once():
    a, b, me = place("a", devices=(H100,)), place("b"), place("me")
    cache, store = FragmentCache(), PeerStore()
    delta = delta_input(req("gold"), snap(a, b, me), cache, store)
    assert delta.request == req("gold").as_dict()
    assert [json.loads(t) for _, t in delta.new] == [p.as_dict("m") for p in (me, a, b)]
    assert delta.order == [k for k, _ in delta.new] and delta.local == delta.order[0]
    store.update(delta.new)
    again = delta_input(req(), snap(a, b, me), cache, store)
    assert again.order == delta.order and again.new == [] and len(cache) == 3
    # a new advert saying the same (a new facts object, the same text): nothing to send
    same = delta_input(req(), snap(place("a", devices=(H100,)), b, me), cache, store)
    assert same.order == delta.order and same.new == []
    # a peer whose facts changed is a new object: a new fragment, only that one is sent
    a2 = place("a", queue=5)
    changed = delta_input(req(), snap(a2, b, me), cache, store)
    assert [json.loads(t)["queue_depth"] for _, t in changed.new] == [5]
    assert changed.new[0][0] not in delta.order
    # texts unused for max_idle decisions are forgotten, and so told to the store
    store.update(changed.new)
    for _ in range(cache.max_idle * 2):
        last = delta_input(req(), snap(a2), cache, store)
        store.update(last.new, last.forget)
        if last.forget:
            forgotten = last.forget
    assert len(cache) == 1 and len(store) == 1
    assert sorted(forgotten) == sorted(delta.order)  # a's old facts, b, me


def test_the_store_decodes_each_fragment_once_and_stays_small():
    policy = compile_policy("p.star", "def route(request, peers, local):\n    return "
                                      "[p['id'] + str(p['queue_depth']) for p in peers]\n")
    cache, store = FragmentCache(), PeerStore(max_chunks=4)
    places = [place(f"p{i}") for i in range(50)]
    for step in range(40):
        places[step % 50] = place(f"p{step % 50}", queue=step % 7)  # one advert changed
        delta = delta_input(req(), snap(*places), cache, store)
        current = set(delta.order)
        store.update(delta.new, [k for k in list(store._texts) if k not in current])
        assert not delta.forget or not current & set(delta.forget)
        decision = policy.evaluate(store, delta.request, delta.order, delta.local)
        assert decision.candidates == tuple(f"{p.id}{p.queue_depth}" for p in places)
        assert len(store) == 50 and len(store._chunks) <= 5
    # 50 at first, then one a step, plus some re-decoding when small batches pile up
    assert 50 + 40 <= store.decoded <= 4 * (50 + 40)
    with pytest.raises(KeyError):
        policy.evaluate(store, delta.request, ["nope"], None)


def test_peers_are_read_only():
    source = "def route(request, peers, local):\n    peers[0]['id'] = 'x'\n    return []\n"
    with pytest.raises(ScriptError) as info:
        decide(script_policy(compile_policy("p.star", source)), req(), snap(place("a")))
    assert (info.value.kind, info.value.line) == ("runtime", 2)


@pytest.mark.parametrize("peer", FARM + [place("x", models=("a", "b"), latency=3.5)])
def test_peer_facts_round_trip_through_plain_data(peer):
    again = PeerFacts.from_dict(peer.as_dict("m"))
    assert again.as_dict("m") == peer.as_dict("m")


def test_request_facts_round_trip_through_plain_data():
    for request in (req(), req("gold", "EU"), RequestFacts("m", "image", 1, 5)):
        assert RequestFacts.from_dict(request.as_dict()) == request
    with pytest.raises(ValueError):
        RequestFacts.from_dict({"tenant": None})
    with pytest.raises(ValueError):
        PeerFacts.from_dict({"models": ["m"]})


def test_helpers_are_documented():
    readme = (EXAMPLES / "README.md").read_text()
    for name in HELPERS:
        assert f"`{name}" in readme, name
