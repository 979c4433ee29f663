"""``rbee-node audit``: verify, export (data-subject access), erase (right to erasure), prune.

``verify`` and ``export`` only read the files and work while the node runs; ``erase`` and
``prune`` rewrite the log under its lock, so they need the node stopped (the running node
applies ``audit_retention_days`` itself).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from datetime import date, datetime, timezone
from pathlib import Path
from typing import Any, Iterable, TextIO

from ..config import audit_path, data_dir, key_path
from ..errors import ConfigError, StorageError

__all__ = ["add_commands", "parse_since"]

DAY_MS = 86_400_000


def parse_since(text: str) -> int:
    """``YYYY-MM-DD`` (midnight UTC) or an ISO 8601 date-time (UTC unless it says) -> ms."""
    try:
        if len(text) == 10:
            day = date.fromisoformat(text)
            moment = datetime(day.year, day.month, day.day, tzinfo=timezone.utc)
        else:
            moment = datetime.fromisoformat(text)
            if moment.tzinfo is None:
                moment = moment.replace(tzinfo=timezone.utc)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not YYYY-MM-DD or an ISO date-time") from None
    return int(moment.timestamp() * 1000)


def _home(args: argparse.Namespace) -> Path:
    return Path(args.home).expanduser() if args.home else data_dir()


def _tenant_ref(args: argparse.Namespace, home: Path) -> tuple[bytes, str]:
    """(ref, how to name it) from --tenant NAME (via the tenants file) or --tenant-ref HEX."""
    if args.tenant_ref:
        try:
            ref = bytes.fromhex(args.tenant_ref)
        except ValueError:
            ref = b""
        if len(ref) != 32:
            raise ConfigError("--tenant-ref takes 64 hex digits")
        return ref, f"ref {ref.hex()[:16]}…"
    from ..tenancy.tenants import FILE, TenantBook

    if not (home / FILE).exists():
        raise ConfigError(f"no {home / FILE}: cannot derive tenant {args.tenant!r}'s ref "
                          "(records carry an HMAC of the name); pass --tenant-ref HEX")
    book = TenantBook.open(home)
    if args.tenant not in book.tenants:
        print(f"rbee-node: note: no tenant {args.tenant!r} in {book.path} (removed?); "
              "using its ref anyway", file=sys.stderr)
    return book.ref(args.tenant), repr(args.tenant)


def _signer(home: Path) -> bytes | None:
    path = key_path(home)
    if not path.exists():
        return None
    from ..store.keys import load_or_create_key

    return load_or_create_key(path).peer_id


def _cmd_verify(args: argparse.Namespace) -> int:
    from ..store.audit_read import verify_log

    home = _home(args)
    verdict = verify_log(audit_path(home), signer=_signer(home))
    if args.json:
        print(json.dumps({"ok": verdict.ok, "positions": verdict.positions,
                          "records": verdict.records, "redacted": verdict.redacted,
                          "pruned": verdict.pruned, "receipts": verdict.receipts,
                          "head_seq": verdict.head.seq, "head_hash": verdict.head.hash.hex(),
                          "errors": verdict.errors, "notes": verdict.notes}, indent=2))
    else:
        print(f"log      {audit_path(home)}")
        for line in verdict.summary():
            print(line)
    return 0 if verdict.ok else 1


def _write_rows(rows: Iterable[dict[str, Any]], fmt: str, out: TextIO) -> int:
    from ..store.audit_read import EXPORT_FIELDS

    count = 0
    if fmt == "csv":
        writer = csv.DictWriter(out, fieldnames=EXPORT_FIELDS, extrasaction="ignore")
        writer.writeheader()
    for row in rows:
        if fmt == "csv":
            cells = dict(row)
            for key, value in cells.items():
                if isinstance(value, list) and key == "covers":
                    cells[key] = " ".join(map(str, value))
                elif isinstance(value, (list, dict)):
                    cells[key] = json.dumps(value, ensure_ascii=False)
            writer.writerow(cells)
        else:
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
        count += 1
    return count


def _cmd_export(args: argparse.Namespace) -> int:
    from ..store.audit_read import content_path, export_rows

    home = _home(args)
    ref, who = _tenant_ref(args, home)
    # the chain verifies before anything is written
    rows = list(export_rows(audit_path(home), ref, since_ms=args.since,
                            content=content_path(home, ref), signer=_signer(home)))
    if args.out is None:
        try:
            _write_rows(rows, args.format, sys.stdout)
            sys.stdout.flush()
        except BrokenPipeError:  # e.g. piped into head
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 1
        return 0
    fd = os.open(args.out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # personal data
    with os.fdopen(fd, "w", newline="" if args.format == "csv" else None) as out:
        count = _write_rows(rows, args.format, out)
    print(f"exported {count} row(s) of tenant {who} to {args.out}", file=sys.stderr)
    return 0


def _open_for_rewrite(home: Path) -> Any:
    from ..store.audit import AuditLog, LogInUse
    from ..store.keys import load_or_create_key

    if not key_path(home).exists():
        raise ConfigError(f"no node key at {key_path(home)}: is {home} a node's home?")
    key = load_or_create_key(key_path(home))
    try:
        return AuditLog(audit_path(home), key)
    except LogInUse:
        raise StorageError(
            f"{audit_path(home)} is locked by a running rbee-node: stop the node first "
            "(a running node prunes by itself: audit_retention_days, 365 by default)") from None


def _confirm(question: str) -> bool:
    try:
        answer = input(f"{question} This cannot be undone. Type 'yes' to go on: ")
    except EOFError:
        return False
    return answer.strip().lower() == "yes"


def _cmd_erase(args: argparse.Namespace) -> int:
    from ..store.audit_read import content_path

    home = _home(args)
    ref, who = _tenant_ref(args, home)
    if not args.yes and not _confirm(f"Erase every audit record, receipt and content log of "
                                     f"tenant {who} in {home}?"):
        print("rbee-node: nothing erased", file=sys.stderr)
        return 1
    records = covers = receipts = 0
    if audit_path(home).exists():
        with _open_for_rewrite(home) as log:
            done = log.erase(ref, now_ms=int(time.time() * 1000))
            records, covers, receipts = done.records, done.covers, done.receipts
    content = content_path(home, ref)
    removed = content.exists()
    if removed:
        content.unlink()
        fd = os.open(content.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    print(f"tenant {who}: {records} audit record(s) redacted ({covers} redaction record(s) "
          f"appended), {receipts} receipt(s) removed, content log "
          f"{'deleted' if removed else 'absent'}")
    return 0


def _cmd_prune(args: argparse.Namespace) -> int:
    home = _home(args)
    if args.older_than <= 0:
        raise ConfigError("--older-than takes a positive number of days")
    if not audit_path(home).exists():
        print(f"no audit log at {audit_path(home)}")
        return 0
    now_ms = int(time.time() * 1000)
    with _open_for_rewrite(home) as log:
        done = log.prune(now_ms - int(args.older_than * DAY_MS), now_ms=now_ms)
    print(f"{done.records} audit record(s) older than {args.older_than:g} day(s) pruned "
          f"({done.covers} prune record(s) appended), {done.receipts} receipt(s) removed")
    return 0


def add_commands(sub: Any) -> None:
    """Add ``audit`` and its actions to the ``rbee-node`` parser."""
    p = sub.add_parser("audit", help="verify, export, erase or prune the audit log",
                       description="The node's tamper-evident audit log ($RBEE_HOME/audit.log) "
                                   "and its receipts.  verify and export work while the node "
                                   "runs; erase and prune need it stopped.")
    actions = p.add_subparsers(dest="audit_action", metavar="ACTION", required=True)

    def action(name: str, help_: str, func: Any) -> argparse.ArgumentParser:
        a: argparse.ArgumentParser = actions.add_parser(name, help=help_, description=help_)
        a.add_argument("--home", metavar="DIR", help="the node's data directory "
                                                     "(default $RBEE_HOME)")
        a.set_defaults(func=func)
        return a

    def tenant(a: argparse.ArgumentParser) -> None:
        g = a.add_mutually_exclusive_group(required=True)
        g.add_argument("--tenant", metavar="NAME", help="tenant name (see tenants.json)")
        g.add_argument("--tenant-ref", metavar="HEX", help="the tenant ref records carry")

    v = action("verify", "check the chain (signatures, links, tombstones) and every stored "
                         "receipt; exit 1 on any failure", _cmd_verify)
    v.add_argument("--json", action="store_true", help="print JSON for scripts")
    e = action("export", "a tenant's audit records (and content log, if any), decoded "
                         "(data-subject access)", _cmd_export)
    tenant(e)
    e.add_argument("--since", type=parse_since, metavar="DATE",
                   help="only records issued at or after YYYY-MM-DD (UTC) or an ISO date-time")
    e.add_argument("--format", choices=("jsonl", "csv"), default="jsonl")
    e.add_argument("--out", metavar="FILE", help="write here (mode 0600) instead of stdout")
    r = action("erase", "right to erasure: redact a tenant's records (the chain still "
                        "verifies), delete its receipts and content log", _cmd_erase)
    tenant(r)
    r.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    pr = action("prune", "retention: redact records older than DAYS (the node must be "
                         "stopped)", _cmd_prune)
    pr.add_argument("--older-than", type=float, required=True, metavar="DAYS")
