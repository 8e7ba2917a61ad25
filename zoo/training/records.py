"""tf.train.Example records without TensorFlow: a protobuf wire-format codec and ArrayRecord I/O.

TFDS writes datasets as ArrayRecord shards whose records are serialized `tf.train.Example`
protos. Reading them should not pull in TensorFlow (hundreds of MB, and a second runtime
competing with JAX for the accelerator), and the message is small enough to decode by hand:

    Example   { Features features = 1; }
    Features  { map<string, Feature> feature = 1; }  // entry: {string key = 1; Feature value = 2;}
    Feature   { oneof kind { BytesList bytes_list = 1; FloatList float_list = 2;
                             Int64List int64_list = 3; } }
    BytesList { repeated bytes value = 1; }
    FloatList { repeated float value = 1 [packed = true]; }
    Int64List { repeated int64 value = 1 [packed = true]; }

The decoder accepts both packed and unpacked repeated scalars (writers differ) and skips fields
it does not know, as any protobuf parser must. The encoder writes what TensorFlow writes (packed
scalars), so files made with it read back in TensorFlow too.
"""
from __future__ import annotations

import os
import struct
from typing import Iterable, Mapping, Sequence, Union

import numpy as np

# Protobuf wire types (https://protobuf.dev/programming-guides/encoding/).
_VARINT, _FIXED64, _LENGTH_DELIMITED, _FIXED32 = 0, 1, 2, 5

# Field numbers of the messages above.
_EXAMPLE_FEATURES = 1
_FEATURES_ENTRY = 1
_ENTRY_KEY, _ENTRY_VALUE = 1, 2
_BYTES_LIST, _FLOAT_LIST, _INT64_LIST = 1, 2, 3
_LIST_VALUE = 1

FeatureValue = Union[bytes, str, int, float, Sequence[bytes], Sequence[str], Sequence[int],
                     Sequence[float], np.ndarray]


# --- wire-format primitives ----------------------------------------------------------------------

def _encode_varint(value: int) -> bytes:
    """Base-128 varint; negative int64 values are written as their 64-bit two's complement
    (ten bytes), as protobuf does."""
    if value < 0:
        value += 1 << 64
    out = bytearray()
    while True:
        low = value & 0x7F
        value >>= 7
        if value:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def _decode_varint(data: bytes, pos: int) -> tuple[int, int]:
    """(unsigned value, position after it)."""
    result, shift = 0, 0
    while True:
        if pos >= len(data):
            raise ValueError("truncated varint in a tf.train.Example record")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift >= 70:
            raise ValueError("varint longer than 10 bytes in a tf.train.Example record")


def _to_int64(unsigned: int) -> int:
    unsigned &= (1 << 64) - 1
    return unsigned - (1 << 64) if unsigned >= 1 << 63 else unsigned


def _tag(field: int, wire_type: int) -> bytes:
    return _encode_varint((field << 3) | wire_type)


def _length_delimited(field: int, payload: bytes) -> bytes:
    return _tag(field, _LENGTH_DELIMITED) + _encode_varint(len(payload)) + payload


def _fields(data: bytes):
    """Yields (field number, wire type, value) over one message; value is an int for varints,
    bytes for everything else."""
    pos, end = 0, len(data)
    while pos < end:
        key, pos = _decode_varint(data, pos)
        field, wire_type = key >> 3, key & 7
        if wire_type == _VARINT:
            value, pos = _decode_varint(data, pos)
        elif wire_type == _LENGTH_DELIMITED:
            length, pos = _decode_varint(data, pos)
            value = data[pos:pos + length]
            if len(value) != length:
                raise ValueError("truncated length-delimited field in a tf.train.Example record")
            pos += length
        elif wire_type == _FIXED32:
            value, pos = data[pos:pos + 4], pos + 4
        elif wire_type == _FIXED64:
            value, pos = data[pos:pos + 8], pos + 8
        else:
            raise ValueError(f"unsupported protobuf wire type {wire_type} (field {field}) in a "
                             f"tf.train.Example record")
        if pos > end:
            raise ValueError("truncated fixed-width field in a tf.train.Example record")
        yield field, wire_type, value


# --- encoder -------------------------------------------------------------------------------------

