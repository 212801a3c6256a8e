"""Device benchmark at smoke sizes: output consistency, targets, inputs, peak memory, CLI."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from cai_helpers import bench, bench_report
from cai_helpers.bench_fanout import summarize_ranks
from cai_helpers.bench_setup import dataset_galaxies, synthetic_galaxies
from cai_helpers.errors import InvalidParameterError
from cai_helpers.partition import galaxies_per_partition

torch.set_num_threads(1)

BITS = 164_160


@pytest.fixture(scope="module")
def quick_result(tmp_path_factory):
    """One quick benchmark of the small AstroMAE; shared by the consistency tests."""
    from cai_helpers.model import AstroMAE, AstroMAEConfig

    torch.manual_seed(0)
    out_dir = tmp_path_factory.mktemp("bench")
    config = bench.BenchConfig.quick_preset(
        out_dir=str(out_dir), model_dir=str(out_dir / "no-model"), batch_sizes=(4, 16),
        data_sizes_gb=(0.0002, 0.0005), data_size_batch=8, min_images_per_repeat=16,
        accuracy_images=32, matmul_size=64, fanout_partition_mb=(0.1, 0.2), fanout_data_mb=0.3,
        fanout_workers=2, fanout_store=str(out_dir / "store"),
    )
    result = bench.run_benchmark(config, model=AstroMAE(AstroMAEConfig.small()).eval())
    return result, out_dir


def test_quick_run_covers_every_setting(quick_result):
    result, _ = quick_result
    settings = {(r["runtime"], r["batch_size"], r["threads"]) for r in result["inference"]}
    expected = {(rt, b, 1) for rt in ("torch", "onnx", "onnx-int8") for b in (4, 16)}
    assert settings == expected
    assert result["skipped"] == []
    assert result["hardware"]["cpu_model"]
    assert result["hardware"]["torch"] == torch.__version__


def test_bits_are_images_times_paper_bits(quick_result):
    result, _ = quick_result
    for row in result["inference"] + result["data_size"]:
        assert row["bits_per_s"] == pytest.approx(row["images_per_s"] * BITS)
    for row in result["inference"]:
        assert row["gbit_per_s"] == pytest.approx(row["images_per_s"] * BITS / 1e9)
        assert row["images_per_s"] == pytest.approx(row["images_per_repeat"] / row["median_s"])
        assert row["min_s"] <= row["median_s"] <= row["max_s"]


def test_roofline_bound_is_flops_over_flop_per_image(quick_result):
    result, _ = quick_result
    (roof,) = result["roofline"]
    assert roof["flop_per_image"] == result["flop_per_image"] > 0
    assert roof["bound_images_per_s"] == pytest.approx(roof["flops_per_s"] / result["flop_per_image"])
    for row in result["inference"]:
        assert row["roofline_images_per_s"] == pytest.approx(roof["bound_images_per_s"])
        assert row["roofline_fraction"] == pytest.approx(row["images_per_s"] / roof["bound_images_per_s"])


def test_data_size_rows_count_exact_images(quick_result):
    result, _ = quick_result
    for runtime in ("torch", "onnx", "onnx-int8"):
        rows = sorted((r for r in result["data_size"] if r["runtime"] == runtime), key=lambda r: r["data_gb"])
        # 0.0002 GB = 214,748 B -> 10 galaxies; 0.0005 GB = 536,870 B -> 26 galaxies (20,520 B each).
        assert [r["images"] for r in rows] == [10, 26]
        for row in rows:
            stages = row["read_s"] + row["decode_s"] + row["inference_s"] + row["write_s"]
            assert row["seconds"] == pytest.approx(stages)
            assert row["images_per_s"] == pytest.approx(row["images"] / row["seconds"])
        assert rows[1]["seconds"] >= rows[0]["seconds"]


def test_int8_accuracy_quantiles_ordered(quick_result):
    result, _ = quick_result
    accuracy = result["int8_accuracy"]
    assert accuracy["n"] == 32
    assert 0 <= accuracy["p50"] <= accuracy["p99"] <= accuracy["max"]


def test_target_ratios_equal_reported_rows(quick_result):
    result, _ = quick_result
    targets = {t["target"]: t for t in result["targets"]}
    speed = {r["runtime"]: r["images_per_s"] for r in result["inference"] if r["batch_size"] == 16}
    int8 = targets["int8 ONNX / torch eager images/s"]
    onnx = targets["fp32 ONNX / torch eager images/s"]
    assert int8["value"] == pytest.approx(speed["onnx-int8"] / speed["torch"])
    assert onnx["value"] == pytest.approx(speed["onnx"] / speed["torch"])
    assert int8["met"] == (int8["value"] >= 2.5)
    assert targets["int8 vs fp32 p99 |dz|"]["value"] == result["int8_accuracy"]["p99"]


def test_fanout_rows_from_rank_records(quick_result):
    result, _ = quick_result
    rows = {row["partition_mb"]: row for row in result["fanout"]}
    assert set(rows) == {0.1, 0.2}
    # 0.3 MB of data = 15 galaxies of 20,504 B, split by the partitioner's capacity rule.
    for partition_mb, row in rows.items():
        assert row["images"] == 15
        assert row["partitions"] == math.ceil(15 / galaxies_per_partition(partition_mb))
    for row in rows.values():
        assert row["workers"] == 2
        assert row["images_per_s"] == pytest.approx(row["images"] / row["map_s"])
        assert 0 < row["worker_efficiency"] <= 1
        assert row["worker_peak_rss_mb"] > 0


def test_json_round_trip_and_table(quick_result, tmp_path):
    result, _ = quick_result
    path = bench_report.write_json(result, tmp_path)
    loaded = json.loads(path.read_text())
    assert loaded["inference"][0]["images_per_s"] == pytest.approx(result["inference"][0]["images_per_s"])
    table = bench_report.format_report(result)
    assert "targets" in table
    assert "onnx-int8" in table


def test_work_folder_removed_after_run(quick_result):
    _, out_dir = quick_result
    assert not [p for p in out_dir.iterdir() if p.name.startswith("bench-")]


def test_targets_from_hand_built_rows():
    def row(runtime, threads, images_per_s):
        return {"runtime": runtime, "device": "cpu", "batch_size": 512, "threads": threads,
                "images_per_s": images_per_s}

    result = {
        "inference": [row("torch", 2, 100.0), row("onnx", 2, 150.0), row("onnx-int8", 2, 300.0),
                      row("torch", 1, 60.0), row("onnx-int8", 1, 50.0)],
        "int8_accuracy": {"n": 100, "p99": 0.004},
        "fanout": [{"partition_mb": 100, "worker_efficiency": 0.9, "worker_peak_rss_mb": 650.0}],
    }
    targets = {t["target"]: t for t in bench_report.compute_targets(result)}
    assert targets["int8 ONNX / torch eager images/s"]["value"] == pytest.approx(3.0)
    assert targets["int8 ONNX / torch eager images/s"]["met"] is True
    assert targets["fp32 ONNX / torch eager images/s"]["value"] == pytest.approx(1.5)
    assert targets["int8 vs fp32 p99 |dz|"]["met"] is False
    assert targets["worker end-to-end / inference-only images/s"]["met"] is True
    assert targets["worker peak RSS on a 100 MB partition (MB)"]["met"] is False


def test_targets_without_rows_are_not_applicable():
    targets = bench_report.compute_targets({"inference": []})
    assert all(t["met"] is None for t in targets)


def test_synthetic_flux_matches_magnitudes():
    galaxies = synthetic_galaxies(200, seed=1)
    assert galaxies["images"].shape == (200, 5, 32, 32)
    assert galaxies["images"].dtype == np.float32
    flux = galaxies["images"].sum(axis=(2, 3))  # [N, C], nanomaggies
    expected = 10 ** ((22.5 - galaxies["magnitudes"].astype(np.float64)) / 2.5)
    # The r band (index 2) is brightest relative to the summed sky noise of 32 x 0.02.
    np.testing.assert_allclose(flux[:, 2], expected[:, 2], rtol=0.05)


def test_dataset_inputs_cropped_and_repeated(tmp_path):
    from cai_helpers.dataset import write_dataset
    from cai_helpers.store import LocalStore
    from fanout_fixtures import make_dataset_arrays

    arrays = make_dataset_arrays(10, seed=3)
    write_dataset(LocalStore(tmp_path / "store"), "datasets/tiny", arrays, shard_rows=4)
    galaxies = dataset_galaxies(str(tmp_path / "store" / "datasets" / "tiny"), 25)

    assert galaxies["images"].shape == (25, 5, 32, 32)
    np.testing.assert_array_equal(galaxies["images"][:10], arrays["images"][:, :, 16:48, 16:48])
    np.testing.assert_array_equal(galaxies["magnitudes"][:10], arrays["magnitudes"])
    np.testing.assert_array_equal(galaxies["object_id"][10:20], arrays["object_id"])
    np.testing.assert_array_equal(galaxies["object_id"][20:], arrays["object_id"][:5])


def test_peak_rss_sees_allocation_in_block():
    with bench_report.PeakRSS() as peak:
        block = np.ones(200 * 2**20 // 8)  # 200 MB of float64, touched
        block.sum()
    del block
    assert peak.peak_mb >= peak.start_mb + 150
    if peak.scope == "block":
        with bench_report.PeakRSS() as small:
            np.ones(1000).sum()
        assert small.peak_mb < peak.peak_mb


def test_summarize_ranks_hand_computed():
    def record(started, finished, images, inference_s, peak):
        timings = {"read_s": 0.1, "decode_s": 0.2, "inference_s": inference_s, "write_s": 0.3}
        return {"started_at": started, "finished_at": finished, "duration_s": finished - started,
                "images": images, "timings": timings, "peak_rss_mb": peak, "model_load_s": 0.5}

    records = [record(100.0, 110.0, 1000, 9.0, 400.0), record(101.0, 106.0, 500, 4.0, 450.0)]
    row = summarize_ranks(records, wall_s=20.0, partition_mb=100, workers=2, partitions=2)
    assert row["map_s"] == pytest.approx(10.0)
    assert row["images_per_s"] == pytest.approx(1500 / 10.0)
    assert row["worker_efficiency"] == pytest.approx(13.0 / 15.0)
    assert row["worker_inference_images_per_s"] == pytest.approx(1500 / 13.0)
    assert row["worker_peak_rss_mb"] == 450.0
    assert row["paper_style_bits_per_s"] == pytest.approx((1000 / 9.0 + 500 / 4.0) * BITS)
    assert row["stage_s"]["decode_s"] == pytest.approx(0.4)


def test_cli_flags_map_to_config():
    config = bench.parse_args(["--quick", "--batch-sizes", "4", "8", "--threads", "1", "--device", "cpu"])
    assert config.quick
    assert config.batch_sizes == (4, 8)
    assert config.threads == (1,)
    full = bench.parse_args(["--runtimes", "torch", "onnx", "--fanout-partition-mb"])
    assert full.runtimes == ("torch", "onnx")
    assert full.fanout_partition_mb == ()
    assert full.batch_sizes == (32, 64, 128, 256, 512)


def test_invalid_config_raises():
    with pytest.raises(InvalidParameterError):
        bench.BenchConfig(runtimes=("tensorrt",)).validate()
    with pytest.raises(InvalidParameterError):
        bench.BenchConfig(batch_sizes=(0,)).validate()
    with pytest.raises(InvalidParameterError):
        bench.BenchConfig(data_sizes_gb=(-1.0,)).validate()
