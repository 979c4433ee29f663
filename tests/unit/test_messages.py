import dataclasses
import typing

import pytest
import samples

from rbee_p2p.protocol import cbor, messages
from rbee_p2p.protocol.errors import InvalidSchema, UnknownType
from rbee_p2p.protocol.messages import (
    MESSAGE_TYPES,
    CapabilityAdvert,
    ErrorMessage,
    InferenceRequest,
    ModelInfo,
    ResultChunk,
)
from rbee_p2p.protocol.schema import from_wire, to_wire


def test_every_registered_type_has_a_sample_and_round_trips():
    instances = samples.one_of_each()
    assert {type(m).TYPE for m in instances} == set(MESSAGE_TYPES)
    for message in instances:
        wire = cbor.decode(cbor.encode(to_wire(message)), max_size=1 << 20)
        assert from_wire(type(message), wire) == message


def test_type_numbers_are_stable():
    # Append-only: these numbers are on the wire and in the spec; never change them.
    assert {n: c.__name__ for n, c in MESSAGE_TYPES.items()} == {
        1: "CapabilityAdvert", 3: "ResultChunk", 4: "ResultEnd", 5: "ErrorMessage",
        6: "Cancel", 7: "AuditRecord", 8: "Receipt", 9: "ReceiptCountersign",
        10: "InferenceRequest",  # 2 (requests with an OpenAI JSON body) is retired
    }
    with pytest.raises(UnknownType):
        messages.class_for_type(2)


def test_type_numbers_cannot_be_reused():
    with pytest.raises(ValueError):
        messages.message_type(1)(type("Again", (messages.Message,), {}))
    with pytest.raises(UnknownType):
        messages.class_for_type(999)


def test_messages_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        samples.advert().seq = 8  # type: ignore[misc]


def test_optional_fields_are_omitted_and_unknown_keys_ignored():
    chunk = ResultChunk(request_id=samples.RID, seq=0)
    wire = to_wire(chunk)
    assert "data" not in wire
    assert from_wire(ResultChunk, {**wire, "future_field": [1, 2]}) == chunk


def _wire_with(cls, message, path, value):
    wire = to_wire(message)
    target = wire
    for key in path[:-1]:
        target = target[key]
    if value is KeyError:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return wire


@pytest.mark.parametrize(
    "path, value, fragment",
    [
        (["seq"], KeyError, "required field missing"),
        (["seq"], True, "expected an integer"),  # a bool is not an int
        (["seq"], -1, "outside"),
        (["seq"], 2**64, "outside"),
        (["seq"], 1.0, "expected an integer"),
        (["swarm"], b"bytes", "expected str"),
        (["swarm"], "x" * 129, "longer than 128"),
        (["jurisdiction"], "EUROPEUNION", "longer than 8"),
        (["addrs"], "not a list", "expected an array"),
        (["addrs"], ["/ip4/1.2.3.4"] * 17, "more than 16"),
        (["models", 0, "digest"], b"short", "length 32"),
        (["models", 0, "modality"], "smell", "one of"),
        (["models", 0, "tokens_per_s"], "fast", "expected a number"),
        (["models", 0], "model", "expected a map"),
        (["devices", 0, "backend"], "abacus", "one of"),
        (["price"], KeyError, "required field missing"),
    ],
)
def test_schema_violations_name_the_field(path, value, fragment):
    wire = _wire_with(CapabilityAdvert, samples.advert(), path, value)
    with pytest.raises(InvalidSchema, match=fragment) as info:
        from_wire(CapabilityAdvert, wire)
    assert str(path[-1]) in str(info.value) or "price" in str(info.value)


def test_integer_accepted_where_a_float_is_expected():
    wire = _wire_with(CapabilityAdvert, samples.advert(), ["models", 0, "tokens_per_s"], 150)
    assert from_wire(CapabilityAdvert, wire).models[0].tokens_per_s == 150.0


@pytest.mark.parametrize(
    "path, value, fragment",
    [
        (["messages", 0, "role"], "tool", "one of"),
        (["messages"], [{"role": "user", "content": "x"}] * 1025, "more than 1024"),
        (["messages", 0, "content"], "x" * ((1 << 20) + 1), "bytes"),
        (["sampling", "temperature"], 2.5, "outside"),
        (["sampling", "stop"], ["s"] * 17, "more than 16"),
        (["inputs"], ["x"] * 257, "more than 256"),
        (["image"], {"steps": 0}, "outside"),
    ],
)
def test_request_fields_are_typed_and_bounded(path, value, fragment):
    wire = _wire_with(InferenceRequest, samples.request(), path, value)
    with pytest.raises(InvalidSchema, match=fragment):
        from_wire(InferenceRequest, wire)


def test_invalid_values_are_never_encoded():
    bad = ErrorMessage(code="teapot", message="no")
    with pytest.raises(InvalidSchema):
        to_wire(bad)
    with pytest.raises(InvalidSchema):
        to_wire(ModelInfo(name="m", digest=b"x", modality="text"))


def test_audit_records_have_no_free_text_field():
    # GDPR: records are metadata.  The only text fields are names, enumerations and codes.
    hints = typing.get_type_hints(messages.AuditRecord, include_extras=True)
    text_fields = {name for name, tp in hints.items() if "str" in repr(tp)}
    assert text_fields == {"model", "jurisdiction", "kind", "outcome", "error_code"}