def _encode_feature(name: str, value: FeatureValue) -> bytes:
    """One `Feature`: bytes/str -> bytes_list, ints -> int64_list, floats -> float_list."""
    if isinstance(value, (bytes, str, int, float, np.integer, np.floating)):
        value = [value]
    values = list(np.asarray(value).ravel()) if isinstance(value, np.ndarray) else list(value)
    if all(isinstance(v, (bytes, str)) for v in values) and values:
        payload = b"".join(_length_delimited(_LIST_VALUE, v.encode() if isinstance(v, str) else v)
                           for v in values)
        kind = _BYTES_LIST
    elif all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in values):
        packed = b"".join(_encode_varint(int(v)) for v in values)
        payload = _length_delimited(_LIST_VALUE, packed) if values else b""
        kind = _INT64_LIST
    elif all(isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)
             for v in values):
        packed = struct.pack(f"<{len(values)}f", *values)
        payload = _length_delimited(_LIST_VALUE, packed)
        kind = _FLOAT_LIST
    else:
        kinds = sorted({type(v).__name__ for v in values})
        raise ValueError(f"feature {name!r} mixes or uses unsupported value types {kinds}; "
                         f"allowed: all bytes/str, all ints, or all floats")
    return _length_delimited(kind, payload)


def encode_example(features: Mapping[str, FeatureValue]) -> bytes:
    """Serializes a `tf.train.Example` with one feature per key (keys written in sorted order, so
    the bytes are deterministic)."""
    entries = b""
    for name in sorted(features):
        entry = (_length_delimited(_ENTRY_KEY, name.encode())
                 + _length_delimited(_ENTRY_VALUE, _encode_feature(name, features[name])))
        entries += _length_delimited(_FEATURES_ENTRY, entry)
    return _length_delimited(_EXAMPLE_FEATURES, entries)


# --- decoder -------------------------------------------------------------------------------------

def _decode_list(kind: int, data: bytes) -> list[bytes] | np.ndarray:
    if kind == _BYTES_LIST:
        return [bytes(v) for field, _, v in _fields(data) if field == _LIST_VALUE]
    if kind == _FLOAT_LIST:
        chunks = []
        for field, wire_type, value in _fields(data):
            if field == _LIST_VALUE:  # packed (length-delimited) or one fixed32 per value
                chunks.append(np.frombuffer(value, dtype="<f4"))
        return (np.concatenate(chunks) if chunks else np.zeros((0,), "<f4")).astype(np.float32)
    values: list[int] = []
    for field, wire_type, value in _fields(data):
        if field != _LIST_VALUE:
            continue
        if wire_type == _VARINT:
            values.append(_to_int64(value))
        else:
            pos = 0
            while pos < len(value):
                raw, pos = _decode_varint(value, pos)
                values.append(_to_int64(raw))
    return np.asarray(values, dtype=np.int64)


def _decode_feature(data: bytes) -> list[bytes] | np.ndarray:
    result: list[bytes] | np.ndarray = []
    for field, _, value in _fields(data):
        if field in (_BYTES_LIST, _FLOAT_LIST, _INT64_LIST):
            result = _decode_list(field, value)
    return result


def decode_example(record: bytes) -> dict[str, list[bytes] | np.ndarray]:
    """Parses a serialized `tf.train.Example`: feature name -> list of bytes (bytes_list),
    float32 array (float_list) or int64 array (int64_list). A feature with no kind set decodes
    as an empty list."""
    features: dict[str, list[bytes] | np.ndarray] = {}
    for field, _, features_msg in _fields(record):
        if field != _EXAMPLE_FEATURES:
            continue
        for entry_field, _, entry in _fields(features_msg):
            if entry_field != _FEATURES_ENTRY:
                continue
            key, value = "", b""
            for item_field, _, item in _fields(entry):
                if item_field == _ENTRY_KEY:
                    key = bytes(item).decode()
                elif item_field == _ENTRY_VALUE:
                    value = item
            features[key] = _decode_feature(value)
    return features


# --- ArrayRecord files ---------------------------------------------------------------------------

def write_array_record(path: str | os.PathLike, records: Iterable[bytes]) -> int:
    """Writes `records` to one ArrayRecord file; returns how many were written.

    `group_size:1` puts every record in its own chunk, which is what random access (grain's
    data sources) needs to read one record without decompressing its neighbours.
    """
    from array_record.python.array_record_module import ArrayRecordWriter

    writer = ArrayRecordWriter(os.fspath(path), "group_size:1")
    count = 0
    try:
        for record in records:
            writer.write(record)
            count += 1
    finally:
        writer.close()
    return count
