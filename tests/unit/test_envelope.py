import pytest
import samples

from rbee_p2p.protocol import cbor
from rbee_p2p.protocol.envelope import (
    DOMAIN,
    Limits,
    ReplayCache,
    Verifier,
    decode_envelope,
    seal,
)
from rbee_p2p.protocol.errors import (
    BadSignature,
    Expired,
    InvalidSchema,
    Malformed,
    Misdirected,
    NotYetValid,
    Oversized,
    ProtocolError,
    Replayed,
    UnknownType,
)
from rbee_p2p.protocol.identity import NodeKey, verify_signature
from rbee_p2p.protocol.messages import CapabilityAdvert, Cancel, InferenceRequest

NOW = samples.NOW


def sealed(message=None, *, now=NOW, ttl=60_000, nonce=None, key=None, limits=None):
    return seal(key or samples.key_a(), message or samples.advert(), now_ms=now, ttl_ms=ttl,
                nonce=nonce, limits=limits)


def test_every_message_type_seals_and_verifies():
    verifier = Verifier()
    for message in samples.one_of_each():
        verified = verifier.verify(sealed(message, ttl=1000), NOW)
        assert verified.message == message
        assert verified.sender == samples.key_a().peer_id


def test_signature_covers_domain_separated_canonical_bytes():
    data = sealed(nonce=bytes(16))
    env, _ = decode_envelope(data, Limits())
    items = cbor.decode(data, max_size=1 << 20)
    assert env.signed_bytes() == DOMAIN + cbor.encode(items[:7])
    verify_signature(env.sender, env.signature, env.signed_bytes())
    with pytest.raises(BadSignature):  # the same signature without the domain fails
        verify_signature(env.sender, env.signature, cbor.encode(items[:7]))


def test_sealing_is_deterministic_for_a_fixed_nonce():
    assert sealed(nonce=bytes(16)) == sealed(nonce=bytes(16))
    assert sealed() != sealed()  # random nonces


def _resign(items, key=None):
    """Re-encode a tampered envelope with a valid signature (to reach later checks)."""
    key = key or samples.key_a()
    items = list(items)
    items[7] = key.sign(DOMAIN + cbor.encode(items[:7]))
    return cbor.encode(items)


def test_pipeline_order_size_first():
    limits = Limits(max_bytes=100)
    with pytest.raises(Oversized):
        Verifier(limits).verify(sealed(), NOW)


def test_per_type_size_limits():
    big_model = samples.ModelInfo(name="é" * 64, digest=bytes(32), modality="embeddings",
                                  context=2**32 - 1, tokens_per_s=1e7 - 1, size_bytes=2**64 - 1,
                                  device="x" * 32)
    big_device = samples.DeviceInfo(id="x" * 32, backend="vulkan", name="y" * 128,
                                    mem_total=2**64 - 1, mem_free=2**64 - 1)
    biggest = samples.advert(addrs=tuple("/dns4/" + "x" * 250 for _ in range(16)),
                             models=(big_model,) * 64, devices=(big_device,) * 16,
                             swarm="s" * 128, version="v" * 32)
    Verifier().verify(sealed(biggest), NOW)  # the largest schema-valid advert fits
    with pytest.raises(Oversized, match="type 1"):
        Verifier(Limits(max_bytes_by_type={1: 400})).verify(sealed(), NOW)


@pytest.mark.parametrize(
    "mutate, error",
    [
        (lambda it: it[:7], InvalidSchema),
        (lambda it: [2, *it[1:]], InvalidSchema),
        (lambda it: [it[0], 99, *it[2:]], UnknownType),
        (lambda it: [*it[:2], it[2][:-1], *it[3:]], InvalidSchema),
        (lambda it: [*it[:5], b"short", *it[6:]], InvalidSchema),
        (lambda it: [*it[:6], "payload", it[7]], InvalidSchema),
        (lambda it: [*it[:6], {**it[6], "seq": "seven"}, it[7]], InvalidSchema),
        (lambda it: [*it[:3], it[3], it[3] - 1, *it[5:]], InvalidSchema),
        (lambda it: [*it[:7], it[7][:10]], InvalidSchema),
        (lambda it: [*it[:3], -5, *it[4:]], InvalidSchema),
    ],
)
def test_structural_errors_are_schema_errors(mutate, error):
    """Signed as it is (where it still has a signature's place): the shape, not the
    signature, is what is wrong."""
    items = cbor.decode(sealed(), max_size=1 << 20)
    bad = mutate(items)
    if len(bad) == 8 and bad[7] == items[7] and bad[2] == items[2]:
        bad[7] = samples.key_a().sign(DOMAIN + cbor.encode(bad[:7]))
    with pytest.raises(error):
        Verifier().verify(cbor.encode(bad), NOW)


