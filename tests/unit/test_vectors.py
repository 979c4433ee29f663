"""The implementation against every test vector in protocol/vectors/."""

import json
import runpy
from pathlib import Path

import pytest

from rbee_p2p.protocol.audit import ChainHead, verify_chain
from rbee_p2p.protocol.envelope import Verifier
from rbee_p2p.protocol.errors import ChainBroken, ProtocolError
from rbee_p2p.protocol.identity import NodeKey, peer_id_from_public_key

VECTORS = Path(__file__).parents[2] / "protocol" / "vectors"
ENVELOPES = json.loads((VECTORS / "envelopes.json").read_text())
AUDIT = json.loads((VECTORS / "audit_chain.json").read_text())


def verdict(case) -> str:
    verifier = Verifier()
    for seen in case.get("seen", []):
        verifier.verify(bytes.fromhex(seen), case["now_ms"])
    try:
        verifier.verify(bytes.fromhex(case["hex"]), case["now_ms"])
    except ProtocolError as exc:
        return exc.reason
    return "valid"


@pytest.mark.parametrize("case", ENVELOPES["cases"], ids=lambda c: c["name"])
def test_envelope_vector(case):
    assert verdict(case) == case["expected"]


def test_vectors_cover_every_verdict():
    verdicts = {c["expected"] for c in ENVELOPES["cases"]}
    assert verdicts == {"valid", "oversized", "malformed", "invalid_schema", "unknown_type",
                        "bad_signature", "expired", "not_yet_valid", "replayed"}


def test_vector_key_material_is_consistent():
    key = NodeKey.from_seed(bytes.fromhex(ENVELOPES["seed"]))
    assert key.public_key.hex() == ENVELOPES["public_key"]
    assert key.peer_id_str == ENVELOPES["peer_id"]


@pytest.mark.parametrize("case", AUDIT["cases"], ids=lambda c: c["name"])
def test_audit_vector(case):
    signer = peer_id_from_public_key(bytes.fromhex(AUDIT["public_key"]))
    expected = case.get("head", AUDIT["head"])
    head = ChainHead(expected["seq"], bytes.fromhex(expected["hash"]))
    records = [bytes.fromhex(h) for h in case["records"]]
    if case["expected"] == "valid":
        assert verify_chain(records, signer=signer, expected_head=head)[0] == head
        return
    with pytest.raises(ChainBroken) as info:
        verify_chain(records, signer=signer, expected_head=head)
    assert {"index": info.value.index, "cause": info.value.cause} == case["expected"]


def test_committed_vectors_match_the_generator():
    generated = runpy.run_path(str(VECTORS / "generate.py"))["build"]()
    for name, text in generated.items():
        assert (VECTORS / name).read_text() == text, f"{name} is stale: rerun generate.py"
