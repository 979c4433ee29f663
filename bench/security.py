"""Floods against a real node of the open swarm (issue 13's numbers): under each, a local
tenant's chat p50 latency against its unloaded value (the anchor, measured in the same run)
and the node's RSS growth; fresh traffic accepted during a replay flood; a tenant's quota
overshoot under 20 concurrent requests.

The victim (``rbee-node start --swarm public``, scripted model at 200 tokens/s, defaults
for per-peer limits) runs on CPU 0; this process -- the attacker, a real libp2p host
(tests/security/attacker.py), and the client measuring chat -- on CPU 1, so the attack's
own CPU does not count against the victim.  Needs 2 cores and psutil.

    python bench/security.py [--chats 40] [--peer-yield SECONDS]
"""

from __future__ import annotations

import argparse
import os
import resource
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import psutil
import trio

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests" / "security"))
sys.path.insert(0, str(HERE.parent / "tests" / "e2e"))
from attacker import fake_advert, hostile, sybil_adverts  # noqa: E402
from common import median, table  # noqa: E402
from nodeproc import NodeProcess  # noqa: E402

from rbee_p2p.tenancy.tenants import TenantBook  # noqa: E402

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}


class Victim(NodeProcess):
    """The victim node on CPU 0, with two tenants, in the open swarm (no swarm key)."""

    def __init__(self, tmp: Path, peer_yield: float | None) -> None:
        home = tmp / "victim"
        home.mkdir()
        if peer_yield is not None:
            (home / "rbee-node.toml").write_text(f"peer_yield = {peer_yield}\n")
        book = TenantBook.open(home)
        self.key = book.add("local")
        self.capped = book.add("capped", tokens_per_day=10)
        book.save()
        super().__init__(home, "--no-dht", "--swarm", "public", "--no-default-model",
                         "--fake-model", "m:200", env_psk=None, prefix=("taskset", "-c", "0"))
        self.wait_ready()
        self.ps = psutil.Process(self.proc.pid)

    def rss_mb(self) -> float:
        return self.ps.memory_info().rss / 1e6


def chats(victim: Victim, n: int) -> list[float]:
    """``n`` sequential chats as the local tenant; their latencies (s)."""
    out = []
    with httpx.Client(timeout=30) as client:
        for _ in range(n):
            started = time.perf_counter()
            r = client.post(victim.url + "/v1/chat/completions", json=CHAT,
                            headers={"Authorization": f"Bearer {victim.key}"})
            r.raise_for_status()
            out.append(time.perf_counter() - started)
    return out


def keep(concurrency: int, one):
    """A flood: ``concurrency`` copies of ``one(attacker)`` in a loop until cancelled."""
    async def flood(attacker) -> None:
        async def loop() -> None:
            while True:
                try:
                    await one(attacker)
                except Exception:
                    await trio.sleep(0.01)  # refused, reset: go on

        async with trio.open_nursery() as nursery:
            for _ in range(concurrency):
                nursery.start_soon(loop)
    return flood


def heavy_frame(attacker) -> bytes:
    import cbor2

    items = cbor2.loads(attacker.request())
    items[6] = {**items[6], "pad": list(range(20)) * 50_000}
    return cbor2.dumps(items, canonical=True)  # ~1 MB, the signature no longer matches


async def sybils(attacker) -> None:
    """1,500 identities' signed adverts over one connection, again every second."""
    from rbee_p2p.protocol.identity import NodeKey

    keys = [NodeKey.from_seed(i.to_bytes(32, "big")) for i in range(1, 1501)]
    await sybil_adverts(attacker.victim_addr, "public", keys, advert=fake_advert, every_s=1.0)


FLOODS = {
    "peer jobs (50 at once, 400 tokens each)": keep(50, lambda a: a.infer(
        a.request(max_tokens=400, tenant_ref=os.urandom(32)), timeout=30)),
    "1 MB frames, wrong signature (8 at once)": keep(8, lambda a: a.infer(
        a.heavy, raw=True, timeout=30)),
    "probes (32 at once)": keep(32, lambda a: a.probe()),
    "unknown-model requests (16 at once)": keep(16, lambda a: a.infer(
        a.request(model="nothing-here"))),
    "replays of one request (16 at once)": keep(16, lambda a: a.infer(a.replayed)),
    "Sybil: 1,500 identities' adverts a second, one connection": sybils,
}


