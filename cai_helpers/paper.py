"""Published numbers of the CAI paper, as data, with what each number measures.

Paper: Staylor et al., "Scalable Cosmic AI Inference using Cloud Serverless Computing
with FMI", arXiv:2501.06249. The figure points come from the CSV files that the authors
publish in their repository (github.com/UVA-MLSys/AI-for-Astronomy and the fork
github.com/mstaylor/AI-for-Astronomy), averaged over three runs as in those files:

- time vs data size per device: ``code/Anomaly Detection/Plots/Cloud for
  CosmicAI(CURRENT - vary datasize).csv`` (column "Inference Time", batch 512);
- time and throughput vs partition size: ``aws/results/result_stats.csv``;
- throughput vs batch size (1 GB, 100 MB partitions): ``aws/batch_varying_results.csv``.

How the paper measured matters when comparing. Its per-Lambda "time" is profiler CPU
time of the inference loop (model load and download untimed), and its throughput in
bits/s is the sum over Lambdas of (bits / own CPU time), not bits over wall time. Our
benchmark reports wall time; the comparison table states which definition each row uses.
"""

from __future__ import annotations

from dataclasses import dataclass

# The paper's size of one galaxy: float32 image 5x32x32 (20,480 B) + 5 float32 magnitudes.
BITS_PER_IMAGE = 164_160
BYTES_PER_IMAGE = BITS_PER_IMAGE // 8  # 20,520 B
FULL_DATASET_GALAXIES = 659_857
FULL_DATASET_GB = 12.6  # GiB: 659,857 x 20,520 B = 12.61 x 2**30 B
GB = 2**30
MB = 2**20


@dataclass(frozen=True)
class HeadlineNumber:
    """One row of the paper's headline results."""

    setting: str
    quantity: str
    value: float
    unit: str
    note: str


HEADLINE: tuple[HeadlineNumber, ...] = (
    HeadlineNumber("HPC CPU", "inference time, 12.6 GB", 1793.2, "s",
                   "Rivanna CPU node, batch 512; core count not recorded (368 images/s)"),
    HeadlineNumber("HPC GPU (A100)", "inference time, 12.6 GB", 140.8, "s",
                   "Rivanna A100, batch 512; DataLoader-bound (4,686 images/s)"),
    HeadlineNumber("laptop (8 cores, 15 GB)", "inference time, 8 GB", 6283.3, "s",
                   "largest size that fit in memory"),
    HeadlineNumber("CAI, 25 MB partitions", "map state time, 12.6 GB", 28.0, "s",
                   "517 Lambdas at 10,240 MB"),
    HeadlineNumber("CAI, 25 MB partitions", "whole state machine time, 12.6 GB", 56.8, "s",
                   "initializer + map + summarizer"),
    HeadlineNumber("CAI, 25 MB partitions", "throughput, 12.6 GB", 18.04e9, "bit/s",
                   "sum over Lambdas of bits / own CPU time; bits over the 28 s map state give 3.9 Gbit/s"),
    HeadlineNumber("CAI, 25 MB partitions", "cost per full-data run", 0.16, "USD",
                   "from memory used and profiler time, not billed duration"),
    HeadlineNumber("CAI, 100 MB partitions", "cost per full-data run", 0.38, "USD",
                   "same method as the 25 MB cost"),
    HeadlineNumber("one Lambda, batch 512", "throughput per function", 188.0, "images/s",
                   "low end of 188-250 images/s at 10,240 MB (6 vCPUs)"),
    HeadlineNumber("one Lambda, batch 512", "throughput per function", 250.0, "images/s",
                   "high end of 188-250 images/s at 10,240 MB (6 vCPUs)"),
    HeadlineNumber("map state, 1 GB", "time at batch 32", 34.6, "s", "batch sweep in the paper's text"),
    HeadlineNumber("map state, 1 GB", "time at batch 512", 15.9, "s", "batch sweep in the paper's text"),
)

