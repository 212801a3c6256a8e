"""Tiny data sets and a tiny ONNX model for the partition, inference and fan-out tests.

The ONNX model predicts z = MAG_WEIGHT * mean(magnitudes) + mean(images), so a test can
compute the expected redshifts with numpy alone.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

MAG_WEIGHT = 0.01
ONNX_OPSET = 17  # the last opset whose ReduceMean takes axes as an attribute


def make_dataset_arrays(n_rows: int, *, pixels: int = 64, first_id: int = 1000, seed: int = 0) -> dict[str, np.ndarray]:
    """Return random data set tensors of ``n_rows`` galaxies in the shard layout."""
    rng = np.random.default_rng(seed)
    redshift = rng.uniform(0.01, 0.4, n_rows).astype(np.float32)
    redshift[::7] = np.nan  # some galaxies without a spectroscopic redshift
    return {
        "images": rng.normal(0.0, 0.1, (n_rows, 5, pixels, pixels)).astype(np.float32),
        "magnitudes": rng.uniform(14.0, 22.0, (n_rows, 5)).astype(np.float32),
        "magnitude_errors": rng.uniform(0.01, 0.1, (n_rows, 5)).astype(np.float32),
        "redshift": redshift,
        "object_id": np.arange(first_id, first_id + n_rows, dtype=np.int64),
        "split": (np.arange(n_rows) % 3).astype(np.uint8),
    }


def write_dataset(store, prefix: str, shard_rows: list[int], *, seed: int = 0, with_count: bool = True) -> dict[str, np.ndarray]:
    """Write a data set of shards with ``shard_rows`` rows each; return all its tensors."""
    from safetensors.numpy import save

    shards = []
    first_id = 1000
    for index, rows in enumerate(shard_rows):
        arrays = make_dataset_arrays(rows, first_id=first_id, seed=seed + index)
        store.put(f"{prefix}/shards/shard-{index:05d}.safetensors", save(arrays))
        shards.append(arrays)
        first_id += rows
    manifest = {"shards": [{"key": f"shards/shard-{i:05d}.safetensors", "rows": r} for i, r in enumerate(shard_rows)]}
    if with_count:
        manifest["n_rows"] = sum(shard_rows)
    store.put(f"{prefix}/manifest.json", json.dumps(manifest).encode())
    return {name: np.concatenate([s[name] for s in shards]) for name in shards[0]}


def expected_z(images: np.ndarray, magnitudes: np.ndarray) -> np.ndarray:
    """Return the tiny model's prediction, computed with numpy in float64."""
    return MAG_WEIGHT * magnitudes.astype(np.float64).mean(axis=1) + images.astype(np.float64).mean(axis=(1, 2, 3))


def write_tiny_onnx(model_dir: Path) -> Path:
    """Write the tiny model as astromae.onnx and astromae.int8.onnx into ``model_dir``."""
    import onnx
    from onnx import TensorProto, helper

    images = helper.make_tensor_value_info("images", TensorProto.FLOAT, ["B", 5, 32, 32])
    magnitudes = helper.make_tensor_value_info("magnitudes", TensorProto.FLOAT, ["B", 5])
    redshift = helper.make_tensor_value_info("redshift", TensorProto.FLOAT, ["B"])
    weight = helper.make_tensor("weight", TensorProto.FLOAT, [], [MAG_WEIGHT])
    nodes = [
        helper.make_node("ReduceMean", ["magnitudes"], ["mag_mean"], axes=[1], keepdims=0),
        helper.make_node("ReduceMean", ["images"], ["img_mean"], axes=[1, 2, 3], keepdims=0),
        helper.make_node("Mul", ["mag_mean", "weight"], ["mag_term"]),
        helper.make_node("Add", ["mag_term", "img_mean"], ["redshift"]),
    ]
    graph = helper.make_graph(nodes, "tiny_photoz", [images, magnitudes], [redshift], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", ONNX_OPSET)])
    model.ir_version = 8
    onnx.checker.check_model(model)

    model_dir.mkdir(parents=True, exist_ok=True)
    path = model_dir / "astromae.onnx"
    onnx.save(model, path)
    onnx.save(model, model_dir / "astromae.int8.onnx")
    return path
