import pytest

from rbee_p2p.routing import Offer, RouteRequest, fastest_expected_completion

REQ = RouteRequest(model="m", max_tokens=100)


def offer(pid, tps=100.0, queue=0, active=0, max_queue=16, latency=0.0):
    return Offer(peer_id=pid, tokens_per_s=tps, queue_depth=queue, active_jobs=active,
                 max_queue=max_queue, latency_ms=latency)


def ranked(*offers):
    return [o.peer_id for o in fastest_expected_completion(REQ, list(offers))]


@pytest.mark.parametrize("offers, expected", [
    # idle equal machines: local first (ties go local)
    ([offer(b"p"), offer(None)], [None, b"p"]),
    # a busy local node loses to an idle peer
    ([offer(None, active=1), offer(b"p")], [b"p", None]),
    # queue depth x speed: a fast busy peer vs a slow idle one
    ([offer(b"fast", tps=400, queue=2), offer(b"slow", tps=100)], [b"fast", b"slow"]),
    ([offer(b"fast", tps=400, queue=5), offer(b"slow", tps=100)], [b"slow", b"fast"]),
    # a peer within the local margin does not win
    ([offer(None, tps=100), offer(b"p", tps=105)], [None, b"p"]),
    ([offer(None, tps=100), offer(b"p", tps=150)], [b"p", None]),
    # full queues are left out
    ([offer(b"full", queue=16), offer(b"ok", queue=3)], [b"ok"]),
    # network latency counts
    ([offer(b"far", latency=2000), offer(b"near", latency=1)], [b"near", b"far"]),
    # unmeasured speed gets the default estimate
    ([offer(b"unknown", tps=0), offer(b"known", tps=10)], [b"unknown", b"known"]),
    ([], []),
])
def test_fastest_expected_completion(offers, expected):
    assert ranked(*offers) == expected
