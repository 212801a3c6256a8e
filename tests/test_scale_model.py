"""Scale model of a Lambda run: hand-computed cases for vCPUs, waves, time and cost."""

from __future__ import annotations

import math

import pytest

from cai_helpers import scale_model as sm
from cai_helpers.errors import InvalidParameterError

GALAXIES_PER_25_MB = 1278  # 26,214,400 B // 20,504 B
LambdaDefaults = sm.LambdaAssumptions()


def bare_assumptions(**overrides) -> sm.LambdaAssumptions:
    """Assumptions with every overhead zero, so hand arithmetic stays short."""
    fields = dict(
        seconds_per_image_per_vcpu=0.01, cold_start_s=2.0, model_load_s=1.0, s3_read_mb_per_s=100.0,
        result_write_s=0.0, map_start_s=0.0, per_child_overhead_s=0.0, init_state_s=0.0,
        summarize_state_s=0.0, summarize_per_result_s=0.0, memory_base_mb=100.0,
        memory_per_partition_mb=1.0, concurrency_limit=1000,
    )
    fields.update(overrides)
    return sm.LambdaAssumptions(**fields)


def test_vcpus_proportional_to_memory():
    assert sm.lambda_vcpus(1769) == pytest.approx(1.0)
    assert sm.lambda_vcpus(3538) == pytest.approx(2.0)
    assert sm.lambda_vcpus(884.5) == pytest.approx(0.5)
    assert sm.lambda_vcpus(10_240) == pytest.approx(10_240 / 1769)
    assert sm.lambda_vcpus(10_240) <= 6


def test_vcpus_reject_memory_outside_lambda_range():
    with pytest.raises(InvalidParameterError):
        sm.lambda_vcpus(64)
    with pytest.raises(InvalidParameterError):
        sm.lambda_vcpus(10_241)


def test_waves_when_items_exceed_concurrency():
    assert sm.waves(1000, 1000) == 1
    assert sm.waves(1001, 1000) == 2
    assert sm.waves(2500, 1000) == 3
    assert sm.waves(1, 1000) == 1


def test_compute_time_scales_as_inverse_vcpus():
    a = bare_assumptions()
    one = sm.predict_run(GALAXIES_PER_25_MB, 25, 1769, a)
    two = sm.predict_run(GALAXIES_PER_25_MB, 25, 3538, a)
    four = sm.predict_run(GALAXIES_PER_25_MB, 25, 7076, a)
    assert one.compute_seconds == pytest.approx(GALAXIES_PER_25_MB * 0.01)
    assert two.compute_seconds == pytest.approx(one.compute_seconds / 2)
    assert four.compute_seconds == pytest.approx(one.compute_seconds / 4)


def test_two_waves_hand_computed():
    # 3 partitions of 1,278 galaxies, 2 at a time, 2 vCPUs at 3,538 MB.
    a = bare_assumptions(concurrency_limit=2)
    prediction = sm.predict_run(3 * GALAXIES_PER_25_MB, 25, 3538, a)

    compute = GALAXIES_PER_25_MB * 0.01 / 2  # 6.39 s
    read = 25 / 100.0
    cold = 2.0 + 1.0 + read + compute
    warm = read + compute
    assert prediction.partitions == 3
    assert prediction.waves == 2
    assert prediction.child_seconds_cold == pytest.approx(cold)
    assert prediction.child_seconds_warm == pytest.approx(warm)
    assert prediction.map_seconds == pytest.approx(cold + warm)
    assert prediction.total_seconds == pytest.approx(cold + warm)

    billed_s = 2 * cold + warm
    lambda_usd = billed_s * 3538 / 1024 * 0.0000166667
    assert prediction.cost_breakdown["lambda_compute_usd"] == pytest.approx(lambda_usd, rel=1e-3)
    assert prediction.cost_usd > lambda_usd


def test_overheads_add_to_whole_run():
    a = bare_assumptions(map_start_s=1.0, init_state_s=2.0, summarize_state_s=3.0,
                         summarize_per_result_s=0.5, per_child_overhead_s=0.25)
    prediction = sm.predict_run(2 * GALAXIES_PER_25_MB, 25, 1769, a)
    child = 2.0 + 1.0 + 0.25 + GALAXIES_PER_25_MB * 0.01 + 0.25
    assert prediction.map_seconds == pytest.approx(1.0 + child)
    assert prediction.total_seconds == pytest.approx(2.0 + 1.0 + child + 3.0 + 2 * 0.5)


