"""Every ``rbee-node`` command: ``main`` parses and dispatches (commands.py); tenants.py,
audit.py and pull.py hold the longer commands."""

from .commands import build_parser, main

__all__ = ["main", "build_parser"]
