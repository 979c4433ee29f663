import pytest
from hypothesis import given
from hypothesis import strategies as st

from rbee_p2p.protocol.errors import Malformed, Oversized, ProtocolError
from rbee_p2p.protocol.framing import FrameDecoder, encode_frame

PAYLOADS = [b"", b"x", b"y" * 127, b"z" * 128, b"w" * 300, bytes(range(256)) * 70]


def test_whole_and_byte_by_byte():
    stream = b"".join(encode_frame(p) for p in PAYLOADS)
    assert FrameDecoder(1 << 20).feed(stream) == PAYLOADS
    decoder, got = FrameDecoder(1 << 20), []
    for i in range(len(stream)):
        got += decoder.feed(stream[i : i + 1])
    assert got == PAYLOADS and decoder.pending == 0


def test_varint_encoding():
    assert encode_frame(b"")[:1] == b"\x00"
    assert encode_frame(b"a" * 127)[:1] == b"\x7f"
    assert encode_frame(b"a" * 128)[:2] == b"\x80\x01"
    assert encode_frame(b"a" * 300)[:2] == b"\xac\x02"


def test_oversized_frame_is_refused_before_its_body():
    decoder = FrameDecoder(100)
    with pytest.raises(Oversized):
        decoder.feed(encode_frame(b"x" * 101)[:2])


@pytest.mark.parametrize("data", [b"\x80\x00", b"\xff" * 11, b"\x81\x80\x00"])
def test_bad_varints(data):
    with pytest.raises(Malformed):
        FrameDecoder(1 << 40).feed(data)


def test_trailing_partial_frame_waits():
    decoder = FrameDecoder(100)
    assert decoder.feed(encode_frame(b"abc") + b"\x05ab") == [b"abc"]
    assert decoder.pending == 3
    assert decoder.feed(b"cde") == [b"abcde"]


@given(st.binary(max_size=200))
def test_garbage_only_raises_protocol_errors(data):
    try:
        FrameDecoder(64).feed(data)
    except ProtocolError:
        pass
