"""PSNR and SSIM (mar.eval.fidelity) against independent computations: numpy for PSNR, scipy.ndimage's Gaussian
filter (the filter scikit-image's SSIM uses) for SSIM."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from mar.eval.fidelity import psnr, ssim, summary


def images(seed: int, n: int = 3, size: int = 28) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, size, size), generator=g, dtype=torch.uint8)


def ssim_reference(x: np.ndarray, y: np.ndarray) -> float:
    """Wang et al. 2004 with a Gaussian window (sigma 1.5, truncated at 3.5 sigma: 11 taps), valid positions."""
    x, y = x.astype(np.float64), y.astype(np.float64)
    f = lambda v: gaussian_filter(v, 1.5, truncate=3.5)[5:-5, 5:-5]  # noqa: E731
    mx, my = f(x), f(y)
    sxx, syy, sxy = f(x * x) - mx ** 2, f(y * y) - my ** 2, f(x * y) - mx * my
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    return float((((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (sxx + syy + c2))).mean())


def test_psnr_and_ssim_equal_independent_computations():
    x = images(0)
    y = (x.int() + torch.randint(-20, 21, x.shape, generator=torch.Generator().manual_seed(1))).clamp(0, 255).to(torch.uint8)
    mse = ((x.numpy().astype(np.float64) - y.numpy()) ** 2).reshape(3, -1).mean(1)
    assert psnr(x, y).numpy() == pytest.approx(10 * np.log10(255 ** 2 / mse), rel=1e-12)
    expected = [ssim_reference(a, b) for a, b in zip(x.numpy(), y.numpy())]
    assert ssim(x, y).numpy() == pytest.approx(expected, rel=1e-9)
    assert ssim(x, x).tolist() == pytest.approx([1.0] * 3, abs=1e-12) and torch.isinf(psnr(x, x)).all()
    # colour: the mean over channels
    xc, yc = torch.stack([x, y], 1), torch.stack([y, x], 1)
    assert ssim(xc, yc).numpy() == pytest.approx(ssim(x, y).numpy(), rel=1e-12)


def test_bad_input_and_summary():
    with pytest.raises(ValueError, match="uint8"):
        ssim(images(0).float(), images(1).float())
    with pytest.raises(ValueError, match="at least"):
        ssim(images(0, size=8), images(1, size=8))
    s = summary(torch.tensor([1.0, 3.0, float("inf")]))
    assert s == {"mean": 2.0, "sem": pytest.approx(1.0), "n": 3}
