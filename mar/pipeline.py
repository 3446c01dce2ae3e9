"""Images in, images out: the tokenizer, the generator and its head composed for sampling and editing.

Glossary: n images, i an image index, K classes sampled, H/W pixels, h/w tokens per side.

Every image is a function of (weights, settings, i) only:
    label(i)     = classes[i % K]                        (round robin: any N keeps the labels of 0..N-1)
    generator(i) = torch.Generator().manual_seed(item_seed(seed, i))
so an image never depends on the batch around it, on the number of processes, or on a resume. The same
compute shapes matter too (CPU and GPU kernels are picked by shape): ``sample_images`` pads every batch to
the same size and ``decode_each`` decodes one image at a time; sample.py also makes MKL's CPU matmuls
shape-independent (``MKL_CBWR``).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from mar.config.schema import SamplingOptions
from mar.engine.data import item_seed


def model_device(model: torch.nn.Module) -> torch.device:
    """The device a generator's weights are on (every generator of the family has parameters)."""
    return next(model.parameters()).device


def label_of(i: int, classes: Sequence[int]) -> int:
    """Class of image i: classes[i % K]."""
    return int(classes[i % len(classes)])


def image_generators(seed: int, indices: Sequence[int], device) -> list[torch.Generator]:
    """One generator per image index, seeded from (seed, i) alone."""
    return [torch.Generator(device).manual_seed(item_seed(seed, i)) for i in indices]


def decode_each(tokenizer, tokens: torch.Tensor) -> torch.Tensor:
    """Decode (n, c, h, w) tokens one image at a time, from NCHW-contiguous memory -> (n, C, H, W).

    Convolution kernels are chosen by batch size and memory layout (MAR's unpatchify returns a
    channels-last view whose strides depend on the batch), and either changes the float result."""
    tokens = tokens.contiguous()
    return torch.cat([tokenizer.decode(tokens[j:j + 1]) for j in range(len(tokens))])


@torch.no_grad()
def sample_images(model, tokenizer, indices: Sequence[int], classes: Sequence[int], seed: int, num_iter: int,
                  cfg: float, cfg_schedule: str, temperature: float, options: SamplingOptions | None = None,
                  pad_to: int = 0) -> np.ndarray:
    """Images of ``indices`` as uint8 (n, H, W, C): one generator and label per index (module docstring).

    The batch is padded to ``pad_to`` samples (repeats of the last index, dropped after), so every batch of a
    run has the same shapes and picks the same kernels.
    """
    device = model_device(model)
    n = len(indices)
    padded = list(indices) + [indices[-1]] * max(0, pad_to - n)
    labels = torch.tensor([label_of(i, classes) for i in padded], device=device)
    tokens = model.generate(len(padded), labels=labels, num_iter=num_iter, cfg=cfg, cfg_schedule=cfg_schedule,
                            temperature=temperature, generator=image_generators(seed, padded, device), options=options)
    return tokenizer.to_uint8(decode_each(tokenizer, decoder_input(model.unpatchify(tokens[:n])))).cpu().numpy()


def decoder_input(tokens: torch.Tensor) -> torch.Tensor:
    """What a tokenizer decodes: continuous tokens in float32 (after any autocast), code indices as they are."""
    return tokens.float() if tokens.is_floating_point() else tokens
