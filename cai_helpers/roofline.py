"""Compute roofline of a device: measured matmul FLOP/s against the model's FLOP per image.

The bound is a compute roofline only. A large float32 matrix product, timed in the same
process and with the same thread count as the benchmark, stands for the device's
attainable FLOP/s. FLOP per image are counted on the model itself with
``torch.utils.flop_counter.FlopCounterMode``, which counts a multiply-add as 2 FLOP and
covers matrix products and convolutions (element-wise work such as softmax, GELU and
normalisation is not counted). The images/s bound is FLOP/s divided by FLOP per image,
and a runtime's efficiency is its achieved images/s over that bound.
"""

from __future__ import annotations

import logging
import statistics
import time
from dataclasses import asdict, dataclass

import torch

from cai_helpers.errors import InvalidParameterError

logger = logging.getLogger(__name__)

DEFAULT_MATMUL_SIZE = 2048
DEFAULT_MATMUL_REPEATS = 10
MATMUL_WARMUP_RUNS = 2


@dataclass
class Roofline:
    """Compute bound of one device at one thread count.

    ``flops_per_s`` is the best FLOP/s of an n x n float32 matmul, and
    ``flop_per_image`` the counted FLOP of one forward pass per image. Their ratio is
    ``bound_images_per_s`` (images/s).
    """

    device: str
    threads: int
    matmul_size: int
    flops_per_s: float
    flop_per_image: float
    bound_images_per_s: float

    def to_dict(self) -> dict:
        return asdict(self)


def _synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure_matmul_flops(
    n: int = DEFAULT_MATMUL_SIZE,
    *,
    repeats: int = DEFAULT_MATMUL_REPEATS,
    device: str = "cpu",
) -> float:
    """Time an n x n float32 ``torch.matmul`` and return the best FLOP/s (2 n^3 per product).

    The fastest of ``repeats`` runs is used, because a roofline is an upper bound and
    other processes on the machine only slow runs down. Uses the current
    ``torch.get_num_threads()`` on CPU and synchronises CUDA around each run.
    """
    if n < 1 or repeats < 1:
        raise InvalidParameterError(f"matmul size and repeats must be >= 1, got n={n}, repeats={repeats}")
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=generator).to(device)
    b = torch.randn(n, n, generator=generator).to(device)

    for _ in range(MATMUL_WARMUP_RUNS):
        torch.matmul(a, b)
    _synchronize(device)

    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        torch.matmul(a, b)
        _synchronize(device)
        seconds.append(time.perf_counter() - start)
    flops = 2.0 * n**3 / min(seconds)
    logger.info("matmul %dx%d on %s: %.3g FLOP/s (best of %d, median %.3g)", n, n, device, flops,
                repeats, 2.0 * n**3 / statistics.median(seconds))
    return flops


def count_flop_per_image(model: torch.nn.Module, images: torch.Tensor, magnitudes: torch.Tensor) -> float:
    """Count the FLOP of one forward pass over the batch and return FLOP per image.

    ``images`` is [B, C, H, W] and ``magnitudes`` [B, C_mag]; a multiply-add counts as 2 FLOP.
    """
    from torch.utils.flop_counter import FlopCounterMode

    batch_size = images.shape[0]
    if batch_size < 1:
        raise InvalidParameterError("count_flop_per_image needs a batch of at least one image")
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(images, magnitudes)
    return counter.get_total_flops() / batch_size


def bound_images_per_s(flops_per_s: float, flop_per_image: float) -> float:
    """Return the compute bound in images/s: FLOP/s divided by FLOP per image."""
    if flop_per_image <= 0:
        raise InvalidParameterError(f"flop_per_image must be > 0, got {flop_per_image}")
    return flops_per_s / flop_per_image


def efficiency(achieved_images_per_s: float, bound: float) -> float:
    """Return achieved images/s as a fraction of the roofline bound (1.0 = at the bound)."""
    if bound <= 0:
        raise InvalidParameterError(f"roofline bound must be > 0 images/s, got {bound}")
    return achieved_images_per_s / bound


def measure_roofline(
    flop_per_image: float,
    *,
    device: str = "cpu",
    threads: int | None = None,
    n: int = DEFAULT_MATMUL_SIZE,
    repeats: int = DEFAULT_MATMUL_REPEATS,
) -> Roofline:
    """Measure matmul FLOP/s at ``threads`` (CPU) and return the device's :class:`Roofline`."""
    previous_threads = torch.get_num_threads()
    if threads is not None and not device.startswith("cuda"):
        torch.set_num_threads(threads)
    try:
        flops = measure_matmul_flops(n, repeats=repeats, device=device)
    finally:
        torch.set_num_threads(previous_threads)
    used_threads = threads if threads is not None else previous_threads
    return Roofline(
        device=device,
        threads=used_threads,
        matmul_size=n,
        flops_per_s=flops,
        flop_per_image=flop_per_image,
        bound_images_per_s=bound_images_per_s(flops, flop_per_image),
    )
