"""Sample folders: which image has which class and seed, what is on disk, and writing the outputs.

Glossary: N images in a setting, i an image index (0..N-1), K classes sampled, c a class label.

Every image is a function of (weights, settings, i) only:
    label(i)     = classes[i % K]                        (round robin: any N keeps the labels of 0..N-1)
    generator(i) = torch.Generator().manual_seed(item_seed(seed, i))
so an image never depends on the batch around it, on the number of processes, or on a resume. The
same compute shapes matter too (kernels are picked by shape): `generate_images` pads every batch to
the same size and decodes images one at a time; sample.py makes MKL's CPU matmuls shape-independent.
On disk, image i is ``{i:06d}_c{label:03d}.png`` (evaluate.py reads the class from the name), written
atomically; ``settings.json`` records the settings the folder was made with.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import re
import zipfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from mar.engine.data import item_seed
from mar.io import atomic_write
from mar.registry import PRESETS

SETTINGS_FORMAT = "mar-samples-v1"
SAMPLE_NAME = re.compile(r"^(\d+)_c(\d+)\.png$")
GRID_COLUMNS, GRID_MAX_ROWS = 8, 16
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class SettingsMismatch(ValueError):
    """A sample folder already holds images made with other settings."""


# --- labels, names and grids ------------------------------------------------------------------------------------
def label_of(i: int, classes: Sequence[int]) -> int:
    """Class of image i: classes[i % K]."""
    return int(classes[i % len(classes)])


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
    if old is None:
        if folder.is_dir() and any(SAMPLE_NAME.match(p.name) for p in folder.iterdir()):
            raise SettingsMismatch(f"{folder} holds sample PNGs but no settings.json, so they cannot be checked: "
                                   "pass another --out")
        return None
    diff = [f"{k}: {json.dumps(old['key'].get(k))} there, {json.dumps(v)} now" for k, v in key.items()
            if old["key"].get(k) != v]
    diff += [f"{k}: {json.dumps(v)} there, absent now" for k, v in old["key"].items() if k not in key]
    if diff:
        raise SettingsMismatch(f"{folder} holds samples made with other settings ({'; '.join(diff)}); "
                               "pass another --out (or delete that folder) rather than mix images")
    existing_samples(folder, num_images, classes)
    return old


# --- generation -------------------------------------------------------------------------------------------------
@torch.no_grad()
def generate_images(model, tokenizer, indices: Sequence[int], classes: Sequence[int], seed: int, num_iter: int,
                    cfg: float, cfg_schedule: str, temperature: float, precision: str = "fp32",
                    pad_to: int = 0, sampler: str = "ddpm", eta: float = 0.0,
                    diffusion_steps: tuple[int, int] | None = None, clip_denoised: float | None = None) -> np.ndarray:
    """Images of `indices` as uint8 (n, H, W, C): one generator and label per index.

    `precision`, `sampler`, `eta` and `diffusion_steps` (annealed (first, last) diffusion steps) select the
    opt-in fast path of ``MAR.sample_tokens`` and `clip_denoised` its opt-in guard; the defaults are the exact
    reference sampler in fp32.

    The batch is padded to `pad_to` samples (repeats of the last index, dropped after), so every batch
    of a run has the same shapes and picks the same kernels; `decode_each` does the same for the decoder.
    """
    device = model.fake_latent.device
    n = len(indices)
    padded = list(indices) + [indices[-1]] * max(0, pad_to - n)
    generators = [torch.Generator(device).manual_seed(item_seed(seed, i)) for i in padded]
    labels = torch.tensor([label_of(i, classes) for i in padded], device=device)
    tokens = model.sample_tokens(len(padded), num_iter=num_iter, cfg=cfg, cfg_schedule=cfg_schedule,
                                 labels=labels, temperature=temperature, generator=generators, sampler=sampler,
                                 eta=eta, diffusion_steps_schedule=diffusion_steps,
                                 autocast_dtype=PRECISIONS[precision], clip_denoised=clip_denoised)
    return tokenizer.to_uint8(decode_each(tokenizer, tokens[:n].float())).cpu().numpy()


def decode_each(tokenizer, tokens: torch.Tensor) -> torch.Tensor:
    """Decode (n, c, h, w) tokens one image at a time, from NCHW-contiguous memory -> (n, C, H, W).

    Convolution kernels are chosen by batch size and memory layout (MAR's unpatchify returns a
    channels-last view whose strides depend on the batch), and either changes the float result."""
    tokens = tokens.contiguous()
    return torch.cat([tokenizer.decode(tokens[j:j + 1]) for j in range(len(tokens))])


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


def parse_clip_denoised(text: str) -> float:
    """A --clip-denoised argument (argparse type): a positive finite number, or 'off' / 'none', returned as 0.0
    (explicitly off, whatever the run's config says; see `effective_clip_denoised`)."""
    if text.strip().lower() in ("off", "none"):
        return 0.0
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number or 'off', got {text!r}") from None
    if not 0.0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"expected a positive number or 'off', got {text!r}")
    return value


def effective_clip_denoised(argument: float | None, run_default: float | None) -> float | None:
    """The guard a sampling run uses: the run config's value unless the command line gave one (0.0 = off)."""
    return run_default if argument is None else (argument or None)


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


# --- model sizes from a state dict ------------------------------------------------------------------------------
def guess_preset(state: dict[str, torch.Tensor]) -> str:
    """Which preset's sizes a MAR state dict has, as words for error messages."""
    try:
        width = state["z_proj.weight"].shape[0]
        depth = len({k.split(".")[1] for k in state if k.startswith("encoder_blocks.")})
        head = (len({k.split(".")[3] for k in state if k.startswith("diffloss.net.res_blocks.")}),
                state["diffloss.net.input_proj.weight"].shape[0])
    except KeyError:
        return "it is not a MAR state dict"
    for name, p in PRESETS.items():
        sizes = (p["encoder_embed_dim"], p["encoder_depth"], p["diffloss_depth"], p["diffloss_width"])
        if sizes == (width, depth, *head):
            return f"it looks like {name}"
    return f"width {width}, depth {depth}, DiffLoss {head[0]}x{head[1]}: no preset has these sizes"


def infer_kwargs(state: dict[str, torch.Tensor], token_channels: int, vae_stride: int, source: str) -> dict[str, int]:
    """num_classes, buffer_size, patch_size and img_size of a config-less (published) MAR state dict:
    class_emb (K, D); diffusion_pos_embed (1, L, D); encoder_pos_embed (1, P+L, D); z_proj (D, C*p*p)."""
    try:
        classes, pos, enc, zproj = (state[k].shape for k in ("class_emb.weight", "diffusion_pos_embed_learned",
                                                             "encoder_pos_embed_learned", "z_proj.weight"))
    except KeyError as e:
        raise ValueError(f"{source} is not a MAR state dict (no {e})") from None
    side, patch = math.isqrt(pos[1]), math.isqrt(zproj[1] // token_channels)
    if side * side != pos[1] or patch * patch * token_channels != zproj[1]:
        raise ValueError(f"{source}: token width {zproj[1]} does not fit a tokenizer with {token_channels} channels")
    return dict(num_classes=classes[0], buffer_size=enc[1] - pos[1], patch_size=patch,
                img_size=side * patch * vae_stride)