async def under(victim: Victim, flood, n: int) -> tuple[list[float], float, float | None]:
    """(chat latencies, peak RSS growth in MB, fresh requests of a second peer accepted --
    not refused as replayed or invalid -- in %) while ``flood`` runs."""
    base = victim.rss_mb()
    peak = [base]
    fresh: list[bool] = []

    async def watch() -> None:
        while True:
            peak[0] = max(peak[0], victim.rss_mb())
            await trio.sleep(0.2)

    async with hostile(victim.addr) as attacker, hostile(victim.addr) as other:
        attacker.heavy = heavy_frame(attacker)
        attacker.replayed = attacker.request(tenant_ref=os.urandom(32))
        attacker.victim_addr = victim.addr
        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch)
            nursery.start_soon(flood, attacker)
            await trio.sleep(1.0)  # the flood in full swing
            latencies = await trio.to_thread.run_sync(chats, victim, n)
            if flood is FLOODS["replays of one request (16 at once)"]:
                for _ in range(20):  # within the open swarm's 60 a minute
                    kind, reply = await other.infer(other.request(tenant_ref=os.urandom(32)))
                    # accepted as fresh: served, or refused for any reason but the
                    # envelope's (e.g. busy: peers give way to the local chats)
                    fresh.append(kind == "served" or (
                        kind == "error" and getattr(reply, "code", "") != "protocol"))
            nursery.cancel_scope.cancel()
    await trio.sleep(2)  # let the victim settle before the next flood
    return latencies, peak[0] - base, (100 * sum(fresh) / len(fresh) if fresh else None)


def slowloris(victim: Victim, n: int) -> tuple[list[float], float]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 8192), hard))
    base, sockets = victim.rss_mb(), []
    try:
        for i in range(2000):
            s = socket.create_connection(("127.0.0.1", victim.port), timeout=5)
            s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow-" + str(i).encode())
            sockets.append(s)
        grown = victim.rss_mb() - base
        return chats(victim, n), grown
    finally:
        for s in sockets:
            s.close()
        time.sleep(2)


def quota_overshoot(victim: Victim) -> int:
    """Tokens the "capped" tenant (10 tokens a day) got beyond its quota from 20 concurrent
    requests (10 streamed) of max_tokens 8."""
    def one(i: int) -> None:
        try:
            httpx.post(victim.url + "/v1/chat/completions", timeout=30,
                       json={**CHAT, "stream": i % 2 == 0},
                       headers={"Authorization": f"Bearer {victim.capped}"})
        except httpx.HTTPError:
            pass

    threads = [threading.Thread(target=one, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    time.sleep(0.5)
    usage = victim.status()["tenancy"]["usage"]["capped"]
    return usage["tokens_today"] - 10


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chats", type=int, default=40)
    parser.add_argument("--peer-yield", type=float, default=None,
                        help="the victim's peer_yield (default: the open swarm's, 30 s)")
    args = parser.parse_args()
    if len(os.sched_getaffinity(0)) < 2:
        sys.exit("needs 2 cores: the victim on one, the attacker on the other")
    os.sched_setaffinity(0, {1})
    with tempfile.TemporaryDirectory() as tmp:
        victim = Victim(Path(tmp), args.peer_yield)
        try:
            run(victim, args.chats)
        finally:
            victim.kill()


def run(victim: Victim, n: int) -> None:
    """Every flood in turn, then the slowloris and the quota rows; prints the table."""
    chats(victim, 10)  # warm up
    anchor = median(chats(victim, n))
    rows = [["flood", "chat p50 ms", "x unloaded", "RSS +MB", "fresh accepted"],
            ["none (anchor)", f"{anchor * 1000:.1f}", "1.00", "0", ""]]
    for name, flood in FLOODS.items():
        latencies, grown, fresh = trio.run(under, victim, flood, n)
        p50 = median(latencies)
        rows.append([name, f"{p50 * 1000:.1f}", f"{p50 / anchor:.2f}", f"{grown:.0f}",
                     "" if fresh is None else f"{fresh:.0f}%"])
        print(rows[-1], flush=True)
    latencies, grown = slowloris(victim, n)
    p50 = median(latencies)
    rows.append(["2,000 half-open HTTP connections", f"{p50 * 1000:.1f}",
                 f"{p50 / anchor:.2f}", f"{grown:.0f}", ""])
    overshoot = quota_overshoot(victim)
    print(table(rows))
    print(f"\nquota overshoot (tokens/day = 10, 20 concurrent requests of max_tokens "
          f"{CHAT['max_tokens']}): {overshoot} tokens "
          f"({'within' if overshoot <= CHAT['max_tokens'] else 'MORE than'} one request's "
          "max_tokens)")
    status = victim.status()
    print("victim's peer gate:", status["tenancy"]["peers"], "adverts:", status["adverts"])


if __name__ == "__main__":
    main()
