"""VQ tokenizer (VQGAN-style): images <-> discrete codes, on diffusers' ``VQModel``; and its training objective.

Glossary: B batch, H/W image height/width, h/w code grid (= H/stride, W/stride), C code vector dimension
(latent_channels), K codebook size, e_k the k-th codebook vector (row k of ``vq.quantize.embedding``),
z the encoder output after quant_conv (the pre-quantization latent), sg stop-gradient, N = B*h*w positions.

    z        = quant_conv(encoder(x))                       (B, C, h, w), unscaled
    code     = argmin_k |z - e_k|^2                          per position; ties -> the lowest k
    z_q      = z + sg(e_code - z)                            straight-through: forward e_code, d z_q / d z = I
    x_hat    = decoder(post_quant_conv(z_q))                 in [-1, 1]
    codebook   = mean (sg[z] - e_code)^2                      moves the codebook only
    commitment = mean (z - sg[e_code])^2                      moves the encoder only
    loss     = recon + codebook + beta * commitment          recon: mean |x - x_hat| (l1) or (x - x_hat)^2 (l2)

VQ-VAE: van den Oord et al. 2017, "Neural Discrete Representation Learning", Eq. 3 (the loss above, beta 0.25).
VQGAN: Esser et al. 2021, "Taming Transformers", Sec. 3 (the same quantizer in a convolutional autoencoder; its
perceptual and adversarial terms are not used here, as for the KL-VAE objective in ``training.py``).
diffusers' ``VectorQuantizer`` defaults to ``legacy=True``, which swaps beta between the two terms; this module
never calls it and does the lookup and the losses itself (only its ``embedding`` is used, as the codebook).

Dead-code restart (e.g. Dhariwal et al. 2020, Jukebox, Sec. 3 "random restarts"; Zeghidour et al. 2021,
SoundStream, Sec. 3.3): a code that no position of the batch used for ``dead_after_steps`` consecutive optimizer
steps is replaced by an encoder output z of the current batch, chosen with the training generator.

Continuous view (MAR paper, Li et al. 2024, Table 2, "VQ tokenizer with Diffusion Loss"): ``as_continuous`` gives
tokens = z * scaling_factor (the pre-quantization latent); their decoder quantizes first, since the VQ decoder was
only ever trained on codebook vectors.

Initialisation: the network is built on the meta device (diffusers would otherwise draw from the global RNG) and
every parameter is then drawn from one ``torch.Generator``: convolutions and linear layers with PyTorch's default
(kaiming-uniform, a = sqrt(5): U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight and bias), GroupNorm weight 1 and
bias 0, the codebook U(-1/K, 1/K) (as taming-transformers and diffusers). Without a generator, one seeded with
``torch.initial_seed()`` is used: the global seed (``torch.manual_seed``, as TokenizerTask sets) decides the
weights and the global RNG state is never advanced.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from diffusers import VQModel
from torch import nn

from .convert import read_tokenizer_metadata
from .kl_vae import ConvAutoencoderLayout, KLTokenizer
from .training import check_reconstructs, codebook_param_groups

_SAVE_FORMAT = "mar-vq-v1"
_KL_SAVE_FORMAT = "mar-kl-vae-v1"  # kl_vae._SAVE_FORMAT, named in the error for a KL file


def _check_positive_int(name: str, value: Any, low: int = 1) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")


@dataclass(frozen=True)
class VQConfig(ConvAutoencoderLayout):
    """Architecture of a VQGAN-style tokenizer (defaults: the KL-16 widths, 16x16 codes at 256 px, 1024 codes).

    The encoder/decoder are the KL-VAE's (same block types, so the same stride for the same widths); the encoder
    emits C = latent_channels values per position (no posterior variance) and the codebook holds K x C vectors.
    """

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (128, 128, 256, 256, 512)  # one width per level
    layers_per_block: int = 2  # res blocks per encoder level (decoder levels get one more)
    latent_channels: int = 16  # C, the code vector dimension
    codebook_size: int = 1024  # K
    norm_num_groups: int = 32  # GroupNorm groups
    encoder_attention: bool = True  # attention after each res block of the lowest encoder level
    mid_block_add_attention: bool = True  # attention in encoder and decoder mid blocks
    beta: float = 0.25  # commitment weight (VQ-VAE Eq. 3)
    scaling_factor: float = 1.0  # only for the continuous view: tokens = z * scaling_factor

    def __post_init__(self) -> None:
        object.__setattr__(self, "block_out_channels", tuple(self.block_out_channels))  # YAML lists
        widths = self.block_out_channels
        if not widths or not all(isinstance(c, int) and not isinstance(c, bool) and c > 0 for c in widths):
            raise ValueError(f"block_out_channels must be a non-empty tuple of positive ints, got {widths}")
        for name in ("in_channels", "out_channels", "layers_per_block", "latent_channels", "norm_num_groups"):
            _check_positive_int(name, getattr(self, name))
        _check_positive_int("codebook_size", self.codebook_size, low=2)
        bad = [c for c in widths if c % self.norm_num_groups]
        if bad:
            raise ValueError(
                f"every width in block_out_channels={widths} must be divisible by norm_num_groups="
                f"{self.norm_num_groups} (GroupNorm); {bad} are not. Change the widths or the group count."
            )
        for name in ("encoder_attention", "mid_block_add_attention"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if not (isinstance(self.beta, (int, float)) and not isinstance(self.beta, bool)
                and math.isfinite(self.beta) and self.beta >= 0):
            raise ValueError(f"beta (the commitment weight) must be a finite number >= 0, got {self.beta!r}")
        if not (isinstance(self.scaling_factor, (int, float)) and math.isfinite(self.scaling_factor)
                and self.scaling_factor > 0):
            raise ValueError(f"scaling_factor must be a finite number > 0, got {self.scaling_factor!r}")


VQ_PRESETS: dict[str, VQConfig] = {
    # KL-16 widths (LDM ch 128, ch_mult 1,1,2,2,4): 256x256x3 -> 16x16 codes of 16 dims, 1024 codes.
    "vq16": VQConfig(),
    # The widths and stride 4 of the KL preset kl_f4_c8: 32x32 (Fashion-MNIST, in_channels=1) -> 8x8 codes.
    "vq_f4_c8_k512": VQConfig(block_out_channels=(32, 64, 64), latent_channels=8, norm_num_groups=16,
                              codebook_size=512),
    "vq_f4_c8_k256": VQConfig(block_out_channels=(32, 64, 64), latent_channels=8, norm_num_groups=16,
                              codebook_size=256),
}


def vq_preset(name: str, **overrides: Any) -> VQConfig:
    """The named preset config, optionally with fields replaced (e.g. in_channels=1, codebook_size=128)."""
    if name not in VQ_PRESETS:
        raise ValueError(f"unknown VQ preset {name!r}; valid presets: {sorted(VQ_PRESETS)}")
    return dataclasses.replace(VQ_PRESETS[name], **overrides)


def build_vq_model(config: VQConfig) -> VQModel:
    """The diffusers VQModel with the config's architecture (on the current default device; diffusers initialises
    it from the global RNG, so ``VQTokenizer`` builds it on the meta device and draws the weights itself)."""
    return VQModel(
        in_channels=config.in_channels,
        out_channels=config.out_channels,
        down_block_types=config.down_block_types,
        up_block_types=config.up_block_types,
        block_out_channels=config.block_out_channels,
        layers_per_block=config.layers_per_block,
        latent_channels=config.latent_channels,
        num_vq_embeddings=config.codebook_size,
        vq_embed_dim=config.latent_channels,
        norm_num_groups=config.norm_num_groups,
        mid_block_add_attention=config.mid_block_add_attention,
        scaling_factor=config.scaling_factor,  # informational only
    )


def _uniform_(param: torch.Tensor, bound: float, generator: torch.Generator) -> None:
    """param <- U(-bound, bound), drawn on the generator's device and copied over."""
    values = torch.empty(param.shape, dtype=param.dtype, device=generator.device)
    param.copy_(values.uniform_(-bound, bound, generator=generator))


