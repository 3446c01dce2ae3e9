"""Multi-scale residual VQVAE (VAR's tokenizer): images <-> S token maps of growing size, and the quantizer API
the next-scale generators use; plus the same pyramid without quantization for continuous latents.

Paper: Tian et al. 2024, "Visual Autoregressive Modeling" (arXiv 2404.02905), Sec. 3.2 and Algorithms 1-2. The
layout and numbers are those of FoundationVision/VAR at commit 78b9539 (models/vqvae.py, quant.py, basic_vae.py);
this is our own code, with the reference's parameter names so its checkpoint loads strictly. HART's hybrid
tokenizer (Tang et al. 2024, arXiv 2410.10812, Sec. 3.1) is this model trained with ``hybrid=True``
(``tokenizers.multiscale_training``); ``encode_hybrid`` gives its codes and the continuous residual.

Glossary: B batch, S scales, k scale index (0..S-1), pn_k side of scale k's token map (``patch_nums``),
H = pn_{S-1} side of the latent, Cz latent channels (z_channels), V codebook size (vocab_size),
L = sum_k pn_k^2 tokens per image, P = H * stride the image side, f encoder latent (B, Cz, H, H), f_hat its
multi-scale VQ reconstruction, r = f - f_hat the residual (HART). Tokens of a scale are row-major.

Parts: the encoder / decoder blocks (LDM-style, VAR's module names: diffusers' blocks name their tensors
differently and split q/k/v, so they cannot hold the published key layout) are in ``multiscale_blocks``; the
quantizer (Algorithm 1, the phi convs) and the area / bicubic resizing in ``multiscale_quant``. Both are
re-exported here. This file holds the config and presets, the continuous pyramid, and the tokenizer.

Initialisation, for training from scratch: PyTorch's defaults drawn from one ``torch.Generator`` (convolutions
U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight and bias, GroupNorm 1 / 0, codebook N(0, 1) as nn.Embedding, which
the reference keeps; ``codebook_init`` gives the reference's other ``eini`` choices); without a generator one
seeded with ``torch.initial_seed()``.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .convert import read_tokenizer_metadata
from .kl_vae import KLTokenizer
# re-exported: the blocks and the quantizer lived here before the split; their names stay importable from here
from .multiscale_blocks import (  # noqa: F401
    AttnBlock, Decoder, Downsample, Encoder, ResnetBlock, Upsample, _conv3, _Level, _mid, _norm,
)
from .multiscale_quant import MultiScaleQuantizer, Phi, _phi_bank, area_down, bicubic_up, phi_ticks  # noqa: F401

_SAVE_FORMAT = "mar-multiscale-vq-v1"
PhiFn = Callable[[torch.Tensor, int], torch.Tensor]


# ---- configuration ----------------------------------------------------------------------------------------
def _is_int(value: Any, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


@dataclass(frozen=True)
class MultiScaleVQConfig:
    """Architecture of a multi-scale VQVAE (defaults: the published vae_ch160v4096z32, 256 px, 680 tokens)."""

    in_channels: int = 3
    out_channels: int = 3
    ch: int = 160  # width of the first level; level i has ch * ch_mult[i]
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2  # per encoder level; decoder levels get one more
    norm_num_groups: int = 32
    dropout: float = 0.0  # only 0.0: dropout would draw from the global RNG
    z_channels: int = 32  # Cz
    vocab_size: int = 4096  # V
    patch_nums: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
    quant_resi: float = 0.5  # r of phi; 0 = no residual convs (phi is the identity)
    share_quant_resi: int = 4  # 0: one phi per scale, 1: one for all, n >= 2: n shared by nearest tick
    beta: float = 0.25  # commitment weight of the quantizer loss
    using_sa: bool = True  # attention after each res block of the lowest-resolution level
    using_mid_sa: bool = True  # attention in the mid blocks
    codebook_init: float = 0.0  # the reference's eini: 0 N(0, 1) (nn.Embedding), > 0 trunc-normal std, < 0 U(+-|x|/V)
    # HART's hybrid tokenizer (arXiv 2410.10812 Sec. 3.1): the objective feeds the decoder the continuous latent f
    # instead of f_hat for half of the samples; files without the key (older ones) read as False
    hybrid: bool = False

    def __post_init__(self) -> None:
        for name in ("ch_mult", "patch_nums"):
            object.__setattr__(self, name, tuple(getattr(self, name)))  # YAML / JSON lists
        for name in ("in_channels", "out_channels", "ch", "num_res_blocks", "norm_num_groups", "z_channels"):
            if not _is_int(getattr(self, name), 1):
                raise ValueError(f"{name} must be an int >= 1, got {getattr(self, name)!r}")
        if not _is_int(self.vocab_size, 2):
            raise ValueError(f"vocab_size must be an int >= 2, got {self.vocab_size!r}")
        if not self.ch_mult or not all(_is_int(m, 1) for m in self.ch_mult):
            raise ValueError(f"ch_mult must be a non-empty tuple of ints >= 1, got {self.ch_mult}")
        bad = [self.ch * m for m in self.ch_mult if (self.ch * m) % self.norm_num_groups]
        if bad:
            raise ValueError(f"widths {bad} (ch * ch_mult) are not divisible by norm_num_groups="
                             f"{self.norm_num_groups} (GroupNorm): change ch, ch_mult or norm_num_groups")
        pn = self.patch_nums
        if len(pn) < 2 or not all(_is_int(p, 1) for p in pn) or any(a >= b for a, b in zip(pn, pn[1:])):
            raise ValueError(f"patch_nums must be >= 2 strictly increasing ints >= 1 (coarse to fine, the last = "
                             f"the latent side), got {pn}")
        if self.dropout != 0.0:
            raise ValueError(f"dropout must be 0.0 (the published value; dropout would draw from the global RNG), "
                             f"got {self.dropout!r}")
        if not (isinstance(self.codebook_init, (int, float)) and not isinstance(self.codebook_init, bool)
                and math.isfinite(self.codebook_init)):
            raise ValueError(f"codebook_init must be a finite number, got {self.codebook_init!r}")
        for name, high in (("quant_resi", 1.0), ("beta", math.inf)):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value <= high
                    and math.isfinite(value)):
                raise ValueError(f"{name} must be a finite number in [0, {high}], got {value!r}")
        if not _is_int(self.share_quant_resi, 0):
            raise ValueError(f"share_quant_resi must be an int >= 0 (0: one phi per scale, 1: shared, n: n "
                             f"partially shared), got {self.share_quant_resi!r}")
        for name in ("using_sa", "using_mid_sa", "hybrid"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")

    @property
    def stride(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def token_channels(self) -> int:
        return self.vocab_size

    @property
    def num_scales(self) -> int:
        return len(self.patch_nums)

    @property
    def num_tokens(self) -> int:
        return sum(p * p for p in self.patch_nums)

    @property
    def image_size(self) -> int:
        return self.patch_nums[-1] * self.stride

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> MultiScaleVQConfig:
        """Build from plain data; unknown keys raise with the list of valid ones."""
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(values) - set(valid))
        if unknown:
            raise ValueError(f"unknown {cls.__name__} keys {unknown}; valid keys: {valid}")
        return cls(**values)


# 32x32 images (Fashion-MNIST: in_channels=1, out_channels=1), stride 4: 8x8 latent, 6 scales, L = 130; a small
# uniform codebook (U(+-1/V)) keeps more codes in use than N(0, 1) with a freshly initialised encoder.
_MSVQ_F4 = MultiScaleVQConfig(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, norm_num_groups=16, z_channels=16,
                              vocab_size=512, patch_nums=(1, 2, 3, 4, 6, 8), codebook_init=-1.0)
MULTISCALE_PRESETS: dict[str, MultiScaleVQConfig] = {
    # The published VAR tokenizer vae_ch160v4096z32.pth: 256x256x3 -> 10 scales up to 16x16, L = 680.
    "var_vqvae": MultiScaleVQConfig(),
    "msvq_f4": _MSVQ_F4,
    # HART's hybrid tokenizer at that size: the decoder trained on f_hat and on f, half of the samples each
    # (arXiv 2410.10812 Sec. 3.1)
    "hmsvq_f4": dataclasses.replace(_MSVQ_F4, hybrid=True),
}


def multiscale_preset(name: str, **overrides: Any) -> MultiScaleVQConfig:
    """The named preset config, optionally with fields replaced (e.g. in_channels=1, out_channels=1)."""
    if name not in MULTISCALE_PRESETS:
        raise ValueError(f"unknown multi-scale VQ preset {name!r}; valid presets: {sorted(MULTISCALE_PRESETS)}")
    return dataclasses.replace(MULTISCALE_PRESETS[name], **overrides)


# ---- the continuous pyramid ------------------------------------------------------------------------------
def _identity_phi(h: torch.Tensor, k: int) -> torch.Tensor:
    return h


def residual_pyramid(f: torch.Tensor, patch_nums, phi: PhiFn | None = None) -> list[torch.Tensor]:
    """VAR's residual decomposition of a continuous latent f (B, C, H, H), H = patch_nums[-1], unquantized.

    Per scale k: r_k = area(rest, pn_k) (rest itself at the last scale), h_k = phi(bicubic(r_k, H), k)
    (no resize at the last scale; phi(h, k) optional, e.g. ``MultiScaleQuantizer.phi``), rest -= h_k.
    Returns [r_k (B, C, pn_k, pn_k)]. Without phi, ``pyramid_to_fhat(r)`` == f up to rounding; with phi the
    last scale leaves rest - phi(rest, S-1)."""
    patch_nums = _check_pyramid_input(f, patch_nums)
    phi = phi or _identity_phi
    height, last = f.shape[-1], len(patch_nums) - 1
    rest, out = f, []
    for k, pn in enumerate(patch_nums):
        r = rest if k == last else area_down(rest, pn)
        out.append(r)
        rest = rest - phi(r if k == last else bicubic_up(r, height), k)
    return out


def pyramid_to_fhat(r_list: list[torch.Tensor], phi: PhiFn | None = None) -> torch.Tensor:
    """sum_k phi(bicubic(r_k, H), k) (B, C, H, H), H = the last map's side: the latent a pyramid stands for."""
    phi = phi or _identity_phi
    height = r_list[-1].shape[-1]
    f_hat = torch.zeros_like(r_list[-1])
    for k, r in enumerate(r_list):
        f_hat = f_hat + phi(r if r.shape[-1] == height else bicubic_up(r, height), k)
    return f_hat


