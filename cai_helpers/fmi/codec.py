"""Serialization of communicator values without pickle.

A message is the magic ``FMI1`` followed by one tagged value. Each value starts
with a one-byte type tag:

- ``n`` None, ``T``/``F`` bool, ``i`` int64, ``I`` larger int as decimal text,
  ``f`` float64, ``s`` UTF-8 str, ``b`` bytes,
- ``A`` numpy array of a plain dtype: the dtype string (``'<f8'``), the shape and
  the C-order bytes, which decodes about ten times faster than ``.npy`` for small arrays,
- ``a`` numpy array of a structured dtype and ``g`` numpy scalar, both stored as
  the ``.npy`` format written by ``np.save(..., allow_pickle=False)``,
- ``l`` list, ``t`` tuple and ``d`` dict with str keys, holding tagged values.

Object arrays are rejected, since they would need pickle. Lengths and counts are
unsigned 64-bit big-endian integers. Decoding checks every
length against the bytes left, so a truncated or forged message raises
:class:`~cai_helpers.errors.DataFormatError` instead of reading past the end.
"""

from __future__ import annotations

import io
import math
import struct
from typing import Any

import numpy as np

from cai_helpers.errors import DataFormatError, InvalidParameterError

MAGIC = b"FMI1"
MAX_NESTING_DEPTH = 32
_LENGTH = struct.Struct("!Q")
_INT64 = struct.Struct("!q")
_FLOAT64 = struct.Struct("!d")
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


def encode(value: Any) -> bytes:
    """Serialize ``value`` into a message; raise InvalidParameterError for unsupported types."""
    parts: list[bytes] = [MAGIC]
    _encode_into(value, parts, depth=0)
    return b"".join(parts)


def decode(message: bytes | bytearray | memoryview) -> Any:
    """Rebuild the value that :func:`encode` serialized into ``message``."""
    view = memoryview(message)
    if bytes(view[: len(MAGIC)]) != MAGIC:
        raise DataFormatError(
            "FMI message does not start with the magic b'FMI1'; the sender is not an "
            "FMI communicator of this version"
        )
    value, offset = _decode_from(view, len(MAGIC), depth=0)
    if offset != len(view):
        raise DataFormatError(
            f"FMI message has {len(view) - offset} trailing bytes after its value; "
            "the message is corrupt"
        )
    return value


def _is_plain(dtype: np.dtype) -> bool:
    return dtype.fields is None and dtype.subdtype is None and not dtype.hasobject


def _encode_plain_array(array: np.ndarray) -> bytes:
    dtype = array.dtype.str.encode("ascii")
    header = struct.pack(f"!B{len(dtype)}sB{array.ndim}Q", len(dtype), dtype, array.ndim, *array.shape)
    return header + np.ascontiguousarray(array).tobytes()


def _decode_plain_array(blob: memoryview) -> np.ndarray:
    try:
        (dtype_length,) = struct.unpack_from("!B", blob)
        dtype_text, ndim = struct.unpack_from(f"!{dtype_length}sB", blob, 1)
        offset = 2 + dtype_length
        shape = struct.unpack_from(f"!{ndim}Q", blob, offset)
        dtype = np.dtype(dtype_text.decode("ascii"))
    except (struct.error, TypeError, ValueError, UnicodeDecodeError) as exc:
        raise DataFormatError(f"FMI message contains an invalid array header: {exc}") from exc
    if not _is_plain(dtype):
        raise DataFormatError(f"FMI message contains an array of the unsupported dtype {dtype}")
    data = blob[offset + 8 * ndim:]
    count = math.prod(shape)
    if count * dtype.itemsize != len(data):
        raise DataFormatError(
            f"FMI message contains an array of shape {shape} and dtype {dtype} with {len(data)} data bytes"
        )
    return np.frombuffer(data, dtype=dtype).reshape(shape).copy()


