"""Tenants file, API keys and quotas (time passed in: no clock)."""

import hashlib
import hmac
import json
import os

import pytest

from rbee_p2p.errors import ConfigError, Forbidden, QuotaExceeded, Unauthorized
from rbee_p2p.tenancy.tenants import KEY_PREFIX, Quotas, TenantBook

DAY = 86_400
T0 = 1_700_000_000.0 - (1_700_000_000 % DAY) + 3600  # 01:00 UTC on some day


def book(tmp_path, **settings):
    b = TenantBook.open(tmp_path)
    key = b.add("acme", **settings)
    b.save()
    return TenantBook.open(tmp_path), key


def test_keys_are_shown_once_and_stored_hashed(tmp_path):
    b, key = book(tmp_path, tier="gold")
    assert key.startswith(KEY_PREFIX) and len(key) > 40
    text = (tmp_path / "tenants.json").read_text()
    assert key not in text and hashlib.sha256(key.encode()).hexdigest() in text
    assert os.stat(tmp_path / "tenants.json").st_mode & 0o777 == 0o600
    assert b.authenticate(key).tier == "gold"


@pytest.mark.parametrize("presented", [None, "", "rbee-wrong", "Bearer x"])
def test_missing_or_wrong_key_is_unauthorized(tmp_path, presented):
    b, _ = book(tmp_path)
    with pytest.raises(Unauthorized):
        b.authenticate(presented)


def test_rotate_and_remove(tmp_path):
    b, old = book(tmp_path)
    new = b.rotate("acme")
    with pytest.raises(Unauthorized):
        b.authenticate(old)
    assert b.authenticate(new).name == "acme"
    b.remove("acme")
    with pytest.raises(Unauthorized):
        b.authenticate(new)
    with pytest.raises(ConfigError):
        b.remove("acme")


def test_names_are_checked_and_unique(tmp_path):
    b, _ = book(tmp_path)
    for bad in ("", "a b", "x" * 65, "../etc"):
        with pytest.raises(ConfigError):
            b.add(bad)
    with pytest.raises(ConfigError, match="exists"):
        b.add("acme")


def test_tenant_ref_is_a_keyed_hash_of_the_name_and_survives_reload(tmp_path):
    b, key = book(tmp_path)
    ref = b.ref("acme")
    assert ref == hmac.new(b.ref_key, b"rbee-tenant\x00acme", hashlib.sha256).digest()
    assert key.encode() not in ref and TenantBook.open(tmp_path).ref("acme") == ref
    assert TenantBook.open(tmp_path / "other").ref("acme") != ref  # another node's secret


def test_unsafe_or_broken_file_is_refused(tmp_path):
    book(tmp_path)
    path = tmp_path / "tenants.json"
    os.chmod(path, 0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        TenantBook.open(tmp_path)
    os.chmod(path, 0o600)
    path.write_text(json.dumps({"tenants": {}}))
    with pytest.raises(ConfigError, match="not a valid tenants file"):
        TenantBook.open(tmp_path)


def tenant(tmp_path, **settings):
    b, key = book(tmp_path, **settings)
    return b.authenticate(key)


def test_requests_per_minute_with_retry_after(tmp_path):
    t, q = tenant(tmp_path, rpm=2), Quotas()
    q.admit(t, "m", T0)
    q.admit(t, "m", T0 + 10)
    with pytest.raises(QuotaExceeded) as info:
        q.admit(t, "m", T0 + 20)
    assert info.value.retry_after == pytest.approx(40)  # the first leaves the window at +60
    q.admit(t, "m", T0 + 60.5)
    assert q.status()["acme"]["refused"] == {"429": 1}


def test_tokens_per_day_reset_at_utc_midnight(tmp_path):
    t, q = tenant(tmp_path, tokens_per_day=100), Quotas()
    q.admit(t, "m", T0)
    q.finish(t, 120, T0 + 1)
    with pytest.raises(QuotaExceeded) as info:
        q.admit(t, "m", T0 + 2)
    assert info.value.retry_after == pytest.approx(DAY - 3600 - 2)
    q.admit(t, "m", T0 + DAY)  # a new UTC day


def test_a_request_is_admitted_only_while_what_is_left_holds_its_prompt(tmp_path):
    """So concurrent requests overshoot the day by at most one request's max_tokens: each
    reserves its estimate (prompt + max_tokens), at most what is left."""
    t, q = tenant(tmp_path, tokens_per_day=10), Quotas()
    assert q.admit(t, "m", T0, reserve=6, prompt=2) == 6
    assert q.admit(t, "m", T0, reserve=6, prompt=2) == 4  # 4 left hold a 2-token prompt
    with pytest.raises(QuotaExceeded):
        q.admit(t, "m", T0, reserve=6, prompt=2)  # nothing left
    q.finish(t, 6, T0, reserved=6)
    q.finish(t, 6, T0, reserved=4)  # used all its estimate: 2 over, less than max_tokens 4
    assert q.status()["acme"]["tokens_today"] == 12
    with pytest.raises(QuotaExceeded):  # the next day: its prompt alone is over the quota
        q.admit(t, "m", T0 + DAY, reserve=20, prompt=12)


def test_concurrency_slots_are_released(tmp_path):
    t, q = tenant(tmp_path, concurrent=1), Quotas()
    q.admit(t, "m", T0)
    with pytest.raises(QuotaExceeded):
        q.admit(t, "m", T0)
    q.finish(t, 0, T0)
    q.admit(t, "m", T0)


def test_model_allow_list(tmp_path):
    t, q = tenant(tmp_path, models=("small",)), Quotas()
    q.admit(t, "small", T0)
    with pytest.raises(Forbidden, match="may not use model big"):
        q.admit(t, "big", T0)
    assert q.status()["acme"]["refused"] == {"403": 1}