def pyramid_teacher_inputs(r_list: list[torch.Tensor], H: int, phi: PhiFn | None = None) -> torch.Tensor:
    """Next-scale inputs of a continuous pyramid, as ``MultiScaleQuantizer.teacher_inputs`` for codes:
    scale k+1's input = area(F_k, pn_{k+1}), F_k = sum_{j<=k} phi(bicubic(r_j, H), j), row-major.
    r_list [(B, C, pn_k, pn_k)] -> (B, L - pn_0^2, C)."""
    if not r_list or r_list[-1].shape[-1] != H:
        raise ValueError(f"the last map of r_list must be H x H = {H} x {H} (the latent side), got "
                         f"{tuple(r_list[-1].shape) if r_list else 'an empty list'}")
    phi = phi or _identity_phi
    b, c = r_list[0].shape[:2]
    f_hat = r_list[0].new_zeros(b, c, H, H)
    inputs = []
    for k in range(len(r_list) - 1):
        f_hat = f_hat + phi(bicubic_up(r_list[k], H), k)
        inputs.append(area_down(f_hat, r_list[k + 1].shape[-1]).flatten(2).transpose(1, 2))
    return torch.cat(inputs, dim=1)


def _check_pyramid_input(f: torch.Tensor, patch_nums) -> tuple[int, ...]:
    patch_nums = tuple(patch_nums)
    if f.ndim != 4 or f.shape[-1] != f.shape[-2] or not patch_nums or f.shape[-1] != patch_nums[-1]:
        raise ValueError(f"expected a square latent (B, C, H, H) with H = patch_nums[-1] = "
                         f"{patch_nums[-1] if patch_nums else None}, got {tuple(f.shape)}")
    return patch_nums


