"""The one codec: messages ⇄ versioned msgpack frames `[version, kind, {field: value}]`.

`decode` treats its input as untrusted: anything but a well-formed frame of a known kind whose
fields match their declared types — recursively, into the nested records a message carries — raises
`ProtocolError`, never another exception. Integers must fit a signed 64-bit value, floats must be
finite, and a frame is measured before it is unpacked.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Callable
from typing import Any, Literal, Union

import msgpack

from actors._config import MAX_FRAME_BYTES, PROTOCOL_VERSION
from actors._errors import ProtocolError
from actors.wire._messages import MESSAGE_TYPES

Message = Any  # any instance of a class in MESSAGE_TYPES
INT_MIN, INT_MAX = -(2**63), 2**63 - 1  # what every peer can encode back

_BY_KIND: dict[str, type] = {cls.KIND: cls for cls in MESSAGE_TYPES}  # type: ignore[attr-defined]


def encode(message: Message) -> bytes:
    """Pack a message into one frame; fields holding nested records are turned into maps."""
    nested = _nested(type(message))
    fields = {
        f.name: _plain(getattr(message, f.name)) if f.name in nested else getattr(message, f.name)
        for f in dataclasses.fields(message)
    }
    return msgpack.packb([PROTOCOL_VERSION, message.KIND, fields], use_bin_type=True)


def _plain(value: Any) -> Any:
    """A value with its records (at any depth of lists and maps) turned into maps."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


_NESTED: dict[type, frozenset[str]] = {}


def _nested(cls: type) -> frozenset[str]:
    """The fields of `cls` whose annotation mentions a record (so that `encode` leaves the hot
    kinds, chunks above all, as cheap as plain values)."""
    if cls not in _NESTED:
        _NESTED[cls] = frozenset(name for name, hint in _hints(cls).items() if _mentions_record(hint))
    return _NESTED[cls]


def _mentions_record(hint: Any) -> bool:
    return dataclasses.is_dataclass(hint) or any(_mentions_record(a) for a in typing.get_args(hint))


def decode(frame: bytes, max_bytes: int = MAX_FRAME_BYTES) -> Message:
    """Unpack and validate one frame; raises `ProtocolError` for anything malformed."""
    if len(frame) > max_bytes:
        raise ProtocolError(f"frame of {len(frame)} bytes exceeds the {max_bytes}-byte limit")
    try:
        head = msgpack.unpackb(frame, raw=False, strict_map_key=True)
        version, kind, fields = head
    except Exception as err:  # msgpack raises several unrelated types on garbage
        raise ProtocolError(f"undecodable frame: {err}") from err
    if version != PROTOCOL_VERSION:
        raise ProtocolError(f"protocol version {version!r}, expected {PROTOCOL_VERSION}")
    cls = _BY_KIND.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise ProtocolError(f"unknown message kind {kind!r}")
    try:
        try:
            return _checker(cls)(fields)
        except _Bad:  # walk it again, slowly, to say where and why
            _record(cls, fields, cls.KIND)  # type: ignore[attr-defined]
    except ProtocolError:
        raise
    except Exception as err:  # a validation path we did not foresee: still the peer's fault
        raise ProtocolError(f"{kind}: {type(err).__name__}: {err}") from err
    raise ProtocolError(f"{kind}: its fields do not fit their types")  # the two walks disagree


def peek_version(frame: bytes) -> int | None:
    """The protocol version a frame claims, or None if it does not even say (for counting)."""
    try:
        head = msgpack.unpackb(frame, raw=False)
    except Exception:
        return None
    return head[0] if isinstance(head, list) and head and isinstance(head[0], int) else None


# -- checking a decoded frame -----------------------------------------------------------------
#
# Each annotation is compiled once into a checker: a function that returns the value (nested
# records built) or raises `_Bad`, and builds no text on the way. Every frame that crosses the
# node (a chunk, three times) takes that path. Only a frame that fails is walked again by
# `_record`/`_convert`, which say which field is wrong and why. The two walks check the same rules.


class _Bad(Exception):
    """A value does not fit its annotation (which and why: `_convert`)."""


Checker = Callable[[Any], Any]
_CHECKERS: dict[Any, Checker] = {}


def _checker(hint: Any) -> Checker:
    check = _CHECKERS.get(hint)
    if check is None:
        check = _CHECKERS[hint] = _compile(hint)
    return check


