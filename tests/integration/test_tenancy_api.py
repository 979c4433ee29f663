"""API keys, quotas, residency and content logging through the HTTP API (fake engine,
autojump clock; the quota clock is a variable the test moves)."""

import json

import pytest

from rbee_p2p.config import NodeConfig
from rbee_p2p.engines.fake import ScriptedEngine
from rbee_p2p.errors import ConfigError
from rbee_p2p.node import Node, check_exposure
from rbee_p2p.protocol.identity import NodeKey
from rbee_p2p.tenancy.tenants import TenantBook

CHAT = {"model": "fake", "messages": [{"role": "user", "content": "hello there"}],
        "max_tokens": 4}


class Recorder:
    """Stands in for the audit writer: keeps what would be recorded."""

    def __init__(self):
        self.records = []

    async def record(self, kind, outcome, **fields):
        self.records.append({"kind": kind, "outcome": outcome, **fields})

    def check(self):  # the log can always be written
        pass

    written = lost = 0
    failing = None


def make(tmp_path, jurisdiction="", key=None, **tenants):
    book = TenantBook.open(tmp_path)
    keys = {name: book.add(name, **settings) for name, settings in tenants.items()}
    book.save()
    audit = Recorder()
    node = Node(NodeConfig(home=tmp_path, default_model=False, jurisdiction=jurisdiction),
                [ScriptedEngine("fake", script="one two three")], "me", audit=audit, key=key)
    now = [1_700_000_000.0]
    node.gate.clock = lambda: now[0]
    return node, keys, audit, now, node.app.test_client()


def auth(key):
    return {"Authorization": f"Bearer {key}"}


async def test_no_tenants_means_open_to_the_local_user(tmp_path, autojump_clock):
    _, _, _, _, client = make(tmp_path)
    assert (await client.post("/v1/chat/completions", json=CHAT)).status_code == 200


async def test_keys_are_required_once_a_tenant_exists(tmp_path, autojump_clock):
    node, keys, _, _, client = make(tmp_path, acme={})
    for headers in ({}, auth("rbee-nope"), {"Authorization": keys["acme"]}):
        r = await client.post("/v1/chat/completions", json=CHAT, headers=headers)
        assert r.status_code == 401
        error = (await r.get_json())["error"]
        assert (error["type"], error["code"]) == ("invalid_request_error", "invalid_api_key")
    r = await client.post("/v1/chat/completions", json=CHAT, headers=auth(keys["acme"]))
    assert r.status_code == 200
    r = await client.post("/v1/embeddings", json={"model": "fake", "input": "x"})
    assert r.status_code == 401
    assert node.status()["tenancy"]["unauthorized"] == 4


async def test_model_not_allowed_is_403_and_audited(tmp_path, autojump_clock):
    node, keys, audit, _, client = make(tmp_path, acme={"models": ("other",)})
    r = await client.post("/v1/chat/completions", json=CHAT, headers=auth(keys["acme"]))
    assert r.status_code == 403
    assert (await r.get_json())["error"]["type"] == "permission_error"
    [rec] = audit.records
    assert (rec["kind"], rec["outcome"], rec["error_code"]) == ("entry", "rejected", "forbidden")
    assert rec["tenant_ref"] == node.gate.ref(node.gate.book.tenants["acme"])


async def test_rate_limit_is_429_with_retry_after_and_counted(tmp_path, autojump_clock):
    node, keys, _, now, client = make(tmp_path, acme={"rpm": 2}, other={})
    for _ in range(2):
        r = await client.post("/v1/chat/completions", json=CHAT, headers=auth(keys["acme"]))
        assert r.status_code == 200
    now[0] += 15
    r = await client.post("/v1/chat/completions", json=CHAT, headers=auth(keys["acme"]))
    assert r.status_code == 429 and r.headers["Retry-After"] == "45"
    assert (await r.get_json())["error"]["code"] == "rate_limit_exceeded"
    # another tenant is not affected; the limit lifts after the window
    r = await client.post("/v1/chat/completions", json=CHAT, headers=auth(keys["other"]))
    assert r.status_code == 200
    now[0] += 46
    r = await client.post("/v1/chat/completions", json=CHAT, headers=auth(keys["acme"]))
    assert r.status_code == 200
    usage = node.status()["tenancy"]["usage"]["acme"]
    assert usage["allowed"] == 3 and usage["refused"] == {"429": 1} and usage["in_flight"] == 0