# ---- the tokenizer ----------------------------------------------------------------------------------------
@torch.no_grad()
def _init_parameters(model: nn.Module, generator: torch.Generator) -> None:
    """PyTorch's default initialisation drawn from ``generator`` (the rules in the module docstring)."""
    def draw(param: torch.Tensor, fill) -> None:
        values = torch.empty(param.shape, dtype=param.dtype, device=generator.device)
        param.copy_(fill(values))

    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            bound = 1.0 / math.sqrt(module.weight[0].numel())
            draw(module.weight, lambda t: t.uniform_(-bound, bound, generator=generator))
            draw(module.bias, lambda t: t.uniform_(-bound, bound, generator=generator))
        elif isinstance(module, nn.GroupNorm):
            module.weight.fill_(1.0)
            module.bias.fill_(0.0)
        elif isinstance(module, nn.Embedding):  # the codebook, by codebook_init (the reference's eini)
            eini = model.config.codebook_init
            if eini > 0:
                draw(module.weight, lambda t: nn.init.trunc_normal_(t, std=eini, generator=generator))
            elif eini < 0:
                bound = -eini / module.num_embeddings
                draw(module.weight, lambda t: t.uniform_(-bound, bound, generator=generator))
            else:
                draw(module.weight, lambda t: t.normal_(0.0, 1.0, generator=generator))


