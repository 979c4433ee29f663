"""Forwarding over an in-memory stream, for the integration tests: the executor (on B) and
the remote job (on A), both real, joined by trio's memory streams; ``mesh`` is the fixture
that starts a job."""

from contextlib import aclosing

import pytest
import samples
import trio
import trio.testing

from rbee_p2p.api.schemas import Limits, parse_chat
from rbee_p2p.dispatch import Dispatcher, Stamp
from rbee_p2p.engines.fake import ScriptedEngine
from rbee_p2p.engines.scheduler import Scheduler
from rbee_p2p.mesh.executor import Executor, Timing
from rbee_p2p.mesh.remote import RemoteJob
from rbee_p2p.protocol.envelope import Verifier
from rbee_p2p.routing import TenantFacts

A, B = samples.key_a(), samples.key_b()  # A asks, B executes
EU_TENANT = TenantFacts("t", residency="EU")
TIMING = Timing(heartbeat_s=1.0, frame_timeout_s=5.0, request_timeout_s=10.0)


class Mem:
    """A trio in-memory stream with the libp2p stream methods."""

    def __init__(self, stream):
        self.s = stream

    async def read(self, n=65536):
        return await self.s.receive_some(n)

    async def write(self, data):
        await self.s.send_all(data)

    async def close(self):
        await self.s.aclose()

    async def reset(self):
        await self.s.aclose()


class Audit:
    def __init__(self):
        self.records = []

    async def record(self, kind, outcome, **fields):
        self.records.append((kind, outcome, fields))

    def check(self):  # the log can always be written
        pass


def call(max_tokens=6, **body):
    return parse_chat({"model": "fake", "messages": [{"role": "user", "content": "hi there"}],
                       "max_tokens": max_tokens, **body}, Limits()).request


def executor(engines=None, scheduler=None, where="", **kwargs):
    """An executor on B serving ``engines`` through its own dispatcher."""
    scheduler = scheduler or Scheduler(engines or [])
    return Executor(B, Verifier(), Dispatcher(scheduler, jurisdiction=where).run_here,
                    Limits(), jurisdiction=where, timing=TIMING, **kwargs)


@pytest.fixture
def mesh(nursery):
    """Returns start(call, engine=..., serve=True) -> RemoteJob against an executor on B."""
    audits = {"A": Audit(), "B": Audit()}

    async def start(c, engine=None, serve=True, scheduler=None, stamp=Stamp(), where="EU",
                    admit_by_ms=None, prices=None, server=None):
        engine = engine or ScriptedEngine("fake", script="alpha beta gamma", token_seconds=0.1)
        scheduler = scheduler or Scheduler([engine])
        server = server or executor(scheduler=scheduler, where=where, audit=audits["B"],
                                    prices=prices)

        async def open_stream(peer, fresh):
            left, right = trio.testing.memory_stream_pair()
            start.served.append(right)
            if serve:
                nursery.start_soon(server.handle, Mem(right), A.peer_id)
            return Mem(left)

        job = await RemoteJob.start(B.peer_id, open_stream, c, key=A, verifier=Verifier(),
                                    timing=TIMING, audit=audits["A"], stamp=stamp,
                                    admit_by_ms=admit_by_ms, on_failure=start.failed.append)
        return job, engine, server

    start.audits = audits
    start.served = []  # the executor's ends of the streams
    start.failed = []  # peers the remote job reported as failed
    return start


async def collect(job):
    out = []
    async with aclosing(job.batches()) as batches:
        async for batch in batches:
            out += batch
    return "".join(out)
