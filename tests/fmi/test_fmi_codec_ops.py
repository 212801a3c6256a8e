"""Serialization without pickle, reduction ops, configuration and the channel policy."""

from __future__ import annotations

import io
import json
import pickle

import numpy as np
import pytest

from cai_helpers.errors import DataFormatError, InvalidParameterError
from cai_helpers.fmi import codec
from cai_helpers.fmi.config import load_config
from cai_helpers.fmi.ops import UserOp, resolve_op
from cai_helpers.fmi.policy import choose_channel, estimate

ROUND_TRIP_VALUES = [
    None, True, False, 0, -7, 2**63 - 1, -(2**63), 2**80, -(2**70), 1.5, float("inf"), "", "héllo",
    b"", b"\x00\xff" * 10, [1, [2, (3, b"x")]], (), {"a": 1.0, "b": {"c": [None]}},
]


@pytest.mark.parametrize("value", ROUND_TRIP_VALUES, ids=repr)
def test_codec_round_trips_python_values(value):
    decoded = codec.decode(codec.encode(value))
    assert decoded == value
    assert type(decoded) is type(value)


@pytest.mark.parametrize(
    "array",
    [
        np.arange(24, dtype=np.float32).reshape(2, 3, 4),
        np.array([[1, -2]], dtype=np.int8),
        np.zeros((0, 5), dtype=np.float64),
        np.array([True, False]),
        np.array([1 + 2j], dtype=np.complex128),
        np.array(["ab", "c"]),
        np.asfortranarray(np.arange(6, dtype=np.int64).reshape(2, 3)),
        np.arange(10, dtype=np.uint16)[::3],
        np.array(["2024-01-01"], dtype="datetime64[ns]"),
        np.zeros(2, dtype=[("x", "<f4"), ("y", "i2")]),
        np.array(3.0),
    ],
    ids=lambda a: f"{a.dtype}{a.shape}",
)
def test_codec_round_trips_arrays(array):
    decoded = codec.decode(codec.encode(array))
    assert decoded.dtype == array.dtype
    assert decoded.shape == array.shape
    np.testing.assert_array_equal(decoded, array)


def test_codec_round_trips_numpy_scalars():
    for scalar in (np.float32(1.25), np.int64(-3), np.bool_(True)):
        decoded = codec.decode(codec.encode(scalar))
        assert decoded == scalar
        assert decoded.dtype == scalar.dtype


@pytest.mark.parametrize("value", [np.array([object()], dtype=object), {1: "int key"}, object(), {1, 2}])
def test_codec_rejects_unsupported_values(value):
    with pytest.raises(InvalidParameterError):
        codec.encode(value)


def test_codec_never_unpickles():
    # an .npy of an object array needs pickle to load; the decoder must refuse it
    buffer = io.BytesIO()
    np.save(buffer, np.array([{"x": 1}], dtype=object), allow_pickle=True)
    blob = buffer.getvalue()
    forged = codec.MAGIC + b"a" + len(blob).to_bytes(8, "big") + blob
    with pytest.raises(DataFormatError):
        codec.decode(forged)
    with pytest.raises(DataFormatError):
        codec.decode(pickle.dumps([1, 2]))


def plain_array_message(dtype: bytes, shape: tuple, data: bytes) -> bytes:
    import struct

    blob = struct.pack(f"!B{len(dtype)}sB{len(shape)}Q", len(dtype), dtype, len(shape), *shape) + data
    return codec.MAGIC + b"A" + len(blob).to_bytes(8, "big") + blob


@pytest.mark.parametrize(
    "message",
    [
        plain_array_message(b"|O", (1,), b"\x00" * 8),
        plain_array_message(b"<f8", (2, 2), b"\x00" * 24),
        plain_array_message(b"not-a-dtype", (1,), b"\x00"),
        plain_array_message(b"<f8", (2**40, 2**40), b""),
    ],
    ids=["object", "short-data", "bad-dtype", "huge-shape"],
)
def test_codec_rejects_forged_array_headers(message):
    with pytest.raises(DataFormatError):
        codec.decode(message)


def test_codec_decoded_arrays_are_writable():
    decoded = codec.decode(codec.encode(np.arange(3)))
    decoded[0] = 7
    assert decoded[0] == 7