async def test_token_quota_counts_streamed_and_plain_responses(tmp_path, autojump_clock):
    node, keys, _, _, client = make(tmp_path, acme={"tokens_per_day": 60})
    r = await client.post("/v1/chat/completions", json={**CHAT, "stream": True},
                          headers=auth(keys["acme"]))
    assert r.status_code == 200 and (await r.get_data()).endswith(b"data: [DONE]\n\n")
    used = node.status()["tenancy"]["usage"]["acme"]["tokens_today"]
    assert used > 0
    served = 1
    while (r := await client.post("/v1/chat/completions", json=CHAT,
                                  headers=auth(keys["acme"]))).status_code == 200:
        served += 1  # plain responses count too
    assert r.status_code == 429 and int(r.headers["Retry-After"]) > 0
    assert served >= 2  # admitted while what was left held a prompt
    assert node.status()["tenancy"]["usage"]["acme"]["tokens_today"] <= 60 + CHAT["max_tokens"]


async def test_concurrent_requests_cannot_overshoot_the_token_quota(tmp_path, autojump_clock):
    import trio

    node, keys, _, _, client = make(tmp_path, acme={"tokens_per_day": 40})
    codes = []

    async def one(stream):
        r = await client.post("/v1/chat/completions", json={**CHAT, "stream": stream},
                              headers=auth(keys["acme"]))
        await r.get_data()
        codes.append(r.status_code)

    async with trio.open_nursery() as nursery:
        for i in range(20):  # all at once: each passes the check before any has finished
            nursery.start_soon(one, i % 2 == 0)
    usage = node.status()["tenancy"]["usage"]["acme"]
    assert 0 < codes.count(200) < 20 and codes.count(429) == 20 - codes.count(200)
    # each reserved its estimate (max_tokens + a token a character): at most one request
    # (its max_tokens) past the quota, and every reservation handed back
    assert usage["tokens_today"] <= 40 + CHAT["max_tokens"]
    assert usage["reserved"] == 0 and usage["in_flight"] == 0


async def test_a_stream_whose_body_never_starts_frees_its_slot(tmp_path, autojump_clock):
    import gc

    from rbee_p2p.api.schemas import Limits, parse_chat

    node, keys, _, _, _ = make(tmp_path, acme={"concurrent": 1, "tokens_per_day": 1000})
    tenant = node.gate.authenticate(f"Bearer {keys['acme']}")
    call = parse_chat({**CHAT, "stream": True}, Limits())
    async with node.serving.admission(tenant, "fake", 100) as admitted:
        job = await node.serving.start(call, admitted)
        admitted.streaming = True
    events = node.serving.stream(call, job, admitted)
    usage = node.status()["tenancy"]["usage"]["acme"]
    assert (usage["in_flight"], usage["reserved"]) == (1, 100)
    del events  # the client left before the body was iterated: no finally ever runs
    gc.collect()
    usage = node.status()["tenancy"]["usage"]["acme"]
    assert (usage["in_flight"], usage["reserved"]) == (0, 0)


async def test_concurrency_slot_is_freed_after_errors(tmp_path, autojump_clock):
    node, keys, _, _, client = make(tmp_path, acme={"concurrent": 1})
    for _ in range(3):  # a 404 inside the admitted request must not leak its slot
        r = await client.post("/v1/chat/completions", json={**CHAT, "model": "nope"},
                              headers=auth(keys["acme"]))
        assert r.status_code == 404
    r = await client.post("/v1/chat/completions", json=CHAT, headers=auth(keys["acme"]))
    assert r.status_code == 200
    assert node.status()["tenancy"]["usage"]["acme"]["in_flight"] == 0


async def test_residency_no_eligible_node_is_403_with_a_clear_message(tmp_path, autojump_clock):
    node_key = NodeKey.from_seed(bytes([5]) * 32)
    node, keys, audit, _, client = make(tmp_path, "US", node_key, eu={"residency": "EU"}, us={})
    r = await client.post("/v1/chat/completions", json=CHAT, headers=auth(keys["eu"]))
    assert r.status_code == 403
    message = (await r.get_json())["error"]["message"]
    assert "EU" in message and "residency" in message
    assert audit.records[-1]["outcome"] == "rejected"
    r = await client.post("/v1/embeddings", json={"model": "fake", "input": "x"},
                          headers=auth(keys["eu"]))
    assert r.status_code == 403
    r = await client.post("/v1/chat/completions", json=CHAT, headers=auth(keys["us"]))
    assert r.status_code == 200
    record = audit.records[-1]
    assert (record["kind"], record["outcome"], record["jurisdiction"]) == ("entry", "ok", "US")
    # ran here: this node took it and executed it
    assert record["entry_peer"] == record["exec_peer"] == node_key.peer_id


async def test_residency_met_locally_runs_here(tmp_path, autojump_clock):
    _, keys, audit, _, client = make(tmp_path, "DE", eu={"residency": "EU"})
    r = await client.post("/v1/chat/completions", json=CHAT, headers=auth(keys["eu"]))
    assert r.status_code == 200
    assert audit.records[-1]["jurisdiction"] == "DE"


