"""Chaos (issue 13, item 7): 5 real nodes -- 2 entry nodes without a model, 3 executors of a
scripted model -- take >= 500 requests from 8 clients while the executors are killed
(SIGKILL, restarted a second later on the same identity and ports) and frozen (SIGSTOP for
2-6 s, then SIGCONT) at random.  Every request must end in success or a clean error (an
OpenAI-shaped error body, or an error event then ``[DONE]`` in a stream; no hang, no cut),
none may be completed twice (at most one ``execute ok`` audit record per request id across
the executors), and every node's audit chain must verify.

    python bench/chaos.py [--requests 500] [--seed 1]

Exits non-zero if any of the three fails.
"""

from __future__ import annotations

import argparse
import collections
import json
import random
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "e2e"))
from nodeproc import NodeProcess  # noqa: E402

from rbee_p2p.protocol.audit import verify_chain  # noqa: E402
from rbee_p2p.store.audit import read_frames  # noqa: E402

FAST = "advert_interval = 0.5\nsuspect_after = 1.5\ndead_after = 3.0\n"
MODEL = ("--no-default-model", "--fake-model", "m:300")


def start(home: Path, *args: str, **kwargs) -> NodeProcess:
    home.mkdir(parents=True, exist_ok=True)
    (home / "rbee-node.toml").write_text(FAST)
    return NodeProcess(home, *args, **kwargs)


def classify(r: httpx.Response, stream: bool) -> str:
    """"ok", "clean:<code>" or "unclean:<why>" for a finished response."""
    if r.status_code != 200:
        try:
            error = r.json()["error"]
            return f"clean:{error.get('code') or error['type']}"
        except Exception:
            return f"unclean:status {r.status_code} without an error body"
    if not stream:
        choice = r.json()["choices"][0]
        ok = choice["finish_reason"] in ("stop", "length") and choice["message"]["content"]
        return "ok" if ok else "unclean:no answer"
    lines = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
    if not lines or lines[-1] != "[DONE]":
        return "unclean:stream cut without [DONE]"
    last = json.loads(lines[-2]) if len(lines) > 1 else {}
    if "error" in last:
        return f"clean:{last['error'].get('code') or last['error']['type']}"
    finishes = [c["finish_reason"] for event in map(json.loads, lines[:-1])
                for c in event.get("choices", []) if c.get("finish_reason")]
    return "ok" if finishes else "unclean:no finish_reason"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    root = Path(tempfile.mkdtemp(prefix="rbee-chaos-"))
    executors = [start(root / f"x{i}", *MODEL) for i in range(3)]
    entries = [start(root / f"e{i}", "--no-default-model",
                     *[a for x in executors for a in ("--peer", x.addr)]) for i in range(2)]
    everyone = lambda: [*entries, *executors]  # noqa: E731 (restarts replace executors)
    outcomes: collections.Counter[str] = collections.Counter()
    unclean: list[str] = []
    issued = [0]
    lock = threading.Lock()
    done = threading.Event()
    actions = collections.Counter()
    try:
        for node in everyone():
            node.wait_ready()
        for e in entries:
            e.wait_for(lambda s: sum(p["state"] == "alive" and "m" in p["models"]
                                     for p in s["peers"]) == 3, 60, "all three executors")

        def client(seed: int) -> None:
            mine = random.Random(seed)
            with httpx.Client(timeout=60) as http:
                while True:
                    with lock:
                        if issued[0] >= args.requests:
                            return
                        issued[0] += 1
                    entry, stream = mine.choice(entries), mine.random() < 0.5
                    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}],
                            "max_tokens": mine.randint(8, 64), "stream": stream}
                    try:
                        r = http.post(entry.url + "/v1/chat/completions", json=body)
                        outcome = classify(r, stream)
                    except httpx.HTTPError as exc:
                        outcome = f"unclean:{type(exc).__name__}"
                    with lock:
                        outcomes[outcome] += 1
                        if outcome.startswith("unclean"):
                            unclean.append(outcome)

        def chaos() -> None:
            while not done.wait(rng.uniform(1, 3)):
                i = rng.randrange(len(executors))
                victim = executors[i]
                if rng.random() < 0.5:
                    victim.kill()
                    actions["SIGKILL + restart"] += 1
                    time.sleep(1)
                    executors[i] = start(victim.log.parent, *MODEL, port=victim.port,
                                         p2p_port=victim.p2p_port)
                else:
                    victim.proc.send_signal(signal.SIGSTOP)
                    actions["SIGSTOP 2-6 s"] += 1
                    time.sleep(rng.uniform(2, 6))
                    victim.proc.send_signal(signal.SIGCONT)

        started = time.monotonic()
        threads = [threading.Thread(target=client, args=(args.seed * 100 + k,)) for k in
                   range(8)]
        agent = threading.Thread(target=chaos)
        agent.start()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        done.set()
        agent.join()
        took = time.monotonic() - started
        time.sleep(3)  # the audit writers' last batches
    finally:
        for node in everyone():
            node.kill()

    completed: collections.Counter[bytes] = collections.Counter()
    chains = {}
    for node in everyone():
        name = node.log.parent.name
        frames, _ = read_frames((node.log.parent / "audit.log").read_bytes())
        try:
            _, records = verify_chain([raw for _, raw in frames])
            chains[name] = f"verifies ({len(records)} records)"
        except Exception as exc:
            chains[name] = f"BROKEN: {exc}"
            continue
        for r in records:
            if r.kind == "execute" and r.outcome == "ok":
                completed[r.request_id] += 1
    twice = sum(1 for n in completed.values() if n > 1)
    print(f"{args.requests} requests from 8 clients in {took:.0f} s; chaos: {dict(actions)}")
    print("outcomes:", dict(outcomes.most_common()))
    print(f"completed twice: {twice}; executions recorded ok: {sum(completed.values())}")
    for name, verdict in sorted(chains.items()):
        print(f"audit chain {name}: {verdict}")
    failed = bool(unclean) or twice > 0 or any(v.startswith("BROKEN") for v in chains.values())
    print("RESULT:", "FAIL" if failed else "every request ended cleanly, none twice, every "
          "chain verifies")
    if unclean:
        print("unclean:", collections.Counter(unclean))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
