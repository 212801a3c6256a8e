"""Shared fixtures: an S3-compatible HTTP server on loopback and stores on it.

The S3 server is moto's ThreadedMotoServer bound to 127.0.0.1 on a free port, so the
tests talk real HTTP to a real server and never to AWS. Fake credentials are set for
the whole session so that boto3 never looks for real ones.
"""

from __future__ import annotations

import os
import uuid

import pytest

os.environ.update(
    {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_SESSION_TOKEN": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }
)
os.environ.pop("AWS_PROFILE", None)


@pytest.fixture(scope="session")
def s3_endpoint():
    """URL of a moto S3-compatible server listening on 127.0.0.1."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3_bucket(s3_endpoint):
    """A fresh, empty bucket on the moto server; returns its name."""
    import boto3

    name = f"cai-test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=name)
    return name


@pytest.fixture
def s3_store(s3_endpoint, s3_bucket):
    """An S3Store on a fresh bucket of the moto server, under the prefix ``test``."""
    from cai_helpers.store import S3Store

    return S3Store(s3_bucket, "test", endpoint_url=s3_endpoint)


@pytest.fixture
def local_store(tmp_path):
    """A LocalStore in a fresh temporary folder."""
    from cai_helpers.store import LocalStore

    return LocalStore(tmp_path / "store")


@pytest.fixture
def fanout_run_setup(tmp_path, monkeypatch, local_store):
    """A 47-row data set (5 partitions at 0.2 MB) and the tiny ONNX model, cwd at tmp_path.

    Returns (store, source tensors, RunParams keyword arguments) for a small local run.
    """
    from fanout_fixtures import write_dataset, write_tiny_onnx

    monkeypatch.chdir(tmp_path)
    write_tiny_onnx(tmp_path / "model")
    source = write_dataset(local_store, "ds", [20, 27])
    params = dict(store=local_store.uri, dataset_prefix="ds", partition_mb=0.2, model_dir=str(tmp_path / "model"),
                  batch_size=8, max_concurrency=2, max_retries=1, rank_timeout_s=60.0)
    return local_store, source, params
