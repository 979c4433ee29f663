"""protocol/rbee.cddl agrees with the implementation on every test vector."""

import json
from pathlib import Path

import pycddl
import pytest

from rbee_p2p.protocol import cbor

PROTOCOL = Path(__file__).parents[2] / "protocol"
CDDL = (PROTOCOL / "rbee.cddl").read_text()
CASES = json.loads((PROTOCOL / "vectors" / "envelopes.json").read_text())["cases"]
VALID = [c for c in CASES if c["expected"] == "valid"]
PAYLOAD_RULES = {1: "capability-advert", 10: "inference-request", 3: "result-chunk",
                 4: "result-end", 5: "error-message", 6: "cancel", 7: "audit-record",
                 8: "receipt", 9: "receipt-countersign"}


def schema(root: str) -> pycddl.Schema:
    # pycddl validates against the first rule of the text
    return pycddl.Schema(f"root = {root}\n" + CDDL)


ENVELOPE = pycddl.Schema(CDDL)  # the first rule is `envelope`
PAYLOADS = {t: schema(rule) for t, rule in PAYLOAD_RULES.items()}


@pytest.mark.parametrize("case", VALID, ids=lambda c: c["name"])
def test_valid_vectors_match_the_schema(case):
    data = bytes.fromhex(case["hex"])
    ENVELOPE.validate_cbor(data)
    items = cbor.decode(data, max_size=1 << 20)
    PAYLOADS[items[1]].validate_cbor(cbor.encode(items[6]))


def test_every_type_has_a_valid_vector():
    assert {cbor.decode(bytes.fromhex(c["hex"]), max_size=1 << 20)[1] for c in VALID} == set(
        PAYLOAD_RULES)


@pytest.mark.parametrize("name", ["invalid_schema_seven_items", "invalid_schema_version_2",
                                  "invalid_schema_short_nonce", "unknown_type_99",
                                  "invalid_schema_missing_field"])
def test_structurally_invalid_vectors_fail_the_schema(name):
    case = next(c for c in CASES if c["name"] == name)
    with pytest.raises(pycddl.ValidationError):
        ENVELOPE.validate_cbor(bytes.fromhex(case["hex"]))


def test_a_bad_enumeration_value_fails_the_payload_rule():
    case = next(c for c in VALID if c["name"] == "valid_error")
    payload = cbor.decode(bytes.fromhex(case["hex"]), max_size=1 << 20)[6]
    with pytest.raises(pycddl.ValidationError):
        PAYLOADS[5].validate_cbor(cbor.encode({**payload, "code": "teapot"}))


AUDIT_CASES = json.loads((PROTOCOL / "vectors" / "audit_chain.json").read_text())["cases"]
AUDIT_ENTRY = schema("audit-entry")
TOMBSTONE = schema("tombstone / tombstone")  # wrapped: see the pycddl notes in rbee.cddl


def test_audit_file_entries_and_tombstones_match_the_schema():
    entries = {bytes.fromhex(h) for c in AUDIT_CASES if c["expected"] == "valid"
               for h in c["records"]}
    tombstones = [e for e in entries if e.startswith(b"\x83")]
    assert len(tombstones) == 3
    for entry in entries:
        AUDIT_ENTRY.validate_cbor(entry)
    for entry in tombstones:
        TOMBSTONE.validate_cbor(entry)
    for bad in (["tombstone", 1, b"short"], ["grave", 1, bytes(32)], ["tombstone", -1, bytes(32)],
                ["tombstone", 1, bytes(32), 0]):
        for rule in (AUDIT_ENTRY, TOMBSTONE):
            with pytest.raises(pycddl.ValidationError):
                rule.validate_cbor(cbor.encode(bad))
