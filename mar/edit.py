"""Zero-shot editing with any masked generator: inpainting, outpainting (uncropping) and class editing.

Glossary: n images, H/W pixels, h/w tokens per side, s = vae_stride * patch_size pixels per token side,
L = h * w tokens, U unknown tokens of an image.

MAR models p(unknown tokens | known tokens, class) for any split of the tokens (MAR paper, Sec. 3.3: the
masked generator is trained on random subsets of visible tokens), so editing needs no training:

- **Known tokens are the tokenizer's encoding of the image**: the posterior mean, scaled (``encode(...,
  sample=False)``), one image at a time.
- **A token is unknown if any pixel of its s x s patch is masked** (a max-pool of the pixel mask).
- **The known tokens are kept exactly**, bit for bit in token space, and the generator's encoder sees them
  from the first step (``mar.generate.masked`` with ``known_tokens`` / ``known_mask``).
- **The generation and CFG schedules count from the number of unknown tokens** U of each image.
- **Rows in one batch may have different numbers of unknown tokens** (the loop groups rows by U).

Inpainting regenerates a masked region; outpainting keeps a region (``keep=``) and regenerates the rest of
the canvas; class editing regenerates a region under another label. Image i of a run is drawn from its own
generator seeded from (seed, i), as in sample.py.

Pixel masks are (n, H, W) bool, True = regenerate (a PNG mask: white = regenerate). ``region_mask`` names the
common ones: ``lower-half``, ``upper-half``, ``left-half``, ``right-half``, ``center:S`` (the central S x S
pixel square) and ``box:X0,Y0,X1,Y1`` (pixels X0 <= x < X1, Y0 <= y < Y1).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from mar.config.schema import SamplingOptions
from mar.pipeline import decode_each, decoder_input, image_generators, model_device

REGIONS = ("lower-half", "upper-half", "left-half", "right-half", "center:S", "box:X0,Y0,X1,Y1")


def region_mask(spec: str, height: int, width: int) -> torch.Tensor:
    """The (H, W) bool mask of a named region (see the module docstring); True inside the region."""
    mask = torch.zeros(height, width, dtype=torch.bool)
    name, _, arg = spec.partition(":")
    if name in ("lower-half", "upper-half", "left-half", "right-half") and not arg:
        half = {"lower-half": (slice(height // 2, None), slice(None)), "upper-half": (slice(None, height // 2),
                slice(None)), "left-half": (slice(None), slice(None, width // 2)),
                "right-half": (slice(None), slice(width // 2, None))}[name]
        mask[half] = True
        return mask
    try:
        values = [int(v) for v in arg.split(",")] if arg else []
    except ValueError:
        values = []
    if name == "center" and len(values) == 1 and 0 < values[0] <= min(height, width):
        top, left = (height - values[0]) // 2, (width - values[0]) // 2
        mask[top:top + values[0], left:left + values[0]] = True
        return mask
    if name == "box" and len(values) == 4:
        x0, y0, x1, y1 = values
        if 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height:
            mask[y0:y1, x0:x1] = True
            return mask
    raise ValueError(f"unknown region {spec!r} for a {width}x{height} image: use one of {', '.join(REGIONS)} "
                     f"(S and the box in pixels, inside the image)")


def token_unknown(regenerate: torch.Tensor, patch: int) -> torch.Tensor:
    """(n, H, W) pixel mask (True = regenerate) -> (n, L) bool, True where any pixel of a token's patch is
    masked; tokens in row-major order (``MAR.patchify``'s order). H and W must be multiples of ``patch``."""
    if regenerate.dim() != 3:
        raise ValueError(f"a pixel mask must be (n, H, W), got shape {tuple(regenerate.shape)}")
    n, h, w = regenerate.shape
    if h % patch or w % patch:
        raise ValueError(f"mask size {w}x{h} is not a multiple of the {patch}-pixel token size")
    pooled = F.max_pool2d(regenerate[:, None].float(), kernel_size=patch)  # (n, 1, h/s, w/s)
    return pooled.flatten(1) > 0


@torch.no_grad()
def known_tokens(model, tokenizer, images: torch.Tensor) -> torch.Tensor:
    """The tokens of images (n, C, H, W) in [-1, 1]: posterior means, scaled, one image at a time -> (n, L, C)."""
    means = torch.cat([tokenizer.encode(images[j:j + 1], sample=False) for j in range(len(images))])
    return model.patchify(means)


@torch.no_grad()
def edit_tokens(model, tokenizer, images: torch.Tensor, regenerate: torch.Tensor, labels: torch.Tensor | None,
                *, indices: Sequence[int], seed: int = 0, num_iter: int = 16, cfg: float = 1.0,
                cfg_schedule: str = "linear", temperature: float = 1.0, options: SamplingOptions | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens (n, L, C), known mask (n, L)) of edited images; row j is result ``indices[j]`` of the run.

    ``images`` (n, C, H, W) in [-1, 1] at the model's image size, ``regenerate`` (n, H, W) bool (True = make
    anew), ``labels`` (n,) the class to generate under (None: unconditional). The settings are sample.py's.
    """
    device = model_device(model)
    if images.dim() != 4 or images.shape[-2:] != (model.img_size, model.img_size):
        raise ValueError(f"images must be (n, C, {model.img_size}, {model.img_size}) for this model, got "
                         f"{tuple(images.shape)}")
    if regenerate.shape != (images.shape[0], *images.shape[-2:]):
        raise ValueError(f"the mask must be (n, H, W) = {(images.shape[0], *images.shape[-2:])}, got "
                         f"{tuple(regenerate.shape)}")
    if len(indices) != len(images):
        raise ValueError(f"give one result index per image: {len(indices)} indices for {len(images)} images")
    unknown = token_unknown(regenerate.to(device), model.vae_stride * model.patch_size)
    known = known_tokens(model, tokenizer, images.to(device))
    tokens = model.generate(len(images), labels=None if labels is None else labels.to(device), num_iter=num_iter,
                            cfg=cfg, cfg_schedule=cfg_schedule, temperature=temperature,
                            generator=image_generators(seed, indices, device), options=options, known_tokens=known,
                            known_mask=~unknown)
    return tokens, ~unknown


@torch.no_grad()
def edit_images(model, tokenizer, images: torch.Tensor, regenerate: torch.Tensor, labels: torch.Tensor | None,
                composite: bool = False, **settings) -> np.ndarray:
    """Edited images as uint8 (n, H, W, C): ``edit_tokens`` decoded one image at a time.

    The decoder sees every token (the KL-VAE's mid-block attention is global), so the kept region comes out as
    the tokenizer's reconstruction shifted by its new surroundings, more so the fewer tokens are kept. With
    ``composite`` the input's own pixels are pasted back where the mask keeps them (a seam may show).
    """
    tokens, _ = edit_tokens(model, tokenizer, images, regenerate, labels, **settings)
    out = tokenizer.to_uint8(decode_each(tokenizer, decoder_input(model.unpatchify(tokens)))).cpu()
    if composite:
        keep = ~regenerate.cpu()
        out[keep] = tokenizer.to_uint8(images.cpu())[keep]
    return out.numpy()


def mask_preview(images: np.ndarray, regenerate: np.ndarray) -> np.ndarray:
    """uint8 (n, H, W, C) images with the region to regenerate shown as a grey checkerboard (for grids)."""
    n, h, w = regenerate.shape
    checker = np.where((np.arange(h)[:, None] // 2 + np.arange(w)[None] // 2) % 2 == 0, 96, 160).astype(np.uint8)
    out = images.copy()
    out[regenerate.astype(bool)] = checker[None].repeat(n, 0)[regenerate.astype(bool)][:, None]
    return out


# --- inputs for the command line: images and masks at the model's size -----------------------------------------
def fit_to_canvas(image, size: int):
    """A PIL image at ``size`` x ``size``: smaller images are centred on a black canvas (as Fashion-MNIST's
    28 px are padded to 32), larger ones get the ADM centre crop (``mar.engine.data.center_crop_arr``)."""
    from PIL import Image

    from mar.engine.data import center_crop_arr

    if image.size[0] <= size and image.size[1] <= size:
        canvas = Image.new(image.mode, (size, size), 0)
        canvas.paste(image, ((size - image.size[0]) // 2, (size - image.size[1]) // 2))
        return canvas
    return center_crop_arr(image, size)


def load_inputs(sources: Sequence[str], size: int, channels: int, fmnist_root: str | None = None
                ) -> tuple[torch.Tensor, list[int | None], list[str]]:
    """(images (n, C, size, size) in [-1, 1], labels (the dataset's, None for files), names) of the inputs:
    image files, or ``fashion_mnist:SPLIT[:I-J]`` (records I..J-1 of a split, with their labels)."""
    from PIL import Image

    from mar.engine.data import FashionMNISTDataset, to_tensor

    images, labels, names = [], [], []
    for source in sources:
        if source.startswith("fashion_mnist:"):
            split, _, span = source.split(":", 1)[1].partition(":")
            ds = FashionMNISTDataset(fmnist_root, split=split, pad_to=size, hflip=False)
            try:
                lo, hi = (int(v) for v in span.split("-")) if span else (0, len(ds))
            except ValueError:
                raise ValueError(f"--input {source!r}: expected fashion_mnist:SPLIT or fashion_mnist:SPLIT:I-J") from None
            if not 0 <= lo < hi <= len(ds):
                raise ValueError(f"--input {source!r}: records {lo}-{hi} are outside the split's 0-{len(ds)}")
            for i in range(lo, hi):
                x, y = ds[i]
                images.append(x if channels == 1 else x.expand(channels, -1, -1))
                labels.append(int(y))
                names.append(f"fashion_mnist_{split}_{i}")
            continue
        try:
            with Image.open(source) as im:
                im = im.convert("L" if channels == 1 else "RGB")
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot read image {source}: {e}") from None
        images.append(to_tensor(fit_to_canvas(im, size)))
        labels.append(None)
        names.append(source)
    if not images:
        raise ValueError("no inputs: give --input FILE ... or --input fashion_mnist:test:0-8")
    return torch.stack(images), labels, names


def load_masks(spec: Sequence[str], n: int, size: int, keep: bool = False) -> torch.Tensor:
    """(n, size, size) bool, True = regenerate: one PNG (white = regenerate) or region name for every input, or
    one per input. With ``keep`` the spec names what to keep and the rest is regenerated (outpainting)."""
    from PIL import Image

    if len(spec) not in (1, n):
        raise ValueError(f"give one mask for all {n} inputs or one per input, got {len(spec)}")
    masks = []
    for item in spec:
        if item.lower().endswith((".png", ".bmp", ".gif", ".jpg", ".jpeg", ".webp")):
            try:
                with Image.open(item) as im:
                    grey = fit_to_canvas(im.convert("L"), size)
            except (OSError, ValueError) as e:
                raise ValueError(f"cannot read mask {item}: {e}") from None
            masks.append(torch.from_numpy(np.asarray(grey) > 127))
        else:
            masks.append(region_mask(item, size, size))
    masks = torch.stack(masks).expand(n, -1, -1) if len(masks) == 1 else torch.stack(masks)
    return ~masks if keep else masks
