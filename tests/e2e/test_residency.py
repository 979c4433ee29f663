"""EU-only processing in a real swarm: three processes on loopback, the real model on an EU
node (attested by the entry node's operator) and on a node whose advert claims EU too but
that nobody attested (a liar, as far as residency goes); tenants with API keys on the
entry node."""

from __future__ import annotations

import json
import os
import signal

import openai
import pytest
from nodeproc import NodeProcess, sdk
from test_audit_cli import audit
from nodeproc import audit_records
from test_mesh import knows

from rbee_p2p.protocol.identity import peer_id_from_str
from rbee_p2p.tenancy.tenants import TenantBook

pytestmark = pytest.mark.e2e
HELLO = [{"role": "user", "content": "Say hello."}]
FAST_LIVENESS = "advert_interval = 0.5\nsuspect_after = 1.5\ndead_after = 3.0\n"


@pytest.fixture
def swarm(tmp_path):
    started = []
    for name in "abc":
        (tmp_path / name).mkdir()
        (tmp_path / name / "rbee-node.toml").write_text(FAST_LIVENESS)
    book = TenantBook.open(tmp_path / "a")
    keys = {"eu": book.add("eu-corp", residency="EU", tier="enterprise"),
            "any": book.add("anywhere")}
    book.save()
    try:
        c = NodeProcess(tmp_path / "c", "--jurisdiction", "EU")
        started.append(c)
        b = NodeProcess(tmp_path / "b", "--jurisdiction", "EU")  # claimed, not attested
        started.append(b)
        a = NodeProcess(tmp_path / "a", "--no-default-model", "--jurisdiction", "US",
                        "--peer", b.addr, "--peer", c.addr, "--attest", f"{c.peer_id}=EU")
        started.append(a)
        for node in started:
            node.wait_ready()
        a.wait_for(knows("smollm2", b.peer_id), 30, "B's model in A's table")
        a.wait_for(knows("smollm2", c.peer_id), 30, "C's model in A's table")
        yield a, b, c, keys, book
    finally:
        for node in started:
            node.kill()


def test_eu_tenant_runs_only_on_eu_nodes_and_fails_clearly_without_one(swarm):
    a, b, c, keys, book = swarm
    eu_ref = book.ref("eu-corp")
    with pytest.raises(openai.AuthenticationError):
        sdk(a).chat.completions.create(model="smollm2", messages=HELLO, max_tokens=4)
    for _ in range(4):
        out = sdk(a, keys["eu"]).chat.completions.create(model="smollm2", messages=HELLO,
                                                          max_tokens=8)
        assert out.choices[0].message.content
    stream = sdk(a, keys["any"]).chat.completions.create(
        model="smollm2", messages=HELLO, max_tokens=8, stream=True)
    assert "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices)

    # A's entry records: every EU-tenant request ran on C, under a receipt saying EU
    entries = [r for r in audit_records(a, "entry", 5) if r.tenant_ref == eu_ref]
    assert len(entries) == 4
    assert {r.exec_peer for r in entries} == {peer_id_from_str(c.peer_id)}
    assert {r.jurisdiction for r in entries} == {"EU"} and all(r.receipt_sig for r in entries)
    # C's execute records carry the same keyed hash; B never ran an EU-tenant request
    assert len([r for r in audit_records(c, "execute", 4) if r.tenant_ref == eu_ref]) == 4
    assert not [r for r in audit_records(b, "execute", 0, timeout=0) if r.tenant_ref == eu_ref]

    peers = {p["id"]: p for p in a.status()["peers"]}
    assert peers[c.peer_id]["jurisdiction_attested"]
    assert not peers[b.peer_id]["jurisdiction_attested"]  # its advert alone says EU

    # without an attested EU node: 403 with a clear message, never silently elsewhere --
    # not on B, whose advert claims EU
    os.kill(c.proc.pid, signal.SIGKILL)
    a.wait_for(lambda s: any(p["id"] == c.peer_id and p["state"] == "dead"
                             for p in s["peers"]), 15, "C dead in A's table")
    with pytest.raises(openai.PermissionDeniedError) as info:
        sdk(a, keys["eu"]).chat.completions.create(model="smollm2", messages=HELLO,
                                                    max_tokens=4)
    assert "EU" in str(info.value) and "residency" in str(info.value)
    # the other tenant is still served (by B)
    assert sdk(a, keys["any"]).chat.completions.create(
        model="smollm2", messages=HELLO, max_tokens=4).choices[0].message.content is not None
    # B's execute records were read (the other tenant's request just ran there), and
    # none of them is the EU tenant's
    executed_on_b = audit_records(b, "execute", 1)
    assert executed_on_b, "B recorded no execute record for the other tenant's request"
    assert {r.tenant_ref for r in executed_on_b} == {book.ref("anywhere")}

    # GDPR on the entry node's real log, once it is stopped: verify (chain and the EU node's
    # receipts), the tenant's data-subject export, erasure
    assert a.interrupt() == 0
    home = a.log.parent
    result = audit(home, "verify", "--json")
    verdict = json.loads(result.stdout)
    assert result.returncode == 0 and verdict["ok"] and verdict["receipts"] >= 6
    rows = [json.loads(line) for line in audit(home, "export", "--tenant", "eu-corp").stdout
            .splitlines()]
    assert [(r["outcome"], r["jurisdiction"]) for r in rows] == [("ok", "EU")] * 4 + [
        ("rejected", None)]
    assert {r["exec_peer"] for r in rows[:4]} == {c.peer_id}
    result = audit(home, "erase", "--tenant", "eu-corp", "--yes")
    assert result.returncode == 0, result.stderr
    assert audit(home, "verify").returncode == 0
    rows = audit(home, "export", "--tenant", "eu-corp").stdout.splitlines()
    assert [json.loads(line)["kind"] for line in rows] == ["redaction"]
    assert len(audit(home, "export", "--tenant", "anywhere").stdout.splitlines()) == 2
