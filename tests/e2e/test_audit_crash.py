"""kill -9 an audit writer in a loop: every acknowledged record survives, the chain verifies."""

import os
import random
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import samples

from rbee_p2p.protocol.audit import verify_chain
from rbee_p2p.store.audit import AuditLog

pytestmark = pytest.mark.e2e

WRITER = """
import sys
from rbee_p2p.protocol.identity import NodeKey
from rbee_p2p.store.audit import AuditLog
log = AuditLog(__import__("pathlib").Path(sys.argv[1]), NodeKey.from_seed(bytes.fromhex(sys.argv[2])))
print("head", log.head.seq, flush=True)
while True:
    log.append(now_ms=1, kind="execute", outcome="ok", tokens_out=log.head.seq)
    print(log.head.seq - 1, flush=True)
"""


def read_line(proc: subprocess.Popen, deadline: float) -> str:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
    assert ready, "writer produced no output in time"
    return proc.stdout.readline().decode()


def test_kill_9_writer_in_a_loop(tmp_path: Path):
    path = tmp_path / "audit.log"
    rng = random.Random(7)
    acked = -1
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])}
    for _round in range(8):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path), samples.SEED_A.hex()],
                                stdout=subprocess.PIPE, env=env)
        try:
            deadline = time.monotonic() + 20
            head = int(read_line(proc, deadline).split()[1])
            assert head >= acked + 1, "an acknowledged record was lost"
            for _ in range(rng.randint(1, 40)):
                acked = int(read_line(proc, deadline))
            os.kill(proc.pid, signal.SIGKILL)  # mid-append, most likely
        finally:
            proc.kill()
            proc.wait(timeout=10)
            assert proc.stdout is not None
            proc.stdout.close()
        with AuditLog(path, samples.key_a()) as log:
            assert log.head.seq >= acked + 1
            _, records = verify_chain(log.records(), signer=samples.key_a().peer_id,
                                      expected_head=log.head)
        assert [r.tokens_out for r in records] == list(range(len(records)))


BATCHED = """
import itertools, sys, trio
from pathlib import Path
sys.path.insert(0, sys.argv[3])
from auditlogs import receipt_for
from rbee_p2p.protocol.identity import NodeKey
from rbee_p2p.store.audit import AuditLog
from rbee_p2p.store.writer import AuditWriter
log = AuditLog(Path(sys.argv[1]), NodeKey.from_seed(bytes.fromhex(sys.argv[2])))
print("head", log.head.seq, flush=True)
counter = itertools.count(int(sys.argv[4]))

async def producer(writer):
    while True:
        i = next(counter)
        await writer.record("entry", "ok", request_id=i.to_bytes(16, "big"), tokens_out=i,
                            receipt=receipt_for(i) if i % 2 else None, durable=True)
        print(i, flush=True)

async def main():
    writer = AuditWriter(log)
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        for _ in range(8):
            nursery.start_soon(producer, writer)

trio.run(main)
"""


def test_kill_9_batched_writer_with_receipts_in_a_loop(tmp_path: Path):
    """Group commit (durable=True): every acknowledged record survives, and no receipt is
    ever left without its record (audit verify stays green)."""
    from rbee_p2p.store.audit_read import verify_log

    path = tmp_path / "audit.log"
    rng = random.Random(11)
    acked: set[int] = set()
    tests = Path(__file__).parents[1]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])}
    for round_ in range(6):
        proc = subprocess.Popen([sys.executable, "-c", BATCHED, str(path), samples.SEED_A.hex(),
                                 str(tests), str(round_ * 1_000_000)],
                                stdout=subprocess.PIPE, env=env)
        try:
            deadline = time.monotonic() + 30
            read_line(proc, deadline)
            for _ in range(rng.randint(1, 200)):
                acked.add(int(read_line(proc, deadline)))
            os.kill(proc.pid, signal.SIGKILL)
        finally:
            proc.kill()
            proc.wait(timeout=10)
            assert proc.stdout is not None
            proc.stdout.close()
        with AuditLog(path, samples.key_a()) as log:  # cuts a torn tail
            _, records = verify_chain(log.records(), signer=samples.key_a().peer_id,
                                      expected_head=log.head)
        assert acked <= {r.tokens_out for r in records}, "an acknowledged record was lost"
        verdict = verify_log(path, signer=samples.key_a().peer_id)
        assert verdict.ok, verdict.errors
