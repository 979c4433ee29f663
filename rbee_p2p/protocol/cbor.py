"""Deterministic CBOR (RFC 8949 §4.2.1) on top of cbor2's canonical mode.

``encode`` produces the one canonical encoding of a value.  ``decode`` accepts exactly one
canonical item and nothing else: no trailing bytes, no tags, no indefinite lengths, no
duplicate keys, no non-shortest integers or floats, no NaN or infinities, map keys only
text.  The check is simple and strict: decode, walk the value for allowed
types, and re-encode; the re-encoding must equal the input byte for byte.
"""

from __future__ import annotations

import io
import math
from typing import Any, Mapping

import cbor2

from .errors import Malformed, Oversized

__all__ = ["encode", "decode", "MAX_DEPTH"]

MAX_DEPTH = 16
"""Deepest nesting of arrays and maps a decoded item may have."""


def _no_tags(decoder: object, tag: object) -> object:
    raise Malformed("CBOR tags are not allowed")


def _no_semantic(decoder: object) -> object:
    raise Malformed("CBOR tags are not allowed")


# cbor2 decodes some tags natively (dates, bignums, regexes, ...): refuse all of them before
# any tag-specific work is done.  Unknown tags go to the tag hook, which refuses too.
_REFUSE_SEMANTIC: Mapping[int, Any] = {
    tag: _no_semantic for tag in [*range(0, 300), 1004, 1040, 55799]
}


def encode(value: Any) -> bytes:
    """Encode ``value`` deterministically.  Raises :class:`Malformed` for unencodable values."""
    try:
        return cbor2.dumps(value, canonical=True)
    except (cbor2.CBOREncodeError, TypeError, ValueError) as exc:
        raise Malformed(f"cannot encode: {exc}") from exc


def _check_types(value: Any, depth: int) -> None:
    if depth > MAX_DEPTH:
        raise Malformed(f"nested deeper than {MAX_DEPTH}")
    if value is None or isinstance(value, (bool, int, str, bytes)):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise Malformed("NaN and infinities are not allowed")
        return
    if isinstance(value, list):
        for item in value:
            _check_types(item, depth + 1)
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise Malformed("map keys must be text")
            _check_types(item, depth + 1)
        return
    raise Malformed(f"type {type(value).__name__} is not allowed")


def decode(data: bytes, *, max_size: int) -> Any:
    """Decode exactly one canonical CBOR item of at most ``max_size`` bytes.

    Raises :class:`Oversized` before looking at the bytes if they exceed ``max_size``, and
    :class:`Malformed` for anything that is not one canonical item of the allowed types.
    Pure; safe to call on hostile input (any failure inside cbor2 becomes ``Malformed``).
    """
    if len(data) > max_size:
        raise Oversized(f"{len(data)} bytes exceed the limit of {max_size}")
    if not data:
        raise Malformed("empty input")
    stream = io.BytesIO(data)
    try:
        decoder = cbor2.CBORDecoder(
            stream,
            tag_hook=_no_tags,
            semantic_decoders=_REFUSE_SEMANTIC,
            max_depth=MAX_DEPTH + 1,
            allow_indefinite=False,
            allow_duplicate_keys=False,
            strict_hashable_types=True,
        )
        value = decoder.decode()
    except Malformed:
        raise
    except Exception as exc:  # cbor2 raises a zoo of types on hostile input
        raise Malformed(f"not valid CBOR: {exc}") from None
    if stream.tell() != len(data):
        raise Malformed(f"{len(data) - stream.tell()} trailing bytes after the CBOR item")
    _check_types(value, 0)
    if encode(value) != data:
        raise Malformed("not in deterministic (canonical) encoding")
    return value
