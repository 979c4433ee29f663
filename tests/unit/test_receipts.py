import pytest
import samples

from rbee_p2p.protocol import receipts
from rbee_p2p.protocol.envelope import seal
from rbee_p2p.protocol.errors import BadSignature, Misdirected
from rbee_p2p.protocol.messages import Cancel

NOW = samples.NOW
A, B = samples.key_a(), samples.key_b()  # A requests, B executes


@pytest.fixture
def exchange():
    request_raw = seal(A, samples.request(B.peer_id), now_ms=NOW)
    out = receipts.OutputDigest()
    out.update("Hello")
    out.update(" world", b"\x01\x02")
    receipt = samples.receipt(A.peer_id, receipts.digest(request_raw),
                              output_digest=out.digest(), tokens_out=2)
    receipt_raw = seal(B, receipt, now_ms=NOW + 100, ttl_ms=0)
    return request_raw, receipt_raw, out.digest()


def test_receipt_verifies_and_countersign_round_trip(exchange):
    request_raw, receipt_raw, output = exchange
    receipt = receipts.verify_receipt(receipt_raw, request_raw=request_raw, executor=B.peer_id,
                                      output_digest=output, tokens_out=2)
    assert receipt.tokens_out == 2 and receipt.jurisdiction == "EU"
    ack = receipts.countersign(A, receipt_raw, receipt, now_ms=NOW + 200)
    assert receipts.verify_countersign(ack, receipt_raw).accepted


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"executor": A.peer_id}, "not signed by the executor"),
        ({"output_digest": bytes(32)}, "output digest"),
        ({"tokens_out": 3}, "token count"),
    ],
)
def test_receipt_mismatches(exchange, kwargs, fragment):
    request_raw, receipt_raw, output = exchange
    args = {"request_raw": request_raw, "executor": B.peer_id, "output_digest": output,
            "tokens_out": 2, **kwargs}
    with pytest.raises(Misdirected, match=fragment):
        receipts.verify_receipt(receipt_raw, **args)


def test_receipt_for_another_request_is_refused(exchange):
    _, receipt_raw, _ = exchange
    other_request = seal(A, samples.request(B.peer_id, max_tokens=65), now_ms=NOW)
    with pytest.raises(Misdirected, match="request digest"):
        receipts.verify_receipt(receipt_raw, request_raw=other_request, executor=B.peer_id)
    from_b = seal(B, samples.request(B.peer_id), now_ms=NOW)
    with pytest.raises(Misdirected):
        receipts.verify_receipt(receipt_raw, request_raw=from_b, executor=B.peer_id)


def test_forged_receipt_is_refused(exchange):
    request_raw, receipt_raw, _ = exchange
    forged = receipt_raw[:-1] + bytes([receipt_raw[-1] ^ 1])
    with pytest.raises(BadSignature):
        receipts.verify_receipt(forged, request_raw=request_raw, executor=B.peer_id)
    with pytest.raises(Misdirected):
        receipts.verify_receipt(request_raw, request_raw=request_raw, executor=B.peer_id)


def test_countersign_by_someone_else_or_for_another_receipt(exchange):
    request_raw, receipt_raw, _ = exchange
    receipt = receipts.verify_receipt(receipt_raw, request_raw=request_raw, executor=B.peer_id)
    by_b = receipts.countersign(B, receipt_raw, receipt, now_ms=NOW)
    with pytest.raises(Misdirected, match="other than the requester"):
        receipts.verify_countersign(by_b, receipt_raw)
    other_receipt = seal(B, receipt, now_ms=NOW + 1, ttl_ms=0)
    ack = receipts.countersign(A, other_receipt, receipt, now_ms=NOW)
    with pytest.raises(Misdirected, match="another receipt"):
        receipts.verify_countersign(ack, receipt_raw)
    with pytest.raises(Misdirected):
        receipts.verify_countersign(seal(A, Cancel(request_id=samples.RID), now_ms=NOW),
                                    receipt_raw)


def test_receipt_must_name_the_requested_model_and_pinned_digest():
    pinned = seal(A, samples.request(B.peer_id, model_digest=bytes(32)), now_ms=NOW)
    receipt = samples.receipt(A.peer_id, receipts.digest(pinned))  # digest DIGEST != zeros
    with pytest.raises(Misdirected, match="model digest"):
        receipts.verify_receipt(seal(B, receipt, now_ms=NOW, ttl_ms=0), request_raw=pinned,
                                executor=B.peer_id)
    request_raw = seal(A, samples.request(B.peer_id), now_ms=NOW)
    other_model = samples.receipt(A.peer_id, receipts.digest(request_raw), model="llama")
    with pytest.raises(Misdirected, match="another model"):
        receipts.verify_receipt(seal(B, other_model, now_ms=NOW, ttl_ms=0),
                                request_raw=request_raw, executor=B.peer_id)


def test_request_signature_is_checked(exchange):
    request_raw, receipt_raw, _ = exchange
    forged = request_raw[:-1] + bytes([request_raw[-1] ^ 1])
    with pytest.raises(BadSignature):
        receipts.verify_receipt(receipt_raw, request_raw=forged, executor=B.peer_id)
