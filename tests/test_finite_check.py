"""lookfast.models.checkpoint_io.finite_per_image / check_finite_images: the sum-based NaN/inf check (used by the
models and lookfast.serving) against torch.isfinite element by element, including the cases a sum could get wrong
(inf + -inf, finite values whose sum overflows, half types)."""
from __future__ import annotations

import pytest
import torch

from lookfast.models.checkpoint_io import check_finite_images, finite_per_image


def _truth(images: torch.Tensor) -> list[bool]:
    return [bool(torch.isfinite(images[i]).all()) for i in range(images.shape[0])]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_finite_per_image_matches_isfinite(dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(9, 3, 7, 5, generator=g).to(dtype)
    x[1, 0, 0, 0] = float("nan")
    x[3, 2, 6, 4] = float("inf")
    x[4, 1, 3, 2] = float("-inf")
    x[5, 0, 1, 1], x[5, 2, 2, 2] = float("inf"), float("-inf")  # the sum is NaN
    big = torch.finfo(dtype).max
    x[6] = big  # finite, but the sum overflows: must still count as finite
    x[7] = -big
    x[7, 0, 0, 0] = float("nan")  # a NaN hidden among values whose sum overflows
    want = _truth(x)
    assert want == [True, False, True, False, False, False, True, False, True]
    assert finite_per_image(x).tolist() == want
    assert finite_per_image(x.contiguous(memory_format=torch.channels_last)).tolist() == want
    assert finite_per_image(x[:, :, ::2, 1:]).tolist() == _truth(x[:, :, ::2, 1:])  # non-contiguous
    assert finite_per_image(x[:0]).tolist() == []
    assert finite_per_image(x.flatten(1)[:, 0]).tolist() == _truth(x.flatten(1)[:, :1])  # 1-D: one value per row


def test_check_finite_images_accepts_overflowing_sums_and_counts_bad_values():
    x = torch.full((2, 3, 4, 4), torch.finfo(torch.float32).max)
    check_finite_images(x)  # finite: the sum overflows to inf, the exact check then passes
    check_finite_images(torch.full((1, 3, 300, 300), 60000.0, dtype=torch.float16))  # fp16 sum would overflow
    x[1, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="images holds 1 NaN or inf"):
        check_finite_images(x)
    y = torch.randn(2, 3, 4, 4)
    y[0, 0, 0, 0], y[1, 1, 1, 1] = float("inf"), float("-inf")
    with pytest.raises(ValueError, match="pixels holds 2 NaN or inf"):
        check_finite_images(y, "pixels")
    check_finite_images(torch.zeros(2, 3, 4, 4, dtype=torch.uint8))  # integers are always finite
