"""Single-node serving benchmark (issue: one node serves the OpenAI API).

Compares, in one run on this machine, with the same model, threads, context and sampling:
  * in-process llama-cpp-python (``Llama.create_completion(stream=True)``): the anchor;
  * rbee-node (``rbee-node start``, this project) over HTTP/SSE;
  * llama-cpp-python's own server (``python -m llama_cpp.server``) over HTTP/SSE.
Requests are 64-token completions with distinct prompts, sent back to back: blocks of
consecutive requests per target, blocks interleaved across rounds so that drift hits all
targets alike; in a round every target gets the same prompts (prompt lengths and shared
prefixes differ between prompts, and so does the work before the first token).  The first request of each block is a warm-up (the model was idle and its
weights cold while the other targets ran) and is not counted.  Reports medians and ratios
against the anchors.

    python bench/single_node.py [--rounds 3] [--block 5] [-v]
"""

from __future__ import annotations

import argparse
import http.client
import json
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).parent))
from common import free_port, median, read_sse, server, table  # noqa: E402

from rbee_p2p.config import default_model_path  # noqa: E402
from rbee_p2p.engines.llama import available_cores  # noqa: E402

TOKENS = 64
SAMPLING = {"temperature": 0.8, "top_p": 0.95}
# llama_cpp.server's own defaults differ (repeat_penalty 1.1); pin what rbee uses
LLAMA_EXTRA = {"top_k": 40, "min_p": 0.05, "repeat_penalty": 1.0}


SEEDED = True  # --no-seed: unseeded sampling (then the targets' texts differ)


def seed(i: int) -> dict:
    return {"seed": i} if SEEDED else {}


def prompt(i: int) -> str:
    return f"Write story number {i} about a {['cat', 'bee', 'ship', 'tree', 'robot'][i % 5]}:"


def inprocess_run(llm, i: int, tokens: int) -> tuple[float, float, int]:
    start = time.perf_counter()
    first = last = None
    n = 0
    for chunk in llm.create_completion(prompt(i), max_tokens=tokens, stream=True, **seed(i),
                                       top_k=40, min_p=0.05, repeat_penalty=1.0, **SAMPLING):
        if chunk["choices"][0]["text"]:
            last = time.perf_counter()
            first = first or last
            n += 1
    return first - start, last - first, n


class Client:
    """A lean keep-alive HTTP/1.1 client (http.client), as editors keep connections open;
    client overhead, identical for both servers, stays small next to what they add."""

    def __init__(self, url: str) -> None:
        host, port = url.removeprefix("http://").split(":")
        self.conn = http.client.HTTPConnection(host, int(port), timeout=120)

    def post(self, path: str, body: dict) -> tuple[float, http.client.HTTPResponse]:
        """(start time, response); reconnects once if the server dropped the idle connection."""
        data = json.dumps(body).encode()
        for attempt in (1, 2):
            start = time.perf_counter()
            try:
                self.conn.request("POST", path, data, {"Content-Type": "application/json"})
                response = self.conn.getresponse()
                break
            except (BrokenPipeError, ConnectionResetError, http.client.RemoteDisconnected):
                self.conn.close()
                if attempt == 2:
                    raise
        if response.status != 200:
            sys.exit(f"{path}: HTTP {response.status}: {response.read()[:500]!r}")
        return start, response


def http_run(client: Client, i: int, tokens: int, extra: dict) -> tuple[float, float, int]:
    body = {"model": "smollm2", "prompt": prompt(i), "max_tokens": tokens, **seed(i),
            "stream": True, **SAMPLING, **extra}
    start, response = client.post("/v1/completions", body)
    first, last, usage, pieces = read_sse(response)
    return first - start, last - first, usage or pieces


def decode_rate(run: tuple[float, float, int]) -> float:
    _, span, n = run
    return (n - 1) / span if span > 0 and n > 1 else float("nan")


def sequential_short(client: Client, extra: dict, n: int, offset: int) -> float:
    start = time.perf_counter()
    for i in range(n):
        client.post("/v1/completions", {"model": "smollm2", "prompt": prompt(offset + i),
                                        "max_tokens": 16, **seed(i), **SAMPLING, **extra})[1].read()
    return n / (time.perf_counter() - start)


