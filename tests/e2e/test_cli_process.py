"""The installed console script, as a user runs it."""

import os
import shutil
import subprocess

import pytest

from rbee_p2p import __version__

pytestmark = pytest.mark.e2e


def run(*args, env=None):
    exe = shutil.which("rbee-node")
    assert exe, "rbee-node is not installed (pip install -e .)"
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})})


def test_version_and_help():
    assert run("--version").stdout.strip() == f"rbee-node {__version__}"
    help_ = run("--help")
    assert help_.returncode == 0 and "usage: rbee-node" in help_.stdout


def test_id_is_stable_across_runs(tmp_path):
    env = {"RBEE_HOME": str(tmp_path / "home")}
    first, second = run("id", env=env), run("id", env=env)
    assert first.returncode == 0 and first.stdout == second.stdout
    assert first.stdout.startswith("12D3KooW")


@pytest.mark.parametrize("which", ["http", "p2p"])
def test_a_taken_port_is_a_clear_error(tmp_path, which):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        free = socket.socket()
        free.bind(("127.0.0.1", 0))
        other = free.getsockname()[1]
        free.close()
        http, p2p = (port, other) if which == "http" else (other, port)
        r = run("start", "--no-default-model", "--no-mdns", "--port", str(http),
                "--p2p-listen", f"/ip4/127.0.0.1/tcp/{p2p}", env={"RBEE_HOME": str(tmp_path)})
    assert r.returncode == 1
    assert "rbee-node: error:" in r.stderr and "another rbee-node" in r.stderr
    assert "Traceback" not in r.stderr


def test_a_node_restarts_at_once_on_the_same_ports(tmp_path):
    """Connections of the stopped node linger in TIME_WAIT; they must not block a restart."""
    import sys

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    from nodeproc import NodeProcess

    first = NodeProcess(tmp_path / "a", "--no-default-model")
    peer = NodeProcess(tmp_path / "b", "--no-default-model", "--peer", first.addr)
    try:
        first.wait_ready()
        peer.wait_ready()
        peer.wait_for(lambda s: any(p["id"] == first.peer_id for p in s["peers"]), 15,
                      "a connection between the two")
        assert first.interrupt() == 0
        again = NodeProcess(tmp_path / "a", "--no-default-model", port=first.port,
                            p2p_port=first.p2p_port)
        try:
            again.wait_ready()
        finally:
            again.kill()
    finally:
        first.kill()
        peer.kill()
