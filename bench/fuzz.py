"""Fuzz the wire: >= 1,000,000 inputs through what a peer's bytes reach first -- the frame
decoder, the CBOR decoder, envelope verification (with a replay cache), receipts and the
audit chain -- raising nothing but ProtocolError (issue 13, item 7).  Coverage-guided by
atheris (``pip install atheris``), seeded with a valid envelope of every message type; a
quarter of the inputs are signed again as they are (where they keep an envelope's fixed
head) so that the decoder behind the signature check is reached too.

    python bench/fuzz.py [--runs 1000000]

Prints the inputs run, their rate and the ProtocolError reasons seen every 200,000 inputs,
and libFuzzer's final stats; any other exception is a failure (atheris prints it and the
input, and the script exits non-zero).
"""

from __future__ import annotations

import argparse
import collections
import sys
import tempfile
import time
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

with atheris.instrument_imports(include=["rbee_p2p"]):
    from rbee_p2p.protocol import cbor
    from rbee_p2p.protocol.audit import verify_chain
    from rbee_p2p.protocol.envelope import Limits, Verifier, seal, signed_bytes, signed_head
    from rbee_p2p.protocol.errors import ProtocolError
    from rbee_p2p.protocol.framing import FrameDecoder
    from rbee_p2p.protocol.receipts import verify_receipt

import samples  # noqa: E402

KEY = samples.key_a()
VALID = [seal(KEY, m, now_ms=samples.NOW, ttl_ms=1000, nonce=bytes(16))
         for m in samples.one_of_each()]
VERIFIER = Verifier(Limits(max_bytes=64 * 1024))  # a shared replay cache, as a node has
REASONS: collections.Counter[str] = collections.Counter()
COUNT = [0]
STARTED = [time.perf_counter()]


def attempt(check, *args) -> None:
    try:
        check(*args)
    except ProtocolError as exc:
        REASONS[exc.reason] += 1


def one_input(data: bytes) -> None:
    COUNT[0] += 1
    if COUNT[0] % 200_000 == 0:
        took = time.perf_counter() - STARTED[0]
        print(f"inputs: {COUNT[0]:,} in {took:.0f} s ({COUNT[0] / took:,.0f}/s), only "
              f"ProtocolError so far: {dict(REASONS.most_common())}", flush=True)
    if COUNT[0] % 4 == 0 and signed_head(data) is not None:
        data = data[:-64] + KEY.sign(signed_bytes(data))
    attempt(lambda d: FrameDecoder(64 * 1024).feed(d), data)
    attempt(lambda d: cbor.decode(d, max_size=64 * 1024), data)
    attempt(VERIFIER.verify, data, samples.NOW)
    attempt(lambda d: verify_receipt(d, request_raw=VALID[1], executor=KEY.peer_id), data)
    attempt(verify_chain, [data])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=1_000_000)
    args = parser.parse_args()
    corpus = Path(tempfile.mkdtemp(prefix="rbee-fuzz-"))
    for i, data in enumerate(VALID):
        (corpus / f"seed{i}").write_bytes(data)
    STARTED[0] = time.perf_counter()
    # libFuzzer ends the process: on an exception other than ProtocolError it prints it and
    # the input and exits non-zero; after --runs inputs it prints its final stats
    # (stat::number_of_executed_units) and exits 0
    atheris.Setup([sys.argv[0], f"-runs={args.runs}", "-max_len=4096", "-print_final_stats=1",
                   f"-artifact_prefix={corpus}/", str(corpus)], one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