def test_nothing_large_is_decoded_before_its_signature_checks(monkeypatch):
    """An 800 KB envelope of 800,000 small items under a wrong signature is refused at the
    signature, and a large input without an envelope's fixed head at once: neither is
    decoded (decoding such a frame costs ~0.2 s of CPU; a signature check ~2 ms)."""
    from rbee_p2p.protocol import envelope

    items = cbor.decode(sealed(samples.request()), max_size=1 << 20)
    heavy = cbor.encode([*items[:6], {**items[6], "pad": list(range(20)) * 40_000}, items[7]])
    assert 700_000 < len(heavy) <= 1 << 20
    decoded = []
    real = envelope.cbor.decode
    monkeypatch.setattr(envelope.cbor, "decode",
                        lambda *a, **k: decoded.append(1) or real(*a, **k))
    with pytest.raises(BadSignature):
        Verifier().verify(heavy, NOW)
    with pytest.raises(Malformed, match="not an envelope"):
        Verifier().verify(b"\x9a" + heavy[1:], NOW)  # no 8-item array head
    assert decoded == []
    Verifier().verify(sealed(), NOW)  # a good one is decoded once, after its signature
    assert decoded == [1]


def test_tampering_with_any_signed_field_breaks_the_signature():
    items = cbor.decode(sealed(), max_size=1 << 20)
    tampered = [
        [*items[:3], items[3] + 1, *items[4:]],
        [*items[:5], bytes(16), *items[6:]],
        [*items[:6], {**items[6], "seq": 8}, items[7]],
        [*items[:2], samples.key_b().peer_id, *items[3:]],
    ]
    for t in tampered:
        with pytest.raises(BadSignature):
            Verifier().verify(cbor.encode(t), NOW)


def test_flipping_any_bit_never_verifies():
    data = sealed(samples.ResultChunk(request_id=samples.RID, seq=0, text="hi", tokens=1))
    for i in range(len(data)):
        for bit in (0x01, 0x80):
            bad = data[:i] + bytes([data[i] ^ bit]) + data[i + 1 :]
            with pytest.raises(ProtocolError):
                Verifier().verify(bad, NOW)


def test_byte_by_byte_prefixes_and_trailing_garbage():
    data = sealed()
    for end in range(len(data)):
        with pytest.raises(Malformed):
            Verifier().verify(data[:end], NOW)
    with pytest.raises(Malformed):
        Verifier().verify(data + b"\x00", NOW)


def test_time_window():
    limits = Limits(max_skew_ms=1000, max_ttl_ms=60_000)
    data = sealed(ttl=10_000)
    Verifier(limits).verify(data, NOW - 1000)  # issued within the skew ahead of us
    with pytest.raises(NotYetValid):
        Verifier(limits).verify(data, NOW - 1001)
    Verifier(limits).verify(data, NOW + 11_000)  # expired less than skew ago
    with pytest.raises(Expired):
        Verifier(limits).verify(data, NOW + 11_001)
    with pytest.raises(InvalidSchema, match="validity"):
        Verifier(limits).verify(sealed(ttl=60_001), NOW)


def test_replay_is_rejected_and_nothing_is_recorded_for_invalid_messages():
    verifier = Verifier()
    data = sealed()
    verifier.verify(data, NOW)
    with pytest.raises(Replayed):
        verifier.verify(data, NOW + 5)
    expired = sealed(now=NOW - 10 * 60_000)
    with pytest.raises(Expired):
        verifier.verify(expired, NOW)
    assert len(verifier.replay) == 1
    # the same nonce from another sender is not a replay
    verifier.verify(sealed(nonce=cbor.decode(data, max_size=1 << 20)[5], key=samples.key_b()), NOW)


def test_replay_cache_forgets_expired_entries():
    cache = ReplayCache()
    verifier = Verifier(Limits(max_skew_ms=0), cache)
    verifier.verify(sealed(ttl=1000), NOW)
    verifier.verify(sealed(ttl=1000), NOW + 500)
    assert len(cache) == 2
    verifier.verify(sealed(now=NOW + 2000, ttl=1000), NOW + 2000)
    assert len(cache) == 1