# Time vs data size per device, batch 512: (device, data GB, mean inference time s).
TIME_VS_DATA_SIZE: tuple[tuple[str, float, float], ...] = (
    ("laptop", 1, 701.08), ("laptop", 2, 1496.33), ("laptop", 4, 2997.60),
    ("laptop", 6, 4489.03), ("laptop", 8, 6283.32),
    ("Dell XPS server", 1, 206.83), ("Dell XPS server", 2, 423.78), ("Dell XPS server", 4, 839.62),
    ("Dell XPS server", 6, 1256.92), ("Dell XPS server", 8, 1676.56), ("Dell XPS server", 10, 2030.63),
    ("HPC CPU", 1, 148.59), ("HPC CPU", 2, 248.82), ("HPC CPU", 4, 538.70), ("HPC CPU", 6, 783.58),
    ("HPC CPU", 8, 1026.85), ("HPC CPU", 10, 1353.61), ("HPC CPU", 12.6, 1793.20),
    ("HPC GPU (A100)", 1, 17.58), ("HPC GPU (A100)", 2, 22.46), ("HPC GPU (A100)", 4, 45.32),
    ("HPC GPU (A100)", 6, 68.73), ("HPC GPU (A100)", 8, 89.17), ("HPC GPU (A100)", 10, 111.41),
    ("HPC GPU (A100)", 12.6, 140.82),
    ("CAI (Lambda, 25 MB)", 1, 15.35), ("CAI (Lambda, 25 MB)", 2, 20.15), ("CAI (Lambda, 25 MB)", 4, 22.13),
    ("CAI (Lambda, 25 MB)", 6, 23.66), ("CAI (Lambda, 25 MB)", 8, 22.80), ("CAI (Lambda, 25 MB)", 10, 25.48),
    ("CAI (Lambda, 25 MB)", 12.6, 28.08),
)

# Throughput vs batch size, 1 GB data, Lambda fan-out:
# (batch size, mean summed CPU time s, mean throughput bit/s as the paper defines it).
THROUGHPUT_VS_BATCH: tuple[tuple[int, float, float], ...] = (
    (32, 36.17, 24_900_108.42),
    (64, 30.85, 29_779_379.55),
    (128, 27.17, 32_415_586.91),
    (256, 24.95, 35_453_317.75),
    (512, 25.84, 33_679_434.84),
)

# Per-Lambda time and fan-out throughput vs partition size, 12.6 GB, batch 512:
# (partition MB, mean per-Lambda CPU time s, mean throughput bit/s as the paper defines it).
# The 100 MB row at 12.6 GB mixes a failed run; the 10 GB row is listed beside it.
PARTITION_SWEEP_12_6_GB: tuple[tuple[int, float, float], ...] = (
    (25, 5.70, 18_036_934_171.84),
    (50, 10.77, 9_700_018_768.36),
    (75, 15.71, 6_656_500_624.40),
    (100, 20.68, 4_098_351_374.70),  # 10 GB run: the 12.6 GB mean includes a failed run
)

# Memory used per Lambda (MB, as reported by the paper): 25 MB and 100 MB partitions.
LAMBDA_MEMORY_USED_MB = {25: 2.8 * 1024, 100: 7.0 * 1024}
LAMBDA_MEMORY_CONFIGURED_MB = 10_240


