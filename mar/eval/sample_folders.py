"""Sample folders on disk: file names, which images exist, the settings they were made with, grids and npz.

Glossary: N images in a setting, i an image index (0..N-1), K classes sampled, c a class label.

Image i of a setting has class ``label_of(i, classes)`` = classes[i % K] and is seeded from (seed, i) alone
(``mar.pipeline``). On disk it is ``{i:06d}_c{label:03d}.png`` (evaluate.py reads the class from the name),
written atomically; ``settings.json`` records the key the folder was made with, and a folder made with
another key is refused (``SettingsMismatch``), so images of two settings never mix.
"""
from __future__ import annotations

import hashlib
import json
import re
import zipfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from mar.io import atomic_write
from mar.pipeline import label_of

SETTINGS_FORMAT = "mar-samples-v1"
SAMPLE_NAME = re.compile(r"^(\d+)_c(\d+)\.png$")
GRID_COLUMNS, GRID_MAX_ROWS = 8, 16


class SettingsMismatch(ValueError):
    """A sample folder already holds images made with other settings."""


# --- labels, names and grids ------------------------------------------------------------------------------------
def sample_name(i: int, classes: Sequence[int]) -> str:
    return f"{i:06d}_c{label_of(i, classes):03d}.png"


def default_num_images(num_classes_sampled: int) -> int:
    """One grid's worth: a row of 8 per class for up to 16 classes, else an 8 x 8 grid."""
    k = num_classes_sampled
    return GRID_COLUMNS * k if k <= GRID_MAX_ROWS else GRID_COLUMNS * GRID_COLUMNS


def grid_layout(num_images: int, classes: Sequence[int]) -> tuple[list[int], int]:
    """(indices shown, images per row): one row per class (first images of each) when there are at most
    16 classes and every class has an image, else the first 64 images, 8 per row."""
    k = len(classes)
    if k <= GRID_MAX_ROWS and num_images >= k:
        cols = min(GRID_COLUMNS, num_images // k)
        return [r + j * k for r in range(k) for j in range(cols)], cols
    n = min(num_images, GRID_COLUMNS * GRID_COLUMNS)
    return list(range(n)), min(GRID_COLUMNS, n)


# --- what is on disk --------------------------------------------------------------------------------------------
def existing_samples(folder: Path, num_images: int, classes: Sequence[int]) -> set[int]:
    """Indices whose PNG is complete on disk. Raises SettingsMismatch on an image that this setting
    would not make (index >= N, or a class that is not label(i)): never mix images of two settings."""
    found = set()
    for p in folder.iterdir() if folder.is_dir() else ():
        m = SAMPLE_NAME.match(p.name)
        if not m or p.stat().st_size == 0:
            continue
        i, c = int(m.group(1)), int(m.group(2))
        if i >= num_images:
            raise SettingsMismatch(f"{folder} holds {p.name}, beyond --num-images {num_images}: pass a larger "
                                   "--num-images, or another --out")
        if c != label_of(i, classes):
            raise SettingsMismatch(f"{folder} holds {p.name} but image {i} has class {label_of(i, classes)} with "
                                   f"--classes {','.join(map(str, classes))}: pass another --out")
        found.add(i)
    return found


def read_samples(folder: Path, indices: Sequence[int], classes: Sequence[int], rgb: bool = True) -> np.ndarray:
    """The PNGs of `indices` as uint8 (n, H, W, 3) (grey replicated to 3 channels: the ADM layout), or
    as stored ((n, H, W) for grey) with rgb=False."""
    out = []
    for i in indices:
        with Image.open(folder / sample_name(i, classes)) as im:
            out.append(np.asarray(im.convert("RGB") if rgb else im, dtype=np.uint8))
    return np.stack(out)


# --- settings ---------------------------------------------------------------------------------------------------
def fingerprint(state_dict: dict[str, torch.Tensor], extra: Any = None) -> str:
    """sha256 over (name, dtype, shape, bytes) of every tensor, in name order, plus JSON `extra`."""
    h = hashlib.sha256(json.dumps(extra, sort_keys=True).encode())
    for k in sorted(state_dict):
        t = state_dict[k].detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())  # the raw bytes, without a copy
    return h.hexdigest()


