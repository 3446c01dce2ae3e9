"""The tokenizer interface: images to tokens and back, and how to open a tokenizer file.

Glossary: B batch, C_img image channels, H/W pixels, C token channels, h/w = H/stride, W/stride, K codebook size.

A tokenizer is an ``nn.Module`` with

    kind            "continuous" (tokens are real vectors, e.g. the KL-VAE), "discrete" (code indices, the VQ) or
                    "multiscale" (codes of VAR's scale pyramid, (B, L) int64; no scaling factor)
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

``open_tokenizer`` reads a project tokenizer file (``.safetensors`` with its config: KL-VAE, VQ or multi-scale VQ,
told apart by the format in its metadata), an LDM-format VAE checkpoint (the MAR release's ``kl16.ckpt``) with a
named KL preset's architecture, or the published VAR VQVAE (``vae_ch160v4096z32.pth``) with a multi-scale preset;
``continuous=True`` gives a VQ tokenizer's continuous view (MAR Table 2).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Protocol

import torch

from .convert import read_state_dict_file
from .kl_vae import _SAVE_FORMAT as _KL_FORMAT
from .kl_vae import KL_VAE_PRESETS, KLTokenizer, KLVAEConfig, kl_vae_preset
from .multiscale import _SAVE_FORMAT as _MS_FORMAT
from .multiscale import MULTISCALE_PRESETS, MultiScaleVQConfig, MultiScaleVQVAE, multiscale_preset
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


def _is_multiscale(preset) -> bool:
    return isinstance(preset, MultiScaleVQConfig) or (isinstance(preset, str) and preset in MULTISCALE_PRESETS)


def tokenizer_kind(preset: str | KLVAEConfig | VQConfig | MultiScaleVQConfig, continuous: bool = False) -> str:
    """"discrete", "continuous" or "multiscale": what ``open_tokenizer(preset=preset, continuous=continuous)`` gives
    (a KL preset is continuous and takes no ``continuous=True``; a VQ preset is discrete, or continuous with its
    view; a multi-scale preset (VAR / HART) gives codes of several scales and has no continuous view)."""
    if isinstance(preset, VQConfig) or (isinstance(preset, str) and preset in VQ_PRESETS):
        return "continuous" if continuous else "discrete"
    if isinstance(preset, KLVAEConfig) or (isinstance(preset, str) and preset in KL_VAE_PRESETS):
        if continuous:
            raise ValueError(f"the KL tokenizer {preset!r} is already continuous; continuous=True is only for VQ "
                             f"presets {sorted(VQ_PRESETS)}")
        return "continuous"
    if _is_multiscale(preset):
        if continuous:
            raise ValueError(_MS_CONTINUOUS.format(preset=preset))
        return "multiscale"
    raise ValueError(f"unknown tokenizer preset {preset!r}; valid presets: KL {sorted(KL_VAE_PRESETS)}, "
                     f"VQ {sorted(VQ_PRESETS)}, multi-scale {sorted(MULTISCALE_PRESETS)}")


_MS_CONTINUOUS = ("the multi-scale tokenizer {preset!r} has no continuous view (continuous=True is only for VQ "
                  "presets): drop continuous=True; its continuous residual is MultiScaleVQVAE.encode_hybrid")
_MS_SCALING = ("multi-scale VQ tokenizers have no scaling factor (their tokens are codes; the codebook vectors are "
               "used as they are): drop scaling_factor (got {value!r})")


def _safetensors_format(path: Path) -> str | None:
    """The ``format`` entry of a safetensors file's metadata (None if there is none or the file is unreadable)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("format")
    except Exception:
        return None