@pytest.mark.parametrize("cut", [1, 5, 9, 20])
def test_codec_truncated_message_raises(cut):
    message = codec.encode({"a": np.arange(4), "b": b"xyz"})
    with pytest.raises(DataFormatError):
        codec.decode(message[:-cut])


def test_codec_trailing_bytes_raise():
    with pytest.raises(DataFormatError):
        codec.decode(codec.encode(1) + b"\x00")


def test_builtin_ops_elementwise_and_nested():
    left = {"t": 1.5, "a": np.array([1, 5]), "l": [1, 2]}
    right = {"t": 2.0, "a": np.array([4, 2]), "l": [3, -4]}
    total = resolve_op("sum")(left, right)
    assert total["t"] == 3.5
    np.testing.assert_array_equal(total["a"], [5, 7])
    assert total["l"] == [4, -2]
    np.testing.assert_array_equal(resolve_op("max")(left, right)["a"], [4, 5])
    np.testing.assert_array_equal(resolve_op("min")(left, right)["a"], [1, 2])
    assert resolve_op("prod")(3, 4) == 12
    np.testing.assert_array_equal(left["a"], [1, 5])


def test_builtin_ops_reject_mismatches():
    with pytest.raises(InvalidParameterError):
        resolve_op("sum")({"a": 1}, {"b": 1})
    with pytest.raises(InvalidParameterError):
        resolve_op("sum")(b"a", b"b")
    with pytest.raises(InvalidParameterError):
        resolve_op("median")


def test_plain_function_is_not_reorderable():
    op = resolve_op(lambda a, b: a - b)
    assert not op.reorderable
    assert UserOp(max, commutative=True, associative=True).reorderable


def test_config_from_json_file(tmp_path):
    path = tmp_path / "fmi.json"
    path.write_text(json.dumps({"channels": {"redis": {"port": 7000}}, "timeouts": {"io_s": 3}}))
    config = load_config(str(path))
    assert config.enabled_channels == ("redis",)
    assert config.redis.port == 7000
    assert config.timeouts.io_s == 3


@pytest.mark.parametrize(
    "bad",
    [
        {},
        {"channels": {"mpi": {}}},
        {"channels": {"redis": {"prot": 1}}},
        {"channels": {"redis": {}}, "pin": "direct"},
        {"channels": {"redis": {}}, "objective": "fastest"},
        {"channels": {"redis": {}}, "timeouts": {"io_s": 0}},
        {"channels": {"redis": {}}, "extra": 1},
    ],
)
def test_config_rejects_invalid(bad):
    with pytest.raises(InvalidParameterError):
        load_config(bad)


ALL_CHANNELS = {"channels": {"direct": {}, "redis": {}, "objectstore": {"location": "unused"}}}


def test_policy_fast_picks_lowest_modelled_latency():
    config = load_config(ALL_CHANNELS)
    for op in ("bcast", "allreduce", "barrier"):
        latencies = {name: estimate(name, op, 16, config.policy.message_bytes, config).latency_s
                     for name in config.enabled_channels}
        assert choose_channel(op, 16, config, "fast") == min(latencies, key=latencies.get)


def test_policy_cheap_picks_lowest_modelled_price():
    config = load_config({**ALL_CHANNELS, "policy": {"direct_server_hour_usd": 100.0}})
    prices = {name: estimate(name, "allreduce", 16, config.policy.message_bytes, config).price_usd
              for name in config.enabled_channels}
    assert choose_channel("allreduce", 16, config, "cheap") == min(prices, key=prices.get)
    assert choose_channel("allreduce", 16, config, "cheap") != "direct"


def test_policy_ties_break_in_fixed_order():
    # with one peer every channel costs nothing, so the fixed order decides
    config = load_config(ALL_CHANNELS)
    assert choose_channel("bcast", 1, config, "fast") == "direct"
    config = load_config({"channels": {"objectstore": {"location": "x"}, "redis": {}}})
    assert choose_channel("bcast", 1, config, "cheap") == "redis"


def test_policy_pin_overrides_model():
    config = load_config({**ALL_CHANNELS, "pin": "objectstore"})
    assert choose_channel("allreduce", 64, config, "fast") == "objectstore"
