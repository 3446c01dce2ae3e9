"""KL-VAE tokenizer: images <-> continuous latent tokens, on diffusers' ``AutoencoderKL``.

Glossary: B batch, H/W image height/width, h/w latent height/width (= H/stride, W/stride),
C latent channels (token dim before patchify), stride = 2**(num_levels - 1).

tokens = posterior_sample * scaling_factor      posterior = N(mean, exp(logvar)), logvar clamped [-30, 20]
images = vae.decode(tokens / scaling_factor)    in [-1, 1]

The scaling factor is 1/std of the unscaled latents over the training data (no mean shift); it belongs
to the tokenizer (its config), and a new tokenizer gets its own via ``compute_scaling_factor``.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL
from torch import nn

from .convert import convert_ldm_vae_state_dict, read_state_dict_file, read_tokenizer_metadata

# 1/std of KL-16 latents over ImageNet train (MAR reference); the only place this number lives.
KL16_SCALING_FACTOR = 0.2325
LOGVAR_RANGE = (-30.0, 20.0)  # clamp of diffusers' DiagonalGaussianDistribution
_SAVE_FORMAT = "mar-kl-vae-v1"


class ConvAutoencoderLayout:
    """What the KL-VAE and VQ configs share (methods only; each dataclass has the fields ``block_out_channels``
    and ``encoder_attention``): the stride, diffusers' block types, plain-data conversion, the image-size check."""

    @property
    def stride(self) -> int:
        """Image pixels per token along each axis (one 2x downsample between levels)."""
        return 2 ** (len(self.block_out_channels) - 1)

    @property
    def down_block_types(self) -> tuple[str, ...]:
        last = "AttnDownEncoderBlock2D" if self.encoder_attention else "DownEncoderBlock2D"
        return ("DownEncoderBlock2D",) * (len(self.block_out_channels) - 1) + (last,)

    @property
    def up_block_types(self) -> tuple[str, ...]:
        return ("UpDecoderBlock2D",) * len(self.block_out_channels)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]):
        """Build from plain data; unknown keys raise with the list of valid ones."""
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(values) - set(valid))
        if unknown:
            raise ValueError(f"unknown {cls.__name__} keys {unknown}; valid keys: {valid}")
        return cls(**values)

    def check_image_size(self, height: int, width: int) -> None:
        if height % self.stride or width % self.stride:
            raise ValueError(
                f"image size {height}x{width} is not divisible by the tokenizer stride {self.stride}; "
                f"resize/crop images to a multiple of {self.stride}."
            )


