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
