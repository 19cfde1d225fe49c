"""The one codec: messages ⇄ versioned msgpack frames `[version, kind, {field: value}]`.

`decode` treats its input as untrusted: anything but a well-formed frame of a known kind with
fields of the declared types raises `ProtocolError`, never another exception.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Union

import msgpack

from actors._config import PROTOCOL_VERSION
from actors._errors import ProtocolError
from actors.wire._messages import MESSAGE_TYPES

Message = Any  # any instance of a class in MESSAGE_TYPES
DEFAULT_MAX_FRAME_BYTES = 4 * 1024 * 1024

_BY_KIND: dict[str, type] = {cls.KIND: cls for cls in MESSAGE_TYPES}  # type: ignore[attr-defined]


def encode(message: Message) -> bytes:
    """Pack a message into one frame."""
    fields = {f.name: getattr(message, f.name) for f in dataclasses.fields(message)}
    return msgpack.packb([PROTOCOL_VERSION, message.KIND, fields], use_bin_type=True)


def decode(frame: bytes, max_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> Message:
    """Unpack and validate one frame; raises `ProtocolError` for anything malformed."""
    if len(frame) > max_bytes:
        raise ProtocolError(f"frame of {len(frame)} bytes exceeds the {max_bytes}-byte limit")
    try:
        version, kind, fields = msgpack.unpackb(frame, raw=False, strict_map_key=True)
    except Exception as err:  # msgpack raises several unrelated types on garbage
        raise ProtocolError(f"undecodable frame: {err}") from err
    if version != PROTOCOL_VERSION:
        raise ProtocolError(f"protocol version {version!r}, expected {PROTOCOL_VERSION}")
    cls = _BY_KIND.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise ProtocolError(f"unknown message kind {kind!r}")
    if not isinstance(fields, dict):
        raise ProtocolError(f"{kind}: fields must be a map")
    return _build(cls, fields)


def peek_version(frame: bytes) -> int | None:
    """The protocol version a frame claims, or None if it does not even say (for counting)."""
    try:
        head = msgpack.unpackb(frame, raw=False)
    except Exception:
        return None
    return head[0] if isinstance(head, list) and head and isinstance(head[0], int) else None


def _build(cls: type, fields: dict[str, Any]) -> Message:
    hints = _hints(cls)
    unknown = fields.keys() - hints.keys()
    if unknown:
        raise ProtocolError(f"{cls.KIND}: unknown fields {sorted(unknown)}")  # type: ignore[attr-defined]
    for name, value in fields.items():
        if not _matches(value, hints[name]):
            raise ProtocolError(f"{cls.KIND}.{name}: {type(value).__name__} is not {hints[name]}")  # type: ignore[attr-defined]
    try:
        return cls(**fields)
    except TypeError as err:  # a required field is missing
        raise ProtocolError(f"{cls.KIND}: {err}") from err  # type: ignore[attr-defined]


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        all_hints = typing.get_type_hints(cls)
        _HINTS[cls] = {f.name: all_hints[f.name] for f in dataclasses.fields(cls)}
    return _HINTS[cls]


def _matches(value: Any, hint: Any) -> bool:
    """Shallow runtime check of a decoded value against a field's annotation."""
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        return any(_matches(value, arg) for arg in typing.get_args(hint))
    if hint is Any:
        return True
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is list:
        (item,) = typing.get_args(hint)
        return isinstance(value, list) and all(_matches(v, item) for v in value)
    if origin is dict:
        return isinstance(value, dict)
    return isinstance(value, hint)