def test_full_replay_cache_fails_closed():
    cache = ReplayCache(capacity=2)
    verifier = Verifier(replay=cache)
    first = sealed(ttl=1000)
    verifier.verify(first, NOW)
    verifier.verify(sealed(ttl=2000), NOW)
    verifier.verify(sealed(ttl=3000), NOW)  # evicts `first`: its sender's mark = its expiry
    assert len(cache) == 2 and cache.mark(samples.key_a().peer_id) == NOW + 1000
    with pytest.raises(Replayed):
        verifier.verify(first, NOW)  # forgotten, but still refused
    with pytest.raises(Replayed):
        verifier.verify(sealed(ttl=500), NOW)  # could be an old message: refused
    verifier.verify(sealed(ttl=4000), NOW)


def test_full_replay_cache_does_not_forget_when_it_refuses():
    cache = ReplayCache(capacity=1)
    verifier = Verifier(replay=cache)
    kept = sealed(ttl=5000)
    verifier.verify(kept, NOW)
    with pytest.raises(Replayed):
        verifier.verify(kept, NOW)
    assert len(cache) == 1 and cache.mark(samples.key_a().peer_id) == -1


def test_a_flood_of_long_lived_envelopes_from_many_identities_cannot_poison_the_cache():
    cache = ReplayCache(capacity=1000, per_sender=100)
    verifier = Verifier(replay=cache)
    honest = NodeKey.from_seed(bytes([200]) * 32)
    before = sealed(ttl=60_000, key=honest)
    verifier.verify(before, NOW)
    attackers = [NodeKey.from_seed(bytes([i + 1]) * 32) for i in range(20)]
    flood = [sealed(ttl=600_000, key=k) for k in attackers for _ in range(100)]
    refused = 0
    for data in flood:  # 2,000 valid 10-minute envelopes into a 1,000-entry cache
        try:
            verifier.verify(data, NOW)
        except Replayed:  # a flooder whose entries were forgotten: refused, by its own mark
            refused += 1
    assert len(cache) == 1000 and refused < len(flood)
    for i in range(50):  # fresh traffic from anyone else is still accepted
        verifier.verify(sealed(now=NOW + 1000 + i, ttl=60_000, key=honest), NOW + 1000 + i)
    with pytest.raises(Replayed):
        verifier.verify(before, NOW + 1100)  # forgotten under the flood, still refused
    with pytest.raises(Replayed):
        verifier.verify(flood[0], NOW + 1100)  # and so are the flood's own replays
    assert len(cache._marks) <= 21


def test_one_sender_cannot_hold_more_than_its_share():
    cache = ReplayCache(capacity=1000, per_sender=10)
    verifier = Verifier(replay=cache)
    mine = [sealed(ttl=1000 + i) for i in range(25)]
    for data in mine:
        verifier.verify(data, NOW)
    assert len(cache) == 10
    with pytest.raises(Replayed):
        verifier.verify(mine[0], NOW)  # evicted from its share: refused by its mark


def test_stream_frames_may_not_live_long():
    data = sealed(Cancel(request_id=samples.RID), ttl=120_000)
    with pytest.raises(InvalidSchema, match="validity longer than 90000 ms"):
        Verifier().verify(data, NOW)


def test_expected_type_and_sender():
    data = sealed(Cancel(request_id=samples.RID))
    with pytest.raises(Misdirected):
        Verifier().verify(data, NOW, expect=InferenceRequest)
    with pytest.raises(Misdirected):
        Verifier().verify(data, NOW, sender=samples.key_b().peer_id)
    assert isinstance(Verifier().verify(sealed(), NOW, expect=CapabilityAdvert).message,
                      CapabilityAdvert)


def test_nothing_is_sealed_that_peers_would_refuse_as_oversized():
    with pytest.raises(Oversized):
        sealed(samples.advert(), limits=Limits(max_bytes_by_type={1: 100}))


def test_text_limits_count_utf8_bytes():
    sealed(samples.advert(jurisdiction="ÉÉÉÉ"))  # 8 bytes
    with pytest.raises(InvalidSchema, match="8 bytes"):
        sealed(samples.advert(jurisdiction="ÉÉÉÉÉ"))  # 5 characters, 10 bytes


def test_invalid_messages_are_never_signed():
    with pytest.raises(InvalidSchema):
        sealed(samples.advert(jurisdiction="TOO-LONG-CODE"))
