"""Garbage in, ProtocolError out: random and mutated bytes never raise anything else.
10,000 inputs here (a few seconds); bench/fuzz.py runs >= 1,000,000 (atheris)."""

import samples
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rbee_p2p.protocol import cbor
from rbee_p2p.protocol.audit import verify_chain
from rbee_p2p.protocol.envelope import (DOMAIN, Limits, Verifier, seal, signed_bytes,
                                        signed_head)
from rbee_p2p.protocol.errors import ProtocolError
from rbee_p2p.protocol.receipts import verify_receipt

VALID = [seal(samples.key_a(), m, now_ms=samples.NOW, ttl_ms=1000, nonce=bytes(16))
         for m in samples.one_of_each()]
LIMITS = Limits(max_bytes=64 * 1024)


def verify_or_protocol_error(data: bytes) -> None:
    try:
        Verifier(LIMITS).verify(data, samples.NOW)
    except ProtocolError:
        pass


@settings(max_examples=4000, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.binary(max_size=2048))
def test_random_bytes(data):
    verify_or_protocol_error(data)


@st.composite
def mutated(draw):
    data = bytearray(draw(st.sampled_from(VALID)))
    for _ in range(draw(st.integers(1, 8))):
        op = draw(st.sampled_from(["flip", "insert", "delete", "truncate", "splice"]))
        pos = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "flip" and data:
            data[pos] ^= draw(st.integers(1, 255))
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete" and data:
            del data[pos : pos + draw(st.integers(1, 16))]
        elif op == "truncate":
            del data[pos:]
        elif op == "splice":
            other = draw(st.sampled_from(VALID))
            data[pos:] = other[pos:]
    return bytes(data)


@settings(max_examples=3000, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(mutated())
def test_mutated_envelopes(data):
    verify_or_protocol_error(data)
    if signed_head(data) is not None:  # signed again as it is: past the signature, decoded
        verify_or_protocol_error(data[:-64] + samples.key_a().sign(signed_bytes(data)))
    try:
        verify_chain([data])
    except ProtocolError:
        pass
    try:
        verify_receipt(data, request_raw=VALID[1], executor=samples.key_a().peer_id)
    except ProtocolError:
        pass


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
    | st.binary(max_size=20),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=5), inner,
                                                                  max_size=5),
    max_leaves=30,
)


@settings(max_examples=800, deadline=None)  # x up to 16 envelopes each
@given(json_values)
def test_structured_garbage_inside_a_valid_cbor_envelope(value):
    items = cbor.decode(VALID[0], max_size=1 << 20)
    for i in range(8):
        mutated_items = list(items)
        mutated_items[i] = value
        try:
            data = cbor.encode(mutated_items)
            if i < 7 and isinstance(mutated_items[2], bytes):  # signed: the decoder sees it
                mutated_items[7] = samples.key_a().sign(DOMAIN + cbor.encode(mutated_items[:7]))
                verify_or_protocol_error(cbor.encode(mutated_items))
        except ProtocolError:
            continue
        verify_or_protocol_error(data)
