import math

import pytest

from rbee_p2p.protocol import cbor
from rbee_p2p.protocol.errors import Malformed, Oversized

VALUE = {"b": [1, -2, 2.5, b"\x00\xff", "text", None, True], "a": {"x": 0}, "cc": "longer key"}


def test_round_trip_and_deterministic_key_order():
    data = cbor.encode(VALUE)
    assert cbor.decode(data, max_size=1024) == VALUE
    # RFC 8949 §4.2.1: keys sorted bytewise by their encoding ("a" < "b" < "cc")
    assert data == cbor.encode(dict(reversed(list(VALUE.items()))))
    assert data.index(b"\x61a") < data.index(b"\x61b") < data.index(b"\x62cc")


def test_every_strict_prefix_is_rejected_byte_by_byte():
    data = cbor.encode(VALUE)
    for end in range(len(data)):
        with pytest.raises(Malformed):
            cbor.decode(data[:end], max_size=1024)


@pytest.mark.parametrize("garbage", [b"\x00", b"\xff", b"\x80", b"trailing"])
def test_trailing_garbage_is_rejected(garbage):
    with pytest.raises(Malformed, match="trailing"):
        cbor.decode(cbor.encode(VALUE) + garbage, max_size=1024)


def test_size_is_checked_before_decoding():
    with pytest.raises(Oversized):
        cbor.decode(b"\xff" * 11, max_size=10)  # garbage, but too big is reported first


@pytest.mark.parametrize(
    "hex_, why",
    [
        ("a2616201616101", "unsorted map keys"),
        ("1817", "non-shortest integer (23 in two bytes)"),
        ("fb3ff8000000000000", "non-shortest float (1.5 as double)"),
        ("9f01ff", "indefinite-length array"),
        ("5f4101ff", "indefinite-length byte string"),
        ("a2616101616102", "duplicate keys"),
        ("c11a514b67b0", "tag 1 (epoch date)"),
        ("c249010000000000000000", "tag 2 (bignum)"),
        ("d9d9f7a0", "self-describe tag 55799"),
        ("d8236161", "tag 35 (regex)"),
        ("f97e00", "NaN"),
        ("f97c00", "infinity"),
        ("a1f401", "boolean map key"),
        ("a1410101", "byte string map key"),
        ("a10101", "integer map key"),
        ("f7", "undefined"),
        ("e0", "simple value 0"),
        ("62c328", "invalid UTF-8"),
        ("", "empty input"),
    ],
)
def test_non_canonical_or_disallowed_items_are_malformed(hex_, why):
    with pytest.raises(Malformed):
        cbor.decode(bytes.fromhex(hex_), max_size=1024)


def test_nesting_depth_is_bounded():
    deep = b"\x81" * (cbor.MAX_DEPTH + 1) + b"\x00"
    with pytest.raises(Malformed):
        cbor.decode(deep, max_size=1024)
    ok = b"\x81" * cbor.MAX_DEPTH + b"\x00"
    assert cbor.decode(ok, max_size=1024) is not None


def test_huge_declared_lengths_do_not_allocate():
    for hex_ in ("9bffffffffffffffff", "5bffffffffffffffff", "bbffffffffffffffff"):
        with pytest.raises(Malformed):
            cbor.decode(bytes.fromhex(hex_), max_size=1024)


def test_shortest_float_form_round_trips():
    for value in (0.0, 1.5, 65504.0, 1e-7, math.pi):
        assert cbor.decode(cbor.encode(value), max_size=16) == value


def test_unencodable_values_raise_protocol_errors():
    with pytest.raises(Malformed):
        cbor.encode(object())
