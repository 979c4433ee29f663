"""Declarative schemas for protocol messages: frozen dataclasses <-> CBOR maps.

A message is a frozen dataclass whose field annotations say what the wire may carry::

    name: Annotated[str, MaxLen(128)]
    digest: Annotated[bytes, Len(32)]
    models: Annotated[tuple[ModelInfo, ...], MaxItems(64)]
    note: Annotated[str, MaxLen(64)] | None = None

On the wire a message is a CBOR map keyed by field name.  ``None`` fields are left out;
unknown keys are ignored (forward compatibility, see protocol/README.md "Versioning");
everything else is checked strictly: types (a bool is not an int), lengths, ranges,
enumerations, finite floats.  ``to_wire``/``from_wire`` are exact inverses for valid data.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass
from typing import Annotated, Any, Callable, Union

from .errors import InvalidSchema

__all__ = [
    "MaxLen",
    "Len",
    "MaxItems",
    "Range",
    "OneOf",
    "to_wire",
    "from_wire",
    "U64",
]


@dataclass(frozen=True)
class MaxLen:
    """At most ``n`` bytes: UTF-8 bytes for text (portable: no code-point counting)."""

    n: int


@dataclass(frozen=True)
class Len:
    """Exactly ``n`` bytes."""

    n: int


@dataclass(frozen=True)
class MaxItems:
    n: int


@dataclass(frozen=True)
class Range:
    lo: float
    hi: float


@dataclass(frozen=True)
class OneOf:
    values: frozenset[str]

    def __init__(self, *values: str) -> None:
        object.__setattr__(self, "values", frozenset(values))


U64 = Annotated[int, Range(0, 2**64 - 1)]

Checker = Callable[[Any, str], Any]


def _fail(path: str, what: str) -> InvalidSchema:
    return InvalidSchema(f"{path}: {what}")


def _size(value: str | bytes) -> int:
    return len(value.encode("utf-8")) if isinstance(value, str) else len(value)


def _scalar_checker(base: Any, constraints: tuple[Any, ...]) -> Checker:
    def check(value: Any, path: str) -> Any:
        if base is float:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise _fail(path, "expected a number")
            value = float(value)
            if not math.isfinite(value):
                raise _fail(path, "not a finite number")
        elif base is int:
            if isinstance(value, bool) or not isinstance(value, int):
                raise _fail(path, "expected an integer")
        elif not isinstance(value, base):
            raise _fail(path, f"expected {base.__name__}")
        for c in constraints:
            if isinstance(c, MaxLen) and _size(value) > c.n:
                raise _fail(path, f"longer than {c.n} bytes")
            if isinstance(c, Len) and len(value) != c.n:
                raise _fail(path, f"must have length {c.n}")
            if isinstance(c, Range) and not c.lo <= value <= c.hi:
                raise _fail(path, f"outside [{c.lo}, {c.hi}]")
            if isinstance(c, OneOf) and value not in c.values:
                raise _fail(path, f"must be one of {sorted(c.values)}")
        return value

    return check


def _checker(tp: Any) -> tuple[Checker, bool]:
    """(checker, optional) for an annotation."""
    constraints: tuple[Any, ...] = ()
    if typing.get_origin(tp) is Annotated:
        tp, *extra = typing.get_args(tp)
        constraints = tuple(extra)
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) != 1:
            raise TypeError(f"unsupported union {tp}")
        inner, _ = _checker(args[0])
        return inner, True
    if origin is tuple:
        item_tp, ellipsis = typing.get_args(tp)
        assert ellipsis is Ellipsis, "only homogeneous tuples"
        item_check, _ = _checker(item_tp)
        max_items = next((c.n for c in constraints if isinstance(c, MaxItems)), None)
        if max_items is None:
            raise TypeError("tuple fields need MaxItems")

        def check_tuple(value: Any, path: str) -> Any:
            if not isinstance(value, list):
                raise _fail(path, "expected an array")
            if len(value) > max_items:
                raise _fail(path, f"more than {max_items} items")
            return tuple(item_check(v, f"{path}[{i}]") for i, v in enumerate(value))

        return check_tuple, False
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        cls: type = tp

        def check_nested(value: Any, path: str) -> Any:
            return _decode_into(cls, value, path)

        return check_nested, False
    if tp in (int, float, str, bytes, bool):
        return _scalar_checker(tp, constraints), False
    raise TypeError(f"unsupported field type {tp}")


_FieldSpec = tuple[str, Checker, bool]
_SPECS: dict[type, list[_FieldSpec]] = {}


def _specs(cls: type) -> list[_FieldSpec]:
    specs = _SPECS.get(cls)
    if specs is None:
        hints = typing.get_type_hints(cls, include_extras=True)
        specs = []
        for f in dataclasses.fields(cls):
            check, optional = _checker(hints[f.name])
            specs.append((f.name, check, optional))
        _SPECS[cls] = specs
    return specs


def _decode_into(cls: type, value: Any, path: str) -> Any:
    if not isinstance(value, dict):
        raise _fail(path, "expected a map")
    kwargs: dict[str, Any] = {}
    for name, check, optional in _specs(cls):
        if name not in value or value[name] is None:
            if not optional:
                raise _fail(f"{path}.{name}", "required field missing")
            kwargs[name] = None
            continue
        kwargs[name] = check(value[name], f"{path}.{name}")
    return cls(**kwargs)


def from_wire(cls: type[Any], value: Any) -> Any:
    """Build and validate a ``cls`` instance from a decoded CBOR map.

    Raises :class:`InvalidSchema` naming the offending field path.
    """
    return _decode_into(cls, value, cls.__name__)


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {
            f.name: _plain(getattr(value, f.name))
            for f in dataclasses.fields(value)
            if getattr(value, f.name) is not None
        }
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value


def to_wire(obj: Any) -> dict[str, Any]:
    """The CBOR map for a message (``None`` fields omitted).  Validates ``obj`` on the way.

    Raises :class:`InvalidSchema` if ``obj`` would not pass :func:`from_wire`, so nothing
    invalid is ever signed or sent.
    """
    wire: dict[str, Any] = _plain(obj)
    from_wire(type(obj), wire)
    return wire
