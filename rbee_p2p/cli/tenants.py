"""`rbee-node tenants add|list|remove|rotate-key`: manage API keys and quotas.

The tenants file is ``$RBEE_HOME/tenants.json``; a running node picks changes up within a
second, no restart.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

__all__ = ["add_commands"]


def _home(args: argparse.Namespace) -> Path:
    from ..config import data_dir

    return Path(args.home).expanduser() if args.home else data_dir()


def _positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError("must be a positive integer")
    return value


def _cmd_add(args: argparse.Namespace) -> int:
    from ..tenancy.tenants import TenantBook

    book = TenantBook.open(_home(args))
    key = book.add(args.name, tier=args.tier,
                   residency=args.residency.upper() if args.residency else None,
                   models=tuple(args.models) if args.models else None, rpm=args.rpm,
                   tokens_per_day=args.tokens_per_day, concurrent=args.concurrent,
                   content_logging=args.log_content)
    book.save()
    print(f"tenant {args.name} added; its API key (shown once, store it now):\n{key}")
    return 0


def _describe(t: Any) -> dict[str, Any]:
    return {"name": t.name, "tier": t.tier, "residency": t.residency,
            "models": list(t.models) if t.models is not None else None, "rpm": t.rpm,
            "tokens_per_day": t.tokens_per_day, "concurrent": t.concurrent,
            "content_logging": t.content_logging, "key": t.key_hint + "…"}


def _cmd_list(args: argparse.Namespace) -> int:
    from ..tenancy.tenants import TenantBook

    tenants = [_describe(t) for t in TenantBook.open(_home(args))]
    if args.json:
        print(json.dumps(tenants, indent=2))
        return 0
    if not tenants:
        print("no tenants: the node is open to local users (127.0.0.1 only)")
    for t in tenants:
        limits = ", ".join(f"{k} {t[k]}" for k in ("rpm", "tokens_per_day", "concurrent")
                           if t[k] is not None) or "no limits"
        print(f"{t['name']:<20} tier {t['tier']:<12} residency {t['residency'] or '-':<4} "
              f"models {','.join(t['models']) if t['models'] else 'all'}  {limits}  "
              f"{'content logged  ' if t['content_logging'] else ''}key {t['key']}")
    return 0


def _cmd_remove(args: argparse.Namespace) -> int:
    from ..tenancy.tenants import TenantBook

    book = TenantBook.open(_home(args))
    book.remove(args.name)
    book.save()
    print(f"tenant {args.name} removed; its key no longer works (its audit records stay "
          "until `rbee-node audit erase --tenant NAME`)")
    return 0


def _cmd_rotate(args: argparse.Namespace) -> int:
    from ..tenancy.tenants import TenantBook

    book = TenantBook.open(_home(args))
    key = book.rotate(args.name)
    book.save()
    print(f"new API key for {args.name} (the old one stops working now):\n{key}")
    return 0


def add_commands(sub: Any) -> None:
    p = sub.add_parser("tenants", help="manage tenants: API keys, quotas, residency",
                       description=__doc__)
    p.add_argument("--home", metavar="DIR", help="node state folder (default $RBEE_HOME)")
    tsub = p.add_subparsers(dest="tenants_command", metavar="ACTION", required=True)
    add = tsub.add_parser("add", help="add a tenant and print its new API key once")
    add.add_argument("name")
    add.add_argument("--tier", default="default", help="a label routing policies can use")
    add.add_argument("--residency", metavar="CODE",
                     help="run its requests only on nodes claiming this (e.g. EU)")
    add.add_argument("--models", nargs="+", metavar="MODEL", help="allowed models (default all)")
    add.add_argument("--rpm", type=_positive, help="requests per minute")
    add.add_argument("--tokens-per-day", type=_positive, help="tokens per UTC day")
    add.add_argument("--concurrent", type=_positive, help="requests in flight at once")
    add.add_argument("--log-content", action="store_true",
                     help="keep prompts and completions (default: metadata only)")
    add.set_defaults(func=_cmd_add)
    ls = tsub.add_parser("list", help="list tenants (never their keys)")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=_cmd_list)
    rm = tsub.add_parser("remove", help="remove a tenant; its key stops working")
    rm.add_argument("name")
    rm.set_defaults(func=_cmd_remove)
    rot = tsub.add_parser("rotate-key", help="give a tenant a new key; the old one stops working")
    rot.add_argument("name")
    rot.set_defaults(func=_cmd_rotate)
