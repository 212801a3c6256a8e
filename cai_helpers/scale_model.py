"""SIMULATION of a CAI run on AWS Lambda under a Step Functions Distributed Map.

Pure functions: nothing here calls AWS. Every prediction is a scale-model estimate
built from one measured number (seconds of compute per image per vCPU, from a local
benchmark or a parameter) and the stated assumptions below. Each output carries
``SIMULATION_LABEL`` so it is never read as a measurement.

"The paper" below is the CAI paper, Staylor et al., arXiv:2501.06249, whose figures
are in ``cai_helpers.paper``.

Model of one run:

- partitions = ceil(galaxies / galaxies per partition), at the partition byte model of
  20,504 B per galaxy (MB = 2**20 B, so 25 MB holds 1,278 galaxies);
- a function with ``memory_mb`` gets memory_mb / 1,769 vCPUs, at most 6 (AWS Lambda
  allocates CPU in proportion to memory: one vCPU at 1,769 MB, six at 10,240 MB);
- one child = cold start + model load + S3 read + compute + result write + per-child
  overhead, where compute = images x seconds per image per vCPU / vCPUs;
- children run in waves of at most the concurrency limit (1,000 by default per account).
  Warm environments of later waves skip the cold start and the model load;
- whole run = initializer state + map start + waves + summarizer state.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace

import numpy as np

from cai_helpers import cost
from cai_helpers.errors import InvalidParameterError
from cai_helpers.partition import galaxies_per_partition

SIMULATION_LABEL = "SIMULATION (scale model, not a measurement)"

# AWS Lambda facts (AWS documentation).
MB_PER_VCPU = 1_769
MAX_VCPUS = 6
LAMBDA_MIN_MEMORY_MB = 128
LAMBDA_MAX_MEMORY_MB = 10_240
LAMBDA_TIMEOUT_S = 900
DEFAULT_CONCURRENCY_LIMIT = 1_000

# Data sizes: a partition stores 20,504 B per galaxy (see cai_helpers.partition); the
# paper's data-size axis counts 20,520 B per galaxy (image + magnitudes, 164,160 bits).
MB = 2**20
GB = 2**30
PAPER_BYTES_PER_GALAXY = 20_520
PAPER_GALAXIES = 659_857  # the paper's "12.6 GB" data set
PARTITION_SIZES_MB = (25, 50, 75, 100)
MEMORY_SETTINGS_MB = (1_769, 3_538, 5_307, 7_076, 8_845, 10_240)

WORKER_BATCH_SIZE = 512  # batch size of the fan-out workers

# The paper's per-Lambda throughput, 188-250 images/s at 10,240 MB: the midpoint, per vCPU.
PAPER_IMAGES_PER_S_PER_LAMBDA = 219.0


@dataclass
class LambdaAssumptions:
    """Inputs of the scale model; times in seconds, sizes in MB, rates in MB/s.

    Only ``seconds_per_image_per_vcpu`` should come from a measurement. Every other
    default is an ASSUMPTION, not measured by this project; pass measured values when
    they exist.
    """

    seconds_per_image_per_vcpu: float = (LAMBDA_MAX_MEMORY_MB / MB_PER_VCPU) / PAPER_IMAGES_PER_S_PER_LAMBDA
    # ASSUMPTION: cold start of a Python container image with torch-free ONNX Runtime.
    cold_start_s: float = 1.5
    # ASSUMPTION: reading a 60 MB ONNX model and creating the session.
    model_load_s: float = 0.5
    # ASSUMPTION: one GET stream from S3 inside the same region, per function.
    s3_read_mb_per_s: float = 90.0
    # ASSUMPTION: writing one small JSON result and predictions object.
    result_write_s: float = 0.1
    # ASSUMPTION: Step Functions overheads (start of the map run, dispatch of each child).
    map_start_s: float = 1.0
    per_child_overhead_s: float = 0.2
    # ASSUMPTION: initializer (listing + plan) and summarizer states, cold start included.
    init_state_s: float = 2.5
    summarize_state_s: float = 2.5
    summarize_per_result_s: float = 0.002
    # ASSUMPTION: worker peak memory = base + factor x partition size; the project's target
    # is at most 600 MB of RSS on a 100 MB partition.
    memory_base_mb: float = 350.0
    memory_per_partition_mb: float = 2.5
    concurrency_limit: int = DEFAULT_CONCURRENCY_LIMIT
    ephemeral_storage_mb: int = cost.LAMBDA_FREE_EPHEMERAL_MB
    source: str = "paper calibration: 219 images/s per 10,240 MB Lambda"

    def validate(self) -> "LambdaAssumptions":
        for name in ("seconds_per_image_per_vcpu", "s3_read_mb_per_s"):
            if not getattr(self, name) > 0:
                raise InvalidParameterError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.concurrency_limit < 1:
            raise InvalidParameterError(f"concurrency_limit must be >= 1, got {self.concurrency_limit}")
        return self


@dataclass
class Prediction:
    """Predicted time and cost of one run setting (a SIMULATION); seconds and USD."""

    label: str
    galaxies: int
    partition_mb: float
    memory_mb: int
    partitions: int
    galaxies_per_partition: int
    vcpus: float
    waves: int
    child_seconds_cold: float
    child_seconds_warm: float
    compute_seconds: float
    map_seconds: float
    total_seconds: float
    cost_usd: float
    cost_breakdown: dict = field(default_factory=dict)
    feasible: bool = True
    reason: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def lambda_vcpus(memory_mb: float) -> float:
    """Return the vCPUs a function with ``memory_mb`` gets: memory / 1,769 MB, at most 6."""
    if not LAMBDA_MIN_MEMORY_MB <= memory_mb <= LAMBDA_MAX_MEMORY_MB:
        raise InvalidParameterError(
            f"Lambda memory must be {LAMBDA_MIN_MEMORY_MB}-{LAMBDA_MAX_MEMORY_MB} MB, got {memory_mb}"
        )
    return min(MAX_VCPUS, memory_mb / MB_PER_VCPU)


def galaxies_for_gb(data_gb: float) -> int:
    """Return the galaxies in ``data_gb`` GiB at the paper's 20,520 B per galaxy."""
    return int(data_gb * GB // PAPER_BYTES_PER_GALAXY)


def waves(items: int, concurrency: int) -> int:
    """Return how many waves ``items`` children need at ``concurrency`` at a time."""
    if concurrency < 1:
        raise InvalidParameterError(f"concurrency must be >= 1, got {concurrency}")
    return max(1, math.ceil(items / concurrency))


def required_memory_mb(partition_mb: float, assumptions: LambdaAssumptions) -> float:
    """Return the worker peak memory (MB) the model assumes for one partition."""
    return assumptions.memory_base_mb + assumptions.memory_per_partition_mb * partition_mb


def child_seconds(images: int, partition_mb: float, memory_mb: float,
                  assumptions: LambdaAssumptions, *, cold: bool) -> dict[str, float]:
    """Return the stages of one child's duration in seconds, and their sum under "total"."""
    stages = {
        "cold_start": assumptions.cold_start_s if cold else 0.0,
        "model_load": assumptions.model_load_s if cold else 0.0,
        "read": partition_mb / assumptions.s3_read_mb_per_s,
        "compute": images * assumptions.seconds_per_image_per_vcpu / lambda_vcpus(memory_mb),
        "write": assumptions.result_write_s,
        "overhead": assumptions.per_child_overhead_s,
    }
    stages["total"] = sum(stages.values())
    return stages


def run_cost(partitions: int, memory_mb: int, cold_s: float, warm_s: float,
             assumptions: LambdaAssumptions) -> dict:
    """Return the USD bill of the map's children, itemised by ``cai_helpers.cost``.

    Billed duration is the whole child at configured memory. The first wave's children
    start cold and later ones reuse warm environments. S3 requests: one GET per
    partition, one PUT per result, one LIST page per 1,000 partitions.
    """
    cold_children = min(partitions, assumptions.concurrency_limit)
    durations = [cold_s] * cold_children + [warm_s] * (partitions - cold_children)
    return cost.estimate_run_cost(
        partitions,
        durations,
        memory_mb,
        ephemeral_mb=assumptions.ephemeral_storage_mb,
        n_state_transitions=cost.count_state_transitions(partitions),
        s3_get_requests=partitions,
        s3_put_requests=partitions,
        s3_list_requests=math.ceil(partitions / 1000),
    )


def predict_run(galaxies: int, partition_mb: float, memory_mb: int,
                assumptions: LambdaAssumptions | None = None) -> Prediction:
    """Predict map-state time, whole-run time and cost of one setting (a SIMULATION)."""
    assumptions = (assumptions or LambdaAssumptions()).validate()
    if galaxies < 1:
        raise InvalidParameterError(f"galaxies must be >= 1, got {galaxies}")

    per_partition = galaxies_per_partition(partition_mb)
    partitions = math.ceil(galaxies / per_partition)
    images = min(per_partition, galaxies)
    wave_count = waves(partitions, assumptions.concurrency_limit)

    cold = child_seconds(images, partition_mb, memory_mb, assumptions, cold=True)
    warm = child_seconds(images, partition_mb, memory_mb, assumptions, cold=False)
    map_seconds = assumptions.map_start_s + cold["total"] + (wave_count - 1) * warm["total"]
    summarize = assumptions.summarize_state_s + partitions * assumptions.summarize_per_result_s
    total_seconds = assumptions.init_state_s + map_seconds + summarize
    bill = run_cost(partitions, memory_mb, cold["total"], warm["total"], assumptions)

    reasons = []
    needed = required_memory_mb(partition_mb, assumptions)
    if needed > memory_mb:
        reasons.append(f"needs about {needed:.0f} MB of memory, more than the {memory_mb} MB configured")
    if cold["total"] > LAMBDA_TIMEOUT_S:
        reasons.append(f"a child takes {cold['total']:.0f} s, over the {LAMBDA_TIMEOUT_S} s Lambda timeout")

    return Prediction(
        label=SIMULATION_LABEL, galaxies=galaxies, partition_mb=partition_mb, memory_mb=memory_mb,
        partitions=partitions, galaxies_per_partition=per_partition, vcpus=lambda_vcpus(memory_mb),
        waves=wave_count, child_seconds_cold=cold["total"], child_seconds_warm=warm["total"],
        compute_seconds=cold["compute"], map_seconds=map_seconds, total_seconds=total_seconds,
        cost_usd=bill["total_usd"], cost_breakdown=bill, feasible=not reasons, reason="; ".join(reasons),
    )


def sweep(galaxy_counts: dict[str, int], partition_sizes_mb=PARTITION_SIZES_MB,
          memory_settings_mb=MEMORY_SETTINGS_MB,
          assumptions: LambdaAssumptions | None = None) -> list[dict]:
    """Predict every (data set, partition size, memory) setting; return flat records."""
    rows = []
    for name, galaxies in galaxy_counts.items():
        for partition_mb in partition_sizes_mb:
            for memory_mb in memory_settings_mb:
                record = predict_run(galaxies, partition_mb, memory_mb, assumptions).to_dict()
                record.pop("cost_breakdown")
                rows.append({"data": name, **record})
    return rows


def paper_scenarios() -> dict[str, int]:
    """Return the three data sizes to predict: the paper's 12.6 GB, 100 GB and 1 TB (GiB)."""
    return {"12.6 GB": PAPER_GALAXIES, "100 GB": galaxies_for_gb(100), "1 TB": galaxies_for_gb(1024)}


def cheapest_setting(data_gb: float, max_seconds: float,
                     assumptions: LambdaAssumptions | None = None,
                     partition_sizes_mb=PARTITION_SIZES_MB,
                     memory_settings_mb=MEMORY_SETTINGS_MB) -> Prediction:
    """Return the cheapest feasible setting whose whole run finishes within ``max_seconds``.

    Ties on cost go to the faster run. Raises InvalidParameterError when no setting fits.
    """
    galaxies = PAPER_GALAXIES if math.isclose(data_gb, 12.6) else galaxies_for_gb(data_gb)
    candidates = [
        predict_run(galaxies, partition_mb, memory_mb, assumptions)
        for partition_mb in partition_sizes_mb
        for memory_mb in memory_settings_mb
    ]
    fitting = [p for p in candidates if p.feasible and p.total_seconds <= max_seconds]
    if not fitting:
        fastest = min((p for p in candidates if p.feasible), key=lambda p: p.total_seconds, default=None)
        hint = f"; the fastest feasible setting takes {fastest.total_seconds:.1f} s" if fastest else ""
        raise InvalidParameterError(
            f"no setting processes {data_gb} GB within {max_seconds} s{hint}: raise max_seconds "
            "or the concurrency limit"
        )
    return min(fitting, key=lambda p: (p.cost_usd, p.total_seconds))


def calibrate_from_bench(bench: dict, runtime: str = "onnx", device: str = "cpu") -> LambdaAssumptions:
    """Return assumptions calibrated with a bench JSON (``python -m cai_helpers.bench``).

    Compute: seconds per image per vCPU = threads / images_per_s of the ``runtime`` row
    closest to a Lambda worker, which is batch 512 (else the largest batch) at the most
    threads, so losses of multi-threaded scaling are included. One benchmark thread
    stands for one Lambda vCPU. Model load time comes from the same JSON. Worker memory
    is a least-squares line through the fan-out rows' peak RSS against partition size,
    when the JSON has rows for two or more sizes. Raises InvalidParameterError when the
    JSON has no matching inference row.
    """
    rows = [
        r for r in bench.get("inference", [])
        if r.get("runtime") == runtime and r.get("device") == device and r.get("images_per_s")
    ]
    if not rows:
        raise InvalidParameterError(
            f"bench JSON has no inference row for runtime {runtime!r} on {device!r}; "
            "run python -m cai_helpers.bench with that runtime first"
        )
    batches = {r["batch_size"] for r in rows}
    batch = WORKER_BATCH_SIZE if WORKER_BATCH_SIZE in batches else max(batches)
    best = max((r for r in rows if r["batch_size"] == batch), key=lambda r: (r["threads"], r["images_per_s"]))
    seconds = best["threads"] / best["images_per_s"]
    fields = {"seconds_per_image_per_vcpu": seconds,
              "source": f"bench: {runtime} at batch {batch}, {best['threads']} threads, "
                        f"{best['images_per_s']:.1f} images/s"}
    load_s = bench.get("model_load_s", {}).get(runtime)
    if load_s:
        fields["model_load_s"] = load_s

    memory = [(r["partition_mb"], r["worker_peak_rss_mb"]) for r in bench.get("fanout", [])
              if r.get("worker_peak_rss_mb")]
    if len({mb for mb, _ in memory}) >= 2:
        sizes, peaks = zip(*memory)
        slope, intercept = (float(v) for v in np.polyfit(sizes, peaks, 1))
        if slope < 0:
            # Memory cannot shrink with larger partitions; keep the largest peak as a flat line.
            slope, intercept = 0.0, max(peaks)
        fields["memory_per_partition_mb"] = slope
        fields["memory_base_mb"] = intercept
        fields["source"] += f"; worker memory {intercept:.0f} MB + {slope:.2f} x partition MB"
    return replace(LambdaAssumptions(), **fields)


def compare_with_paper(prediction: Prediction) -> list[dict]:
    """Return the paper's 12.6 GB, 25 MB numbers beside a prediction, with ratios ours / paper."""
    pairs = (
        ("map state time (s)", 28.0, prediction.map_seconds),
        ("whole state machine time (s)", 56.8, prediction.total_seconds),
        ("cost per run (USD)", 0.16, prediction.cost_usd),
    )
    return [
        {"quantity": name, "paper": paper, "simulation": ours, "ratio": ours / paper, "label": SIMULATION_LABEL}
        for name, paper, ours in pairs
    ]
