"""Executor handler: one rank predicts its partitions and writes its rank record.

The executor skips a partition of its rank when its predictions object already exists
with the manifest's row count, as for a resumed or retried rank. Otherwise it reads the
partition, verifies its sha256, predicts, and writes
``runs/<run_id>/predictions/<partition>.parquet`` (object_id, z_pred, z_true, split)
in one atomic put. A partition that fails with a package error is recorded with its
reason and the rank goes on. The model is loaded once per process (module-level cache)
and only when some partition needs predicting.

Run as ``python -m cai_helpers.handlers.executor '<event JSON>'`` (the local backend
does), the executor prints one JSON line per finished partition and a final result
line to stdout; logs go to stderr.
"""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import socket
import sys
import time
from typing import Any, Callable

import numpy as np

from cai_helpers.errors import CAIError, InvalidParameterError
from cai_helpers.handlers import (
    plan_key,
    predictions_key,
    rank_key,
    read_json,
    store_from_event,
    write_json,
)
from cai_helpers.handlers.figures import TOKEN_ENV, allreduce_run_figures, error_sums, fmi_config_for, redact
from cai_helpers.inference import Predictor, StageTimings, make_predictor, peak_rss_mb
from cai_helpers.logs import setup_logging
from cai_helpers.partition import decode_partition
from cai_helpers.runconfig import available_cores
from cai_helpers.store import Store

log = logging.getLogger(__name__)

PREDICTION_COLUMNS = ("object_id", "z_pred", "z_true", "split")
PROGRESS_PREFIX = "CAI-PROGRESS "  # marks the JSON lines the local backend parses

_PREDICTORS: dict[tuple[str, str, int, int, str], Predictor] = {}


def get_predictor(runtime: str, model_dir: str, *, batch_size: int, threads: int, device: str = "cpu") -> Predictor:
    """Return the process's cached predictor for these settings, loading it once."""
    cache_key = (runtime, os.path.abspath(model_dir), batch_size, threads, device)
    if cache_key not in _PREDICTORS:
        _PREDICTORS[cache_key] = make_predictor(runtime, model_dir, batch_size=batch_size, threads=threads, device=device)
    return _PREDICTORS[cache_key]


def encode_predictions(arrays: dict[str, np.ndarray], z_pred: np.ndarray) -> bytes:
    """Return the Parquet bytes of one partition's predictions."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({
        "object_id": arrays["object_id"],
        "z_pred": z_pred.astype(np.float32),
        "z_true": arrays["redshift"],
        "split": arrays["split"],
    })
    sink = io.BytesIO()
    pq.write_table(table, sink)
    return sink.getvalue()


def decode_predictions(data: bytes) -> dict[str, np.ndarray]:
    """Return the columns of a predictions Parquet object as numpy arrays."""
    import pyarrow.parquet as pq

    table = pq.read_table(io.BytesIO(data))
    return {name: table.column(name).to_numpy() for name in PREDICTION_COLUMNS}


def _existing_predictions(store: Store, key: str, rows: int) -> dict[str, np.ndarray] | None:
    """Return a complete predictions object's columns, or None if absent or incomplete."""
    if not store.exists(key):
        return None
    try:
        columns = decode_predictions(store.get(key))
    except (OSError, ValueError, KeyError) as exc:
        log.warning("predictions %s are unreadable (%s); predicting the partition again", key, exc)
        return None
    if len(columns["object_id"]) != rows:
        log.warning("predictions %s hold %d of %d rows; predicting the partition again",
                    key, len(columns["object_id"]), rows)
        return None
    return columns


