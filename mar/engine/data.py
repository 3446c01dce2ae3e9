"""Datasets: ImageNet-style image folders, Fashion-MNIST (IDX files), cached VAE latents; seeded index orders.

Every random choice here is a pure function of integers, so a resumed or sharded run draws the same data:
- the order of epoch e is ``epoch_permutation(n, seed, e)``; micro-batch ``slot`` j = rank * grad_accum + a
  of optimizer step s takes its items from it (``batch_indices``) and its random draws (orders, mask ratio,
  label drop, diffusion t and noise, dropout) from ``slot_seed(seed, s, j)``: a run is a function of
  (config, step), so resuming at step s, or 2 processes instead of 1 with 2 accumulation steps, draw the same;
- the horizontal flip of item i in epoch e is ``hflip_coin(seed, e, i)`` (datasets hold `seed` and
  `epoch`; call ``set_epoch(e)`` before each epoch; with ``persistent_workers=True`` workers keep their copy).

Images come out as float tensors (C, H, W) in [-1, 1]: x = pixel / 127.5 - 1.
"""
from __future__ import annotations

import gzip
import hashlib
import math
import os
import re
import struct
import zlib
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import SafetensorError, safe_open
from torch.utils.data import Dataset, Sampler

from mar.engine.checkpoint import export_safetensors

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".pgm", ".tif", ".tiff")
FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
CLASS_NAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
               "Ankle boot"]  # Fashion-MNIST labels 0..9


# --- seeded randomness ----------------------------------------------------------------------------------------
def item_seed(*ints: int) -> int:
    """A 63-bit seed hashed (BLAKE2b) from integers, e.g. (seed, epoch, index); the same on every machine."""
    digest = hashlib.blake2b(",".join(str(int(i)) for i in ints).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def item_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """A CPU generator seeded from (seed, epoch, index): the random stream of one item in one epoch."""
    return torch.Generator().manual_seed(item_seed(seed, epoch, index))


def hflip_coin(seed: int, epoch: int, index: int) -> bool:
    """Whether item `index` is flipped in `epoch`: a fair coin from `item_generator(seed, epoch, index)`."""
    return bool(torch.randint(2, (), generator=item_generator(seed, epoch, index)))


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The order of the n items in `epoch`: LongTensor (n,), a permutation seeded from (seed, epoch)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(item_seed(seed, epoch)))


def slot_seed(seed: int, step: int, slot: int) -> int:
    """The seed of micro-batch ``slot`` at optimizer ``step``."""
    return item_seed(seed, step, slot)


def batch_indices(num_items: int, seed: int, step: int, global_batch: int, slot: int,
                  micro_batch: int) -> tuple[int, torch.Tensor]:
    """(epoch, dataset indices) of micro-batch ``slot`` at optimizer ``step``; epochs drop their last partial batch."""
    steps_per_epoch = num_items // global_batch
    if steps_per_epoch == 0:
        raise ValueError(f"the dataset has {num_items} items, fewer than one global batch of {global_batch}: "
                         "lower optim.batch_size or use more data")
    epoch, within = divmod(step, steps_per_epoch)
    start = within * global_batch + slot * micro_batch
    return epoch, epoch_permutation(num_items, seed, epoch)[start:start + micro_batch]


class EpochIndexed(Dataset):
    """Items addressed as (epoch, index): the epoch fixes each item's flip, also inside loader workers."""

    def __init__(self, base):
        self.base = base

    def __len__(self):
        return len(self.base)

    def __getitem__(self, key):
        epoch, index = key
        self.base.set_epoch(epoch)
        return self.base[index]


def train_batches(dataset, seed: int, batch_size: int, grad_accum: int, start_step: int, rank: int, world: int,
                  num_workers: int = 0, pin_memory: bool = False) -> Iterator:
    """This rank's micro-batches from ``start_step`` on, ``grad_accum`` of them per optimizer step. Workers
    (``num_workers`` > 0) persist across epochs; ``pin_memory`` (CUDA runs) puts batches in page-locked memory so
    the copy to the GPU can overlap compute. Neither changes what is drawn."""
    global_batch = batch_size * grad_accum * world

    def keys():
        step = start_step
        while True:
            for a in range(grad_accum):
                epoch, idx = batch_indices(len(dataset), seed, step, global_batch, rank * grad_accum + a, batch_size)
                yield [(epoch, int(i)) for i in idx]
            step += 1

    return iter(torch.utils.data.DataLoader(EpochIndexed(dataset), batch_sampler=keys(), num_workers=num_workers,
                                            persistent_workers=num_workers > 0, pin_memory=pin_memory))