async def test_content_is_logged_only_for_tenants_that_enable_it(tmp_path, autojump_clock):
    node, keys, audit, _, client = make(tmp_path, loud={"content_logging": True}, quiet={})
    for name in ("loud", "quiet"):
        r = await client.post("/v1/chat/completions", json=CHAT, headers=auth(keys[name]))
        assert r.status_code == 200
    files = list((tmp_path / "content").iterdir())
    ref = node.gate.ref(node.gate.book.tenants["loud"])
    assert [f.name for f in files] == [f"{ref.hex()}.jsonl"]
    line = json.loads(files[0].read_text())
    assert line["prompt"] == CHAT["messages"] and line["completion"]
    assert line["request_id"] == audit.records[0]["request_id"].hex()
    # the audit records themselves never hold text
    assert all("hello" not in repr(v) for rec in audit.records for v in rec.values())


async def test_tenants_added_while_running_are_picked_up(tmp_path, autojump_clock):
    node, _, _, now, client = make(tmp_path)
    assert (await client.post("/v1/chat/completions", json=CHAT)).status_code == 200
    book = TenantBook.open(tmp_path)
    key = book.add("late")
    book.save()
    now[0] += 2
    assert (await client.post("/v1/chat/completions", json=CHAT)).status_code == 401
    r = await client.post("/v1/chat/completions", json=CHAT, headers=auth(key))
    assert r.status_code == 200


@pytest.mark.parametrize("host, tenants, allow_open, refused", [
    ("127.0.0.1", False, False, False),
    ("0.0.0.0", False, False, True),
    ("0.0.0.0", False, True, False),
    ("0.0.0.0", True, False, False),
    ("::", False, False, True),
])
def test_exposure_without_keys_needs_consent(tmp_path, host, tenants, allow_open, refused):
    if tenants:
        book = TenantBook.open(tmp_path)
        book.add("acme")
        book.save()
    config = NodeConfig(home=tmp_path, host=host, allow_open=allow_open)
    if refused:
        with pytest.raises(ConfigError, match="--allow-open"):
            check_exposure(config)
    else:
        check_exposure(config)


@pytest.mark.parametrize("swarm, limits, listen, refused", [
    ("public", {"peer_rpm": 0}, "/ip4/0.0.0.0/tcp/7834", True),
    ("public", {"peer_concurrent": 0}, "/ip4/0.0.0.0/tcp/7834", True),
    ("public", {}, "/ip4/0.0.0.0/tcp/7834", False),  # the open swarm's default limits
    ("public", {"peer_rpm": 0}, "/ip4/127.0.0.1/tcp/7834", False),
    ("private", {"peer_rpm": 0}, "/ip4/0.0.0.0/tcp/7834", False),  # members only
])
def test_exposure_covers_the_p2p_listener(tmp_path, swarm, limits, listen, refused):
    config = NodeConfig(home=tmp_path, swarm=swarm, p2p_listen=(listen,), **limits)
    if refused:
        with pytest.raises(ConfigError, match="any stranger"):
            check_exposure(config)
    else:
        check_exposure(config)


async def test_status_needs_the_admin_key_once_tenants_exist(tmp_path, autojump_clock):
    _, _, _, _, client = make(tmp_path)
    assert (await client.get("/rbee/status")).status_code == 200  # open node: the local user
    node, keys, _, _, client = make(tmp_path, acme={})
    for headers in ({}, auth(keys["acme"]), auth("rbee-admin-nope")):
        r = await client.get("/rbee/status", headers=headers)
        assert r.status_code == 401 and "admin key" in (await r.get_json())["error"]["message"]
    admin = (tmp_path / "admin.key").read_text().strip()
    assert oct((tmp_path / "admin.key").stat().st_mode & 0o777) == "0o600"
    r = await client.get("/rbee/status", headers=auth(admin))
    assert r.status_code == 200 and (await r.get_json())["tenancy"]["tenants"] == 1


async def test_key_guessing_is_rate_limited_per_source(tmp_path, autojump_clock):
    node, keys, _, now, client = make(tmp_path, acme={})
    for i in range(20):
        r = await client.post("/v1/chat/completions", json=CHAT, headers=auth(f"rbee-{i}"))
        assert r.status_code == 401
    r = await client.post("/v1/chat/completions", json=CHAT, headers=auth("rbee-21"))
    assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1
    # even the right key waits: a guesser cannot tell a hit while blocked
    r = await client.post("/v1/chat/completions", json=CHAT, headers=auth(keys["acme"]))
    assert r.status_code == 429
    now[0] += 61
    r = await client.post("/v1/chat/completions", json=CHAT, headers=auth(keys["acme"]))
    assert r.status_code == 200
    assert node.status()["tenancy"]["guesses_refused"] == 2
