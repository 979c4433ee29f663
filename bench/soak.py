"""Soak (issue 13, item 7): two real nodes -- an entry node with no model and a peer
serving a scripted model -- under steady load for 10 minutes: 4 clients, chat streamed and
not, direct at the peer and forwarded through the entry node, some clients leaving
mid-stream.  Samples each node's RSS and open descriptors every 10 s; passes when RSS grew
less than 5% from the end of the warm-up (the first minute) to the end, and the
descriptors are back where they were (no leak).

    python bench/soak.py [--minutes 10]
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "e2e"))
from nodeproc import NodeProcess  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import table  # noqa: E402

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="rbee-soak-"))
    peer = NodeProcess(root / "peer", "--no-default-model", "--fake-model", "m:400")
    entry = NodeProcess(root / "entry", "--no-default-model", "--peer", peer.addr)
    stop = threading.Event()
    counts = {"ok": 0, "left": 0, "error": 0}
    lock = threading.Lock()
    try:
        for n in (peer, entry):
            n.wait_ready()
        entry.wait_for(lambda s: any(p["models"] for p in s["peers"]), 30, "the peer")

        def client(seed: int) -> None:
            rng = random.Random(seed)
            with httpx.Client(timeout=60) as http:
                while not stop.is_set():
                    node = rng.choice((peer, entry))
                    body = {**CHAT, "max_tokens": rng.randint(8, 96),
                            "stream": rng.random() < 0.5}
                    outcome = "ok"
                    try:
                        if body["stream"] and rng.random() < 0.2:  # leaves mid-stream
                            with http.stream("POST", node.url + "/v1/chat/completions",
                                             json=body) as r:
                                for _ in zip(range(3), r.iter_lines()):
                                    pass
                            outcome = "left"
                        else:
                            r = http.post(node.url + "/v1/chat/completions", json=body)
                            outcome = "ok" if r.status_code == 200 else "error"
                    except httpx.HTTPError:
                        outcome = "error"
                    with lock:
                        counts[outcome] += 1

        threads = [threading.Thread(target=client, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        procs = {"peer": psutil.Process(peer.proc.pid), "entry": psutil.Process(entry.proc.pid)}
        samples: list[tuple[float, dict[str, tuple[float, int]]]] = []
        started = time.monotonic()
        while (elapsed := time.monotonic() - started) < args.minutes * 60:
            samples.append((elapsed, {name: (p.memory_info().rss / 1e6, p.num_fds())
                                      for name, p in procs.items()}))
            print(f"{elapsed:5.0f} s  " + "  ".join(
                f"{name}: {rss:.0f} MB, {fds} fds" for name, (rss, fds) in samples[-1][1].items())
                  + f"  requests: {dict(counts)}", flush=True)
            time.sleep(10)
        stop.set()
        for t in threads:
            t.join(60)
        time.sleep(6)  # idle connections close after 5 s
        after = {name: (p.memory_info().rss / 1e6, p.num_fds()) for name, p in procs.items()}
    finally:
        stop.set()
        for n in (peer, entry):
            n.kill()

    warm = next(s for t, s in samples if t >= min(60, args.minutes * 60 / 10))
    first = samples[0][1]
    rows = [["node", "RSS after warm-up MB", "RSS at end MB", "growth", "fds at start",
             "fds at end (idle)"]]
    failed = False
    for name in procs:
        growth = samples[-1][1][name][0] / warm[name][0] - 1
        leak = after[name][1] > first[name][1] + 2
        failed |= growth >= 0.05 or leak
        rows.append([name, f"{warm[name][0]:.0f}", f"{samples[-1][1][name][0]:.0f}",
                     f"{growth * 100:+.1f}%", first[name][1], after[name][1]])
    print(table(rows))
    print(f"requests: {dict(counts)} in {args.minutes:g} min")
    print("RESULT:", "FAIL" if failed else "RSS grew < 5% after warm-up, no descriptor leak")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