def read_settings(folder: Path) -> dict | None:
    path = folder / "settings.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise SettingsMismatch(f"{path} is not valid JSON ({e}): pass another --out") from None
    if not isinstance(data, dict) or data.get("format") != SETTINGS_FORMAT or "key" not in data:
        raise SettingsMismatch(f"{path} was not written by sample.py: pass another --out")
    return data


def check_folder(folder: Path, key: dict, num_images: int, classes: Sequence[int]) -> dict | None:
    """Refuse (SettingsMismatch) a folder made with other settings; return its settings.json or None."""
    old = read_settings(folder)
    has_images = folder.is_dir() and any(SAMPLE_NAME.match(p.name) for p in folder.iterdir())
    if old is None:
        if has_images:
            raise SettingsMismatch(f"{folder} holds sample PNGs but no settings.json, so they cannot be checked: "
                                   "pass another --out")
        return None
    if not has_images and old["key"] != key:
        return None  # a run that made no image yet (it failed or was stopped early): nothing to mix, start anew
    diff = [f"{k}: {json.dumps(old['key'].get(k))} there, {json.dumps(v)} now" for k, v in key.items()
            if old["key"].get(k) != v]
    diff += [f"{k}: {json.dumps(v)} there, absent now" for k, v in old["key"].items() if k not in key]
    if diff:
        raise SettingsMismatch(f"{folder} holds samples made with other settings ({'; '.join(diff)}); "
                               "pass another --out (or delete that folder) rather than mix images")
    existing_samples(folder, num_images, classes)
    return old


# --- ADM evaluator npz ------------------------------------------------------------------------------------------
def write_npz(path: Path, folder: Path, num_images: int, classes: Sequence[int], chunk: int = 256) -> None:
    """``samples.npz`` with ``arr_0`` uint8 (N, H, W, 3) read back from the PNGs in index order, streamed
    into the zip member (no N-image array in memory) and renamed into place when complete."""
    first = read_samples(folder, [0], classes)
    shape = (num_images, *first.shape[1:])

    def write(tmp: Path) -> None:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            with zf.open("arr_0.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array_header_1_0(f, {"descr": "|u1", "fortran_order": False, "shape": shape})
                for s in range(0, num_images, chunk):
                    batch = read_samples(folder, range(s, min(num_images, s + chunk)), classes)
                    f.write(np.ascontiguousarray(batch).data)

    atomic_write(path, write)


def rate(images: int, seconds: float) -> dict[str, float | None]:
    """Seconds per image and images per second (None when nothing was generated)."""
    if images <= 0:
        return {"seconds_per_image": None, "images_per_second": None}
    return {"seconds_per_image": seconds / images, "images_per_second": images / max(seconds, 1e-9)}


def setting_folder_name(cfg: float, temperature: float, num_iter: int | None = None) -> str:
    """``cfg2.0_temp1.0`` (plus ``_iter64`` when several num_iter values are swept)."""
    name = f"cfg{float(cfg)}_temp{float(temperature)}"
    return name if num_iter is None else f"{name}_iter{num_iter}"


def parse_classes(text: str | None, num_classes: int) -> list[int]:
    """``"0,3,7"`` -> [0, 3, 7], checked against the model; None -> every class."""
    if text is None:
        return list(range(num_classes))
    try:
        classes = [int(c) for c in text.split(",") if c.strip()]
    except ValueError:
        raise ValueError(f"--classes {text!r}: expected comma-separated class indices such as 0,3,7") from None
    bad = [c for c in classes if not 0 <= c < num_classes]
    if bad or not classes:
        raise ValueError(f"class {bad[0]} is out of range: this model has classes 0..{num_classes - 1}" if bad else
                         "--classes is empty: give class indices such as 0,3,7")
    return classes