def test_paper_dataset_gives_517_partitions():
    prediction = sm.predict_run(sm.PAPER_GALAXIES, 25, 10_240)
    assert prediction.partitions == math.ceil(659_857 / GALAXIES_PER_25_MB) == 517
    assert prediction.waves == 1
    assert "SIMULATION" in prediction.label


def test_memory_below_requirement_is_infeasible():
    a = bare_assumptions(memory_base_mb=350.0, memory_per_partition_mb=2.5)
    prediction = sm.predict_run(10_000, 100, 512, a)
    assert not prediction.feasible
    assert "600 MB" in prediction.reason


def test_child_over_timeout_is_infeasible():
    a = bare_assumptions(seconds_per_image_per_vcpu=10.0)
    prediction = sm.predict_run(GALAXIES_PER_25_MB, 25, 1769, a)
    assert not prediction.feasible
    assert "900 s" in prediction.reason


def test_cheapest_setting_is_minimum_cost_within_deadline():
    a = bare_assumptions()
    memories = (1769, 3538, 7076)
    chosen = sm.cheapest_setting(12.6, 1e6, a, partition_sizes_mb=(25, 100), memory_settings_mb=memories)
    costs = [sm.predict_run(sm.PAPER_GALAXIES, p, m, a).cost_usd for p in (25, 100) for m in memories]
    assert chosen.cost_usd == pytest.approx(min(costs))
    assert chosen.total_seconds <= 1e6


def test_cheapest_setting_respects_deadline():
    a = bare_assumptions()
    fastest = min(
        sm.predict_run(sm.PAPER_GALAXIES, p, m, a).total_seconds
        for p in sm.PARTITION_SIZES_MB for m in sm.MEMORY_SETTINGS_MB
    )
    chosen = sm.cheapest_setting(12.6, fastest, a)
    assert chosen.total_seconds == pytest.approx(fastest)
    with pytest.raises(InvalidParameterError, match="no setting"):
        sm.cheapest_setting(12.6, fastest * 0.5, a)


def test_calibration_from_bench_json():
    bench = {
        "inference": [
            {"runtime": "onnx", "device": "cpu", "batch_size": 512, "threads": 2, "images_per_s": 80.0},
            {"runtime": "onnx", "device": "cpu", "batch_size": 512, "threads": 1, "images_per_s": 50.0},
            {"runtime": "torch", "device": "cpu", "batch_size": 512, "threads": 1, "images_per_s": 90.0},
        ],
        "model_load_s": {"onnx": 0.3},
    }
    calibrated = sm.calibrate_from_bench(bench, runtime="onnx")
    # The batch-512 row with the most threads: 2 threads / 80 images/s.
    assert calibrated.seconds_per_image_per_vcpu == pytest.approx(2 / 80.0)
    assert calibrated.model_load_s == pytest.approx(0.3)
    assert calibrated.memory_base_mb == LambdaDefaults.memory_base_mb
    with pytest.raises(InvalidParameterError):
        sm.calibrate_from_bench(bench, runtime="onnx-int8")


def test_calibration_fits_worker_memory():
    bench = {
        "inference": [{"runtime": "onnx", "device": "cpu", "batch_size": 512, "threads": 4, "images_per_s": 200.0}],
        "fanout": [{"partition_mb": 25, "worker_peak_rss_mb": 400.0},
                   {"partition_mb": 100, "worker_peak_rss_mb": 700.0}],
    }
    calibrated = sm.calibrate_from_bench(bench)
    # Line through (25, 400) and (100, 700): 4 MB per partition MB, 300 MB at zero.
    assert calibrated.memory_per_partition_mb == pytest.approx(4.0)
    assert calibrated.memory_base_mb == pytest.approx(300.0)
    assert calibrated.seconds_per_image_per_vcpu == pytest.approx(4 / 200.0)

    bench["fanout"] = [{"partition_mb": 25, "worker_peak_rss_mb": 900.0},
                       {"partition_mb": 100, "worker_peak_rss_mb": 800.0}]
    flat = sm.calibrate_from_bench(bench)
    assert flat.memory_per_partition_mb == 0.0
    assert flat.memory_base_mb == pytest.approx(900.0)


def test_sweep_covers_every_setting_with_label():
    rows = sm.sweep({"a": 10_000, "b": 20_000}, (25, 50), (1769, 10_240))
    assert len(rows) == 2 * 2 * 2
    assert all("SIMULATION" in row["label"] for row in rows)


def test_comparison_ratios_match_values():
    prediction = sm.predict_run(sm.PAPER_GALAXIES, 25, 10_240)
    for row in sm.compare_with_paper(prediction):
        assert row["ratio"] == pytest.approx(row["simulation"] / row["paper"])
