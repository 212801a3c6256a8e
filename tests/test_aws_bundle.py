"""Lambda bundle: built from manylinux wheels, torch-free, and runs the handlers from the zip.

The handler test unpacks the zip and runs the initializer, executor and summarizer
handlers in a fresh interpreter (``python -I -S``). Its sys.path is the bundle plus a
folder that links only boto3, botocore and their dependencies from the venv, because
the Lambda runtime provides those and the bundle leaves them out. They talk to moto's
S3 server on 127.0.0.1. The first run downloads the pinned wheels from PyPI into
build/wheels; the test is skipped when that download is impossible.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from cai_helpers.aws import bundle
from cai_helpers.errors import DeploymentError
from cai_helpers.partition import write_partitions
from cai_helpers.store import S3Store
from fanout_fixtures import expected_z, write_dataset, write_tiny_onnx

# What the Lambda Python runtime provides next to the bundle.
RUNTIME_PACKAGES = ("boto3", "botocore", "s3transfer", "jmespath", "dateutil", "urllib3", "six.py")
HANDLER_TIMEOUT_S = 120

RUN_HANDLERS = r"""
import json, sys
sys.path[:0] = [sys.argv[1], sys.argv[2]]
from cai_helpers.aws import lambda_handlers
from cai_helpers.handlers import summarizer
from cai_helpers.store import open_store
params = json.loads(sys.argv[3])
init = lambda_handlers.initializer(params, None)
items = json.loads(open_store(params["store"], endpoint_url=params["endpoint_url"]).get(init["items_key"]))
ranks = [lambda_handlers.executor(item, None) for item in items]
summary = summarizer.handler({"run_id": init["run_id"], "store": params["store"],
                              "endpoint_url": params["endpoint_url"]}, None)
import numpy, onnxruntime
print(json.dumps({"init": init, "n_items": len(items), "ranks": ranks,
                  "summary": summary, "torch_loaded": "torch" in sys.modules,
                  "numpy_file": numpy.__file__, "onnxruntime_version": onnxruntime.__version__,
                  "modules": sorted(m for m in sys.modules if "." not in m)}))
"""


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(zip path, report, unpacked folder) of a bundle built with the repo's wheel cache."""
    try:
        wheels = bundle.download_wheels()
    except DeploymentError as exc:
        pytest.skip(f"cannot fetch the pinned wheels: {exc}")
    assert len(wheels) == len(bundle.REQUIREMENTS)
    out = tmp_path_factory.mktemp("bundle") / "executor.zip"
    report = bundle.build_bundle(out)
    unpacked = out.parent / "unpacked"
    with zipfile.ZipFile(out) as archive:
        archive.extractall(unpacked)
    return out, report, unpacked


@pytest.fixture(scope="module")
def runtime_only(tmp_path_factory):
    """A folder that links only the packages the Lambda runtime ships, from the venv."""
    import boto3

    site = Path(boto3.__file__).resolve().parents[1]
    folder = tmp_path_factory.mktemp("lambda-runtime")
    for name in RUNTIME_PACKAGES:
        (folder / name).symlink_to(site / name)
    return folder


def test_bundle_contents(built):
    out, report, _ = built
    names = zipfile.ZipFile(out).namelist()
    assert "cai_helpers/handlers/executor.py" in names
    assert "onnxruntime/__init__.py" in names
    assert "pyarrow/parquet/__init__.py" in names
    assert "numpy/__init__.py" in names
    assert not [n for n in names if n.startswith(("torch/", "boto3/", "botocore/"))]
    assert not [n for n in names if "__pycache__" in n or "/tests/" in n or n.endswith(".pyc")]
    assert not [n for n in names if n.startswith("pyarrow/include/")]


def test_bundle_size_under_limit(built):
    out, report, unpacked = built
    on_disk = sum(p.stat().st_size for p in unpacked.rglob("*") if p.is_file())
    assert report.unzipped_bytes == on_disk
    assert on_disk < bundle.LAMBDA_UNZIPPED_LIMIT_BYTES
    assert report.zipped_bytes == out.stat().st_size


def test_oversized_bundle_raises(built, tmp_path):
    out = tmp_path / "too-big.zip"
    with pytest.raises(DeploymentError, match="over the 1 MB limit"):
        bundle.build_bundle(out, limit_bytes=2**20)
    assert not out.exists()
    assert not out.with_suffix(".zip.partial").exists()


