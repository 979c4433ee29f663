"""Where the forwarded path's milliseconds go: each step's CPU time, measured in-process.

``bench/mesh.py`` measures what forwarding adds to the time to first token end to end
(two real nodes on loopback).  This script times the Python work that path adds, step by
step, with the node's real objects (keys, envelopes, verifier, parsers, dispatcher), so the
end-to-end number can be split into "our CPU work" and "the rest" (libp2p/yamux/Noise,
the loopback trip, trio and thread hand-offs, waiting for a core the model holds).  It also
times what the executor did before the request was typed: parsing the OpenAI body again.

    python bench/forward_steps.py [--n 2000]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import median, table  # noqa: E402

from rbee_p2p.api.schemas import parse_chat  # noqa: E402
from rbee_p2p.dispatch.request import Limits  # noqa: E402
from rbee_p2p.mesh.wire import from_wire, to_wire  # noqa: E402
from rbee_p2p.protocol.envelope import Verifier, seal  # noqa: E402
from rbee_p2p.protocol.identity import NodeKey  # noqa: E402
from rbee_p2p.protocol.messages import InferenceRequest, ResultChunk  # noqa: E402

BODY = {"model": "smollm2", "stream": True, "max_tokens": 64, "temperature": 0.8, "seed": 1,
        "messages": [{"role": "system", "content": "You are a helpful assistant."},
                     {"role": "user", "content": "Write a short story about a bee " * 4}]}


def timed(fn, n: int) -> float:
    """Median µs of ``fn()`` over ``n`` calls (in blocks of 20, to keep timer cost out)."""
    samples = []
    for _ in range(n // 20):
        start = time.perf_counter()
        for _ in range(20):
            fn()
        samples.append((time.perf_counter() - start) / 20 * 1e6)
    return median(samples)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=2000)
    n = ap.parse_args().n
    a, b = NodeKey.from_seed(bytes([1]) * 32), NodeKey.from_seed(bytes([2]) * 32)
    limits = Limits()
    call = parse_chat(BODY, limits)
    now = int(time.time() * 1000)
    wire = to_wire(call.request, request_id=os.urandom(16), target=b.peer_id,
                   deadline_ms=now + 600_000)
    raw = seal(a, wire, now_ms=now)
    chunk = ResultChunk(request_id=wire.request_id, seq=1, text="Once upon", tokens=2)
    chunk_raw = seal(b, chunk, now_ms=now)

    def verify_request() -> None:
        Verifier().verify(raw, now, expect=InferenceRequest, sender=a.peer_id)

    def verify_chunk() -> None:
        Verifier().verify(chunk_raw, now, sender=b.peer_id)

    rows = [
        ("A", "parse the OpenAI body (as for a local request too)", lambda: parse_chat(BODY, limits)),
        ("A", "Request -> typed InferenceRequest", lambda: to_wire(
            call.request, request_id=wire.request_id, target=b.peer_id, deadline_ms=now)),
        ("A", "seal the request (CBOR + Ed25519 sign)", lambda: seal(a, wire, now_ms=now)),
        ("B", "verify the request (size, decode, schema, signature, window, replay)",
         verify_request),
        ("B", "typed request -> Request, checked against B's limits",
         lambda: from_wire(wire, limits)),
        ("B", "seal the accepted chunk", lambda: seal(b, ResultChunk(
            request_id=wire.request_id, seq=0), now_ms=now)),
        ("B", "seal the first text chunk", lambda: seal(b, chunk, now_ms=now)),
        ("A", "verify the accepted chunk", verify_chunk),
        ("A", "verify the first text chunk", verify_chunk),
    ]
    results = [(who, what, timed(fn, n)) for who, what, fn in rows]
    added = sum(us for _, what, us in results if "as for a local" not in what)
    old = timed(lambda: parse_chat(dict(BODY), limits), n)
    print(f"\nCPU time of the forwarded path's own steps (median of {n} calls each, µs)\n")
    print(table([["node", "step", "µs"], *[[w, s, f"{us:.0f}"] for w, s, us in results]]))
    print(f"\nadded by forwarding, before the first token reaches A's SSE stream: "
          f"{added / 1000:.2f} ms of CPU (on two nodes)")
    print(f"before typed requests B also re-parsed the OpenAI body: {old:.0f} µs "
          f"(now {results[4][2]:.0f} µs to check the typed request)")


if __name__ == "__main__":
    main()