def galaxies_for_gb(data_gb: float) -> int:
    """Return how many galaxies ``data_gb`` GiB contains at the paper's 20,520 B per galaxy."""
    return int(data_gb * GB // BYTES_PER_IMAGE)


def images_per_s_from_bits(bits_per_s: float) -> float:
    """Convert the paper's bit/s to images/s (164,160 bits per image)."""
    return bits_per_s / BITS_PER_IMAGE


def time_vs_data_size_rows() -> list[dict]:
    """Return the time-vs-data-size points as records with images/s added."""
    rows = []
    for device, data_gb, seconds in TIME_VS_DATA_SIZE:
        images = galaxies_for_gb(data_gb)
        rows.append({"source": "paper", "device": device, "data_gb": float(data_gb),
                     "seconds": seconds, "images_per_s": images / seconds})
    return rows


def batch_sweep_rows() -> list[dict]:
    """Return the batch-size points as records (images/s from the paper's bit/s)."""
    return [
        {"source": "paper", "batch_size": batch, "seconds": seconds,
         "bits_per_s": bits, "images_per_s": images_per_s_from_bits(bits)}
        for batch, seconds, bits in THROUGHPUT_VS_BATCH
    ]


def partition_sweep_rows() -> list[dict]:
    """Return the partition-size points as records.

    Fields: per-Lambda seconds, fan-out throughput as the paper defines it, and
    per-Lambda images/s (galaxies per partition over per-Lambda seconds).
    """
    from cai_helpers.partition import galaxies_per_partition

    return [
        {"source": "paper", "partition_mb": mb, "worker_seconds": seconds,
         "bits_per_s": bits, "images_per_s": images_per_s_from_bits(bits),
         "worker_images_per_s": galaxies_per_partition(mb) / seconds}
        for mb, seconds, bits in PARTITION_SWEEP_12_6_GB
    ]


def headline_rows() -> list[dict]:
    """Return the headline table as records."""
    return [
        {"setting": h.setting, "quantity": h.quantity, "value": h.value, "unit": h.unit, "note": h.note}
        for h in HEADLINE
    ]


def _best(rows: list[dict], **match) -> dict | None:
    """Return the fastest row (images/s) whose fields equal ``match``."""
    matching = [r for r in rows if all(r.get(k) == v for k, v in match.items()) and r.get("images_per_s")]
    return max(matching, key=lambda r: r["images_per_s"], default=None)


def compare_with_bench(result: dict) -> list[dict]:
    """Return the paper's numbers beside a bench JSON's, with ratio ours / paper.

    Rows whose inputs the bench run lacks are left out. ``basis`` states how each side
    was measured, because the paper's Lambda figures are profiler CPU time.
    """
    rows: list[dict] = []
    inference = result.get("inference", [])

    def add(quantity: str, paper: float, ours: float | None, unit: str, basis: str) -> None:
        if ours is not None:
            rows.append({"quantity": quantity, "paper": paper, "ours": ours, "unit": unit,
                         "ratio": ours / paper, "basis": basis})

    cpu = _best(inference, device="cpu")
    if cpu:
        add("CPU images/s", FULL_DATASET_GALAXIES / 1793.2, cpu["images_per_s"], "images/s",
            f"paper: HPC CPU node, 12.6 GB in 1,793 s; ours: {cpu['runtime']}, batch {cpu['batch_size']}, "
            f"{cpu['threads']} threads, wall time")
        add("time for 12.6 GB on CPU (extrapolated)", 1793.2, FULL_DATASET_GALAXIES / cpu["images_per_s"], "s",
            "ours: 659,857 galaxies / measured images/s")
        per_thread = max(r["images_per_s"] / r["threads"] for r in inference if r["device"] == "cpu")
        add("images/s per vCPU or thread", 219.0 / (LAMBDA_MEMORY_CONFIGURED_MB / 1769), per_thread,
            "images/s", "paper: 188-250 images/s per 10,240 MB Lambda (5.79 vCPU); ours: best row per thread")
    gpu = _best(inference, device="cuda")
    if gpu:
        add("GPU images/s", FULL_DATASET_GALAXIES / 140.8, gpu["images_per_s"], "images/s",
            f"paper: A100, DataLoader-bound; ours: {result['hardware'].get('gpu')}, {gpu['runtime']}, "
            f"batch {gpu['batch_size']}")
    sweep = {mb: (seconds, bits) for mb, seconds, bits in PARTITION_SWEEP_12_6_GB}
    for row in result.get("fanout", []):
        paper_seconds, paper_bits = sweep.get(int(row["partition_mb"]), (None, None))
        if paper_seconds is None:
            continue
        add(f"worker time, {row['partition_mb']:.0f} MB partition", paper_seconds, row.get("worker_mean_s"), "s",
            "paper: Lambda CPU time of inference at 6 vCPUs; ours: local worker wall time incl. load, "
            f"{row.get('workers')} workers")
        add(f"fan-out bit/s as the paper sums them, {row['partition_mb']:.0f} MB", paper_bits,
            row.get("paper_style_bits_per_s"), "bit/s",
            f"sum over workers of bits / own inference time; paper: 12.6 GB on Lambdas, ours: "
            f"{row.get('images')} images on {row.get('workers')} local workers")
    return rows
