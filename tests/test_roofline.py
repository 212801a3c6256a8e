"""Roofline: FLOP counting by hand-computed layers, and bound = FLOP/s / FLOP per image."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cai_helpers import roofline
from cai_helpers.errors import InvalidParameterError

torch.set_num_threads(1)


class TwoInputNet(nn.Module):
    """Conv 5->2 (3x3, no padding) on 8x8 images plus Linear 5->7 on magnitudes."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(5, 2, kernel_size=3)
        self.linear = nn.Linear(5, 7)

    def forward(self, images: torch.Tensor, magnitudes: torch.Tensor) -> torch.Tensor:
        return self.conv(images).flatten(1).sum(1) + self.linear(magnitudes).sum(1)


def test_flop_count_matches_hand_count():
    # conv: 2 x 6 x 6 outputs x (5 x 3 x 3) multiply-adds; linear: 5 x 7; 2 FLOP each.
    expected = 2 * (2 * 6 * 6 * 5 * 3 * 3) + 2 * (5 * 7)
    flop = roofline.count_flop_per_image(TwoInputNet(), torch.zeros(3, 5, 8, 8), torch.zeros(3, 5))
    assert flop == expected


def test_astromae_flop_near_published_count():
    from cai_helpers.model import AstroMAE, AstroMAEConfig

    model = AstroMAE(AstroMAEConfig()).eval()
    flop = roofline.count_flop_per_image(model, torch.zeros(1, 5, 32, 32), torch.zeros(1, 5))
    # About 110.8 M multiply-adds per image; element-wise operations are not counted.
    assert flop == pytest.approx(2 * 110.8e6, rel=0.03)


def test_bound_is_flops_over_flop_per_image():
    assert roofline.bound_images_per_s(1e11, 2e8) == pytest.approx(500.0)
    assert roofline.efficiency(250.0, 500.0) == pytest.approx(0.5)


def test_measured_roofline_is_consistent():
    result = roofline.measure_roofline(1e6, threads=1, n=64, repeats=2)
    assert result.flops_per_s > 0
    assert result.threads == 1
    assert result.bound_images_per_s == pytest.approx(result.flops_per_s / 1e6)


def test_roofline_restores_thread_count():
    before = torch.get_num_threads()
    roofline.measure_roofline(1e6, threads=2, n=32, repeats=1)
    assert torch.get_num_threads() == before


@pytest.mark.parametrize("call", [
    lambda: roofline.bound_images_per_s(1e9, 0),
    lambda: roofline.efficiency(1.0, 0),
    lambda: roofline.measure_matmul_flops(0),
    lambda: roofline.count_flop_per_image(TwoInputNet(), torch.zeros(0, 5, 8, 8), torch.zeros(0, 5)),
])
def test_invalid_inputs_raise(call):
    with pytest.raises(InvalidParameterError):
        call()