@dataclass(frozen=True)
class KLVAEConfig(ConvAutoencoderLayout):
    """Architecture of an LDM-style KL-VAE (defaults: KL-16 widths; scaling_factor 1.0 = uncalibrated)."""

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (128, 128, 256, 256, 512)  # one width per level
    layers_per_block: int = 2  # res blocks per encoder level (decoder levels get one more)
    latent_channels: int = 16  # C
    norm_num_groups: int = 32  # GroupNorm groups (eps 1e-6 in diffusers' VAE)
    encoder_attention: bool = True  # attention after each res block of the lowest encoder level
    mid_block_add_attention: bool = True  # attention in encoder and decoder mid blocks
    scaling_factor: float = 1.0  # tokens = latents * scaling_factor

    def __post_init__(self) -> None:
        object.__setattr__(self, "block_out_channels", tuple(self.block_out_channels))  # YAML lists
        widths = self.block_out_channels
        if not widths or not all(isinstance(c, int) and c > 0 for c in widths):
            raise ValueError(f"block_out_channels must be a non-empty tuple of positive ints, got {widths}")
        for name in ("in_channels", "out_channels", "layers_per_block", "latent_channels", "norm_num_groups"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        bad = [c for c in widths if c % self.norm_num_groups]
        if bad:
            raise ValueError(
                f"every width in block_out_channels={widths} must be divisible by norm_num_groups="
                f"{self.norm_num_groups} (GroupNorm); {bad} are not. Change the widths or the group count."
            )
        if not (isinstance(self.scaling_factor, (int, float)) and math.isfinite(self.scaling_factor)
                and self.scaling_factor > 0):
            raise ValueError(f"scaling_factor must be a finite number > 0, got {self.scaling_factor!r}")


KL_VAE_PRESETS: dict[str, KLVAEConfig] = {
    # The MAR release's KL-16 (LDM ch 128, ch_mult 1,1,2,2,4): 256x256x3 -> 16x16x16, 66,456,019 params.
    "kl16": KLVAEConfig(scaling_factor=KL16_SCALING_FACTOR),
    # Small tokenizers for 32x32 images (train your own; calibrate scaling_factor with compute_scaling_factor).
    "kl_f4_c4": KLVAEConfig(block_out_channels=(32, 64, 64), latent_channels=4, norm_num_groups=16),  # 8x8x4
    "kl_f8_c4": KLVAEConfig(block_out_channels=(32, 64, 64, 128), latent_channels=4, norm_num_groups=16),  # 4x4x4
    "kl_f4_c8": KLVAEConfig(block_out_channels=(32, 64, 64), latent_channels=8, norm_num_groups=16),  # 8x8x8
    # kl_f4_c8 sized for 32x32: one res block per level (the decoder two) and no attention (at 8x8 the convs'
    # receptive field covers the image); 0.93 M parameters instead of 1.33 M, 1.6x faster per training step
    "kl_f4_c8_lean": KLVAEConfig(block_out_channels=(32, 64, 64), latent_channels=8, norm_num_groups=16,
                                 layers_per_block=1, encoder_attention=False, mid_block_add_attention=False),
}
# kl_f4_c8_lean at half the width, for the 20-minute main job on a CPU: 0.24 M parameters, about 3x faster per
# training step, so about 3x more steps fit the same minutes
KL_VAE_PRESETS["kl_f4_c8_tiny"] = dataclasses.replace(KL_VAE_PRESETS["kl_f4_c8_lean"],
                                                      block_out_channels=(16, 32, 32), norm_num_groups=8)


def kl_vae_preset(name: str, **overrides: Any) -> KLVAEConfig:
    """The named preset config, optionally with fields replaced (e.g. scaling_factor=0.5)."""
    if name not in KL_VAE_PRESETS:
        raise ValueError(f"unknown KL-VAE preset {name!r}; valid presets: {sorted(KL_VAE_PRESETS)}")
    return dataclasses.replace(KL_VAE_PRESETS[name], **overrides)


def build_autoencoder(config: KLVAEConfig) -> AutoencoderKL:
    """The diffusers AutoencoderKL with the config's architecture (created on the current default device)."""
    return AutoencoderKL(
        in_channels=config.in_channels,
        out_channels=config.out_channels,
        down_block_types=config.down_block_types,
        up_block_types=config.up_block_types,
        block_out_channels=config.block_out_channels,
        layers_per_block=config.layers_per_block,
        latent_channels=config.latent_channels,
        norm_num_groups=config.norm_num_groups,
        mid_block_add_attention=config.mid_block_add_attention,
        scaling_factor=config.scaling_factor,  # informational only; this class applies the factor itself
    )


def compute_scaling_factor(latent_samples: torch.Tensor) -> float:
    """1 / std of unscaled latents (all elements, unbiased std, no mean shift applied to the tokens)."""
    if latent_samples.numel() < 2:
        raise ValueError("compute_scaling_factor needs at least 2 latent values; pass a batch of latents")
    std = latent_samples.detach().double().std().item()
    if not math.isfinite(std) or std <= 0:
        raise ValueError(f"latent std is {std}; the latents are constant or not finite, cannot compute a scale")
    return 1.0 / std


class KLTokenizer(nn.Module):
    """Images (B, in, H, W) in [-1, 1] <-> scaled latent tokens (B, C, H/stride, W/stride)."""

    def __init__(self, config: KLVAEConfig | str = "kl16") -> None:
        super().__init__()
        self.config = kl_vae_preset(config) if isinstance(config, str) else config
        self.vae = build_autoencoder(self.config)

    @property
    def scaling_factor(self) -> float:
        return self.config.scaling_factor

    @property
    def stride(self) -> int:
        return self.config.stride

    @property
    def latent_channels(self) -> int:
        return self.config.latent_channels

    kind = "continuous"  # the tokenizers.base.Tokenizer interface

    @property
    def token_channels(self) -> int:
        return self.config.latent_channels

    @property
    def in_channels(self) -> int:
        return self.config.in_channels

    def token_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """(C, h, w) of the tokens of an image of height x width pixels (sides must be multiples of the stride)."""
        self.config.check_image_size(height, width)
        return self.latent_channels, height // self.stride, width // self.stride

    # ---- encoding -------------------------------------------------------------------------------
    def encode_moments(self, images: torch.Tensor) -> torch.Tensor:
        """(B, in, H, W) in [-1, 1] -> (B, 2C, h, w) = mean || logvar (logvar clamped to [-30, 20])."""
        if images.ndim != 4 or images.shape[1] != self.config.in_channels:
            raise ValueError(
                f"expected images of shape (B, {self.config.in_channels}, H, W), got {tuple(images.shape)}"
            )
        self.config.check_image_size(images.shape[2], images.shape[3])
        posterior = self.vae.encode(images).latent_dist
        return torch.cat([posterior.mean, posterior.logvar], dim=1)

    def sample_from_moments(
        self, moments: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """(B, 2C, h, w) moments -> scaled tokens (B, C, h, w) = (mean + exp(logvar/2) * noise) * scale."""
        if moments.ndim != 4 or moments.shape[1] != 2 * self.latent_channels:
            raise ValueError(
                f"expected moments of shape (B, {2 * self.latent_channels}, h, w), got {tuple(moments.shape)}"
            )
        mean, logvar = moments.chunk(2, dim=1)
        std = torch.exp(0.5 * logvar.clamp(*LOGVAR_RANGE))
        noise_device = generator.device if generator is not None else mean.device
        noise = torch.randn(mean.shape, generator=generator, device=noise_device, dtype=mean.dtype)
        return (mean + std * noise.to(mean.device)) * self.scaling_factor

    def encode(
        self, images: torch.Tensor, generator: torch.Generator | None = None, sample: bool = True
    ) -> torch.Tensor:
        """(B, in, H, W) in [-1, 1] -> scaled tokens (B, C, h, w): posterior sample (or mean if not sample)."""
        moments = self.encode_moments(images)
        if sample:
            return self.sample_from_moments(moments, generator)
        return moments[:, : self.latent_channels].contiguous() * self.scaling_factor

    # ---- decoding -------------------------------------------------------------------------------
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """Scaled tokens (B, C, h, w) -> images (B, out, h*stride, w*stride), nominally in [-1, 1]."""
        if tokens.ndim != 4 or tokens.shape[1] != self.latent_channels:
            raise ValueError(
                f"expected tokens of shape (B, {self.latent_channels}, h, w), got {tuple(tokens.shape)}"
            )
        return self.vae.decode(tokens / self.scaling_factor).sample

    @staticmethod
    def to_uint8(images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) in [-1, 1] -> uint8 (B, H, W, C) = round(clip((x + 1) / 2 * 255, 0, 255))."""
        pixels = ((images.float() + 1.0) / 2.0 * 255.0).clamp(0.0, 255.0).round()
        return pixels.to(torch.uint8).permute(0, 2, 3, 1)

    # ---- loading / saving -----------------------------------------------------------------------
    @classmethod
    def _from_vae_state_dict(cls, config: KLVAEConfig, state_dict: dict[str, torch.Tensor]) -> KLTokenizer:
        """Build without random init (meta device), take the given tensors (strict); in eval mode."""
        with torch.device("meta"):
            tokenizer = cls(config)
        tokenizer.vae.load_state_dict(state_dict, strict=True, assign=True)
        return tokenizer.eval()

    @classmethod
    def from_ldm_state_dict(
        cls, state_dict: dict[str, torch.Tensor], config: KLVAEConfig | str = "kl16"
    ) -> KLTokenizer:
        """A tokenizer holding an LDM-format VAE state dict, converted strictly (see convert.py)."""
        config = kl_vae_preset(config) if isinstance(config, str) else config
        with torch.device("meta"):
            target = build_autoencoder(config)
        return cls._from_vae_state_dict(config, convert_ldm_vae_state_dict(state_dict, target))

    @classmethod
    def from_ldm_checkpoint(cls, path: str | Path, config: KLVAEConfig | str = "kl16") -> KLTokenizer:
        """Load an LDM-format checkpoint: ``torch.load(path)["model"]`` (kl16.ckpt), a bare state dict,
        or a .safetensors file. Every key must map one-to-one onto the config's architecture."""
        return cls.from_ldm_state_dict(read_state_dict_file(path), config)

    def save(self, path: str | Path) -> None:
        """Write the VAE weights as safetensors with the config (incl. scaling_factor) in its metadata."""
        from safetensors.torch import save_file

        tensors = {k: v.detach().cpu().contiguous() for k, v in self.vae.state_dict().items()}
        metadata = {"format": _SAVE_FORMAT, "config": json.dumps(self.config.to_dict())}
        save_file(tensors, str(path), metadata=metadata)

    @classmethod
    def load(cls, path: str | Path) -> KLTokenizer:
        """Read a file written by ``save`` (on CPU)."""
        from safetensors.torch import load_file

        path = Path(path)
        metadata = read_tokenizer_metadata(path, "KLTokenizer")
        if metadata.get("format") != _SAVE_FORMAT or "config" not in metadata:
            raise ValueError(
                f"{str(path)!r} has no KLTokenizer config in its metadata; for LDM-format VAE checkpoints "
                "use KLTokenizer.from_ldm_checkpoint(path, config)."
            )
        config = KLVAEConfig.from_dict(json.loads(metadata["config"]))
        return cls._from_vae_state_dict(config, load_file(str(path), device="cpu"))
