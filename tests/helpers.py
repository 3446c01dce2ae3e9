"""Test helpers shared by several test files (imported as ``helpers``: pytest puts tests/ on sys.path)."""
import os

import numpy as np
import torch
from PIL import Image


def synthetic_classes(n: int, seed: int, size: int = 32):
    """Separable 10-class grey images, uint8 (N, size, size) and labels (N,) as tensors: class k = a bright 6x6
    square at cell k of a 2x5 grid, on dim noise."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 10, (n,), generator=g)
    images = torch.rand(n, size, size, generator=g) * 60
    off = (size - 28) // 2
    for i, k in enumerate(labels.tolist()):
        r, c = divmod(k, 5)
        images[i, off + 4 + 12 * r: off + 10 + 12 * r, off + 1 + 5 * c: off + 6 + 5 * c] = 230
    return images.to(torch.uint8), labels


def write_pngs(folder, images, labels=None) -> str:
    """uint8 (N, H, W) grey or (N, H, W, 3) -> PNGs named {i:06d}.png or {i:06d}_c{label:03d}.png."""
    os.makedirs(folder, exist_ok=True)
    for i, img in enumerate(np.asarray(images)):
        name = f"{i:06d}.png" if labels is None else f"{i:06d}_c{int(labels[i]):03d}.png"
        Image.fromarray(img).save(os.path.join(folder, name))
    return str(folder)
