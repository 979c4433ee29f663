"""Run a real `rbee-node start` process for e2e tests: bounded waits, killed by PID."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


READY = re.compile(r"^serving .* on http", re.M)  # not "serving a scripted model ..."
E2E_SWARM = "rbee-e2e-swarm"
"""The private swarm's passphrase the tests' nodes share (each has its own home, so each
would otherwise found a swarm of its own); ``env_psk=None`` leaves a node to the default."""


class NodeProcess:
    """``rbee-node start`` on 127.0.0.1 (HTTP and libp2p), mDNS off unless asked for."""

    def __init__(self, home: Path, *args: str, port: int | None = None,
                 p2p_port: int | None = None, prefix: tuple[str, ...] = (),
                 env_psk: str | None = E2E_SWARM, p2p_host: str = "127.0.0.1") -> None:
        self.port = port or free_port()
        self.p2p_port = p2p_port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = home / "node.log"
        home.mkdir(parents=True, exist_ok=True)
        exe = shutil.which("rbee-node")
        assert exe, "rbee-node is not installed (pip install -e .)"
        env = {k: v for k, v in os.environ.items() if k not in ("RBEE_PSK", "RBEE_JOIN")}
        env["RBEE_HOME"] = str(home)
        if env_psk is not None:
            env["RBEE_PSK"] = env_psk
        self.peer_id = subprocess.run([exe, "id"], env=env, capture_output=True, text=True,
                                      timeout=60, check=True).stdout.strip()
        self.addr = f"/ip4/{p2p_host}/tcp/{self.p2p_port}/p2p/{self.peer_id}"
        self._out = open(self.log, "wb")
        mdns = () if "--mdns" in args else ("--no-mdns",)
        args = tuple(a for a in args if a != "--mdns")
        self.proc = subprocess.Popen(
            [*prefix, exe, "start", "--port", str(self.port), "--p2p-listen",
             f"/ip4/{p2p_host}/tcp/{self.p2p_port}", *mdns, *args], stdout=self._out,
            stderr=subprocess.STDOUT, env=env)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if READY.search(self.output()):
                return
            if self.proc.poll() is not None:
                raise AssertionError(f"node exited with {self.proc.returncode}:\n{self.output()}")
            time.sleep(0.1)
        raise AssertionError(f"node not ready in {timeout}s:\n{self.output()}")

    def interrupt(self, timeout: float = 30) -> int:
        """Ctrl-C, then wait for the exit code."""
        self.proc.send_signal(signal.SIGINT)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._out.close()

    def status(self) -> dict:
        """/rbee/status, with the node's admin key (needed once it has tenants)."""
        import httpx

        key = self.log.parent / "admin.key"
        headers = {"Authorization": f"Bearer {key.read_text().strip()}"} if key.exists() else {}
        return httpx.get(self.url + "/rbee/status", headers=headers, timeout=10).json()

    def wait_for(self, predicate, timeout: float = 30, what: str = "condition") -> dict:
        """Poll /rbee/status until ``predicate(status)``; bounded."""
        deadline = time.monotonic() + timeout
        while True:
            status = self.status()
            if predicate(status):
                return status
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}: {status}")
            time.sleep(0.1)


@contextmanager
def running(home: Path, *args: str, **kwargs) -> Iterator[NodeProcess]:
    """A started, ready node; killed (by PID) afterwards."""
    proc = NodeProcess(home, *args, **kwargs)
    try:
        proc.wait_ready()
        yield proc
    finally:
        proc.kill()


@contextmanager
def cluster(root: Path) -> Iterator:
    """``start(name, *args, **kwargs)`` -> a NodeProcess homed at ``root/name``; every node
    started is killed (by PID; a stopped one is continued first) at the end."""
    started: list[NodeProcess] = []

    def start(name: str, *args: str, **kwargs) -> NodeProcess:
        node = NodeProcess(root / name, *args, **kwargs)
        started.append(node)
        return node

    try:
        yield start
    finally:
        for node in started:
            if node.proc.poll() is None:
                os.kill(node.proc.pid, signal.SIGCONT)
            node.kill()


def sdk(node: NodeProcess, api_key: str = "unused"):
    """The official openai client for ``node`` (no retries: failures must show)."""
    import openai

    return openai.OpenAI(base_url=node.url + "/v1", api_key=api_key, max_retries=0,
                         timeout=60)


def audit_records(node, kind, count, timeout=10):
    """The node's audit records of ``kind``, once there are ``count`` of them (the writer
    batches: poll, bounded)."""
    from rbee_p2p.protocol.audit import verify_chain
    from rbee_p2p.store.audit import read_frames

    deadline = time.monotonic() + timeout
    while True:
        frames, _ = read_frames((node.log.parent / "audit.log").read_bytes())
        _, records = verify_chain([raw for _, raw in frames])
        found = [r for r in records if r.kind == kind]
        if len(found) >= count or time.monotonic() > deadline:
            return found
        time.sleep(0.1)
