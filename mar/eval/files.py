"""What the metrics read and write: image sources as torch-fidelity datasets, ADM npz files, statistics files.

- Image sources (``open_images``): a folder of PNG/JPEG files (read with PIL, grey/paletted images
  converted to RGB; in a ``sample.py`` folder only its ``{index}_c{class}.png`` samples), an ADM ``.npz``
  (``arr_0`` NHWC uint8), ``"fashion_mnist:train|test"``, a uint8 array, or a Dataset -> items uint8 (3, H, W).
  A file PIL cannot decode is reported by name. torchvision's image I/O is not used.
- Statistics files (``save_statistics`` / ``load_statistics``): ADM ``.npz`` (``mu``, ``sigma`` float64; the
  format of the published MAR/ADM reference batches, whose other keys such as ``arr_0`` are not read) or
  ours, ``.safetensors`` with ``mu``/``sigma`` float64 and metadata (feature extractor, layer, weights hash,
  image count). Files are written atomically (``mar.io.atomic_write``): an old file survives a failed write.

Feature extraction and scoring are in ``mar.eval.metrics``.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file as save_numpy_safetensors
from torch.utils.data import Dataset

from mar.eval.classifier import fashion_mnist_uint8
from mar.io import atomic_write

STATS_FORMAT = "mar-fid-stats"  # safetensors metadata "format" of our statistics files
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
LABELLED_NAME = re.compile(r"^\d+_c(\d+)\.png$")  # sample.py's "{index:06d}_c{class:03d}.png"
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)  # what PIL raises on bad files


def _unreadable(path: str, e: BaseException) -> ValueError:
    return ValueError(f"cannot read image {path}: {type(e).__name__}: {e}; delete or replace the file")


# --- image sources ------------------------------------------------------------------------------------------------
class ImageFiles(Dataset):
    """The image files of one folder, sorted by name -> items uint8 (3, H, W) (PIL, converted to RGB).

    ``__init__`` reads only the headers (sizes must agree); a file whose pixel data is damaged (a truncated
    PNG, say) fails when torch-fidelity reads it, with a ValueError naming the file.
    """

    def __init__(self, folder: str):
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"image folder {folder} not found")
        names = sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_SUFFIXES))
        samples = [f for f in names if LABELLED_NAME.match(f)]
        if samples:  # a sample.py folder: only its samples (not grid.png or other pictures beside them)
            names = samples
        if not names:
            raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
        self.paths = [os.path.join(folder, f) for f in names]
        sizes = {}
        for p in self.paths:  # PIL reads only the header here
            try:
                with Image.open(p) as im:
                    sizes.setdefault(im.size, p)
            except _DECODE_ERRORS as e:
                raise _unreadable(p, e) from None
        if len(sizes) > 1:
            (s1, p1), (s2, p2) = list(sizes.items())[:2]
            raise ValueError(f"images in {folder} differ in size: {p1} is {s1[0]}x{s1[1]}, {p2} is {s2[0]}x{s2[1]}")

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        path = self.paths[i]
        try:
            with Image.open(path) as im:
                arr = np.asarray(im.convert("RGB"), dtype=np.uint8)  # (H, W, 3); decodes the whole file
        except _DECODE_ERRORS as e:
            raise _unreadable(path, e) from None
        return torch.from_numpy(arr.copy()).permute(2, 0, 1)

    def labels(self) -> list[int] | None:
        """Class labels parsed from ``{index}_c{class}.png`` names, or None unless every file is named so."""
        found = [LABELLED_NAME.match(os.path.basename(p)) for p in self.paths]
        return [int(m.group(1)) for m in found] if all(found) else None


class UInt8Images(Dataset):
    """uint8 images (N, H, W) or (N, H, W, C) with C in {1, 3} (NHWC, as ADM's npz) -> items uint8 (3, H, W)."""

    def __init__(self, images: np.ndarray | torch.Tensor):
        images = torch.as_tensor(np.asarray(images))
        if images.dtype != torch.uint8 or images.dim() not in (3, 4) or (images.dim() == 4 and images.shape[-1]
                                                                          not in (1, 3)):
            raise ValueError(f"expected uint8 images (N, H, W[, 1|3]), got {images.dtype} {tuple(images.shape)}")
        self.images = images if images.dim() == 4 else images[..., None]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images[i].permute(2, 0, 1).expand(3, -1, -1).contiguous()


def open_images(source, fmnist_root: str | None = None) -> Dataset:
    """A folder, an ADM ``.npz`` (``arr_0`` NHWC uint8), "fashion_mnist:train|test", a uint8 array, or a
    Dataset of uint8 (3, H, W) tensors -> a Dataset torch-fidelity can read."""
    if isinstance(source, Dataset):
        return source
    if isinstance(source, (np.ndarray, torch.Tensor)):
        return UInt8Images(source)
    source = os.fspath(source)
    if source.startswith("fashion_mnist:"):
        return UInt8Images(fashion_mnist_uint8(source.split(":", 1)[1], fmnist_root)[0])  # (N, 32, 32)
    if source.endswith(".npz") and not os.path.isdir(source):
        return UInt8Images(read_adm_npz(source))
    return ImageFiles(source)


# --- ADM npz and statistics files ---------------------------------------------------------------------------------
def _write_npz(path: str, arrays: dict[str, np.ndarray]) -> None:
    """``np.savez`` atomically; through a file object, so ``path`` is used as given (no ``.npz`` appended)."""
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)

    atomic_write(path, write)


