import subprocess
import sys
from pathlib import Path

import rbee_p2p

ROOT = Path(rbee_p2p.__file__).parent


def test_mypy_strict_passes_on_the_protocol_core():
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental",
         str(ROOT / "protocol"), str(ROOT / "routing")],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