class MultiScaleVQVAE(nn.Module):
    """Images (B, in, P, P) in [-1, 1], P = image_size, <-> codes of S scales ((B, L) int64, scale by scale).

    Modules and state-dict keys as the published vae_ch160v4096z32.pth: ``encoder``, ``decoder``, ``quantize``
    (``MultiScaleQuantizer``), ``quant_conv`` and ``post_quant_conv`` (3x3, Cz -> Cz)."""

    kind = "multiscale"  # the tokenizers.base.Tokenizer interface, for codes of several scales
    to_uint8 = staticmethod(KLTokenizer.to_uint8)  # (B, C, H, W) in [-1, 1] -> uint8 (B, H, W, C)

    def __init__(self, config: MultiScaleVQConfig | str = "var_vqvae", generator: torch.Generator | None = None
                 ) -> None:
        super().__init__()
        cfg = multiscale_preset(config) if isinstance(config, str) else config
        self.config = cfg
        device = torch.get_default_device()
        with torch.device("meta"):  # no draw from the global RNG while building
            self.encoder, self.decoder = Encoder(cfg), Decoder(cfg)
            self.quantize = MultiScaleQuantizer(cfg)
            self.quant_conv = _conv3(cfg.z_channels, cfg.z_channels)
            self.post_quant_conv = _conv3(cfg.z_channels, cfg.z_channels)
        if device.type != "meta":  # under torch.device("meta") (``load``) the weights come from a file
            self.to_empty(device=device)
            self.quantize.ema_vocab_hit_SV.zero_()
            _init_parameters(self, generator or torch.Generator().manual_seed(torch.initial_seed()))

    # ---- the interface ----------------------------------------------------------------------------------
    @property
    def stride(self) -> int:
        return self.config.stride

    @property
    def token_channels(self) -> int:
        return self.config.vocab_size

    @property
    def in_channels(self) -> int:
        return self.config.in_channels

    @property
    def patch_nums(self) -> tuple[int, ...]:
        return self.config.patch_nums

    @property
    def num_tokens(self) -> int:
        return self.config.num_tokens

    def token_shape(self, height: int, width: int) -> tuple[int]:
        """(L,): the codes of one image, which must be image_size x image_size (= patch_nums[-1] * stride)."""
        size = self.config.image_size
        if (height, width) != (size, size):
            raise ValueError(f"this multi-scale tokenizer takes {size}x{size} images (patch_nums[-1] "
                             f"{self.patch_nums[-1]} x stride {self.stride}), got {height}x{width}: resize the "
                             "images or use a config with other patch_nums")
        return (self.num_tokens,)

    def split_scales(self, codes: torch.Tensor) -> list[torch.Tensor]:
        """(B, L) -> [(B, pn_k^2)] for k = 0..S-1 (views)."""
        if codes.ndim != 2 or codes.shape[1] != self.num_tokens:
            raise ValueError(f"expected codes of shape (B, {self.num_tokens}) (all scales), got {tuple(codes.shape)}")
        return list(codes.split([p * p for p in self.patch_nums], dim=1))

    # ---- encoding / decoding ----------------------------------------------------------------------------
    def encode_latent(self, images: torch.Tensor) -> torch.Tensor:
        """(B, in, P, P) in [-1, 1] -> f = quant_conv(encoder(x)) (B, Cz, H, H)."""
        if images.ndim != 4 or images.shape[1] != self.in_channels:
            raise ValueError(f"expected images of shape (B, {self.in_channels}, H, W), got {tuple(images.shape)}")
        self.token_shape(images.shape[2], images.shape[3])
        return self.quant_conv(self.encoder(images))

    def encode_indices(self, images: torch.Tensor) -> list[torch.Tensor]:
        """(B, in, P, P) -> [codes (B, pn_k^2) int64] per scale."""
        return self.quantize.encode_indices(self.encode_latent(images))

    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None, sample: bool = True
               ) -> torch.Tensor:
        """(B, in, P, P) -> codes (B, L) int64, the scales concatenated; deterministic (generator, sample unused)."""
        return torch.cat(self.encode_indices(images), dim=1)

    def residual(self, f: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        """HART's split of a latent f (B, Cz, H, H) (arXiv 2410.10812 Sec. 3.1): (codes [(B, pn_k^2)] per scale,
        f_hat = indices_to_fhat(codes), r = f - f_hat), so f_hat + r == f up to one float32 rounding."""
        codes = self.quantize.encode_indices(f)
        f_hat = self.quantize.indices_to_fhat(codes)
        return codes, f_hat, f.float() - f_hat

    def encode_hybrid(self, images: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        """(B, in, P, P) -> (codes per scale, f_hat, residual r = f - f_hat), f = encode_latent(images): the
        discrete and continuous tokens of HART's hybrid tokenizer."""
        return self.residual(self.encode_latent(images))

    def encode_moments(self, images: torch.Tensor) -> torch.Tensor:
        """What a latent cache stores: the latent f (``sample_from_moments`` turns it into codes)."""
        return self.encode_latent(images)

    def sample_from_moments(self, moments: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Cached latent f (B, Cz, H, H) -> codes (B, L) (nothing random)."""
        return torch.cat(self.quantize.encode_indices(moments), dim=1)

    def decode_fhat(self, f_hat: torch.Tensor) -> torch.Tensor:
        """f_hat (B, Cz, H, H) -> images clamp(decoder(post_quant_conv(f_hat)), -1, 1) (B, out, P, P)."""
        self.quantize._check_latent(f_hat)
        return self.decoder(self.post_quant_conv(f_hat)).clamp(-1.0, 1.0)

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """codes (B, L) int64 of all scales, or a float f_hat (B, Cz, H, H) -> images (B, out, P, P) in [-1, 1]."""
        if tokens.dtype.is_floating_point:
            return self.decode_fhat(tokens)
        return self.decode_fhat(self.quantize.indices_to_fhat(self.split_scales(tokens)))

    # ---- checkpoints ------------------------------------------------------------------------------------
    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """As nn.Module's, but a ``quantize.ema_vocab_hit_SV`` with another number of scales is replaced by this
        model's own (usage statistics only; the reference does the same)."""
        key = "quantize.ema_vocab_hit_SV"
        if key in state_dict and state_dict[key].shape[0] != self.quantize.ema_vocab_hit_SV.shape[0]:
            state_dict = {**state_dict, key: self.quantize.ema_vocab_hit_SV}
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def save(self, path: str | Path) -> None:
        """Write the weights (and the usage buffer) as safetensors with the config in its metadata."""
        from safetensors.torch import save_file

        tensors = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        save_file(tensors, str(path), metadata={"format": _SAVE_FORMAT, "config": json.dumps(self.config.to_dict())})

    @classmethod
    def _from_state_dict(cls, config: MultiScaleVQConfig, state: dict[str, torch.Tensor], what: str
                         ) -> MultiScaleVQVAE:
        """Build on the meta device and take the tensors (strict, one ValueError listing the differences)."""
        with torch.device("meta"):
            model = cls(config)
        key = "quantize.ema_vocab_hit_SV"
        if key in state and state[key].shape[0] != config.num_scales:  # as load_state_dict: usage stats only
            state = {**state, key: torch.zeros(config.num_scales, config.vocab_size)}
        mine = model.state_dict()
        missing = [k for k in mine if k not in state]
        unexpected = [k for k in state if k not in mine]
        shapes = [f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}" for k, v in mine.items()
                  if k in state and tuple(state[k].shape) != tuple(v.shape)]
        if missing or unexpected or shapes:
            raise ValueError(f"{what} does not fit this multi-scale VQVAE config (ch {config.ch}, ch_mult "
                             f"{config.ch_mult}, z {config.z_channels}, V {config.vocab_size}): {len(missing)} missing "
                             f"keys {missing[:3]}, {len(unexpected)} unexpected {unexpected[:3]}, shape mismatches "
                             f"{shapes[:3]}; pass the config it was trained with")
        model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True, assign=True)
        return model.eval()

    @classmethod
    def load(cls, path: str | Path) -> MultiScaleVQVAE:
        """Read a file written by ``save`` (on CPU, strict, in eval mode)."""
        from safetensors.torch import load_file

        path = Path(path)
        metadata = read_tokenizer_metadata(path, "MultiScaleVQVAE")
        if metadata.get("format") != _SAVE_FORMAT or "config" not in metadata:
            raise ValueError(f"{str(path)!r} is not a multi-scale VQ tokenizer file (format "
                             f"{metadata.get('format')!r}, expected {_SAVE_FORMAT!r}); for the published "
                             "vae_ch160v4096z32.pth use MultiScaleVQVAE.from_var_checkpoint")
        config = MultiScaleVQConfig.from_dict(json.loads(metadata["config"]))
        return cls._from_state_dict(config, load_file(str(path), device="cpu"), repr(str(path)))

    @classmethod
    def from_var_checkpoint(cls, path: str | Path, config: MultiScaleVQConfig | str | None = None
                            ) -> MultiScaleVQVAE:
        """The published VAR tokenizer (vae_ch160v4096z32.pth, a bare state dict) with ``config`` (default the
        "var_vqvae" preset); strict, in eval mode. Other VAR / MAR files are refused with what they are."""
        config = multiscale_preset(config or "var_vqvae") if not isinstance(config, MultiScaleVQConfig) else config
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"VAR VQVAE checkpoint not found: {str(path)!r}")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise ValueError(f"{str(path)!r} is not a torch checkpoint readable with weights_only=True ({err}); "
                             "expected the bare state dict vae_ch160v4096z32.pth") from err
        _refuse_other_checkpoints(state, path)
        return cls._from_state_dict(config, state, repr(str(path)))