def open_tokenizer(path: str | Path | None = None,
                   preset: str | KLVAEConfig | VQConfig | MultiScaleVQConfig = "kl16",
                   in_channels: int | None = None, scaling_factor: float | None = None, continuous: bool = False
                   ) -> KLTokenizer | VQTokenizer | VQContinuousTokens | MultiScaleVQVAE:
    """A tokenizer from a file, or a fresh (untrained) one of ``preset`` when ``path`` is None.

    ``.safetensors`` written by ``KLTokenizer.save``, ``VQTokenizer.save`` or ``MultiScaleVQVAE.save`` carry their
    own config and are recognised by their metadata whatever the preset (a KL or VQ file with a multi-scale preset
    is refused: the preset says a multi-scale model is wanted); any other file is read as an LDM-format VAE with the
    architecture of ``preset`` (a KL name, with ``in_channels`` for grey images, or a ``KLVAEConfig``), or, for a
    multi-scale preset (a ``MULTISCALE_PRESETS`` name or a ``MultiScaleVQConfig``), as the published VAR VQVAE
    state dict (``MultiScaleVQVAE.from_var_checkpoint``). A preset name starting with "vq" (or a ``VQConfig``) makes
    a fresh tokenizer a VQ one. ``scaling_factor`` replaces the tokenizer's own factor (a multi-scale tokenizer has
    none and raises). ``continuous=True`` returns a VQ tokenizer's continuous view (``VQTokenizer.as_continuous``);
    a KL tokenizer is already continuous and a multi-scale one has no such view: both raise.
    """
    overrides = {"in_channels": in_channels, "out_channels": in_channels} if in_channels else {}
    if isinstance(preset, (KLVAEConfig, VQConfig, MultiScaleVQConfig)):
        config = preset
    elif _is_multiscale(preset):
        config = multiscale_preset(preset, **overrides)
    elif _is_vq_preset(preset):
        config = vq_preset(preset, **overrides)
    else:
        config = kl_vae_preset(preset, **overrides)
    if isinstance(config, MultiScaleVQConfig):  # refused before any file is read
        _check_multiscale_options(preset, scaling_factor, continuous)
    if path is None:
        kinds = {VQConfig: VQTokenizer, MultiScaleVQConfig: MultiScaleVQVAE}
        tok = kinds.get(type(config), KLTokenizer)(config)
    else:
        tok = _open_file(Path(path), config)
    if isinstance(tok, MultiScaleVQVAE):  # a multi-scale file opened with another preset
        _check_multiscale_options(preset, scaling_factor, continuous)
        return tok
    if scaling_factor is not None:
        tok.config = dataclasses.replace(tok.config, scaling_factor=scaling_factor)
    if continuous:
        if not isinstance(tok, VQTokenizer):
            raise ValueError("continuous=True is for VQ tokenizers (their continuous view); this KL tokenizer is "
                             "already continuous: drop continuous=True")
        return tok.as_continuous()
    return tok


def _check_multiscale_options(preset, scaling_factor: float | None, continuous: bool) -> None:
    if scaling_factor is not None:
        raise ValueError(_MS_SCALING.format(value=scaling_factor))
    if continuous:
        raise ValueError(_MS_CONTINUOUS.format(preset=preset))


def _open_file(path: Path, config: KLVAEConfig | VQConfig | MultiScaleVQConfig
               ) -> KLTokenizer | VQTokenizer | MultiScaleVQVAE:
    """The tokenizer in ``path``: a project .safetensors by its format, else a checkpoint read with ``config``."""
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer not found: {path}")
    fmt = _safetensors_format(path) if path.suffix == ".safetensors" else None
    if fmt == _MS_FORMAT:
        return MultiScaleVQVAE.load(path)
    if fmt == _VQ_FORMAT and not isinstance(config, MultiScaleVQConfig):
        return VQTokenizer.load(path)
    if isinstance(config, MultiScaleVQConfig):
        if fmt in (_KL_FORMAT, _VQ_FORMAT):
            what = "a KL-VAE" if fmt == _KL_FORMAT else "a VQ"
            raise ValueError(f"{str(path)!r} is {what} tokenizer file (format {fmt!r}), but a multi-scale preset was "
                             f"named: pass a multi-scale tokenizer file ({_MS_FORMAT!r} .safetensors or the published "
                             "vae_ch160v4096z32.pth), or a KL / VQ preset for this file")
        return MultiScaleVQVAE.from_var_checkpoint(path, config)
    if path.suffix == ".safetensors" and fmt != _KL_FORMAT and isinstance(config, VQConfig):
        raise ValueError(f"{str(path)!r} is not a VQ tokenizer file (format {fmt!r}, expected {_VQ_FORMAT!r}); "
                         "VQ tokenizers are read only from files written by VQTokenizer.save")
    if path.suffix == ".safetensors":
        try:
            return KLTokenizer.load(path)
        except ValueError as e:
            if "no KLTokenizer config" not in str(e):
                raise
    if isinstance(config, VQConfig):
        raise ValueError(f"{str(path)!r} is not a VQ tokenizer file; VQ tokenizers are read only from "
                         ".safetensors files written by VQTokenizer.save (LDM checkpoints are KL-VAEs: "
                         "use a KL preset; the VAR VQVAE .pth: a multi-scale preset)")
    state = read_state_dict_file(path)
    if "quantize.embedding.weight" in state:
        raise ValueError(f"{str(path)!r} is a multi-scale VQVAE checkpoint (VAR's vae_ch160v4096z32.pth layout: it "
                         "has quantize.embedding.weight), not a KL-VAE: open it with a multi-scale preset "
                         f"{sorted(MULTISCALE_PRESETS)} or MultiScaleVQVAE.from_var_checkpoint")
    return KLTokenizer.from_ldm_state_dict(state, config)
