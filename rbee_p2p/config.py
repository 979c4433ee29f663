"""Settings: where a node keeps its state.  (The full TOML/env/flag config arrives with `start`.)"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["data_dir", "key_path", "audit_path"]


def data_dir(env: dict[str, str] | None = None) -> Path:
    """``$RBEE_HOME``, else ``~/.local/share/rbee``."""
    env = dict(os.environ) if env is None else env
    home = env.get("RBEE_HOME")
    return Path(home).expanduser() if home else Path("~/.local/share/rbee").expanduser()


def key_path(root: Path) -> Path:
    return root / "node.key"


def audit_path(root: Path) -> Path:
    return root / "audit.log"
