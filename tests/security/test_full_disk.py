"""The audit log on a full disk (issue 13's table: a short write was ignored, later appends
followed it, and the node no longer started: "damaged record header"), against a real node
whose home is a 4 MiB tmpfs this test mounts (root only, as in CI) and fills: once a record
cannot be written, requests get a clean 503 (nothing is served that could not be recorded;
before, they were served and their records silently lost); once space is freed the node
serves again, restarts, and its audit chain verifies.  Bounded; killed by PID; unmounted."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess

import httpx
import pytest
from e2e.nodeproc import NodeProcess

from rbee_p2p.protocol.audit import verify_chain
from rbee_p2p.store.audit import read_frames

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(os.geteuid() != 0 or shutil.which("mount") is None,
                       reason="needs root to mount a small tmpfs"),
]
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


def fill(path) -> None:
    """Fill the file system ``path`` is on, to the last byte."""
    with open(path, "wb", buffering=0) as f:
        for size in (65536, 4096, 1):
            try:
                while True:
                    f.write(b"\0" * size)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc


def test_a_full_disk_fails_cleanly_and_never_damages_the_audit_log(tmp_path):
    home = tmp_path / "small"
    home.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(home)],
                             capture_output=True, text=True)
    if mounted.returncode and "permission denied" in mounted.stderr.lower():
        pytest.skip(f"root without the right to mount here: {mounted.stderr.strip()}")
    assert mounted.returncode == 0, mounted.stderr
    node = again = None
    try:
        node = NodeProcess(home, "--no-default-model", "--no-p2p", "--fake-model", "m:1000")
        node.wait_ready()
        assert httpx.post(node.url + "/v1/chat/completions", json=CHAT, timeout=30).status_code \
            == 200
        fill(home / "filler")
        codes = []
        for _ in range(20):
            r = httpx.post(node.url + "/v1/chat/completions", json=CHAT, timeout=30)
            codes.append(r.status_code)
            assert r.status_code in (200, 503), r.text
            if r.status_code == 503:
                assert r.json()["error"]["code"] == "audit_unavailable", r.text
        assert codes[-1] == 503, codes  # once refused, refused while the disk is full
        audit = node.status()["audit"]
        assert audit["failing"] and audit["lost"] >= 1, audit
        (home / "filler").unlink()
        r = httpx.post(node.url + "/v1/chat/completions", json=CHAT, timeout=30)
        assert r.status_code == 200, r.text
        assert node.wait_for(lambda s: s["audit"]["failing"] is None, 10, "the log again")
        assert node.interrupt() == 0
        again = NodeProcess(home, "--no-default-model", "--no-p2p", "--fake-model", "m:1000",
                            port=node.port)
        again.wait_ready()  # before: "damaged record header", the node would not start
        assert httpx.post(again.url + "/v1/chat/completions", json=CHAT,
                          timeout=30).status_code == 200
        assert again.interrupt() == 0
        frames, _ = read_frames((home / "audit.log").read_bytes())
        _, records = verify_chain([raw for _, raw in frames])
        assert len(records) >= 2  # the chats after the space was freed, at least
    finally:
        for proc in (node, again):
            if proc is not None:
                proc.kill()
        subprocess.run(["umount", "-l", str(home)], check=False)