def build_dataset(data, seed: int, return_pair: bool = False) -> Dataset:
    """The dataset of a ``DataConfig``; ``return_pair`` gives (image, flipped image, label) for caching latents."""
    if data.kind == "fashion_mnist":
        return FashionMNISTDataset(data.path, split=data.split, pad_to=data.image_size,
                                   hflip=data.hflip and not return_pair, seed=seed, return_pair=return_pair)
    if data.kind == "latents":
        if data.path is None:
            raise ValueError("data.kind=latents needs data.path=<latent cache folder or file> (made with --cache-latents)")
        if return_pair:
            raise ValueError("--cache-latents needs images: set data.kind to imagefolder or fashion_mnist")
        if Path(data.path).is_dir():  # a sharded cache folder (mar.engine.latent_shards)
            from mar.engine.latent_shards import ShardedLatentDataset

            return ShardedLatentDataset(data.path, hflip=data.hflip, seed=seed)
        return LatentCacheDataset(data.path, hflip=data.hflip, seed=seed)
    if data.path is None:
        raise ValueError("data.kind=imagefolder needs data.path=<folder with one sub-folder per class>")
    return ImageFolderDataset(data.path, image_size=data.image_size, hflip=data.hflip and not return_pair, seed=seed,
                              return_pair=return_pair)


class EpochSampler(Sampler[int]):
    """Yields ``epoch_permutation(n, seed, epoch)``, cut to a multiple of world_size, this rank's share
    ``perm[rank::world_size]``, from position `start` on: (epoch, start) fully determines what follows.

    Use world_size=1 when the loader is sharded elsewhere (e.g. by ``accelerator.prepare``).
    """

    def __init__(self, n: int, seed: int = 0, rank: int = 0, world_size: int = 1):
        if not 0 <= rank < world_size or n < world_size:
            raise ValueError(f"need 0 <= rank < world_size <= n, got rank={rank} world_size={world_size} n={n}")
        self.n, self.seed, self.rank, self.world_size = n, seed, rank, world_size
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select the epoch and skip its first `start` indices of this rank (to resume mid-epoch)."""
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        return max(self.n // self.world_size - self.start, 0)

    def __iter__(self) -> Iterator[int]:
        perm = epoch_permutation(self.n, self.seed, self.epoch)[: self.n // self.world_size * self.world_size]
        return iter(perm[self.rank :: self.world_size][self.start :].tolist())


class _SeededFlips(Dataset):
    """Shared by the datasets: `seed`, `epoch`, `set_epoch` and the per-item flip decision."""

    seed: int = 0
    epoch: int = 0
    hflip: bool = False

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _flip(self, index: int) -> bool:
        return self.hflip and hflip_coin(self.seed, self.epoch, index)


# --- images ---------------------------------------------------------------------------------------------------
def center_crop_arr(pil_image: Image.Image, image_size: int) -> Image.Image:
    """ADM center crop: while the short side >= 2*size, box-downsample by 2 (floor); then bicubic resize so the
    short side = size (long side rounded); then crop the central size x size square (offsets floored)."""
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    left, top = (pil_image.size[0] - image_size) // 2, (pil_image.size[1] - image_size) // 2
    return pil_image.crop((left, top, left + image_size, top + image_size))


def to_tensor(pil_image: Image.Image) -> torch.Tensor:
    """uint8 PIL image -> float (C, H, W) in [-1, 1]."""
    arr = np.asarray(pil_image, dtype=np.uint8)
    arr = arr[:, :, None] if arr.ndim == 2 else arr
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 127.5 - 1.0


class ImageFolderDataset(_SeededFlips):
    """``root/<class>/**/<image>`` (ImageNet layout); classes sorted by name -> label 0..K-1, each with images.

    Item: (image (3, S, S) in [-1, 1], label), flipped when ``hflip_coin(seed, epoch, index)``; with
    return_pair=True: (image, flipped image, label) and no random flip (for caching latents).
    """

    def __init__(self, root: str | os.PathLike, image_size: int = 256, hflip: bool = True, seed: int = 0,
                 return_pair: bool = False):
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"image folder not found: {root}")
        self.classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
        if not self.classes:
            raise ValueError(f"no class sub-folders in {root}: expected <root>/<class name>/<image>, "
                             "like ImageNet's train/n01440764/n01440764_10026.JPEG")
        self.samples: list[tuple[str, int]] = []
        for label, name in enumerate(self.classes):
            for folder, subdirs, files in os.walk(root / name, followlinks=True):
                subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
                self.samples += [(os.path.join(folder, f), label) for f in sorted(files)
                                 if os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS]
        if not self.samples:
            raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in the class folders of {root}")
        found = {label for _, label in self.samples}
        empty = [name for label, name in enumerate(self.classes) if label not in found]
        if empty:  # its label would exist but never appear in the data
            raise ValueError(f"class folder(s) with no images ({', '.join(IMAGE_EXTENSIONS)}) in {root}: "
                             f"{', '.join(empty)}; add images to them or remove them (every sub-folder of the "
                             "root whose name does not start with '.' is a class)")
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self.root, self.image_size, self.hflip, self.seed, self.return_pair = root, image_size, hflip, seed, return_pair

    def __len__(self) -> int:
        return len(self.samples)

    def load_image(self, index: int) -> torch.Tensor:
        """The center-cropped, un-flipped image of item `index`: (3, S, S) in [-1, 1]."""
        path = self.samples[index][0]
        try:
            with Image.open(path) as im:
                im = im.convert("RGB")  # decodes the whole file: truncated data fails here
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            raise ValueError(f"cannot read image {path}: {type(e).__name__}: {e}; delete or replace the file") from e
        return to_tensor(center_crop_arr(im, self.image_size))

    def __getitem__(self, index: int) -> tuple:
        x, label = self.load_image(index), self.samples[index][1]
        if self.return_pair:
            return x, x.flip(-1), label
        return (x.flip(-1) if self._flip(index) else x), label


# --- Fashion-MNIST --------------------------------------------------------------------------------------------
def read_idx(path: str | os.PathLike, ndim: int | None = None) -> np.ndarray:
    """An IDX file (raw or gzipped) as a uint8 array. Header: magic 00 00 08 <ndim>, then ndim big-endian
    uint32 sizes (images: magic 2051 = 0x803, 16 bytes; labels: 2049 = 0x801, 8 bytes); then the data."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"IDX file not found: {path}")
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise ValueError(f"{path} is not a valid IDX file: corrupt gzip data ({e})") from None
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] != 0x08 or raw[3] == 0 or (ndim and raw[3] != ndim):
        want = f"00000{0x800 + ndim:03x}" if ndim else "000008<ndim>"
        raise ValueError(f"{path} is not a valid uint8 IDX file: magic number {raw[:4].hex()}, expected {want}")
    header = 4 + 4 * raw[3]
    dims = struct.unpack(f">{raw[3]}I", raw[4:header]) if len(raw) >= header else ()
    if len(raw) != header + math.prod(dims) or not dims:
        raise ValueError(f"{path}: {len(raw)} bytes do not match its header (sizes {list(dims)} -> "
                         f"{header + math.prod(dims)} bytes): the file is truncated or corrupt")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims).copy()