def _refuse_other_checkpoints(state: Any, path: Path) -> None:
    """One clear message for files that are not a multi-scale VQVAE state dict."""
    name = repr(str(path))
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        raise ValueError(f"{name} is an LDM-format checkpoint ({{'model': state_dict}}, e.g. kl16.ckpt), a KL-VAE, "
                         "not a multi-scale VQVAE: open it with a KL preset (KLTokenizer.from_ldm_checkpoint)")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        keys = sorted(state)[:5] if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"{name} is not a bare state dict of tensors (got {keys}); a VAR training checkpoint holds "
                         "the transformer only: use the published vae_ch160v4096z32.pth")
    if any(k.startswith(("blocks.", "class_emb.", "word_embed.", "lvl_embed.")) for k in state):
        raise ValueError(f"{name} is a VAR transformer checkpoint (var_d*.pth), not the VQVAE: load it with "
                         "mar.next_scale.load_var_checkpoint, and the tokenizer from vae_ch160v4096z32.pth")
    if "quantize.embedding.weight" not in state:
        hint = ("it looks like a KL-VAE (no codebook): open it with KLTokenizer.from_ldm_checkpoint"
                if any(k.startswith(("encoder.", "decoder.")) for k in state) else
                "it has no multi-scale codebook (quantize.embedding.weight)")
        raise ValueError(f"{name} is not a multi-scale VQVAE checkpoint: {hint}")
