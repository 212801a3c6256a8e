"""Upload the model and the partitions of a run to the stack's bucket, skipping what is there.

Every object this module writes carries its sha256 in the object metadata
(``x-amz-meta-sha256``). An object is uploaded again only when it is missing or its
recorded sha256 differs from the local bytes (for partitions: from the sha256 their
manifest lists), so a second launch uploads nothing.
"""

from __future__ import annotations

import hashlib
import json
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable

from cai_helpers.errors import ChecksumError, DeploymentError, StoreError
from cai_helpers.inference import ONNX_FILES
from cai_helpers.partition import MANIFEST_NAME, read_manifest
from cai_helpers.store import Store

log = logging.getLogger(__name__)

SHA256_METADATA_KEY = "sha256"
UPLOAD_THREADS = 8  # parallel PUTs; boto3 clients are thread-safe
HASH_CHUNK_BYTES = 8 * 2**20
DATA_PREFIX = "data"
MODELS_PREFIX = "models"
MODEL_CONFIG_NAME = "config.json"


@dataclass
class UploadReport:
    """Keys written and keys skipped because the bucket already held the same bytes."""

    uploaded: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    uploaded_bytes: int = 0

    def merge(self, other: "UploadReport") -> None:
        self.uploaded += other.uploaded
        self.skipped += other.skipped
        self.uploaded_bytes += other.uploaded_bytes


def sha256_hex(data: bytes) -> str:
    """Return the hex sha256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def _remote_sha256(s3: Any, bucket: str, key: str) -> str | None:
    """Return the sha256 recorded on ``s3://bucket/key``, or None if the object is missing."""
    from botocore.exceptions import ClientError

    try:
        head = s3.head_object(Bucket=bucket, Key=key)
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
            return None
        raise DeploymentError(
            f"cannot read s3://{bucket}/{key}: {exc.response.get('Error', {}).get('Code')}; "
            "check that the credentials may read the stack's bucket"
        ) from exc
    return head.get("Metadata", {}).get(SHA256_METADATA_KEY)


def upload_bytes_if_changed(s3: Any, bucket: str, key: str, data: bytes) -> bool:
    """Put ``data`` at ``key`` unless the object there records the same sha256; True if put."""
    digest = sha256_hex(data)
    if _remote_sha256(s3, bucket, key) == digest:
        return False
    _put(s3, bucket, key, data, digest)
    return True


def _put(s3: Any, bucket: str, key: str, data: bytes, digest: str) -> None:
    s3.put_object(Bucket=bucket, Key=key, Body=data, Metadata={SHA256_METADATA_KEY: digest})
    log.info("uploaded s3://%s/%s (%d bytes)", bucket, key, len(data))


@dataclass(frozen=True)
class _Job:
    """One object to upload: its key, a loader of its bytes, and its sha256 if known."""

    key: str
    load: Callable[[], bytes]
    sha256: str | None = None
    source: str = ""


def _upload_one(s3: Any, bucket: str, job: _Job) -> tuple[bool, int]:
    """Upload one job unless the bucket has it; with a known sha256 nothing is read first."""
    if job.sha256 is not None and _remote_sha256(s3, bucket, job.key) == job.sha256:
        return False, 0
    data = job.load()
    digest = sha256_hex(data)
    if job.sha256 is not None and digest != job.sha256:
        raise ChecksumError(
            f"{job.source or job.key} has sha256 {digest}, but its manifest lists {job.sha256}; "
            "the local copy changed or is corrupt, so rewrite the partitions"
        )
    if job.sha256 is None and _remote_sha256(s3, bucket, job.key) == digest:
        return False, 0
    _put(s3, bucket, job.key, data, digest)
    return True, len(data)


def _upload_many(s3: Any, bucket: str, jobs: list[_Job]) -> UploadReport:
    """Upload jobs in parallel threads and report what was written and skipped."""
    report = UploadReport()
    with ThreadPoolExecutor(max_workers=UPLOAD_THREADS) as pool:
        results = pool.map(lambda job: _upload_one(s3, bucket, job), jobs)
        for job, (uploaded, size) in zip(jobs, results):
            if uploaded:
                report.uploaded.append(job.key)
                report.uploaded_bytes += size
            else:
                report.skipped.append(job.key)
    return report


def model_key_prefix(model_dir: str | Path) -> str:
    """Return the bucket prefix of a local model folder: ``models/<folder name>``."""
    return f"{MODELS_PREFIX}/{Path(model_dir).name}"


def upload_model(s3: Any, bucket: str, model_dir: str | Path, runtime: str = "onnx") -> tuple[str, UploadReport]:
    """Upload the ``runtime``'s ONNX file and config.json under ``models/<name>/``.

    Returns (bucket prefix, report). Raises DeploymentError for the torch runtime,
    which the torch-free Lambda bundle cannot run, and for a missing ONNX file.
    """
    if runtime not in ONNX_FILES:
        raise DeploymentError(
            f"runtime {runtime!r} cannot run on Lambda because the bundle has no torch; "
            f"use one of {sorted(ONNX_FILES)}"
        )
    folder = Path(model_dir)
    onnx_file = folder / ONNX_FILES[runtime]
    if not onnx_file.is_file():
        raise DeploymentError(
            f"{onnx_file} not found; export the model with cai_helpers.export.export_onnx "
            "(the shipped model lives in data/models/astromae)"
        )
    files = [onnx_file] + [p for p in [folder / MODEL_CONFIG_NAME] if p.is_file()]
    prefix = model_key_prefix(folder)
    jobs = [_Job(f"{prefix}/{path.name}", path.read_bytes, source=str(path)) for path in files]
    return prefix, _upload_many(s3, bucket, jobs)


def upload_partition_set(s3: Any, bucket: str, store: Store, prefix: str) -> tuple[str, UploadReport]:
    """Copy a partition set of a local store to ``data/<prefix>/`` in the bucket.

    Partitions whose object already records the manifest's sha256 are skipped without
    reading them. The manifest is rewritten so that its keys name the bucket copies, and
    it is uploaded last, so a bucket prefix with a manifest contains a complete set.
    Returns the bucket prefix and the report.
    """
    try:
        manifest = read_manifest(store, prefix)
    except StoreError as exc:
        raise DeploymentError(
            f"no partition set under {prefix!r} in {store.uri} ({exc}); write the partitions "
            "first or pass dataset_prefix to partition a data set"
        ) from exc
    remote_prefix = f"{DATA_PREFIX}/{prefix.strip('/')}"
    jobs = [
        _Job(f"{DATA_PREFIX}/{record['key']}", partial(store.get, record["key"]), record["sha256"],
             store.url_of(record["key"]))
        for record in manifest["partitions"]
    ]
    report = _upload_many(s3, bucket, jobs)

    remote_manifest = {
        **manifest,
        "store": f"s3://{bucket}",
        "partition_prefix": remote_prefix,
        "partitions": [{**r, "key": f"{DATA_PREFIX}/{r['key']}"} for r in manifest["partitions"]],
    }
    manifest_key = f"{remote_prefix}/{MANIFEST_NAME}"
    data = json.dumps(remote_manifest, indent=1, sort_keys=True).encode()
    if upload_bytes_if_changed(s3, bucket, manifest_key, data):
        report.uploaded.append(manifest_key)
        report.uploaded_bytes += len(data)
    else:
        report.skipped.append(manifest_key)
    return remote_prefix, report