def test_shared_library_copies_dropped():
    names = {"pyarrow/libarrow.so.2000", "pyarrow/libarrow_python.so", "pyarrow/libarrow_python.so.2000",
             "pyarrow/libarrow_python.so.2000.0.0"}
    assert bundle._keep("pyarrow/libarrow_python.so.2000", names)
    assert not bundle._keep("pyarrow/libarrow_python.so", names)
    assert not bundle._keep("pyarrow/libarrow_python.so.2000.0.0", names)
    assert bundle._keep("pyarrow/libarrow.so.2000", names)
    assert not bundle._keep("pyarrow/libarrow_flight.so.2000", names)
    assert not bundle._keep("numpy/_core/tests/test_api.py", names)
    assert bundle._keep("numpy/testing/__init__.py", names)


def test_handlers_run_from_bundle(built, runtime_only, s3_endpoint, s3_bucket, tmp_path):
    _, _, unpacked = built
    store = S3Store(s3_bucket, "cai", endpoint_url=s3_endpoint)
    source = write_dataset(store, "ds", [7, 6])
    # Partitioned here: partitioning a data set imports cai_helpers.catalog, which needs
    # pandas, and the bundle leaves pandas out. The launcher uploads partitions.
    write_partitions(store, "ds", "parts", 0.1)
    # The model lives in the store, as the launcher uploads it; the executor copies it to /tmp.
    write_tiny_onnx(tmp_path / "astromae")
    store.put("models/astromae/astromae.onnx", (tmp_path / "astromae" / "astromae.onnx").read_bytes())
    model_cache = tmp_path / "model-cache"
    params = {"store": f"s3://{s3_bucket}/cai", "endpoint_url": s3_endpoint, "partition_prefix": "parts",
              "model_dir": "models/astromae", "runtime": "onnx", "batch_size": 4, "max_concurrency": 2,
              "backend": "aws"}

    env = {k: v for k, v in os.environ.items() if k.startswith("AWS_")}
    env.update({"PATH": os.environ.get("PATH", ""), "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": "1769",
                "CAI_LOG_LEVEL": "WARNING", "HOME": str(tmp_path),
                "CAI_MODEL_CACHE": str(model_cache)})
    result = subprocess.run(
        [sys.executable, "-I", "-S", "-c", RUN_HANDLERS, str(unpacked), str(runtime_only), json.dumps(params)],
        capture_output=True, text=True, timeout=HANDLER_TIMEOUT_S, env=env, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])

    assert report["torch_loaded"] is False
    assert "torch" not in report["modules"]
    assert report["numpy_file"].startswith(str(unpacked))
    assert report["onnxruntime_version"] == "1.16.3"
    assert report["init"]["world_size"] == 2
    assert report["init"]["items_key"] == f"runs/{report['init']['run_id']}/items.json"
    assert report["n_items"] == 2
    assert sum(r["done"] for r in report["ranks"]) == report["init"]["n_partitions"]
    assert all(r["failed"] == 0 for r in report["ranks"])
    assert report["summary"]["n_images"] == 13
    assert (model_cache / "models" / "astromae" / "astromae.onnx").is_file()

    # Predictions written by the bundled executor match the tiny model computed by numpy.
    import pyarrow.parquet as pq
    import io

    run_id = report["init"]["run_id"]
    keys = store.list(f"runs/{run_id}/predictions/")
    assert len(keys) == report["init"]["n_partitions"]
    for key in keys:
        table = pq.read_table(io.BytesIO(store.get(key)))
        ids = table.column("object_id").to_numpy()
        rows = np.searchsorted(source["object_id"], ids)
        crop = source["images"][rows, :, 16:48, 16:48]
        np.testing.assert_allclose(table.column("z_pred").to_numpy(),
                                   expected_z(crop, source["magnitudes"][rows]), rtol=1e-5, atol=1e-6)


def test_dockerfile_matches_bundle():
    # Docker cannot run here, so the Dockerfile is checked by parsing it.
    text = (Path(bundle.REPO_ROOT) / "deploy" / "Dockerfile").read_text()
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    assert lines[0] == "FROM public.ecr.aws/lambda/python:3.11"
    cmd = [line for line in lines if line.startswith("CMD ")]
    assert len(cmd) == 1
    handler = json.loads(cmd[0][len("CMD "):])
    assert handler == ["cai_helpers.aws.lambda_handlers.executor"]
    module, _, function = handler[0].rpartition(".")
    assert (Path(bundle.REPO_ROOT) / (module.replace(".", "/") + ".py")).is_file()
    assert f"def {function}(" in (Path(bundle.REPO_ROOT) / (module.replace(".", "/") + ".py")).read_text()
    for name, version in bundle.REQUIREMENTS:
        assert f"{name}=={version}" in text


def test_missing_model_raises(built, tmp_path):
    with pytest.raises(DeploymentError, match="no astromae.onnx"):
        bundle.build_bundle(tmp_path / "b.zip", model_dir=tmp_path)