@torch.no_grad()
def _init_parameters(model: nn.Module, generator: torch.Generator) -> None:
    """Every parameter from ``generator`` (the rules in the module docstring); unknown layers raise."""
    seen: set[int] = set()
    for module in model.modules():
        own = list(module.parameters(recurse=False))
        if not own:
            continue
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            bound = 1.0 / math.sqrt(module.weight[0].numel())  # fan_in = in_channels / groups * kernel area
            _uniform_(module.weight, bound, generator)
            if module.bias is not None:
                _uniform_(module.bias, bound, generator)
        elif isinstance(module, nn.GroupNorm):
            module.weight.fill_(1.0)
            module.bias.fill_(0.0)
        elif isinstance(module, nn.Embedding):
            _uniform_(module.weight, 1.0 / module.num_embeddings, generator)
        else:
            raise TypeError(f"no initialisation rule for {type(module).__name__}; add one to _init_parameters")
        seen.update(id(p) for p in own)
    missed = [n for n, p in model.named_parameters() if id(p) not in seen]
    if missed:
        raise TypeError(f"parameters left uninitialised: {missed}")


def codebook_statistics(codes: torch.Tensor, codebook_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(usage, perplexity) of a batch of codes: usage = #distinct codes / K; perplexity = exp(-sum_k p_k log p_k)
    with p the batch's code histogram / N (0 log 0 = 0), between 1 (one code) and K (uniform use)."""
    counts = torch.bincount(codes.reshape(-1), minlength=codebook_size).float()
    p = counts / counts.sum().clamp_min(1.0)
    entropy = -(p * torch.log(p.clamp_min(1e-30))).sum()  # p = 0 terms vanish
    return (counts > 0).float().mean(), torch.exp(entropy)


class VQTokenizer(nn.Module):
    """Images (B, in, H, W) in [-1, 1] <-> codes (B, H/stride, W/stride) int64 in [0, codebook_size)."""

    kind = "discrete"  # the tokenizers.base.Tokenizer interface
    to_uint8 = staticmethod(KLTokenizer.to_uint8)  # (B, C, H, W) in [-1, 1] -> uint8 (B, H, W, C)

    def __init__(self, config: VQConfig | str = "vq16", generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.config = vq_preset(config) if isinstance(config, str) else config
        device = torch.get_default_device()
        with torch.device("meta"):
            self.vq = build_vq_model(self.config)
        if device.type != "meta":  # under torch.device("meta") (``load``) the weights come from a file
            self.vq.to_empty(device=device)
            if generator is None:
                generator = torch.Generator().manual_seed(torch.initial_seed())
            _init_parameters(self.vq, generator)

    # ---- the interface --------------------------------------------------------------------------
    @property
    def codebook(self) -> torch.Tensor:
        """(K, C) codebook vectors (the parameter itself)."""
        return self.vq.quantize.embedding.weight

    @property
    def scaling_factor(self) -> float:
        return self.config.scaling_factor

    @property
    def stride(self) -> int:
        return self.config.stride

    @property
    def codebook_size(self) -> int:
        return self.config.codebook_size

    @property
    def token_channels(self) -> int:
        return self.config.codebook_size

    @property
    def latent_channels(self) -> int:
        return self.config.latent_channels

    @property
    def in_channels(self) -> int:
        return self.config.in_channels

    def token_shape(self, height: int, width: int) -> tuple[int, int]:
        """(h, w) of the codes of an image of height x width pixels (sides must be multiples of the stride)."""
        self.config.check_image_size(height, width)
        return height // self.stride, width // self.stride

    def _check_latent(self, z: torch.Tensor, what: str = "latents") -> None:
        if z.ndim != 4 or z.shape[1] != self.latent_channels:
            raise ValueError(f"expected {what} of shape (B, {self.latent_channels}, h, w), got {tuple(z.shape)}")

    # ---- encoding -------------------------------------------------------------------------------
    def encode_latent(self, images: torch.Tensor) -> torch.Tensor:
        """(B, in, H, W) in [-1, 1] -> pre-quantization latent z (B, C, h, w), unscaled."""
        if images.ndim != 4 or images.shape[1] != self.config.in_channels:
            raise ValueError(
                f"expected images of shape (B, {self.config.in_channels}, H, W), got {tuple(images.shape)}"
            )
        self.config.check_image_size(images.shape[2], images.shape[3])
        return self.vq.quant_conv(self.vq.encoder(images))

    @torch.no_grad()
    def lookup(self, z: torch.Tensor) -> torch.Tensor:
        """z (B, C, h, w) -> codes (B, h, w) int64: argmin_k |z - e_k|^2, ties -> the lowest index.

        Computed in float32 as argmin_k (|e_k|^2 - 2 z.e_k) (the |z|^2 term is the same for every k); torch.argmin
        returns the first of equal minima."""
        self._check_latent(z)
        b, c, h, w = z.shape
        z_flat = z.detach().permute(0, 2, 3, 1).reshape(-1, c).float()
        e = self.codebook.detach().float()
        dist = e.square().sum(1)[None, :] - 2.0 * (z_flat @ e.t())  # (N, K)
        return dist.argmin(dim=1).reshape(b, h, w)

    def quantize(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """z (B, C, h, w) -> (z_q, codes (B, h, w), {"codebook", "commitment"}) with the VQ-VAE terms (Eq. 3).

        z_q = sg(e) + (z - sg(z)): the same as z + sg(e - z) (forward e, gradient identity to z), written so that
        its values are exactly the codebook vectors. The codebook gets gradient only from the codebook term."""
        codes = self.lookup(z)
        e = self.codes_to_latent(codes)  # graph to the codebook
        losses = {
            "codebook": (z.detach() - e).square().mean(),  # mean (sg[z] - e)^2
            "commitment": (z - e.detach()).square().mean(),  # mean (z - sg[e])^2
        }
        z_q = e.detach().to(z.dtype) + (z - z.detach())
        return z_q, codes, losses

    def encode(
        self, images: torch.Tensor, generator: torch.Generator | None = None, sample: bool = True
    ) -> torch.Tensor:
        """(B, in, H, W) in [-1, 1] -> codes (B, h, w) int64. Deterministic: generator and sample are ignored."""
        return self.lookup(self.encode_latent(images))

    def encode_moments(self, images: torch.Tensor) -> torch.Tensor:
        """What a latent cache stores: the latent z (B, C, h, w) (``sample_from_moments`` turns it into codes)."""
        return self.encode_latent(images)

    def sample_from_moments(self, moments: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Cached latent z (B, C, h, w) -> codes (B, h, w) (``lookup``; nothing random)."""
        return self.lookup(moments)

    # ---- decoding -------------------------------------------------------------------------------
    def codes_to_latent(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (B, h, w) integer in [0, K) -> codebook vectors (B, C, h, w)."""
        if codes.ndim != 3 or codes.dtype.is_floating_point or codes.dtype.is_complex or codes.dtype == torch.bool:
            raise ValueError(f"expected integer codes of shape (B, h, w), got {tuple(codes.shape)} {codes.dtype}")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.codebook_size):
            raise ValueError(f"codes must lie in [0, {self.codebook_size}), got [{int(codes.min())}, "
                             f"{int(codes.max())}]")
        return F.embedding(codes.long(), self.codebook).permute(0, 3, 1, 2).contiguous()

    def decode_latent(self, z: torch.Tensor, quantize: bool = True) -> torch.Tensor:
        """Latent (B, C, h, w) -> images (B, out, h*stride, w*stride); quantized first unless ``quantize=False``."""
        self._check_latent(z)
        if quantize:
            z = self.codes_to_latent(self.lookup(z))
        return self.vq.decoder(self.vq.post_quant_conv(z))

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (B, h, w) -> images (B, out, h*stride, w*stride), nominally in [-1, 1]."""
        return self.decode_latent(self.codes_to_latent(codes), quantize=False)

    def as_continuous(self, scaling_factor: float | None = None) -> VQContinuousTokens:
        """A continuous-token view sharing these weights (tokens = z * scaling_factor; default the config's)."""
        return VQContinuousTokens(self, scaling_factor)

    # ---- loading / saving -----------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        """Write the VQModel weights as safetensors with the config in its metadata."""
        from safetensors.torch import save_file

        tensors = {k: v.detach().cpu().contiguous() for k, v in self.vq.state_dict().items()}
        metadata = {"format": _SAVE_FORMAT, "config": json.dumps(self.config.to_dict())}
        save_file(tensors, str(path), metadata=metadata)

    @classmethod
    def load(cls, path: str | Path) -> VQTokenizer:
        """Read a file written by ``save`` (on CPU, strict, in eval mode)."""
        from safetensors.torch import load_file

        path = Path(path)
        metadata = read_tokenizer_metadata(path, "VQTokenizer")
        fmt = metadata.get("format")
        if fmt == _KL_SAVE_FORMAT:
            raise ValueError(f"{str(path)!r} is a KL-VAE tokenizer ({fmt}), not a VQ one; open it with "
                             "KLTokenizer.load or tokenizers.open_tokenizer")
        if fmt != _SAVE_FORMAT or "config" not in metadata:
            raise ValueError(
                f"{str(path)!r} has no VQTokenizer config in its metadata (format {fmt!r}, expected "
                f"{_SAVE_FORMAT!r}); VQ tokenizers are read only from files written by VQTokenizer.save"
            )
        config = VQConfig.from_dict(json.loads(metadata["config"]))
        with torch.device("meta"):
            tokenizer = cls(config)
        tokenizer.vq.load_state_dict(load_file(str(path), device="cpu"), strict=True, assign=True)
        return tokenizer.eval()


class VQContinuousTokens(nn.Module):
    """A VQ tokenizer seen as a continuous one (MAR Table 2, "VQ tokenizer with Diffusion Loss").

    tokens = z * scaling_factor, z the pre-quantization latent (B, C, h, w); decode quantizes tokens / scaling_factor
    to the nearest codes before the decoder, because the VQ decoder was trained on codebook vectors only. The view
    shares the tokenizer's weights; it is chosen by the caller (``open_tokenizer(..., continuous=True)``), not
    stored in the tokenizer file.
    """

    kind = "continuous"
    to_uint8 = staticmethod(KLTokenizer.to_uint8)

    def __init__(self, tokenizer: VQTokenizer, scaling_factor: float | None = None) -> None:
        super().__init__()
        self.tokenizer = tokenizer
        scale = tokenizer.scaling_factor if scaling_factor is None else scaling_factor
        self._config = dataclasses.replace(tokenizer.config, scaling_factor=scale)  # checks the number

    @property
    def config(self) -> VQConfig:
        """The tokenizer's VQ config with this view's scaling factor."""
        return self._config

    @config.setter
    def config(self, value: VQConfig) -> None:
        self.tokenizer.config = value
        self._config = value

    @property
    def scaling_factor(self) -> float:
        return self._config.scaling_factor

    @property
    def stride(self) -> int:
        return self.tokenizer.stride

    @property
    def latent_channels(self) -> int:
        return self.tokenizer.latent_channels

    @property
    def token_channels(self) -> int:
        return self.tokenizer.latent_channels

    @property
    def in_channels(self) -> int:
        return self.tokenizer.in_channels

    def token_shape(self, height: int, width: int) -> tuple[int, int, int]:
        h, w = self.tokenizer.token_shape(height, width)
        return self.latent_channels, h, w

    def encode_moments(self, images: torch.Tensor) -> torch.Tensor:
        """The unscaled latent z (B, C, h, w)."""
        return self.tokenizer.encode_latent(images)

    def sample_from_moments(self, moments: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Cached latent z -> tokens z * scaling_factor (nothing random)."""
        self.tokenizer._check_latent(moments, "moments")
        return moments * self.scaling_factor

    def encode(
        self, images: torch.Tensor, generator: torch.Generator | None = None, sample: bool = True
    ) -> torch.Tensor:
        """(B, in, H, W) in [-1, 1] -> tokens z * scaling_factor (B, C, h, w); deterministic."""
        return self.tokenizer.encode_latent(images) * self.scaling_factor

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, C, h, w) -> images: decode_latent(tokens / scaling_factor, quantize=True)."""
        self.tokenizer._check_latent(tokens, "tokens")
        return self.tokenizer.decode_latent(tokens / self.scaling_factor, quantize=True)


# ---- training ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class VQTrainConfig:
    """VQ training settings (config section ``vq:``); the commitment weight beta is part of ``VQConfig``."""

    recon_loss: Literal["l1", "l2"] = "l1"
    restart_dead_codes: bool = True
    dead_after_steps: int = 20  # a code unused for this many consecutive optimizer steps is dead

    def __post_init__(self) -> None:
        if self.recon_loss not in ("l1", "l2"):
            raise ValueError(f"recon_loss must be 'l1' or 'l2', got {self.recon_loss!r}")
        if not isinstance(self.restart_dead_codes, bool):
            raise ValueError(f"restart_dead_codes must be true or false, got {self.restart_dead_codes!r}")
        _check_positive_int("dead_after_steps", self.dead_after_steps)


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


class VQObjective(nn.Module):
    """Holds the VQ tokenizer; ``forward`` returns (loss, logs) with loss = recon + codebook + beta * commitment.

    Dead-code restart rule: the buffer ``unused_steps`` (K,) counts, per code, the optimizer steps since a batch
    last used it. In a training forward (``module.training`` and grad enabled), after the lookup: if ``step``
    differs from the last step seen, every counter goes up by one (so micro-batches of one accumulated step count
    once); the counters of the codes used in this batch go to 0; codes whose counter reaches dead_after_steps are
    dead, and (with restart_dead_codes) each is replaced, under no_grad, by an encoder output z of the current
    batch drawn with the generator (distinct positions while the batch has enough), and its counter reset. Dead
    codes are unused in this batch, so this step's loss and gradients are those of the old codebook, and live codes
    are never changed. Under torch.distributed the "used" flags are all-reduced (MAX) before counting and the new
    vectors are broadcast from rank 0, so every rank's counters and codebook stay identical.
    """

    def __init__(self, tokenizer: VQTokenizer, config: VQTrainConfig | None = None) -> None:
        super().__init__()
        self.config = config or VQTrainConfig()
        cfg = tokenizer.config
        check_reconstructs(cfg)
        self.tokenizer = tokenizer
        device = tokenizer.codebook.device
        self.register_buffer("unused_steps", torch.zeros(cfg.codebook_size, dtype=torch.long, device=device))
        self.register_buffer("last_step", torch.full((), -1, dtype=torch.long, device=device))

    def _updates_codebook(self) -> bool:
        return self.training and torch.is_grad_enabled()

    @torch.no_grad()
    def count_usage(self, codes: torch.Tensor, step: int) -> None:
        """Advance the counters for ``step`` and zero those of the codes in ``codes`` (all ranks' codes)."""
        used = (torch.bincount(codes.reshape(-1), minlength=self.tokenizer.codebook_size) > 0).long()
        if _distributed():
            torch.distributed.all_reduce(used, op=torch.distributed.ReduceOp.MAX)
        if int(self.last_step) != step:
            self.unused_steps += 1
            self.last_step.fill_(step)
        self.unused_steps.masked_fill_(used.bool(), 0)

    def dead_codes(self) -> torch.Tensor:
        """Indices (int64) of the codes whose counter reached dead_after_steps."""
        return torch.nonzero(self.unused_steps >= self.config.dead_after_steps).flatten()

    @torch.no_grad()
    def restart_dead_codes(self, z_flat: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Replace every dead code by a row of z_flat (N, C) chosen with ``generator``; reset their counters.

        Returns the restarted indices (int64, ascending). Rows are distinct when N >= #dead, else drawn with
        replacement. Under torch.distributed rank 0's choice is broadcast to all ranks."""
        dead = self.dead_codes()
        n = dead.numel()
        if n == 0:
            return dead
        codebook = self.tokenizer.codebook
        if z_flat.ndim != 2 or z_flat.shape[1] != codebook.shape[1] or z_flat.shape[0] == 0:
            raise ValueError(f"expected z_flat of shape (N >= 1, {codebook.shape[1]}), got {tuple(z_flat.shape)}")
        rows = z_flat.shape[0]
        if rows >= n:
            pick = torch.randperm(rows, generator=generator, device=generator.device)[:n]
        else:
            pick = torch.randint(rows, (n,), generator=generator, device=generator.device)
        new = z_flat.detach()[pick.to(z_flat.device)].to(device=codebook.device, dtype=codebook.dtype)
        if _distributed():
            torch.distributed.broadcast(new, src=0)
        codebook[dead] = new
        self.unused_steps[dead] = 0
        return dead

    def forward(
        self, images: torch.Tensor, step: int, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """images (B, C, H, W) in [-1, 1] -> (scalar loss, detached logs: recon, codebook, commitment (unweighted),
        usage, perplexity (of this batch's codes), dead (codes found dead at this step, before any restart))."""
        cfg = self.config
        tok = self.tokenizer
        updating = self._updates_codebook()
        if updating and cfg.restart_dead_codes and generator is None:
            raise ValueError("VQObjective restarts dead codes with a torch.Generator: pass generator=..., or set "
                             "vq.restart_dead_codes: false")
        z = tok.encode_latent(images)
        z_q, codes, terms = tok.quantize(z)
        if updating:
            self.count_usage(codes, step)
        n_dead = self.dead_codes().numel()
        if updating and cfg.restart_dead_codes and n_dead:
            self.restart_dead_codes(z.detach().permute(0, 2, 3, 1).reshape(-1, z.shape[1]), generator)
        recon = tok.decode_latent(z_q, quantize=False)
        diff = images - recon
        terms = {"recon": diff.abs().mean() if cfg.recon_loss == "l1" else diff.square().mean(), **terms}
        loss = terms["recon"] + terms["codebook"] + tok.config.beta * terms["commitment"]
        usage, perplexity = codebook_statistics(codes, tok.codebook_size)
        logs = {k: v.detach() for k, v in terms.items()}
        logs.update(usage=usage, perplexity=perplexity,
                    dead=torch.tensor(float(n_dead), device=loss.device))
        return loss, logs

    def param_groups(self, lr: float, weight_decay: float) -> list[dict]:
        """AdamW groups, each with ``lr_mult`` (1.0): the network split into decay / no decay (1-D tensors and
        biases), and the codebook alone without weight decay (decay would pull codes to 0)."""
        return codebook_param_groups(self.tokenizer, self.tokenizer.codebook, lr, weight_decay, "vq")
