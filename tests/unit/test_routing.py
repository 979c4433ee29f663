"""Built-in routing policies, residency and decide(): table-driven."""

import pytest

from rbee_p2p.routing import (BUILTINS, DeviceFacts, ModelFacts, PeerFacts, Ranked, Rejected,
                              RequestFacts, Snapshot, TenantFacts, cheapest, decide, fastest,
                              least_loaded, local_only, lowest_latency, pinned, satisfies)

REQ = RequestFacts(model="m", max_tokens=100)


def place(pid, tps=100.0, queue=0, active=0, max_queue=16, latency=0.0, where="EU", price=0,
          models=("m",), device=None, devices=()):
    return PeerFacts(id=pid, local=pid == "me",
                     models=tuple(ModelFacts(n, tokens_per_s=tps, device=device) for n in models),
                     devices=devices, queue_depth=queue, active_jobs=active, max_queue=max_queue,
                     latency_ms=latency, jurisdiction=where, price=price)


def snap(*places):
    local = next((p for p in places if p.local), None)
    return Snapshot(local=local, peers=tuple(p for p in places if not p.local))


def ranked(policy, *places, request=REQ):
    decision = decide(policy, request, snap(*places))
    return list(decision.candidates) if isinstance(decision, Ranked) else decision


@pytest.mark.parametrize("places, expected", [
    # idle equal machines: local first (ties go local)
    ([place("p"), place("me")], ["me", "p"]),
    # a busy local node loses to an idle peer
    ([place("me", active=1), place("p")], ["p", "me"]),
    # queue depth x speed: a fast busy peer vs a slow idle one
    ([place("fast", tps=400, queue=2), place("slow", tps=100)], ["fast", "slow"]),
    ([place("fast", tps=400, queue=5), place("slow", tps=100)], ["slow", "fast"]),
    # a peer within the local margin does not win
    ([place("me", tps=100), place("p", tps=105)], ["me", "p"]),
    ([place("me", tps=100), place("p", tps=150)], ["p", "me"]),
    # full queues are left out
    ([place("full", queue=16), place("ok", queue=3)], ["ok"]),
    # network latency counts
    ([place("far", latency=2000), place("near", latency=1)], ["near", "far"]),
    # unmeasured speed gets the default estimate (50 tok/s)
    ([place("unknown", tps=0), place("known", tps=10)], ["unknown", "known"]),
])
def test_fastest(places, expected):
    assert ranked(fastest, *places) == expected


@pytest.mark.parametrize("policy, places, expected", [
    (least_loaded, [place("a", queue=4), place("b", active=1), place("c", queue=2)],
     ["b", "c", "a"]),
    (least_loaded, [place("a", queue=4, max_queue=64), place("b", queue=2, max_queue=8)],
     ["a", "b"]),
    (lowest_latency, [place("a", latency=30), place("b", latency=5), place("me")],
     ["me", "b", "a"]),
    (cheapest, [place("a", price=30), place("b", price=5), place("c", price=5, tps=500)],
     ["c", "b", "a"]),
    (local_only, [place("a"), place("me", queue=3)], ["me"]),
])
def test_builtins(policy, places, expected):
    assert ranked(policy, *places) == expected


def test_local_only_without_local_model_is_refused():
    decision = decide(local_only, REQ, snap(place("a")))
    assert isinstance(decision, Rejected) and decision.kind == "forbidden"


def test_pinned_to_peer_device_or_name():
    h100 = (DeviceFacts("cuda:0", "cuda", "NVIDIA H100 80GB", 80 << 30, 70 << 30),)
    a100 = (DeviceFacts("cuda:0", "cuda", "NVIDIA A100", 40 << 30, 30 << 30),)
    places = [place("a", devices=a100), place("h", devices=h100, queue=3), place("me")]
    assert ranked(pinned({"m": "H100"}), *places) == ["h"]
    assert ranked(pinned({"m": "a"}), *places) == ["a"]
    assert ranked(pinned({"other": "a"}), *places) == ["me", "a", "h"]  # unpinned: fastest
    gone = decide(pinned({"m": "cuda:7"}), REQ, snap(*places))
    assert isinstance(gone, Rejected) and "pinned to cuda:7" in gone.reason


@pytest.mark.parametrize("claim, need, ok", [
    ("EU", "EU", True), ("DE", "EU", True), ("fr", "eu", True), ("US", "EU", False),
    ("", "EU", False), ("US", "US", True), ("US", None, True), ("", None, True),
    ("EU", "DE", False), ("CH", "EU", False),
])
def test_satisfies(claim, need, ok):
    assert satisfies(claim, need) is ok


EU_TENANT = RequestFacts(model="m", tenant=TenantFacts("acme", "enterprise", "EU"))


@pytest.mark.parametrize("name", sorted(BUILTINS))
def test_residency_applies_before_every_policy(name):
    places = [place("me", where="US"), place("us", where="US", tps=900), place("de", where="DE")]
    decision = decide(BUILTINS[name], EU_TENANT, snap(*places))
    if name == "local_only":
        assert isinstance(decision, Rejected)
    else:
        assert decision == Ranked(("de",), name)


def test_residency_impossible_is_forbidden_with_reason():
    decision = decide(fastest, EU_TENANT, snap(place("me", where="US"), place("x", where="")))
    assert isinstance(decision, Rejected) and decision.kind == "forbidden"
    assert "EU" in decision.reason


