"""Run parameters of a fan-out inference run, shared by every backend.

One :class:`RunParams` describes a run end to end: where the store is, which data set
or partition manifest to read, the model and runtime, how wide to fan out, and the
figures the cost estimate needs. The initializer handler receives it as a JSON dict
(``RunParams.to_dict()``), so every field is a JSON scalar, list or dict.
"""

from __future__ import annotations

import dataclasses
import os
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

from cai_helpers.errors import InvalidParameterError

RUNTIMES = ("torch", "onnx", "onnx-int8")
BACKENDS = ("local", "aws")
FMI_OFF = "off"  # RunParams.fmi value that turns the allreduce of run figures off

# Lambda limits (AWS documentation): 128-10,240 MB memory, 900 s maximum timeout.
LAMBDA_MIN_MEMORY_MB = 128
LAMBDA_MAX_MEMORY_MB = 10_240
LAMBDA_MAX_TIMEOUT_S = 900

DEFAULT_MAX_RETRIES = 2
MAX_BATCH_SIZE = 65_536
RUN_ID_SUFFIX_BYTES = 3  # 6 hex digits after the UTC timestamp
RUN_ID_MAX_LENGTH = 64


def available_cores() -> int:
    """Return the CPU cores this process may run on (its affinity set where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def new_run_id() -> str:
    """Return a unique run id: UTC timestamp plus a random hex suffix."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    return f"{stamp}-{secrets.token_hex(RUN_ID_SUFFIX_BYTES)}"


def validate_run_id(run_id: str) -> str:
    """Raise InvalidParameterError unless ``run_id`` is usable as one store key segment."""
    allowed = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")
    if not run_id or len(run_id) > RUN_ID_MAX_LENGTH or not set(run_id) <= allowed:
        raise InvalidParameterError(
            f"invalid run_id {run_id!r}: use 1-{RUN_ID_MAX_LENGTH} characters from "
            "letters, digits, '-', '_' and '.', or pass None for a fresh id"
        )
    if run_id in (".", ".."):
        raise InvalidParameterError(f"invalid run_id {run_id!r}: '.' and '..' are not ids")
    return run_id


@dataclass
class RunParams:
    """Settings of one fan-out run; sizes in MB are 2**20 bytes, times in seconds.

    Either ``partition_prefix`` names existing partitions (a prefix holding
    ``manifest.json``), or ``dataset_prefix`` names a data set that the initializer
    partitions first into ``partition_mb`` partitions. ``data_size_mb`` keeps only the
    leading rows of the data set that fit that many MB under the partition byte model
    (None keeps all). ``max_concurrency`` None means one worker per local CPU core.
    ``fmi`` chooses how the executors allreduce their run figures: a communicator
    configuration in the form ``cai_helpers.fmi.config`` reads, ``"off"`` for no
    allreduce, or None (the default). With None, a local run starts its own rendezvous
    server and uses the direct TCP channel, and an AWS run does no allreduce, because
    Lambda workers need a rendezvous server or Redis that the caller configures.
    ``lambda_memory_mb`` is
    the configured memory the cost estimate prices, and ``rank_timeout_s`` bounds one
    rank attempt (on the local backend, the time without a finished partition). A run
    fails when more than ``tolerated_failure_percentage`` percent of its partitions
    fail after ``max_retries`` retries per rank.
    """

    store: str = "data/store"
    endpoint_url: str | None = None
    dataset_prefix: str | None = None
    partition_prefix: str | None = None
    partition_mb: float = 25.0
    data_size_mb: float | None = None
    model_dir: str = "data/models/astromae"
    runtime: str = "onnx"
    batch_size: int = 256  # peak worker RSS 536 MB at 256 against 684 MB at 512 (BENCHMARKS.md)
    max_concurrency: int | None = None
    threads_per_worker: int | None = None
    backend: str = "local"
    run_id: str | None = None
    fmi: dict[str, Any] | str | None = None
    lambda_memory_mb: int = LAMBDA_MAX_MEMORY_MB
    rank_timeout_s: float = float(LAMBDA_MAX_TIMEOUT_S)
    max_retries: int = DEFAULT_MAX_RETRIES
    tolerated_failure_percentage: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> "RunParams":
        """Raise InvalidParameterError naming the first invalid field; return self."""
        if not self.dataset_prefix and not self.partition_prefix:
            raise InvalidParameterError(
                "RunParams needs dataset_prefix (to partition first) or partition_prefix "
                "(a prefix holding manifest.json)"
            )
        if not self.partition_mb > 0:
            raise InvalidParameterError(f"partition_mb must be > 0 MB, got {self.partition_mb}")
        if self.data_size_mb is not None and not self.data_size_mb > 0:
            raise InvalidParameterError(
                f"data_size_mb must be > 0 MB or None (whole data set), got {self.data_size_mb}"
            )
        if self.runtime not in RUNTIMES:
            raise InvalidParameterError(f"invalid runtime {self.runtime!r}: use one of {RUNTIMES}")
        if self.backend not in BACKENDS:
            raise InvalidParameterError(f"invalid backend {self.backend!r}: use one of {BACKENDS}")
        _check_int_range("batch_size", self.batch_size, 1, MAX_BATCH_SIZE)
        if self.max_concurrency is not None:
            _check_int_range("max_concurrency", self.max_concurrency, 1, 100_000)
        if self.threads_per_worker is not None:
            _check_int_range("threads_per_worker", self.threads_per_worker, 1, 1_024)
        _check_int_range("lambda_memory_mb", self.lambda_memory_mb,
                         LAMBDA_MIN_MEMORY_MB, LAMBDA_MAX_MEMORY_MB)
        _check_int_range("max_retries", self.max_retries, 0, 100)
        if not self.rank_timeout_s > 0:
            raise InvalidParameterError(f"rank_timeout_s must be > 0 s, got {self.rank_timeout_s}")
        if not 0.0 <= self.tolerated_failure_percentage <= 100.0:
            raise InvalidParameterError(
                "tolerated_failure_percentage must be within 0-100, got "
                f"{self.tolerated_failure_percentage}"
            )
        if self.run_id is not None:
            validate_run_id(self.run_id)
        if isinstance(self.fmi, str):
            if self.fmi != FMI_OFF:
                raise InvalidParameterError(
                    f"invalid fmi {self.fmi!r}: use {FMI_OFF!r}, None (the default) or a "
                    "communicator configuration dict"
                )
        elif self.fmi is not None:
            from cai_helpers.fmi.config import load_config

            load_config(self.fmi)
        return self

    def to_dict(self) -> dict[str, Any]:
        """Return the parameters as a JSON-able dict (the initializer's event)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RunParams":
        """Build RunParams from a dict, rejecting unknown keys by name."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise InvalidParameterError(
                f"unknown run parameter(s) {unknown}; valid names are {sorted(names)}"
            )
        return cls(**data)

    def resolved_concurrency(self, n_partitions: int) -> int:
        """Return the world size: min(n_partitions, max_concurrency or CPU cores)."""
        limit = self.max_concurrency or available_cores()
        return max(1, min(n_partitions, limit))


def _check_int_range(name: str, value: object, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InvalidParameterError(f"{name} must be an integer within {low}-{high}, got {value!r}")
