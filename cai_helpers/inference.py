"""Batched AstroMAE inference over one partition with torch or ONNX Runtime.

Runtimes: ``torch`` loads ``model.safetensors`` + ``config.json`` through
``cai_helpers.checkpoint.load_model``. ``onnx`` and ``onnx-int8`` run
``astromae.onnx`` / ``astromae.int8.onnx`` with ONNX Runtime and never import torch,
so a worker on those runtimes stays torch-free. Every predictor sets its thread count
explicitly, because the default (all cores per process) oversubscribes the CPU when
several workers share a machine.

Shape legend: B batch, N rows of a partition, C bands, H W pixels.
"""

from __future__ import annotations

import logging
import resource
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from cai_helpers.errors import CheckpointError, InvalidParameterError

log = logging.getLogger(__name__)

# One galaxy's input as Staylor et al. 2025 (arXiv:2501.06249) count it: a float32 5x32x32
# image (20,480 B) plus magnitudes (40 B), in bits. Every bits/s figure of the project uses it.
BITS_PER_GALAXY = 164_160
ONNX_FILES = {"onnx": "astromae.onnx", "onnx-int8": "astromae.int8.onnx"}
RUNTIMES = ("torch", *ONNX_FILES)
ONNX_INPUTS = ("images", "magnitudes")
ONNX_OUTPUT = "redshift"
DEVICES = ("cpu", "cuda")


@dataclass
class StageTimings:
    """Wall times in seconds of one partition's stages (time.perf_counter), and counts."""

    read_s: float = 0.0
    decode_s: float = 0.0
    inference_s: float = 0.0
    write_s: float = 0.0
    images: int = 0
    batches: int = 0

    @property
    def bits(self) -> int:
        """Input bits processed, at :data:`BITS_PER_GALAXY` per galaxy."""
        return self.images * BITS_PER_GALAXY

    @property
    def total_s(self) -> float:
        return self.read_s + self.decode_s + self.inference_s + self.write_s

    def add(self, other: "StageTimings") -> None:
        """Accumulate another partition's timings and counts into this one."""
        for name, value in asdict(other).items():
            setattr(self, name, getattr(self, name) + value)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "bits": self.bits, "total_s": self.total_s}


