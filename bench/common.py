"""Shared helpers for the benchmarks: servers as child processes, timing, tables."""

from __future__ import annotations

import json
import os
import socket
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def server(cmd: Sequence[str], health_url: str, log: Path, env: dict[str, str] | None = None,
           timeout: float = 180) -> Iterator[subprocess.Popen[bytes]]:
    """Start ``cmd``, wait until ``health_url`` answers, kill it (by PID) afterwards."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(list(cmd), stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, **(env or {})})
        try:
            deadline = time.monotonic() + timeout
            while True:
                if proc.poll() is not None:
                    sys.exit(f"{cmd[0]} exited early; see {log}:\n{log.read_text()[-2000:]}")
                try:
                    if httpx.get(health_url, timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    sys.exit(f"{cmd} not ready after {timeout}s; see {log}")
                time.sleep(0.2)
            yield proc
        finally:
            proc.kill()
            proc.wait(10)


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def table(rows: Sequence[Sequence[object]]) -> str:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    lines = ["| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |" for r in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def read_sse(response: Iterable[bytes]) -> tuple[float | None, float | None, int | None, int]:
    """Times of the first and last text event (perf_counter), the usage's completion
    tokens (if sent) and the number of text events of an OpenAI completion stream."""
    first = last = None
    usage = None
    pieces = 0
    for raw in response:
        if not raw.startswith(b"data: {"):
            continue
        event = json.loads(raw[6:])
        if event.get("usage"):
            usage = event["usage"]["completion_tokens"]
        if event.get("choices") and event["choices"][0].get("text"):
            last = time.perf_counter()
            first = first or last
            pieces += 1
    return first, last, usage, pieces