def rss_mib(pid: int) -> float:
    proc = psutil.Process(pid)
    return sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)]) / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--block", type=int, default=5,
                    help="back-to-back requests per block (the first is a warm-up)")
    ap.add_argument("--short", type=int, default=12, help="16-token requests per block")
    ap.add_argument("-v", "--verbose", action="store_true", help="print every TTFT")
    ap.add_argument("--node-args", default="",
                    help="more `rbee-node start` flags, e.g. '--no-dht' or '--no-p2p'")
    ap.add_argument("--no-seed", action="store_true",
                    help="unseeded requests (each target generates other text)")
    args = ap.parse_args()
    global SEEDED
    SEEDED = not args.no_seed

    from llama_cpp import Llama

    model = str(default_model_path())
    threads = available_cores()
    tmp = Path(tempfile.mkdtemp(prefix="rbee-bench-"))
    rbee_port, llama_port = free_port(), free_port()
    rbee_url, llama_url = f"http://127.0.0.1:{rbee_port}", f"http://127.0.0.1:{llama_port}"
    env = {"RBEE_HOME": str(tmp / "home")}

    # the mesh runs as by default, but on loopback and without mDNS (nothing leaves this host)
    local_mesh = ["--no-mdns", "--p2p-listen", "/ip4/127.0.0.1/tcp/0", *args.node_args.split()]
    with server(["rbee-node", "start", "--no-default-model", "--port", str(rbee_port),
                 *local_mesh],
                rbee_url + "/health", tmp / "idle.log", env=env) as idle:
        time.sleep(1.0)
        idle_rss = rss_mib(idle.pid)

    llm = Llama(model, n_ctx=4096, n_threads=threads, n_threads_batch=threads, verbose=False)
    with server(["rbee-node", "start", "--port", str(rbee_port), *local_mesh],
                rbee_url + "/health",
                tmp / "rbee.log", env=env) as rbee, \
         server([sys.executable, "-m", "llama_cpp.server", "--model", model, "--port",
                 str(llama_port), "--n_threads", str(threads), "--n_threads_batch", str(threads),
                 "--n_ctx", "4096", "--model_alias", "smollm2"], llama_url + "/v1/models",
                tmp / "llama_server.log") as llama_server:
        rbee_client, llama_client = Client(rbee_url), Client(llama_url)
        targets = {
            "in-process": lambda i, t=TOKENS: inprocess_run(llm, i, t),
            "rbee-node": lambda i, t=TOKENS: http_run(
                rbee_client, i, t, {"stream_options": {"include_usage": True}}),
            "llama_cpp.server": lambda i, t=TOKENS: http_run(llama_client, i, t, LLAMA_EXTRA),
        }
        runs: dict[str, list] = {name: [] for name in targets}
        for r in range(args.rounds):
            base = r * args.block
            for name, run in targets.items():  # the same prompts for every target
                run(10_000 + base, 8)  # warm-up
                for k in range(args.block - 1):
                    runs[name].append(run(base + k))
        short: dict[str, list[float]] = {"rbee-node": [], "llama_cpp.server": []}
        for r in range(args.rounds):
            short["rbee-node"].append(sequential_short(rbee_client, {}, args.short, 500 + r * 50))
            short["llama_cpp.server"].append(
                sequential_short(llama_client, LLAMA_EXTRA, args.short, 500 + r * 50))
        rbee_rss, server_rss = rss_mib(rbee.pid), rss_mib(llama_server.pid)

    stats = {name: {"tok_s": median([decode_rate(r) for r in rs]),
                    "ttft_ms": median([r[0] * 1000 for r in rs]),
                    "tokens": median([r[2] for r in rs]), "n": len(rs)}
             for name, rs in runs.items()}
    anchor, other = stats["in-process"], stats["llama_cpp.server"]
    rows = [["target", "decode tok/s (median)", "vs in-process", "vs llama_cpp.server",
             "TTFT ms (median)", "TTFT - in-process", "requests"]]
    for name, s in stats.items():
        rows.append([name, f"{s['tok_s']:.1f}", f"{s['tok_s'] / anchor['tok_s']:.3f}x",
                     f"{s['tok_s'] / other['tok_s']:.3f}x", f"{s['ttft_ms']:.1f}",
                     f"{s['ttft_ms'] - anchor['ttft_ms']:+.1f} ms", s["n"]])
    print(f"\nmodel {Path(model).name}, {threads} threads, {TOKENS}-token completions, "
          f"back to back in blocks of {args.block} (1 warm-up), {args.rounds} rounds, "
          f"{'seeded' if SEEDED else 'unseeded'} requests\n")
    print(table(rows))
    rs, ls = median(short["rbee-node"]), median(short["llama_cpp.server"])
    print(f"\nsequential 16-token completions/s: rbee-node {rs:.2f}, llama_cpp.server {ls:.2f} "
          f"-> {rs / ls:.2f}x")
    print(f"RSS: rbee-node idle (no model) {idle_rss:.0f} MiB; with SmolLM2 loaded "
          f"{rbee_rss:.0f} MiB; llama_cpp.server {server_rss:.0f} MiB")
    goals = [
        ("decode >= 0.97x in-process", stats["rbee-node"]["tok_s"] / anchor["tok_s"] >= 0.97),
        ("decode >= 1.5x llama_cpp.server", stats["rbee-node"]["tok_s"] / other["tok_s"] >= 1.5),
        ("TTFT <= in-process + 3 ms", stats["rbee-node"]["ttft_ms"] - anchor["ttft_ms"] <= 3),
        ("16-token completions/s >= 1.2x llama_cpp.server", rs / ls >= 1.2),
        ("idle RSS <= 150 MiB", idle_rss <= 150),
    ]
    print("\n" + "\n".join(f"[{'met' if ok else 'NOT MET'}] {goal}" for goal, ok in goals))
    if args.verbose:
        for name, rs in runs.items():
            print(name, "TTFT ms:", " ".join(f"{r[0] * 1000:.1f}" for r in rs))


if __name__ == "__main__":
    main()