def _idx_file(root: Path, name: str) -> Path:
    for candidate in (root / f"{name}.gz", root / name):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"Fashion-MNIST file {name}.gz not found in {root}: install the Debian package dataset-fashion-mnist "
        "(apt-get update && apt-get install -y dataset-fashion-mnist) or pass data.path=<folder with "
        "train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, "
        "t10k-labels-idx1-ubyte.gz>")


def parse_split(split: str) -> tuple[str, slice | None]:
    """'train', 'test', or a contiguous part of one: 'train[:50000]', 'train[50000:]', 'test[100:200]'."""
    m = re.fullmatch(r"(train|test)(?:\[(\d*):(\d*)\])?", str(split))
    if m is None:
        raise ValueError(f"Fashion-MNIST split must be 'train' or 'test', or a part such as 'train[:50000]', "
                         f"got {split!r}")
    if m[2] is None:  # no [start:stop]
        return m[1], None
    return m[1], slice(int(m[2]) if m[2] else None, int(m[3]) if m[3] else None)


class FashionMNISTDataset(_SeededFlips):
    """Fashion-MNIST in memory. Item: (image (1, P, P) in [-1, 1], label): the 28x28 image centered on a
    P = pad_to square of background -1 (pixel 0); flipped when hflip and ``hflip_coin(seed, epoch, index)``.
    return_pair=True gives (image, flipped image, label)."""

    def __init__(self, root: str | os.PathLike | None = None, split: str = "train", pad_to: int | None = 32,
                 hflip: bool = False, seed: int = 0, return_pair: bool = False):
        name, part = parse_split(split)
        root = Path(root if root is not None else FASHION_MNIST_ROOT)
        prefix = "train" if name == "train" else "t10k"
        images = read_idx(_idx_file(root, f"{prefix}-images-idx3-ubyte"), ndim=3)  # (N, 28, 28) uint8
        labels = read_idx(_idx_file(root, f"{prefix}-labels-idx1-ubyte"), ndim=1)  # (N,) uint8
        if part is not None:
            whole = len(labels)
            images, labels = images[part], labels[part]
            if len(images) == 0:
                raise ValueError(f"Fashion-MNIST split {split!r} is empty (the {name} split has {whole} images)")
        if len(images) != len(labels) or labels.max() >= len(CLASS_NAMES):
            raise ValueError(f"{root}: {len(images)} images but {len(labels)} labels (max {labels.max()}): "
                             "the image and label files do not belong together")
        h, w = images.shape[1:]
        pad_to = pad_to or max(h, w)
        if pad_to < max(h, w):
            raise ValueError(f"pad_to={pad_to} is smaller than the {h}x{w} images")
        top, left = (pad_to - h) // 2, (pad_to - w) // 2
        self.padding = (left, pad_to - w - left, top, pad_to - h - top)  # F.pad order: W then H
        self.images, self.labels = torch.from_numpy(images), torch.from_numpy(labels).long()
        self.hflip, self.seed, self.return_pair = hflip, seed, return_pair

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple:
        x = self.images[index].float()[None] / 127.5 - 1.0  # (1, 28, 28)
        x = F.pad(x, self.padding, value=-1.0)  # (1, P, P)
        label = int(self.labels[index])
        if self.return_pair:
            return x, x.flip(-1), label
        return (x.flip(-1) if self._flip(index) else x), label


