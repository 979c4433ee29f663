"""Every ``rbee-node`` command: ``main`` parses and dispatches (see main.py)."""

from .commands import build_parser, main

__all__ = ["main", "build_parser"]
