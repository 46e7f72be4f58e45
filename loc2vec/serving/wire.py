"""Feast's bytes without Feast: protobuf's wire format for the few messages loc2vec writes and reads directly.

Importing anything from `feast` (even `feast.protos`) runs `feast/__init__`, which imports the whole
FeatureStore stack (~0.8 s of a 2 s lookup, plus pandas). The online rows loc2vec writes (serving/online_write.py)
and reads (serving/online_read.py) use a handful of fixed messages: the serialized entity key of one string join
key, and ValueProto's string, int and float-list cases; the file registry's feature views with their names and
tags. Protobuf's wire format and Feast's field numbers are a compatibility contract (a field's number never
changes), and tests compare every function here with Feast's own protobuf classes on a real store.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator

import numpy as np

JOIN_KEY = "h3_cell"

# Wire types (https://protobuf.dev/programming-guides/encoding/)
VARINT, I64, LEN, I32 = 0, 1, 2, 5

# feast.types.Value (Value.proto): the cases loc2vec's views use
VALUE_STRING, VALUE_INT32, VALUE_INT64, VALUE_FLOAT_LIST = 2, 3, 4, 16
FLOAT_LIST_VAL = 1  # FloatList.val (packed)
# feast.core.Registry / FeatureView / FeatureViewSpec (Registry.proto, FeatureView.proto)
REGISTRY_FEATURE_VIEWS = 6
FEATURE_VIEW_SPEC = 1
SPEC_NAME, SPEC_PROJECT, SPEC_TAGS = 1, 2, 5
MAP_KEY, MAP_VALUE = 1, 2


class WireFormatError(ValueError):
    """Bytes that are not the protobuf message expected (or a case this module does not decode)."""


def varint(n: int) -> bytes:
    """Protobuf's base-128 varint of a non-negative integer."""
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _read_varint(buf: bytes, i: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        if i >= len(buf) or shift > 63:
            raise WireFormatError("truncated or overlong varint")
        b = buf[i]
        i += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, i
        shift += 7


def fields(buf: bytes) -> Iterator[tuple[int, int, int | bytes]]:
    """Each field of a serialized message in order: (field number, wire type, value); a varint's value is its
    integer, a fixed-width or length-delimited field's its bytes."""
    i = 0
    while i < len(buf):
        key, i = _read_varint(buf, i)
        number, wire = key >> 3, key & 7
        if wire == VARINT:
            value, i = _read_varint(buf, i)
            yield number, wire, value
            continue
        if wire == LEN:
            size, i = _read_varint(buf, i)
        elif wire in (I64, I32):
            size = 8 if wire == I64 else 4
        else:
            raise WireFormatError(f"unsupported wire type {wire} (field {number})")
        if i + size > len(buf):
            raise WireFormatError(f"field {number} runs past the end of the message")
        yield number, wire, bytes(buf[i : i + size])
        i += size


def entity_keys(cells: Iterable[str]) -> list[bytes]:
    """Feast's serialized entity key (serialization version 3) of each H3 cell: one join key, a string."""
    prefix = struct.pack("<I", 1) + struct.pack("<I", 2) + struct.pack("<I", len(JOIN_KEY)) + JOIN_KEY.encode()
    prefix += struct.pack("<I", 2)  # ValueType.STRING
    return [prefix + struct.pack("<I", len(b)) + b for b in (c.encode() for c in cells)]


def decode_value(buf: bytes) -> str | int | np.ndarray | None:
    """A serialized feast ValueProto: its string, integer or float32 list (an empty message: None, as Feast's
    unset value).

    Raises:
        WireFormatError: another case (bytes, doubles, maps, …), which loc2vec's views never hold.
    """
    for number, _, value in fields(buf):
        if number == VALUE_STRING and isinstance(value, bytes):
            return value.decode()
        if number in (VALUE_INT32, VALUE_INT64) and isinstance(value, int):
            bits = 32 if number == VALUE_INT32 else 64
            return value - (1 << 64) if value >= 1 << (bits - 1) else value  # two's complement, as protobuf's
        if number == VALUE_FLOAT_LIST and isinstance(value, bytes):
            return _float_list(value)
        raise WireFormatError(f"ValueProto field {number} is not decoded here")
    return None


def _float_list(buf: bytes) -> np.ndarray:
    parts: list[np.ndarray] = []
    for number, wire, value in fields(buf):
        if number != FLOAT_LIST_VAL or not isinstance(value, bytes) or wire not in (LEN, I32):
            raise WireFormatError(f"FloatList field {number} (wire type {wire}) is not decoded here")
        if len(value) % 4:  # packed (what protobuf writes) or one unpacked fixed32 (parsers must accept both)
            raise WireFormatError("packed float list of a length not a multiple of 4")
        parts.append(np.frombuffer(value, dtype="<f4"))
    return np.concatenate(parts) if parts else np.zeros(0, dtype="<f4")


def _messages(buf: bytes, number: int) -> Iterator[bytes]:
    """The length-delimited fields `number` of a message (embedded messages, strings)."""
    for n, _, value in fields(buf):
        if n == number and isinstance(value, bytes):
            yield value


def _string(buf: bytes, number: int) -> str:
    """A string field of a message ("" when unset; the last occurrence wins, as protobuf's parsers do)."""
    found = b""
    for found in _messages(buf, number):  # noqa: B007  # the last one
        pass
    return found.decode()


def registry_feature_views(buf: bytes) -> dict[tuple[str, str], dict[str, str]]:
    """The feature views of a serialized feast Registry (a file registry's content): (project, name) → tags."""
    out: dict[tuple[str, str], dict[str, str]] = {}
    for view in _messages(buf, REGISTRY_FEATURE_VIEWS):
        for spec in _messages(view, FEATURE_VIEW_SPEC):
            tags = {_string(entry, MAP_KEY): _string(entry, MAP_VALUE) for entry in _messages(spec, SPEC_TAGS)}
            out[(_string(spec, SPEC_PROJECT), _string(spec, SPEC_NAME))] = tags
    return out
