"""Pixel fidelity of reconstructions: PSNR and SSIM, per image, on uint8 images.

    PSNR(x, y) = 10 log10(255^2 / mean (x - y)^2)                       (dB; identical images: inf)
    SSIM(x, y) = mean_windows  (2 mu_x mu_y + C1)(2 s_xy + C2) / ((mu_x^2 + mu_y^2 + C1)(s_x^2 + s_y^2 + C2))

SSIM as in Wang, Bovik, Sheikh, Simoncelli, "Image quality assessment: from error visibility to structural
similarity", IEEE TIP 2004, Sec. III-C: an 11x11 Gaussian window of sigma 1.5, C1 = (0.01 L)^2, C2 = (0.03 L)^2,
L = 255, the mean over the positions where the window fits inside the image ("valid" windows; scikit-image's
``structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=255)``).
Grey images (N, H, W); colour images (N, C, H, W) average SSIM over channels.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """uint8 images (N, ...) -> (N,) PSNR in dB (float64)."""
    _check(x, y)
    mse = (x.double() - y.double()).flatten(1).square().mean(1)
    return 10 * torch.log10(255.0 ** 2 / mse)


def gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """(size, size) normalised Gaussian, float64."""
    r = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-r.square() / (2 * sigma ** 2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim(x: torch.Tensor, y: torch.Tensor, size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """uint8 images (N, H, W) or (N, C, H, W) -> (N,) mean SSIM (float64); H, W >= size."""
    _check(x, y)
    if x.ndim == 3:
        x, y = x[:, None], y[:, None]
    n, c, h, w = x.shape
    if h < size or w < size:
        raise ValueError(f"SSIM's {size}x{size} window needs images of at least that size, got {h}x{w}")
    x = x.double().reshape(n * c, 1, h, w)
    y = y.double().reshape(n * c, 1, h, w)
    k = gaussian_window(size, sigma).to(x.device)[None, None]
    blur = lambda v: F.conv2d(v, k)  # noqa: E731  ("valid" windows only)
    mu_x, mu_y = blur(x), blur(y)
    s_xx = blur(x * x) - mu_x.square()
    s_yy = blur(y * y) - mu_y.square()
    s_xy = blur(x * y) - mu_x * mu_y
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    s = ((2 * mu_x * mu_y + c1) * (2 * s_xy + c2)) / ((mu_x.square() + mu_y.square() + c1) * (s_xx + s_yy + c2))
    return s.reshape(n, c, -1).mean(dim=(1, 2))


def _check(x: torch.Tensor, y: torch.Tensor) -> None:
    if x.shape != y.shape or x.dtype != torch.uint8 or y.dtype != torch.uint8 or x.ndim < 2:
        raise ValueError(f"expected two uint8 image batches of one shape, got {tuple(x.shape)} {x.dtype} and "
                         f"{tuple(y.shape)} {y.dtype}")


def summary(values: torch.Tensor) -> dict[str, float]:
    """Mean and the standard error of the mean (finite values; PSNR of identical images is inf)."""
    v = values[torch.isfinite(values)]
    return {"mean": float(v.mean()), "sem": float(v.std() / math.sqrt(len(v))) if len(v) > 1 else 0.0,
            "n": int(len(values))}