class _Timeline:
    """Start and end (Unix time, s) of every stage, for the per-rank Gantt chart."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def add(self, partition: str | None, stage: str, start: float, duration_s: float) -> None:
        self.events.append({"partition": partition, "stage": stage, "start": start, "end": start + duration_s})


def _predict_one(
    store: Store, record: dict[str, Any], run_id: str, predictor_factory: Callable[[], Predictor], timeline: _Timeline,
) -> tuple[dict[str, np.ndarray], StageTimings]:
    """Read, verify, predict and write one partition; return its columns and timings."""
    name = record["name"]

    wall, started = time.time(), time.perf_counter()
    data = store.get(record["key"])
    read_s = time.perf_counter() - started
    timeline.add(name, "read", wall, read_s)

    wall, started = time.time(), time.perf_counter()
    arrays = decode_partition(data, key=store.url_of(record["key"]),
                              expected_sha256=record["sha256"], expected_rows=record["rows"])
    del data
    decode_s = time.perf_counter() - started
    timeline.add(name, "decode", wall, decode_s)

    predictor = predictor_factory()
    wall = time.time()
    z_pred, timings = predictor.predict_partition(arrays)
    timeline.add(name, "inference", wall, timings.inference_s)

    wall, started = time.time(), time.perf_counter()
    store.put(predictions_key(run_id, name), encode_predictions(arrays, z_pred))
    timings.write_s = time.perf_counter() - started
    timeline.add(name, "write", wall, timings.write_s)

    timings.read_s, timings.decode_s = read_s, decode_s
    columns = {"object_id": arrays["object_id"], "z_pred": z_pred, "z_true": arrays["redshift"], "split": arrays["split"]}
    return columns, timings


def run_rank(event: dict[str, Any], on_partition: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Predict every partition of ``event['rank']`` and write its rank record; return it."""
    run_id, rank = event["run_id"], int(event["rank"])
    started_at = time.time()
    store = store_from_event(event)
    plan = read_json(store, plan_key(run_id))
    params = plan["params"]
    if not 0 <= rank < plan["world_size"]:
        raise InvalidParameterError(f"run {run_id}: rank {rank} is outside world size {plan['world_size']}")
    # On Lambda no item sets threads, so the function's vCPUs are used.
    threads = int(event.get("threads") or params.get("threads_per_worker") or available_cores())
    mine = [p for p in plan["partitions"] if p["rank"] == rank]
    log.info("run %s rank %d: %d partitions, %s runtime, %d thread(s)", run_id, rank, len(mine), params["runtime"], threads)

    # Encode an empty table once: pyarrow's first table build imports pandas (about
    # 0.7 s measured on this project's 2-core machine), which is start-up, not a write.
    empty = {"object_id": np.empty(0, np.int64), "redshift": np.empty(0, np.float32), "split": np.empty(0, np.uint8)}
    encode_predictions(empty, np.empty(0, np.float32))

    timeline = _Timeline()
    totals = StageTimings()
    model_load_s = 0.0

    def predictor_factory() -> Predictor:
        nonlocal model_load_s
        wall, started = time.time(), time.perf_counter()
        predictor = get_predictor(params["runtime"], params["model_dir"], batch_size=params["batch_size"], threads=threads)
        elapsed = time.perf_counter() - started
        if elapsed > 1e-3:
            model_load_s += elapsed
            timeline.add(None, "load_model", wall, elapsed)
        return predictor

    done, skipped, failed, sums = [], [], [], error_sums(None)
    for record in mine:
        name = record["name"]
        existing = _existing_predictions(store, predictions_key(run_id, name), record["rows"])
        try:
            if existing is not None:
                columns, status = existing, "skipped"
                skipped.append(name)
            else:
                columns, timings = _predict_one(store, record, run_id, predictor_factory, timeline)
                totals.add(timings)
                status = "done"
                done.append(name)
        except CAIError as exc:
            log.error("run %s rank %d: partition %s failed: %s", run_id, rank, name, exc)
            failed.append({"partition": name, "key": record["key"], "reason": f"{type(exc).__name__}: {exc}"})
            status = "failed"
        else:
            sums = error_sums(columns, sums)
        if on_partition is not None:
            on_partition({"run_id": run_id, "rank": rank, "partition": name, "status": status})

    finished_at = time.time()
    rank_record = {
        "run_id": run_id,
        "rank": rank,
        "world_size": plan["world_size"],
        "attempt": int(event.get("attempt", 0)),
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "runtime": params["runtime"],
        "threads": threads,
        "started_at": started_at,
        "finished_at": finished_at,
        "duration_s": finished_at - started_at,
        "model_load_s": model_load_s,
        "partitions_done": done,
        "partitions_skipped": skipped,
        "partitions_failed": failed,
        "timings": totals.to_dict(),
        "images": totals.images,
        "bits": totals.bits,
        "peak_rss_mb": peak_rss_mb(),
        "error_sums": sums,
        "events": timeline.events,
    }
    fmi_config, fmi_skip_reason = fmi_config_for(event, plan)
    if fmi_config is not None:
        rank_record["allreduced"], rank_record["fmi"] = allreduce_run_figures(
            rank_record, plan=plan, rank=rank, config=fmi_config, elapsed_s=time.time() - started_at)
    elif fmi_skip_reason is not None:
        log.info("run %s rank %d: no allreduce of run figures: %s", run_id, rank, fmi_skip_reason)
        rank_record["allreduced"] = None
        rank_record["fmi"] = {"channel": None, "world_size": plan["world_size"], "joined": False,
                              "reason": fmi_skip_reason}
    write_json(store, rank_key(run_id, rank), rank_record)
    return rank_record


def handler(event: dict[str, Any], context: Any = None) -> dict[str, Any]:
    """AWS Lambda entry point for one rank; returns counts, not the full rank record."""
    setup_logging()
    record = run_rank(event)
    return {
        "run_id": record["run_id"],
        "rank": record["rank"],
        "done": len(record["partitions_done"]),
        "skipped": len(record["partitions_skipped"]),
        "failed": len(record["partitions_failed"]),
        "rank_key": rank_key(record["run_id"], record["rank"]),
    }


def _print_progress(update: dict[str, Any]) -> None:
    sys.stdout.write(PROGRESS_PREFIX + json.dumps(update) + "\n")
    sys.stdout.flush()


class _RedactFilter(logging.Filter):
    """Replaces a secret in a record's message and traceback before any handler writes it."""

    def __init__(self, secret: str) -> None:
        super().__init__()
        self.secret = secret

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if self.secret in message:
            record.msg, record.args = redact(message, self.secret), None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text, self.secret)
        return True


def _redact_token_in_logs(token: str | None) -> None:
    """Keep the rendezvous token out of every log line this worker writes."""
    if not token:
        return
    for handler in logging.getLogger().handlers:
        handler.addFilter(_RedactFilter(token))


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    """Run one rank from a JSON event given as the only argument."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        sys.stderr.write("usage: python -m cai_helpers.handlers.executor '<event JSON>'\n")
        return 2
    setup_logging()
    _redact_token_in_logs(os.environ.get(TOKEN_ENV))
    # SIGTERM from the driver stops the rank between atomic writes, like Ctrl-C.
    signal.signal(signal.SIGTERM, _raise_interrupt)
    record = run_rank(json.loads(args[0]), on_partition=_print_progress)
    _print_progress({"rank": record["rank"], "status": "finished", "failed": len(record["partitions_failed"])})
    return 0


if __name__ == "__main__":
    # Run the imported module's main, so that one module object (and one predictor
    # cache) serves both ``python -m`` and imports.
    from cai_helpers.handlers import executor as _executor

    sys.exit(_executor.main())
