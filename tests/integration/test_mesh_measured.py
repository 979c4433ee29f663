"""Routing inputs the node measures: round trips to peers (libp2p ping, smoothed) and the
devices' free memory (re-probed off the event loop).  Virtual time, fake host and probe."""

import threading
import time
from types import SimpleNamespace

import samples
import trio
from libp2p.peer.id import ID

from rbee_p2p.engines.admission import Capacity
from rbee_p2p.engines.hardware import Device, Hardware
from rbee_p2p.mesh.latency import PING_ID, Latency
from rbee_p2p.routing.places import RTT_ALPHA as ALPHA
from rbee_p2p.routing.places import UNPROVEN_MS
from rbee_p2p.mesh.service import Mesh, MeshConfig
from rbee_p2p.protocol.envelope import Verifier, seal
import pytest

A, B = samples.key_a(), samples.key_b()


class EchoStream:
    """The far end of a ping stream: echoes what is written after ``delay`` seconds."""

    def __init__(self, host, delay):
        self.host, self.delay, self.pending = host, delay, b""

    async def write(self, data):
        self.pending += data

    async def read(self, n=65536):
        self.host.in_flight += 1
        self.host.most = max(self.host.most, self.host.in_flight)
        await trio.sleep(self.delay)
        self.host.in_flight -= 1
        out, self.pending = self.pending[:n], self.pending[n:]
        return out

    async def close(self):
        pass

    async def reset(self):
        pass


class PingHost:
    """Peers at fixed round trips; only those in ``connected`` have a connection."""

    def __init__(self, delays, connected):
        self.delays, self.in_flight, self.most = delays, 0, 0
        self.connected = {ID(p): object() for p in connected}

    def get_network(self):
        return SimpleNamespace(connections=self.connected, close_peer=self.close_peer)

    async def close_peer(self, pid):
        self.connected.pop(pid, None)

    async def new_stream(self, pid, protocols):
        assert protocols == [PING_ID]
        return EchoStream(self, self.delays[pid.to_bytes()])


async def test_a_ping_measures_the_round_trip_and_smooths_it(autojump_clock):
    latency = Latency()
    host = PingHost({B.peer_id: 0.040}, [B.peer_id])
    assert await latency.ping(host, B.peer_id) == pytest_approx(40.0)
    host.delays[B.peer_id] = 0.140
    await latency.ping(host, B.peer_id)
    assert latency.ms(B.peer_id) == pytest_approx(40 + ALPHA * 100)
    latency.forget(B.peer_id)
    assert latency.ms(B.peer_id) is None


async def test_pings_go_to_connected_peers_periodically_a_few_at_a_time(autojump_clock):
    peers = [samples.key_a().peer_id[:-1] + bytes([i]) for i in range(12)]
    host = PingHost({p: 0.010 * (i + 1) for i, p in enumerate(peers)}, peers[:10])
    latency = Latency(interval_s=5.0, concurrency=3)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(latency.run, host, lambda: peers)
        await trio.sleep(1.0)
        first = dict(latency.pings)
        await trio.sleep(5.0)
        nursery.cancel_scope.cancel()
    assert first == {"sent": 10, "answered": 10, "failed": 0,
                     "reconnects": 0}  # not the 2 unconnected
    assert latency.pings["sent"] == 20  # one more round, 5 s later
    assert host.most == 3  # never more than 3 at once
    assert set(latency.rtt) == set(peers[:10])
    assert latency.ms(peers[3]) == pytest_approx(40.0)


async def test_a_connection_whose_pings_go_unanswered_is_closed_for_a_fresh_dial(autojump_clock):
    """A connected peer that answers no ping (new streams on a half-dead connection hang)
    has its connection closed after UNANSWERED rounds, not kept for ever; one slow answer
    in between starts the count again."""
    host = PingHost({B.peer_id: 30.0}, [B.peer_id])  # never within the 2 s timeout
    latency = Latency(interval_s=1.0, timeout_s=2.0)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(latency.run, host, lambda: [B.peer_id])
        await trio.sleep(3.5)  # one round: unanswered once, still connected
        assert ID(B.peer_id) in host.connected and latency.pings["failed"] == 1
        await trio.sleep(3.0)
        assert ID(B.peer_id) not in host.connected  # the second: closed
        nursery.cancel_scope.cancel()
    assert latency.pings["reconnects"] == 1 and latency.ms(B.peer_id) is None


async def test_routing_sees_the_measured_latency_and_status_shows_it(autojump_clock):
    mesh = Mesh(MeshConfig(), A, local=None, executor=None, verifier=Verifier())
    now = int(time.time() * 1000)
    mesh.table.apply_advert(mesh.verifier.verify(seal(B, samples.advert(), now_ms=now), now),
                            now)
    (before,) = mesh.peers()
    await mesh.latency.ping(PingHost({B.peer_id: 0.025}, [B.peer_id]), B.peer_id)
    (after,) = mesh.peers()
    # measured, and proven by its answer: the unproven peer's extra latency is gone
    assert after.latency_ms == pytest_approx(before.latency_ms - UNPROVEN_MS + 25.0)
    (row,) = mesh.status()["peers"]
    assert row["latency_ms"] == pytest_approx(25.0)
    mesh.table.on_forget(B.peer_id)  # as when the table forgets it
    assert mesh.latency.ms(B.peer_id) is None


def pytest_approx(x):
    return pytest.approx(x, abs=0.01)


def hardware(free):
    return Hardware([Device("cpu", "cpu", "x86", 16 << 30, free, engines=("llama.cpp",))])


async def test_device_memory_is_reprobed_periodically_off_the_event_loop(mock_clock):
    # virtual time jumps once trio has been idle 50 ms of real time, so a probe in its
    # thread (microseconds) is back before the clock moves on
    mock_clock.autojump_threshold = 0.05
    capacity = Capacity(hardware(8 << 30), {"cpu": 8 << 30})
    calls = []

    def reprobe(hw):  # blocking, like NVML or ggml: must not run on trio's thread
        calls.append(threading.current_thread() is threading.main_thread())
        return hardware(hw.devices[0].mem_free - (1 << 30))

    async with trio.open_nursery() as nursery:
        await nursery.start(capacity.watch_devices, 30.0, reprobe)
        await trio.sleep(29.0)
        assert capacity.current_device_infos()[0].mem_free == 8 << 30  # not yet
        await trio.sleep(2.0)
        assert capacity.current_device_infos()[0].mem_free == 7 << 30
        await trio.sleep(60.0)
        nursery.cancel_scope.cancel()
    assert capacity.current_device_infos()[0].mem_free == 5 << 30 and calls == [False] * 3
    assert capacity.status()["devices"][0]["mem_free"] == 5 << 30  # no probe on the loop
