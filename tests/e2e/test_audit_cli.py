"""`rbee-node audit verify/export/erase/prune` as a user runs them: real processes, real files."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest
from auditlogs import DAY_MS, add_request

from rbee_p2p.config import audit_path, key_path
from rbee_p2p.store.audit import AuditLog, read_frames, receipts_path
from rbee_p2p.store.audit_read import content_path
from rbee_p2p.store.keys import load_or_create_key
from rbee_p2p.tenancy.tenants import TenantBook

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).parents[2]


def audit(home: Path, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "RBEE_HOME": str(home), "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "rbee_p2p.cli", "audit", *args], env=env,
                          input=stdin, capture_output=True, text=True, timeout=60)


def jsonl(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines()]


@pytest.fixture
def home(tmp_path: Path) -> Path:
    """A stopped node's home: key, tenants a and b, a log with old and new requests of
    both (entry records with receipts), and a's content log."""
    home = tmp_path / "home"
    key = load_or_create_key(key_path(home))
    book = TenantBook.open(home)
    book.add("a")
    book.add("b")
    book.save()
    now = int(time.time() * 1000)
    with AuditLog(audit_path(home), key) as log:
        for i, (tenant, age_days) in enumerate([("a", 40), ("b", 40), ("a", 1), ("b", 1),
                                                ("b", 0)]):
            add_request(log, i, book.ref(tenant), now - age_days * DAY_MS)
    content = content_path(home, book.ref("a"))
    content.parent.mkdir(mode=0o700)
    content.write_text(json.dumps({"request_id": (2).to_bytes(16, "big").hex(),
                                   "prompt": "hello", "completion": "hi there"}) + "\n")
    return home


def test_verify_export_erase_prune(home: Path, tmp_path: Path):
    book = TenantBook.open(home)
    result = audit(home, "verify")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "10 record(s)" in result.stdout and "receipts 5 checked" in result.stdout

    # data-subject access: exactly a's records, then a's content
    rows = jsonl(audit(home, "export", "--tenant", "a").stdout)
    records = [r for r in rows if r["type"] == "record"]
    assert [(r["kind"], int(r["request_id"], 16)) for r in records] == [
        ("entry", 0), ("forward", 0), ("entry", 2), ("forward", 2)]
    entry = records[0]
    assert entry["exec_peer"].startswith("12D3KooW") and entry["jurisdiction"] == "EU"
    assert entry["tokens_in"] == 5 and len(entry["receipt_sig"]) == 128
    assert entry["time"].endswith("Z") and entry["model_digest"] == bytes(range(32)).hex()
    assert rows[-1] == {"type": "content", "request_id": (2).to_bytes(16, "big").hex(),
                        "prompt": "hello", "completion": "hi there"}
    since = datetime.fromtimestamp(time.time() - 10 * 86400, timezone.utc).date().isoformat()
    recent = jsonl(audit(home, "export", "--tenant", "a", "--since", since).stdout)
    assert [int(r["request_id"], 16) for r in recent] == [2, 2, 2]  # and its content
    out = tmp_path / "b.csv"
    result = audit(home, "export", "--tenant", "b", "--format", "csv", "--out", str(out))
    assert result.returncode == 0 and oct(out.stat().st_mode & 0o777) == "0o600"
    b_before = list(csv.DictReader(io.StringIO(out.read_text())))
    assert len(b_before) == 6 and {r["type"] for r in b_before} == {"record"}
    assert [int(r["request_id"], 16) for r in b_before] == [1, 1, 3, 3, 4, 4]

    # erase needs the node stopped; verify and export do not
    with AuditLog(audit_path(home), load_or_create_key(key_path(home))):
        result = audit(home, "erase", "--tenant", "a", "--yes")
        assert result.returncode == 1 and "stop the node first" in result.stderr
        assert audit(home, "verify").returncode == 0
    result = audit(home, "erase", "--tenant", "a", stdin="no\n")
    assert result.returncode == 1 and "nothing erased" in result.stderr

    result = audit(home, "erase", "--tenant", "a", "--yes")
    assert result.returncode == 0, result.stderr
    assert "4 audit record(s) redacted" in result.stdout and "2 receipt(s)" in result.stdout
    assert not content_path(home, book.ref("a")).exists()
    result = audit(home, "verify")
    assert result.returncode == 0 and "4 redacted" in result.stdout
    assert "receipts 3 checked" in result.stdout
    rows = jsonl(audit(home, "export", "--tenant", "a").stdout)
    assert [(r["kind"], r["outcome"], r["covers"]) for r in rows] == [
        ("redaction", "redacted", [0, 1, 4, 5])]
    result = audit(home, "export", "--tenant", "b", "--format", "csv")
    assert list(csv.DictReader(io.StringIO(result.stdout))) == b_before

    # retention: b's 40-day-old request goes, the redaction record stays
    result = audit(home, "prune", "--older-than", "30")
    assert result.returncode == 0 and "2 audit record(s)" in result.stdout
    result = audit(home, "verify", "--json")
    verdict = json.loads(result.stdout)
    assert result.returncode == 0 and verdict["ok"]
    assert (verdict["redacted"], verdict["pruned"], verdict["receipts"]) == (4, 2, 2)
    assert [int(r["request_id"], 16) for r in jsonl(audit(home, "export", "--tenant",
                                                          "b").stdout)] == [3, 3, 4, 4]


def test_verify_fails_on_tampering_and_names_the_record(home: Path):
    path = audit_path(home)
    original = path.read_bytes()
    data = bytearray(original)
    frames, _ = read_frames(original)
    data[frames[3][0] + 60] ^= 1
    path.write_bytes(bytes(data))
    result = audit(home, "verify")
    assert result.returncode == 1 and "FAILED" in result.stdout
    assert "record 3" in result.stdout
    # a forged receipt is named as well
    path.write_bytes(original)
    receipts = bytearray(receipts_path(path).read_bytes())
    receipts[-1] ^= 1
    receipts_path(path).write_bytes(bytes(receipts))
    result = audit(home, "verify")
    assert result.returncode == 1 and "bad_signature" in result.stdout


def test_export_without_a_tenants_file_asks_for_the_ref(home: Path):
    (home / "tenants.json").unlink()
    result = audit(home, "export", "--tenant", "a")
    assert result.returncode == 1 and "--tenant-ref" in result.stderr
