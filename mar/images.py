"""Writing images: atomic PNG files and sample grids (PIL only; no torchvision I/O)."""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
from PIL import Image


def _as_hwc_uint8(img: np.ndarray) -> np.ndarray:
    img = np.asarray(img)
    if img.dtype != np.uint8:
        raise ValueError(f"expected uint8 images, got {img.dtype}")
    return img[..., 0] if img.ndim == 3 and img.shape[-1] == 1 else img


def save_png(img: np.ndarray, path: str | Path) -> None:
    """Write one (H, W, C) or (H, W) uint8 image atomically: temporary file, then rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    Image.fromarray(_as_hwc_uint8(img)).save(tmp, format="PNG")
    os.replace(tmp, path)


def make_grid(images: np.ndarray, nrow: int | None = None, pad: int = 2, value: int = 255) -> np.ndarray:
    """Tile (N, H, W, C) uint8 images into one (rows*(H+pad)+pad, nrow*(W+pad)+pad, C) image."""
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[..., None]
    n, h, w, c = images.shape
    nrow = nrow or max(1, math.ceil(math.sqrt(n)))
    rows = math.ceil(n / nrow)
    grid = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), value, dtype=np.uint8)
    for i in range(n):
        r, q = divmod(i, nrow)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + q * (w + pad): pad + q * (w + pad) + w] = images[i]
    return grid


def save_grid(images: np.ndarray, path: str | Path, nrow: int | None = None, upscale: int = 1) -> None:
    """Write a grid PNG of (N, H, W, C) uint8 images; ``upscale`` enlarges small images (nearest)."""
    grid = make_grid(images, nrow)
    if upscale > 1:
        grid = grid.repeat(upscale, axis=0).repeat(upscale, axis=1)
    save_png(grid, path)
