"""The tokenizer interface: images to tokens and back, and how to open a tokenizer file.

Glossary: B batch, C_img image channels, H/W pixels, C token channels, h/w = H/stride, W/stride, K codebook size.

A tokenizer is an ``nn.Module`` with

    kind            "continuous" (tokens are real vectors, e.g. the KL-VAE) or "discrete" (code indices, the VQ)
    stride          pixels per token side; an image side must be a multiple of it
    token_channels  C (continuous), or the codebook size K (discrete)
    scaling_factor  its own latent scale (tokens = latents * scaling_factor); no other code holds the number
                    (a discrete tokenizer keeps one only for its continuous view)
    in_channels     C_img
    token_shape(H, W) -> (C, h, w) continuous, (h, w) discrete: the tokens of one H x W image
    encode(images (B, C_img, H, W) in [-1, 1], generator=None, sample=True) -> tokens
        continuous: (B, C, h, w) float; ``sample=False`` gives the deterministic encoding (the posterior mean
        for a KL-VAE); discrete: codes (B, h, w) int64 in [0, K), always deterministic
    decode(tokens (B, C, h, w), or codes (B, h, w) int64) -> images (B, C_img, H, W), nominally in [-1, 1]
    to_uint8(images) -> uint8 (B, H, W, C_img)

``open_tokenizer`` reads a project tokenizer file (``.safetensors`` with its config: KL-VAE or VQ, told apart by
the format in its metadata) or an LDM-format VAE checkpoint (the MAR release's ``kl16.ckpt``) with a named KL
preset's architecture; ``continuous=True`` gives a VQ tokenizer's continuous view (MAR Table 2).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Protocol

import torch

from .kl_vae import _SAVE_FORMAT as _KL_FORMAT
from .kl_vae import KL_VAE_PRESETS, KLTokenizer, KLVAEConfig, kl_vae_preset
from .vq import _SAVE_FORMAT as _VQ_FORMAT
from .vq import VQ_PRESETS, VQConfig, VQContinuousTokens, VQTokenizer, vq_preset


class Tokenizer(Protocol):
    kind: str
    stride: int
    token_channels: int
    scaling_factor: float
    in_channels: int

    def token_shape(self, height: int, width: int) -> tuple[int, ...]: ...

    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None,
               sample: bool = True) -> torch.Tensor: ...

    def decode(self, tokens: torch.Tensor) -> torch.Tensor: ...

    @staticmethod
    def to_uint8(images: torch.Tensor) -> torch.Tensor: ...


def _is_vq_preset(preset: str) -> bool:
    return preset in VQ_PRESETS or preset.startswith("vq")


def tokenizer_kind(preset: str | KLVAEConfig | VQConfig, continuous: bool = False) -> str:
    """"discrete" or "continuous": what ``open_tokenizer(preset=preset, continuous=continuous)`` gives (a KL preset
    is continuous and takes no ``continuous=True``; a VQ preset is discrete, or continuous with its view)."""
    if isinstance(preset, VQConfig) or (isinstance(preset, str) and preset in VQ_PRESETS):
        return "continuous" if continuous else "discrete"
    if isinstance(preset, KLVAEConfig) or (isinstance(preset, str) and preset in KL_VAE_PRESETS):
        if continuous:
            raise ValueError(f"the KL tokenizer {preset!r} is already continuous; continuous=True is only for VQ "
                             f"presets {sorted(VQ_PRESETS)}")
        return "continuous"
    raise ValueError(f"unknown tokenizer preset {preset!r}; valid presets: KL {sorted(KL_VAE_PRESETS)}, "
                     f"VQ {sorted(VQ_PRESETS)}")


def _safetensors_format(path: Path) -> str | None:
    """The ``format`` entry of a safetensors file's metadata (None if there is none or the file is unreadable)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("format")
    except Exception:
        return None


def open_tokenizer(path: str | Path | None = None, preset: str | KLVAEConfig | VQConfig = "kl16",
                   in_channels: int | None = None, scaling_factor: float | None = None, continuous: bool = False
                   ) -> KLTokenizer | VQTokenizer | VQContinuousTokens:
    """A tokenizer from a file, or a fresh (untrained) one of ``preset`` when ``path`` is None.

    ``.safetensors`` written by ``KLTokenizer.save`` or ``VQTokenizer.save`` carry their own config and are
    recognised by their metadata whatever the preset; any other file is read as an LDM-format VAE with the
    architecture of ``preset`` (a KL name, with ``in_channels`` for grey images, or a ``KLVAEConfig``). A preset
    name starting with "vq" (or a ``VQConfig``) makes a fresh tokenizer a VQ one. ``scaling_factor`` replaces the
    tokenizer's own factor. ``continuous=True`` returns a VQ tokenizer's continuous view
    (``VQTokenizer.as_continuous``); a KL tokenizer is already continuous and raises.
    """
    overrides = {"in_channels": in_channels, "out_channels": in_channels} if in_channels else {}
    if isinstance(preset, (KLVAEConfig, VQConfig)):
        config = preset
    elif _is_vq_preset(preset):
        config = vq_preset(preset, **overrides)
    else:
        config = kl_vae_preset(preset, **overrides)
    if path is None:
        tok = VQTokenizer(config) if isinstance(config, VQConfig) else KLTokenizer(config)
    else:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer not found: {path}")
        tok = None
        fmt = _safetensors_format(path) if path.suffix == ".safetensors" else None
        if fmt == _VQ_FORMAT:
            tok = VQTokenizer.load(path)
        elif path.suffix == ".safetensors" and fmt != _KL_FORMAT and isinstance(config, VQConfig):
            raise ValueError(f"{str(path)!r} is not a VQ tokenizer file (format {fmt!r}, expected {_VQ_FORMAT!r}); "
                             "VQ tokenizers are read only from files written by VQTokenizer.save")
        elif path.suffix == ".safetensors":
            try:
                tok = KLTokenizer.load(path)
            except ValueError as e:
                if "no KLTokenizer config" not in str(e):
                    raise
        if tok is None:
            if isinstance(config, VQConfig):
                raise ValueError(f"{str(path)!r} is not a VQ tokenizer file; VQ tokenizers are read only from "
                                 ".safetensors files written by VQTokenizer.save (LDM checkpoints are KL-VAEs: "
                                 "use a KL preset)")
            tok = KLTokenizer.from_ldm_checkpoint(path, config)
    if scaling_factor is not None:
        tok.config = dataclasses.replace(tok.config, scaling_factor=scaling_factor)
    if continuous:
        if not isinstance(tok, VQTokenizer):
            raise ValueError("continuous=True is for VQ tokenizers (their continuous view); this KL tokenizer is "
                             "already continuous: drop continuous=True")
        return tok.as_continuous()
    return tok
