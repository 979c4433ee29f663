"""Run a real `rbee-node start` process for e2e tests: bounded waits, killed by PID."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class NodeProcess:
    def __init__(self, home: Path, *args: str, port: int | None = None) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = home / "node.log"
        home.mkdir(parents=True, exist_ok=True)
        exe = shutil.which("rbee-node")
        assert exe, "rbee-node is not installed (pip install -e .)"
        self._out = open(self.log, "wb")
        self.proc = subprocess.Popen(
            [exe, "start", "--port", str(self.port), *args], stdout=self._out,
            stderr=subprocess.STDOUT, env={**os.environ, "RBEE_HOME": str(home)})

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if "serving " in self.output():
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