def _compile(hint: Any) -> Checker:  # one branch per kind of annotation, as `_convert`
    origin = typing.get_origin(hint)
    if hint is Any:
        return _same
    if origin in (Union, types.UnionType):
        options = [_checker(arg) for arg in typing.get_args(hint)]

        def union(value: Any) -> Any:
            for option in options:
                try:
                    return option(value)
                except _Bad:
                    continue
            raise _Bad

        return union
    if origin is Literal:
        allowed = frozenset(arg for arg in typing.get_args(hint) if isinstance(arg, str))
        return _when(lambda v: isinstance(v, str) and v in allowed)
    if hint is type(None):
        return _when(lambda v: v is None)
    if hint is bool:
        return _when(lambda v: isinstance(v, bool))
    if hint is int:
        return _when(lambda v: isinstance(v, int) and not isinstance(v, bool) and INT_MIN <= v <= INT_MAX)
    if hint is float:
        return _when(lambda v: isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v))
    if hint is str or hint is bytes:
        return _when(lambda v: isinstance(v, hint))
    if origin is list:
        (item,) = typing.get_args(hint)
        check = _checker(item)
        if item in (Any, bool, int, float, str, bytes):  # the items come back as they are

            def plain_list(value: Any) -> Any:
                if not isinstance(value, list):
                    raise _Bad
                for v in value:
                    check(v)
                return value

            return plain_list

        def record_list(value: Any) -> Any:
            if not isinstance(value, list):
                raise _Bad
            return [check(v) for v in value]

        return record_list
    if origin is dict:
        key, item = (_checker(arg) for arg in typing.get_args(hint))

        def mapping(value: Any) -> Any:
            if not isinstance(value, dict):
                raise _Bad
            return {key(k): item(v) for k, v in value.items()}

        return mapping
    if dataclasses.is_dataclass(hint):
        return _record_checker(hint)  # type: ignore[arg-type]
    return _when(lambda _v: False)


def _record_checker(cls: type) -> Checker:
    fields: dict[str, Checker] = {}  # filled at the first call: a record may contain itself

    def record(value: Any) -> Any:
        if not fields:
            fields.update((name, _checker(hint)) for name, hint in _hints(cls).items())
        if not isinstance(value, dict) or not value.keys() <= fields.keys():
            raise _Bad
        try:
            return cls(**{name: fields[name](v) for name, v in value.items()})
        except TypeError as err:  # a required field is missing
            raise _Bad from err

    return record


def _same(value: Any) -> Any:
    return value


def _when(fits: Callable[[Any], bool]) -> Checker:
    def check(value: Any) -> Any:
        if fits(value):
            return value
        raise _Bad

    return check


def _record(cls: type, fields: Any, where: str) -> Any:
    """Build a (message or nested) dataclass from a decoded map, checking every field."""
    if not isinstance(fields, dict):
        raise ProtocolError(f"{where}: fields must be a map")
    hints = _hints(cls)
    unknown = fields.keys() - hints.keys()
    if unknown:
        raise ProtocolError(f"{where}: unknown fields {sorted(map(str, unknown))}")
    values = {name: _convert(value, hints[name], f"{where}.{name}") for name, value in fields.items()}
    try:
        return cls(**values)
    except TypeError as err:  # a required field is missing
        raise ProtocolError(f"{where}: {err}") from err


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        all_hints = typing.get_type_hints(cls)
        _HINTS[cls] = {f.name: all_hints[f.name] for f in dataclasses.fields(cls)}
    return _HINTS[cls]


def _convert(value: Any, hint: Any, where: str) -> Any:
    """`value` checked against the annotation `hint` (nested records built); raises
    `ProtocolError` naming the field."""
    origin = typing.get_origin(hint)
    if hint is Any:
        return value
    if origin in (Union, types.UnionType):
        for arg in typing.get_args(hint):
            try:
                return _convert(value, arg, where)
            except ProtocolError:
                continue
        raise ProtocolError(f"{where}: {_kind(value)} is not {hint}")
    if origin is Literal:
        if value in typing.get_args(hint) and isinstance(value, str):
            return value
        raise ProtocolError(f"{where}: {value!r} is not one of {typing.get_args(hint)}")
    if hint is type(None):
        if value is None:
            return None
    elif hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            if not INT_MIN <= value <= INT_MAX:
                raise ProtocolError(f"{where}: {value} does not fit 64 bits")
            return value
    elif hint is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ProtocolError(f"{where}: {value} is not a finite number")
            return value
    elif hint is str or hint is bytes:
        if isinstance(value, hint):
            return value
    elif origin is list:
        if isinstance(value, list):
            (item,) = typing.get_args(hint)
            return [_convert(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    elif origin is dict:
        if isinstance(value, dict):
            key, item = typing.get_args(hint)
            return {_convert(k, key, where): _convert(v, item, f"{where}[{k!r}]") for k, v in value.items()}
    elif dataclasses.is_dataclass(hint):
        return _record(hint, value, where)  # type: ignore[arg-type]
    raise ProtocolError(f"{where}: {_kind(value)} is not {getattr(hint, '__name__', hint)}")


def _kind(value: Any) -> str:
    return type(value).__name__