def _encode_array(array: np.ndarray) -> bytes:
    if array.dtype.hasobject:
        raise InvalidParameterError(
            f"cannot send a numpy array of dtype {array.dtype}: object arrays need pickle; "
            "convert it to a numeric, bool, bytes or unicode dtype"
        )
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _encode_into(value: Any, parts: list[bytes], depth: int) -> None:
    if depth > MAX_NESTING_DEPTH:
        raise InvalidParameterError(
            f"value nests deeper than {MAX_NESTING_DEPTH} levels; flatten it before sending"
        )

    # bool before int, because bool is a subclass of int
    if value is None:
        parts.append(b"n")
    elif value is True or value is False:
        parts.append(b"T" if value else b"F")
    elif isinstance(value, int):
        if _INT64_MIN <= value <= _INT64_MAX:
            parts += [b"i", _INT64.pack(value)]
        else:
            _append_blob(parts, b"I", str(value).encode("ascii"))
    elif isinstance(value, float):
        parts += [b"f", _FLOAT64.pack(value)]
    elif isinstance(value, str):
        _append_blob(parts, b"s", value.encode("utf-8"))
    elif isinstance(value, (bytes, bytearray, memoryview)):
        _append_blob(parts, b"b", bytes(value))
    elif isinstance(value, np.ndarray) and _is_plain(value.dtype):
        _append_blob(parts, b"A", _encode_plain_array(value))
    elif isinstance(value, np.ndarray):
        _append_blob(parts, b"a", _encode_array(value))
    elif isinstance(value, np.generic):
        _append_blob(parts, b"g", _encode_array(np.asarray(value)))
    elif isinstance(value, (list, tuple)):
        parts += [b"l" if isinstance(value, list) else b"t", _LENGTH.pack(len(value))]
        for item in value:
            _encode_into(item, parts, depth + 1)
    elif isinstance(value, dict):
        parts += [b"d", _LENGTH.pack(len(value))]
        for key, item in value.items():
            if not isinstance(key, str):
                raise InvalidParameterError(
                    f"dict key {key!r} is a {type(key).__name__}; only str keys can be sent"
                )
            _append_blob(parts, b"s", key.encode("utf-8"))
            _encode_into(item, parts, depth + 1)
    else:
        raise InvalidParameterError(
            f"cannot send a value of type {type(value).__name__}; send None, bool, int, "
            "float, str, bytes, numpy arrays or scalars, or lists, tuples and str-keyed "
            "dicts of those"
        )


def _append_blob(parts: list[bytes], tag: bytes, blob: bytes) -> None:
    parts += [tag, _LENGTH.pack(len(blob)), blob]


def _read(view: memoryview, offset: int, count: int) -> tuple[memoryview, int]:
    end = offset + count
    if count < 0 or end > len(view):
        raise DataFormatError(
            f"FMI message is truncated: needs {count} bytes at offset {offset} but has "
            f"{len(view)} in all"
        )
    return view[offset:end], end


def _read_blob(view: memoryview, offset: int) -> tuple[memoryview, int]:
    header, offset = _read(view, offset, _LENGTH.size)
    (length,) = _LENGTH.unpack(header)
    return _read(view, offset, length)


def _decode_array(blob: memoryview) -> np.ndarray:
    try:
        return np.load(io.BytesIO(bytes(blob)), allow_pickle=False)
    except ValueError as exc:
        raise DataFormatError(f"FMI message contains an invalid .npy array: {exc}") from exc


def _decode_from(view: memoryview, offset: int, depth: int) -> tuple[Any, int]:
    if depth > MAX_NESTING_DEPTH:
        raise DataFormatError(f"FMI message nests deeper than {MAX_NESTING_DEPTH} levels")
    tag_view, offset = _read(view, offset, 1)
    tag = bytes(tag_view)

    if tag == b"n":
        return None, offset
    if tag in (b"T", b"F"):
        return tag == b"T", offset
    if tag == b"i":
        raw, offset = _read(view, offset, _INT64.size)
        return _INT64.unpack(raw)[0], offset
    if tag == b"f":
        raw, offset = _read(view, offset, _FLOAT64.size)
        return _FLOAT64.unpack(raw)[0], offset
    if tag in (b"I", b"s", b"b", b"a", b"A", b"g"):
        blob, offset = _read_blob(view, offset)
        return _decode_blob(tag, blob), offset
    if tag in (b"l", b"t", b"d"):
        raw, offset = _read(view, offset, _LENGTH.size)
        (count,) = _LENGTH.unpack(raw)
        if count > len(view) - offset:  # every item takes at least one byte
            raise DataFormatError(f"FMI message claims {count} items but is too short")
        if tag == b"d":
            return _decode_dict(view, offset, count, depth)
        items = []
        for _ in range(count):
            item, offset = _decode_from(view, offset, depth + 1)
            items.append(item)
        return (items if tag == b"l" else tuple(items)), offset
    raise DataFormatError(f"FMI message has the unknown type tag {tag!r} at offset {offset - 1}")


def _decode_blob(tag: bytes, blob: memoryview) -> Any:
    if tag == b"b":
        return bytes(blob)
    if tag == b"A":
        return _decode_plain_array(blob)
    if tag == b"a":
        return _decode_array(blob)
    if tag == b"g":
        return _decode_array(blob)[()]
    try:
        text = bytes(blob).decode("utf-8")
        return int(text) if tag == b"I" else text
    except ValueError as exc:
        raise DataFormatError(f"FMI message contains an invalid {tag!r} value: {exc}") from exc


def _decode_dict(view: memoryview, offset: int, count: int, depth: int) -> tuple[dict, int]:
    result: dict[str, Any] = {}
    for _ in range(count):
        key_tag, offset = _read(view, offset, 1)
        if bytes(key_tag) != b"s":
            raise DataFormatError("FMI message contains a dict key that is not a str")
        key_blob, offset = _read_blob(view, offset)
        key = _decode_blob(b"s", key_blob)
        result[key], offset = _decode_from(view, offset, depth + 1)
    return result, offset