def write_adm_npz(images: np.ndarray, path: str, labels: np.ndarray | None = None) -> None:
    """Write uint8 images (N, H, W, 3) as ``arr_0`` (and labels as ``arr_1``), the ADM evaluator's layout."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"ADM npz needs uint8 images (N, H, W, 3), got {images.dtype} {images.shape}")
    extra = {} if labels is None else {"arr_1": np.asarray(labels, dtype=np.int64)}
    _write_npz(path, {"arr_0": images, **extra})


def read_adm_npz(path: str) -> np.ndarray:
    """The uint8 images (N, H, W, 3) stored as ``arr_0`` in an ADM-style npz."""
    with _open_npz(path) as f:
        if "arr_0" not in f.files:
            raise ValueError(f"{path} holds no images (arr_0); its keys are {f.files}")
        return f["arr_0"]


def _open_npz(path: str):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"npz file {path} not found")
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path} is not a readable npz file ({e})") from None


@dataclass
class FIDStatistics:
    """Gaussian fit of features: mu (D,), sigma (D, D), both float64. ``meta`` (strings): feature_extractor,
    feature_layer, weights_sha256, num_images, source -- empty for ADM files (Inception by convention)."""

    mu: np.ndarray
    sigma: np.ndarray
    meta: dict[str, str] = field(default_factory=dict)


def stats_format(path: str, format: str | None) -> str:
    """The format of statistics file ``path`` ("npz" or "ours"), from its extension, checked against ``format``."""
    by_ext = {".npz": "npz", ".safetensors": "ours"}.get(os.path.splitext(path)[1].lower())
    if format not in (None, "npz", "ours") or by_ext is None or format not in (None, by_ext):
        raise ValueError(f"statistics file {path} (format {format}): use the extension .npz for format 'npz' "
                         f"(ADM: mu, sigma) or .safetensors for format 'ours' (mu, sigma and metadata)")
    return by_ext


def save_statistics(stats: FIDStatistics, path: str, format: str | None = None) -> None:
    """Write ``stats`` atomically as ADM npz (mu, sigma only) or ours (safetensors: mu, sigma float64 plus metadata)."""
    fmt = stats_format(path, format)
    arrays = {"mu": stats.mu.astype(np.float64), "sigma": np.ascontiguousarray(stats.sigma, dtype=np.float64)}
    if fmt == "npz":
        _write_npz(path, arrays)
    else:
        meta = {**stats.meta, "format": STATS_FORMAT}
        atomic_write(path, lambda tmp: save_numpy_safetensors(arrays, str(tmp), metadata=meta))


def load_statistics(path: str) -> FIDStatistics:
    """Read an ADM npz (only its ``mu``/``sigma``) or our safetensors statistics; mu and sigma as float64."""
    if stats_format(path, None) == "npz":
        with _open_npz(path) as f:
            if "mu" not in f.files or "sigma" not in f.files:
                raise ValueError(f"{path} holds no FID statistics (mu, sigma); its keys are {f.files}")
            mu, sigma, meta = f["mu"], f["sigma"], {}
    else:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"statistics file {path} not found")
        try:
            with safe_open(path, framework="numpy") as f:
                meta = dict(f.metadata() or {})
                if meta.pop("format", None) != STATS_FORMAT or set(f.keys()) != {"mu", "sigma"}:
                    raise ValueError(f"{path} is not a statistics file written by mar.eval (make one with "
                                     "`evaluate.py ref-stats`)")
                mu, sigma = f.get_tensor("mu"), f.get_tensor("sigma")
        except SafetensorError as e:
            raise ValueError(f"{path} is not a safetensors statistics file ({e})") from None
    mu, sigma = np.asarray(mu, dtype=np.float64), np.asarray(sigma, dtype=np.float64)
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"{path}: mu {mu.shape} and sigma {sigma.shape} are not (D,) and (D, D)")
    return FIDStatistics(mu, sigma, meta)
