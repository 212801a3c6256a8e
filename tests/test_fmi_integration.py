"""FMI in local runs: on by default, checked by the summarizer, off on request, optional.

Runs are real: worker processes, the local backend's own rendezvous server on
127.0.0.1 and the direct TCP channel between the ranks. Expected sums are computed
with numpy from the stored catalog, independently of the package's error sums.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from cai_helpers.errors import InvalidParameterError
from cai_helpers.handlers import plan_key
from cai_helpers.handlers.figures import FMI_BASE_WAIT_S, FMI_WAIT_PER_MB_S, allreduce_timeout_s
from cai_helpers.handlers.fmi_check import comparison_rows, fmi_summary
from cai_helpers.launcher import run
from cai_helpers.local_fmi import LocalRendezvous
from cai_helpers.runconfig import RunParams
from fanout_fixtures import write_dataset, write_tiny_onnx
from fault_fixtures import hook_env, read_catalog, read_rank_records, wait_for

N_ROWS = 47  # 5 partitions of at most 10 rows at 0.2 MB
RUN_TIMEOUT_S = 120
RELATIVE_TOLERANCE = 1e-9


@pytest.fixture
def setup(tmp_path, monkeypatch, local_store):
    """A 47-row data set, the tiny ONNX model and cwd at tmp_path; returns (store, params)."""
    monkeypatch.chdir(tmp_path)
    write_tiny_onnx(tmp_path / "model")
    write_dataset(local_store, "ds", [20, 27])
    params = dict(store=local_store.uri, dataset_prefix="ds", partition_mb=0.2, model_dir=str(tmp_path / "model"),
                  batch_size=8, max_concurrency=3, max_retries=1, rank_timeout_s=60.0)
    return local_store, params


@pytest.fixture
def servers(monkeypatch):
    """(server, the configuration its ranks get) for every LocalRendezvous that a run starts."""
    started: list[tuple[LocalRendezvous, dict]] = []
    original = LocalRendezvous.start

    def start(self):
        original(self)
        started.append((self, self.event_config()))

    monkeypatch.setattr(LocalRendezvous, "start", start)
    return started


def _expected_sums(catalog: dict[str, list]) -> dict[str, float]:
    """Error sums over galaxies with a known redshift, computed with numpy from the catalog."""
    z_pred = np.asarray(catalog["z_pred"], np.float64)
    z_true = np.asarray(catalog["z_true"], np.float64)
    known = np.isfinite(z_true)
    error = z_pred[known] - z_true[known]
    dz = error / (1.0 + z_true[known])
    return {
        "n": float(known.sum()),
        "sum_dz": float(dz.sum()),
        "sum_dz2": float((dz**2).sum()),
        "sum_sq_error": float((error**2).sum()),
        "sum_abs_error": float(np.abs(error).sum()),
        "count_outlier": float((np.abs(dz) > 0.15).sum()),
        "count_outlier_005": float((np.abs(dz) > 0.05).sum()),
    }


def _logs(run_id: str) -> str:
    return "".join(path.read_text() for path in sorted(Path("runs", "logs", run_id).iterdir()))


def test_default_run_allreduces_over_direct(setup, servers, caplog, monkeypatch):
    store, params = setup
    monkeypatch.setenv("CAI_LOG_LEVEL", "DEBUG")  # workers log everything they can
    caplog.set_level(logging.DEBUG)
    summary = run(RunParams(**params), progress=False)
    run_id = summary["run_id"]

    fmi = summary["fmi"]
    assert fmi["channel"] == "direct"
    assert fmi["world_size"] == 3
    assert fmi["agrees"] is True, fmi
    assert fmi["mismatched"] == []
    assert fmi["max_relative_difference"] <= RELATIVE_TOLERANCE

    allreduced = fmi["allreduced"]
    assert allreduced == summary["allreduced"]
    assert allreduced["images"] == N_ROWS
    assert allreduced["images"] == summary["n_images"]
    assert allreduced["bits"] == N_ROWS * 164_160
    assert allreduced["ranks"] == 3
    for name, value in _expected_sums(read_catalog(store, run_id)).items():
        assert allreduced[name] == pytest.approx(value, rel=RELATIVE_TOLERANCE), name

    records = read_rank_records(store, run_id)
    assert [record["rank"] for record in records] == [0, 1, 2]
    assert all(record["fmi"]["joined"] for record in records)
    assert [record["allreduced"] is None for record in records] == [False, True, True]
    assert allreduced["inference_s"] == pytest.approx(sum(r["timings"]["inference_s"] for r in records),
                                                      rel=RELATIVE_TOLERANCE)
    rows = comparison_rows(fmi)
    assert {row["figure"] for row in rows} >= {"images", "n", "sum_sq_error", "read_s"}

    # the token was required and used, and is stored and logged nowhere
    assert len(servers) == 1
    server, config = servers[0]
    assert server._server.pairs >= 2
    token = server._token
    assert token not in json.dumps(config)
    for key in store.list(""):
        assert token.encode() not in store.get(key), f"the rendezvous token is in {key}"
    assert "token" not in json.loads(store.get(plan_key(run_id)))["params"]
    assert token not in _logs(run_id)
    assert token not in caplog.text
    assert token not in os.environ.get("CAI_FMI_TOKEN", "")


def test_fmi_off_skips_allreduce(setup, servers):
    store, params = setup
    summary = run(RunParams(**params, fmi="off"), progress=False)

    assert servers == []
    assert summary["allreduced"] is None
    assert summary["fmi"]["enabled"] is False
    assert summary["fmi"]["agrees"] is None
    records = read_rank_records(store, summary["run_id"])
    assert len(records) == 3
    assert all("fmi" not in record and record.get("allreduced") is None for record in records)
    assert "could not sum run figures" not in _logs(summary["run_id"])


def test_fmi_rejects_unknown_mode():
    with pytest.raises(InvalidParameterError, match="'on'"):
        RunParams(dataset_prefix="ds", fmi="on").validate()
    assert RunParams(dataset_prefix="ds", fmi="off").validate().fmi == "off"


def test_rank_that_cannot_join_keeps_results(setup, monkeypatch, caplog):
    store, params = setup
    original = LocalRendezvous.start

    def start_then_stop(self):
        original(self)
        self.stop()  # the server is gone before any executor starts

    monkeypatch.setattr(LocalRendezvous, "start", start_then_stop)
    caplog.set_level(logging.WARNING, logger="cai_helpers.handlers.fmi_check")
    summary = run(RunParams(**params), progress=False)

    assert summary["status"] == "succeeded"
    assert summary["n_images"] == N_ROWS
    assert sorted(read_catalog(store, summary["run_id"])["object_id"]) == list(range(1000, 1000 + N_ROWS))
    fmi = summary["fmi"]
    assert fmi["agrees"] is None
    assert fmi["allreduced"] is None
    assert "rank 0" in fmi["reason"], fmi["reason"]
    assert "Connection refused" in fmi["reason"], fmi["reason"]
    assert fmi["reason"] in caplog.text
    records = read_rank_records(store, summary["run_id"])
    assert len(records) == 3
    assert not any(record["fmi"]["joined"] for record in records)
    assert sum(record["images"] for record in records) == N_ROWS


def test_retried_rank_counted_once(setup, servers, tmp_path, monkeypatch):
    store, params = setup
    markers = tmp_path / "markers"
    markers.mkdir()
    for name, value in hook_env(tmp_path / "hook", {"marker_dir": str(markers), "partition_delay_s": 0.5}).items():
        monkeypatch.setenv(name, value)

    with ThreadPoolExecutor(1) as pool:
        job = pool.submit(run, RunParams(**params, run_id="retried"), progress=False)
        # rank 0 holds two partitions: kill it inside its second one, before the allreduce
        second = wait_for(lambda: sorted(markers.glob("0-0-*.started"))[1:], "rank 0 to start its second partition")[0]
        os.kill(int(second.read_text()), signal.SIGKILL)
        summary = job.result(timeout=RUN_TIMEOUT_S)

    records = read_rank_records(store, "retried")
    assert records[0]["attempt"] == 1
    assert records[0]["partitions_skipped"]  # written by the killed attempt
    fmi = summary["fmi"]
    assert fmi["agrees"] is True, fmi
    assert fmi["allreduced"]["attempt_sum"] == 1
    # images count what each final attempt predicted; n counts every prediction once
    assert fmi["allreduced"]["images"] == sum(record["images"] for record in records) < N_ROWS
    assert fmi["allreduced"]["n"] == _expected_sums(read_catalog(store, "retried"))["n"]


def _plan(partition_bytes: list[int], ranks: list[int], *, backend: str = "local", rank_timeout_s: float = 900.0):
    return {"run_id": "r", "world_size": max(ranks) + 1,
            "params": {"backend": backend, "rank_timeout_s": rank_timeout_s},
            "partitions": [{"bytes": size, "rows": 1, "rank": rank} for size, rank in zip(partition_bytes, ranks)]}


def test_allreduce_timeout_sized_from_plan():
    mb = 2**20
    plan = _plan([25 * mb, 25 * mb, 10 * mb], [0, 0, 1])
    # the busiest rank holds 50 MB
    assert allreduce_timeout_s(plan, {}, 0.0) == pytest.approx(FMI_BASE_WAIT_S + 50 * FMI_WAIT_PER_MB_S)
    assert allreduce_timeout_s(plan, {"timeouts": {"pairing_s": 7}}, 0.0) == 7
    # capped at 80 % of the time the rank has left: all of rank_timeout_s locally, the rest on Lambda
    assert allreduce_timeout_s(_plan([25 * mb], [0], rank_timeout_s=100.0), {}, 50.0) == pytest.approx(80.0)
    aws = _plan([25 * mb], [0], backend="aws", rank_timeout_s=900.0)
    assert allreduce_timeout_s(aws, {}, 800.0) == pytest.approx(80.0)


def _record(rank: int, attempt: int, images: int) -> dict:
    return {"rank": rank, "attempt": attempt, "images": images, "bits": images * 164_160, "duration_s": 1.0,
            "model_load_s": 0.5, "timings": {"read_s": 0.1, "decode_s": 0.2, "inference_s": 0.3, "write_s": 0.4},
            "fmi": {"channel": "direct", "joined": True, "reason": None}}


def _catalog(z_pred: list[float], z_true: list[float]) -> dict[str, np.ndarray]:
    return {"object_id": np.arange(len(z_pred)), "z_pred": np.asarray(z_pred, np.float32),
            "z_true": np.asarray(z_true, np.float32), "split": np.full(len(z_pred), 2, np.uint8)}


def _sums_by_hand() -> dict[str, float]:
    # z_pred 0.5 and 0.25 against z_true 0.25: errors 0.25 and 0, dz 0.2 and 0
    sums = {"n": 2.0, "sum_dz": 0.2, "sum_dz2": 0.04, "sum_sq_error": 0.0625, "sum_abs_error": 0.25,
            "count_outlier": 1.0, "count_outlier_005": 1.0, "sum_z_true": 0.5, "sum_z_true2": 0.125}
    return {**sums, **{f"{name}_test": value for name, value in sums.items()}}


def test_summary_flags_differing_figure(caplog):
    plan = {"run_id": "r", "world_size": 2}
    ranks = [_record(0, 0, 1), _record(1, 0, 1)]
    allreduced = {"read_s": 0.2, "decode_s": 0.4, "inference_s": 0.6, "write_s": 0.8, "images": 2.0,
                  "bits": 2 * 164_160.0, "duration_s": 2.0, "model_load_s": 1.0, "ranks": 2.0,
                  "attempt_sum": 0.0, **_sums_by_hand()}
    ranks[0]["allreduced"] = allreduced
    catalog = _catalog([0.5, 0.25], [0.25, 0.25])

    entry = fmi_summary(plan, ranks, catalog)
    assert entry["agrees"] is True, entry["relative_differences"]

    ranks[0]["allreduced"] = {**allreduced, "sum_sq_error": 0.07}
    with caplog.at_level(logging.WARNING):
        entry = fmi_summary(plan, ranks, catalog)
    assert entry["agrees"] is False
    assert entry["mismatched"] == ["sum_sq_error"]
    assert entry["max_relative_difference"] == pytest.approx((0.07 - 0.0625) / 0.07)
    assert "allreduced sum_sq_error" in caplog.text


def test_summary_skips_dead_attempt_figures():
    plan = {"run_id": "r", "world_size": 2}
    # rank 1's attempt 0 joined the allreduce and died before writing; attempt 1 wrote the record
    ranks = [_record(0, 0, 1), _record(1, 1, 0)]
    ranks[0]["allreduced"] = {"images": 2.0, "ranks": 2.0, "attempt_sum": 0.0}

    entry = fmi_summary(plan, ranks, _catalog([0.5, 0.25], [0.25, 0.25]))
    assert entry["agrees"] is None
    assert "earlier attempt" in entry["reason"]


def test_summary_sum_dz_scale():
    # sum_dz cancels to zero: its scale is sqrt(n * sum_dz2) = 2, not |sum_dz|
    from cai_helpers.handlers.fmi_check import relative_difference

    totals = {"n": 4.0, "sum_dz2": 1.0}
    assert relative_difference("sum_dz", 1e-12, 0.0, totals) == pytest.approx(1e-12 / math.sqrt(4.0))
    assert relative_difference("images", 3.0, 4.0, totals) == pytest.approx(0.25)