def test_policy_cannot_escape_eligibility():
    def rogue(request, snapshot):
        return Ranked(("us", "nobody", "de", "de"), "rogue")

    places = [place("us", where="US"), place("de", where="DE")]
    assert decide(rogue, EU_TENANT, snap(*places)) == Ranked(("de",), "rogue")

    def only_ineligible(request, snapshot):
        return Ranked(("us",), "rogue")

    assert isinstance(decide(only_ineligible, EU_TENANT, snap(*places)), Rejected)


@pytest.mark.parametrize("places, kind", [
    ([], "unavailable"),
    ([place("a", models=("other",))], "unavailable"),
    ([place("a", queue=16), place("b", queue=20)], "busy"),
])
def test_rejections(places, kind):
    decision = decide(fastest, REQ, snap(*places))
    assert isinstance(decision, Rejected) and decision.kind == kind


def test_modality_must_match():
    img = PeerFacts(id="img", models=(ModelFacts("m", modality="image"),))
    assert isinstance(decide(fastest, REQ, snap(img)), Rejected)
    assert ranked(fastest, img, request=RequestFacts(model="m", modality="image")) == ["img"]


def test_lowest_latency_prefers_a_near_idle_peer_over_a_far_busy_one():
    # "near" is 40 ms away and idle; "busy" is 1 ms away with 3 jobs of 100 tokens ahead
    # at 100 tok/s (3 s of waiting): the wait counts, not only the round trip
    near, busy = place("near", latency=40), place("busy", latency=1, queue=2, active=1)
    assert ranked(lowest_latency, busy, near) == ["near", "busy"]
    # with nothing queued anywhere the round trip alone decides
    assert ranked(lowest_latency, place("busy", latency=1), near) == ["busy", "near"]


def priced(pid, tin, tout, image=0, modality="text", tps=100.0):
    return PeerFacts(id=pid, models=(ModelFacts("m", modality, tps,
                                                price=(tin, tout, image)),))


def test_cheapest_ranks_by_the_requests_expected_cost_with_per_model_prices():
    # a long prompt, a short answer: the input price matters more than the output price
    long_prompt = RequestFacts(model="m", max_tokens=10, prompt_tokens=4000)
    dear_in, dear_out = priced("dear_in", 500, 10), priced("dear_out", 10, 500)
    assert ranked(cheapest, dear_in, dear_out, request=long_prompt) == ["dear_out", "dear_in"]
    # a short prompt, a long answer: the other way round
    long_answer = RequestFacts(model="m", max_tokens=4000, prompt_tokens=10)
    assert ranked(cheapest, dear_in, dear_out, request=long_answer) == ["dear_in", "dear_out"]
    assert dear_in.cost(long_prompt) == pytest.approx((4000 * 500 + 10 * 10) / 1e6)
    # a model price overrides the place's advert-wide price
    plain = place("plain", price=1)  # 1 per Mtok output, no per-model price
    assert ranked(cheapest, dear_out, plain, request=long_answer) == ["plain", "dear_out"]


def test_cheapest_images_cost_n_times_the_image_price():
    request = RequestFacts(model="m", modality="image", max_tokens=3, kind="image")
    a, b = priced("a", 0, 0, 900, "image"), priced("b", 1000, 1000, 700, "image")
    assert a.cost(request) == 2700 and b.cost(request) == 2100
    assert ranked(cheapest, a, b, request=request) == ["b", "a"]


def test_charge_rounds_down_once_over_the_sum():
    from rbee_p2p.routing import charge

    assert charge(100, 200, 0, tokens_in=5000, tokens_out=2500) == 1  # 0.5 + 0.5
    assert charge(0, 0, 5000, images=2) == 10_000


def test_residency_trusts_an_attested_jurisdiction_never_an_advert_alone():
    from rbee_p2p.routing.places import attested_jurisdiction

    attested = {"a": "EU", "b": "US"}
    assert attested_jurisdiction("a", "EU", attested) == "EU"
    assert attested_jurisdiction("c", "EU", attested) == ""  # claimed, not attested
    assert attested_jurisdiction("b", "EU", attested) == ""  # claimed otherwise
    assert attested_jurisdiction("a", "", attested) == ""


def test_a_peer_that_never_answered_ranks_behind_one_that_did():
    """Identities are free: an unproven peer's facts carry UNPROVEN_MS more latency (not in
    a private swarm, whose peers' word is believed), so "fastest" sends a request to the
    peer that answered before a thousand that only advertised the same."""
    import samples

    from rbee_p2p.routing.places import UNPROVEN_MS, peer_facts

    advert = samples.advert()
    facts = [peer_facts(pid, advert, "alive", None, 5.0, 1.0, jurisdiction="", proven=proven)
             for pid, proven in (("fake", False), ("real", True))]
    assert facts[0].latency_ms == facts[1].latency_ms + UNPROVEN_MS
    decision = decide(fastest, RequestFacts("smollm2", max_tokens=4),
                      Snapshot(None, tuple(facts)))
    assert decision.candidates[0] == "real"
    believed = peer_facts("fake", advert, "alive", None, 5.0, 1.0, jurisdiction="",
                          proven=False, believe_claims=True)
    assert believed.latency_ms == facts[1].latency_ms