def proc_status_mb(field_name: str) -> float | None:
    """Return a memory field of /proc/self/status (given in kB) in MB, or None off Linux."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field_name):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def peak_rss_mb() -> float:
    """Return this process's peak resident set size in MB (2**20 B) so far.

    Linux's VmHWM is read first: ``ru_maxrss`` carries the launching process's peak
    across fork and exec, so a worker started by a 1 GB driver would report 1 GB.
    """
    peak = proc_status_mb("VmHWM:")
    if peak is not None:
        return peak
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # ru_maxrss is in KiB on Linux and in bytes on macOS.
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


class Predictor(Protocol):
    """A loaded model that predicts z for batches and whole partitions."""

    runtime: str
    batch_size: int

    def predict_batch(self, images: np.ndarray, magnitudes: np.ndarray) -> np.ndarray:
        """Return z [B] float32 for images [B, C, 32, 32] and magnitudes [B, C]."""
        ...

    def predict_partition(self, arrays: dict[str, np.ndarray]) -> tuple[np.ndarray, StageTimings]:
        """Return z [N] float32 for a decoded partition, and the inference timings."""
        ...


class BatchedPredictor:
    """Shared partition loop: slices a partition into batches of ``batch_size`` rows."""

    runtime = "base"

    def __init__(self, batch_size: int) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise InvalidParameterError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.batch_size = batch_size

    def predict_batch(self, images: np.ndarray, magnitudes: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def predict_partition(self, arrays: dict[str, np.ndarray]) -> tuple[np.ndarray, StageTimings]:
        images = arrays["images"]  # [N, C, H, W]
        magnitudes = arrays["magnitudes"]  # [N, C]
        n_rows = len(images)
        z_pred = np.empty(n_rows, dtype=np.float32)
        timings = StageTimings(images=n_rows)

        started = time.perf_counter()
        for start in range(0, n_rows, self.batch_size):
            stop = min(start + self.batch_size, n_rows)
            z_batch = np.asarray(self.predict_batch(images[start:stop], magnitudes[start:stop]))
            if z_batch.shape not in ((stop - start,), (stop - start, 1)):
                raise CheckpointError(
                    f"{self.runtime} model returned shape {z_batch.shape} for a batch of "
                    f"{stop - start}; expected [{stop - start}] redshifts"
                )
            z_pred[start:stop] = z_batch.reshape(-1)
            timings.batches += 1
        timings.inference_s = time.perf_counter() - started
        return z_pred, timings


def session_options(threads: int) -> Any:
    """Return ONNX Runtime session options for one worker with ``threads`` intra-op threads.

    The memory pattern is off. With it, ONNX Runtime plans one block for every
    intermediate tensor of a batch shape. On top of the arena, that raised the peak RSS
    at batch 512 from about 540 MB to 820 MB (fp32 model, 1 thread, onnxruntime 1.32)
    with no measurable gain in images/s. The CPU arena stays on, because freeing every
    tensor back to malloc was 10-25% slower. Idle intra-op threads sleep instead of
    spinning: on 2 cores shared with other processes, spinning threads took CPU from
    the working ones, and 2 threads ran at 207 img/s with spinning and 329 img/s
    without (fp32, batch 512, load average about 3).
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.enable_mem_pattern = False
    options.enable_cpu_mem_arena = True
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def _providers(device: str) -> list[str]:
    # NOTE: the cuda device is untested here; ONNX Runtime falls back to the CPU
    # provider when its CUDA provider is not installed.
    if device == "cuda":
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class OnnxPredictor(BatchedPredictor):
    """ONNX Runtime session on one model file, ``threads`` intra-op threads."""

    def __init__(self, path: Path, *, runtime: str, batch_size: int, threads: int, device: str) -> None:
        super().__init__(batch_size)
        import onnxruntime as ort

        if not path.is_file():
            raise CheckpointError(
                f"ONNX model {path} not found; export it with cai_helpers.export.export_onnx "
                "(notebook 02) or choose runtime='torch'"
            )
        try:
            self.session = ort.InferenceSession(str(path), sess_options=session_options(threads),
                                                providers=_providers(device))
        except Exception as exc:  # ONNX Runtime's error classes derive from Exception only
            raise CheckpointError(
                f"ONNX model {path} cannot be loaded ({type(exc).__name__}: {exc}); export it again "
                "with cai_helpers.export.export_onnx (notebook 02) or choose runtime='torch'"
            ) from exc
        self.runtime = runtime
        self._release_options = ort.RunOptions()
        self._release_options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")

        names = tuple(i.name for i in self.session.get_inputs())
        if set(names) != set(ONNX_INPUTS):
            raise CheckpointError(f"ONNX model {path} has inputs {names}, expected {ONNX_INPUTS}")
        outputs = [o.name for o in self.session.get_outputs()]
        if ONNX_OUTPUT not in outputs:
            raise CheckpointError(f"ONNX model {path} has outputs {outputs}, expected {ONNX_OUTPUT!r}")

    def predict_batch(self, images: np.ndarray, magnitudes: np.ndarray) -> np.ndarray:
        feeds = {"images": np.ascontiguousarray(images, dtype=np.float32),
                 "magnitudes": np.ascontiguousarray(magnitudes, dtype=np.float32)}
        (z_batch,) = self.session.run([ONNX_OUTPUT], feeds)
        return z_batch

    def predict_partition(self, arrays: dict[str, np.ndarray]) -> tuple[np.ndarray, StageTimings]:
        """Predict a partition, then hand the arena's free memory back to the OS.

        A full batch of 512 leaves about 300 MB of free blocks in the arena. Without the
        release, the next partition's read and decode (about twice its size) come on
        top of them. A 1-row run with arena shrinkage does the release, and it is not
        counted in ``inference_s``.
        """
        z_pred, timings = super().predict_partition(arrays)
        if len(z_pred):
            feeds = {"images": np.ascontiguousarray(arrays["images"][:1], dtype=np.float32),
                     "magnitudes": np.ascontiguousarray(arrays["magnitudes"][:1], dtype=np.float32)}
            self.session.run([ONNX_OUTPUT], feeds, self._release_options)
        return z_pred, timings


class TorchPredictor(BatchedPredictor):
    """The safetensors checkpoint in eval mode under torch.inference_mode."""

    runtime = "torch"

    def __init__(self, model_dir: Path, *, batch_size: int, threads: int, device: str) -> None:
        super().__init__(batch_size)
        import torch

        from cai_helpers.checkpoint import load_model

        torch.set_num_threads(threads)
        self.torch = torch
        self.device = torch.device(device)
        self.model = load_model(model_dir).to(self.device).eval()

    def predict_batch(self, images: np.ndarray, magnitudes: np.ndarray) -> np.ndarray:
        torch = self.torch
        with torch.inference_mode():
            z_batch = self.model(torch.from_numpy(np.ascontiguousarray(images)).to(self.device),
                                 torch.from_numpy(np.ascontiguousarray(magnitudes)).to(self.device))
        return z_batch.float().cpu().numpy()


def make_predictor(
    runtime: str,
    model_dir: str | Path,
    *,
    batch_size: int,
    threads: int,
    device: str = "cpu",
) -> Predictor:
    """Load the model in ``model_dir`` for ``runtime`` with ``threads`` CPU threads."""
    if runtime not in RUNTIMES:
        raise InvalidParameterError(f"invalid runtime {runtime!r}: use one of {RUNTIMES}")
    if device not in DEVICES:
        raise InvalidParameterError(f"invalid device {device!r}: use one of {DEVICES}")
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise InvalidParameterError(f"threads must be a positive integer, got {threads!r}")
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise CheckpointError(
            f"model folder {model_dir} not found; the shipped model lives in data/models/astromae"
        )

    started = time.perf_counter()
    if runtime == "torch":
        predictor: Predictor = TorchPredictor(model_dir, batch_size=batch_size, threads=threads, device=device)
    else:
        predictor = OnnxPredictor(model_dir / ONNX_FILES[runtime], runtime=runtime,
                                  batch_size=batch_size, threads=threads, device=device)
    log.info("loaded %s model from %s with %d thread(s) in %.2f s",
             runtime, model_dir, threads, time.perf_counter() - started)
    return predictor