# --- cached latents -------------------------------------------------------------------------------------------
def save_latent_cache(path: str | os.PathLike, moments: torch.Tensor, moments_flip: torch.Tensor | None,
                      labels: torch.Tensor, meta: dict[str, str] | None = None) -> None:
    """Write VAE posterior moments (N, 2C, h, w) (mean || logvar, float16/32), those of the flipped images
    (or None), and labels (N,) as one safetensors file (atomic) with string metadata `meta`."""
    if moments.ndim != 4 or moments.dtype not in (torch.float16, torch.float32):
        raise ValueError(f"moments must be (N, 2C, h, w) float16/float32, got {tuple(moments.shape)} {moments.dtype}")
    if moments_flip is not None and (moments_flip.shape != moments.shape or moments_flip.dtype != moments.dtype):
        raise ValueError(f"moments_flip {tuple(moments_flip.shape)} {moments_flip.dtype} must match moments "
                         f"{tuple(moments.shape)} {moments.dtype}")
    if labels.shape != (len(moments),) or labels.dtype.is_floating_point:
        raise ValueError(f"labels must be integers of shape ({len(moments)},), "
                         f"got {tuple(labels.shape)} {labels.dtype}")
    tensors = {"moments": moments, "labels": labels.long()}
    if moments_flip is not None:
        tensors["moments_flip"] = moments_flip
    export_safetensors(tensors, path, {**(meta or {}), "format": "mar-latent-cache-v1"})


class LatentCacheDataset(_SeededFlips):
    """Items of a `save_latent_cache` file: (moments (2C, h, w) float32, label), read lazily (memory-mapped);
    the flipped moments are used when hflip and ``hflip_coin(seed, epoch, index)``."""

    def __init__(self, path: str | os.PathLike, hflip: bool = True, seed: int = 0):
        self.path, self.hflip, self.seed, self._file = Path(path), hflip, seed, None
        if not self.path.is_file():
            raise FileNotFoundError(f"latent cache not found: {self.path} (write it with save_latent_cache)")
        try:
            with safe_open(str(self.path), framework="pt") as f:
                self.meta, names = dict(f.metadata() or {}), set(f.keys())
                self.labels = f.get_tensor("labels") if "labels" in names else None
                shape = f.get_slice("moments").get_shape() if "moments" in names else None
        except SafetensorError as e:
            raise ValueError(f"{self.path} is not a valid latent cache: {e}") from None
        if self.meta.get("format") != "mar-latent-cache-v1" or shape is None or self.labels is None:
            raise ValueError(f"{self.path} is not a latent cache written by save_latent_cache")
        if hflip and "moments_flip" not in names:
            raise ValueError(f"{self.path} holds no flipped moments: pass hflip=False or re-cache with flips")
        self.moments_shape = tuple(shape[1:])
        self.tokenizer_fingerprint = self.meta.get("tokenizer_fingerprint")  # absent in caches before 2026-12

    def __len__(self) -> int:
        return len(self.labels)

    def __getstate__(self) -> dict[str, Any]:  # DataLoader workers reopen the file themselves
        return {**self.__dict__, "_file": None}

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for a latent cache of {len(self)} items")
        if self._file is None:
            self._file = safe_open(str(self.path), framework="pt")
        name = "moments_flip" if self._flip(index) else "moments"
        moments = self._file.get_slice(name)[index : index + 1][0].float()  # (2C, h, w)
        return moments, int(self.labels[index])
