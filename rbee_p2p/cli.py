"""The ``rbee-node`` command line."""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from . import __version__
from .config import data_dir, key_path
from .errors import RbeeError

__all__ = ["main", "build_parser"]

DESCRIPTION = """\
rbee-node: one node of a peer-to-peer inference mesh.  Every machine runs the same
program; any node serves an OpenAI-compatible API and runs requests locally or on the
best peer.  State (identity key, audit log) lives in $RBEE_HOME (default
~/.local/share/rbee)."""


def _cmd_id(args: argparse.Namespace) -> int:
    from .store.keys import load_or_create_key

    key = load_or_create_key(key_path(data_dir()))
    print(key.peer_id_str)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rbee-node", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"rbee-node {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p_id = sub.add_parser("id", help="print this node's peer ID (creating the identity if needed)")
    p_id.set_defaults(func=_cmd_id)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args))
    except RbeeError as exc:
        print(f"rbee-node: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
