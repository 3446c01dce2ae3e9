"""The tokenizer interface: images to tokens and back, and how to open a tokenizer file.

Glossary: B batch, C_img image channels, H/W pixels, C token channels, h/w = H/stride, W/stride.

A tokenizer is an ``nn.Module`` with

    kind            "continuous" (tokens are real vectors, e.g. the KL-VAE) or "discrete" (code indices)
    stride          pixels per token side; an image side must be a multiple of it
    token_channels  C (continuous), or the codebook size (discrete)
    scaling_factor  its own latent scale (tokens = latents * scaling_factor); no other code holds the number
    in_channels     C_img
    token_shape(H, W) -> (C, h, w)   the tokens of an H x W image
    encode(images (B, C_img, H, W) in [-1, 1], generator=None, sample=True) -> tokens (B, C, h, w)
        ``sample=False`` gives the deterministic encoding (the posterior mean for a KL-VAE)
    decode(tokens (B, C, h, w)) -> images (B, C_img, H, W), nominally in [-1, 1]
    to_uint8(images) -> uint8 (B, H, W, C_img)

``open_tokenizer`` reads a project tokenizer file (``.safetensors`` with its config) or an LDM-format VAE
checkpoint (the MAR release's ``kl16.ckpt``) with a named preset's architecture.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Protocol

import torch

from .kl_vae import KLTokenizer, KLVAEConfig, kl_vae_preset


class Tokenizer(Protocol):
    kind: str
    stride: int
    token_channels: int
    scaling_factor: float
    in_channels: int

    def token_shape(self, height: int, width: int) -> tuple[int, int, int]: ...

    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None,
               sample: bool = True) -> torch.Tensor: ...

    def decode(self, tokens: torch.Tensor) -> torch.Tensor: ...

    @staticmethod
    def to_uint8(images: torch.Tensor) -> torch.Tensor: ...


def open_tokenizer(path: str | Path | None = None, preset: str | KLVAEConfig = "kl16", in_channels: int | None = None,
                   scaling_factor: float | None = None) -> KLTokenizer:
    """A tokenizer from a file, or a fresh (untrained) one of ``preset`` when ``path`` is None.

    ``.safetensors`` written by ``KLTokenizer.save`` carry their own config; any other file is read as an
    LDM-format VAE with the architecture of ``preset`` (a name, with ``in_channels`` for grey images, or a
    ``KLVAEConfig``). ``scaling_factor`` replaces the tokenizer's own factor.
    """
    overrides = {"in_channels": in_channels, "out_channels": in_channels} if in_channels else {}
    config = preset if isinstance(preset, KLVAEConfig) else kl_vae_preset(preset, **overrides)
    if path is None:
        tok = KLTokenizer(config)
    else:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer not found: {path}")
        tok = None
        if path.suffix == ".safetensors":
            try:
                tok = KLTokenizer.load(path)
            except ValueError as e:
                if "no KLTokenizer config" not in str(e):
                    raise
        if tok is None:
            tok = KLTokenizer.from_ldm_checkpoint(path, config)
    if scaling_factor is not None:
        tok.config = dataclasses.replace(tok.config, scaling_factor=scaling_factor)
    return tok
