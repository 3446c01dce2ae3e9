"""The LDM-style convolutional encoder and decoder of VAR's multi-scale VQVAE (``tokenizers.multiscale``), with the
module names of FoundationVision/VAR (models/basic_vae.py, commit 78b9539) so the published vae_ch160v4096z32.pth
loads strictly. Our own code.

Glossary: B batch, Cin / Cout block widths, ch the first level's width, ch_mult the per-level multipliers
(level i has ch * ch_mult[i] channels, n = len(ch_mult) levels), Cz latent channels (z_channels),
stride = 2^(n-1), H x W the latent side, N = H*W attention positions, g GroupNorm groups.

Blocks: GroupNorm eps 1e-6, SiLU, one-head attention with a fused 1x1 ``qkv`` conv, pad-(0,1,0,1) stride-2 down
conv, nearest-x2 up conv. diffusers' blocks name their tensors differently and split q/k/v, so they cannot hold
the published key layout; hence these modules. The encoder has ``num_res_blocks`` res blocks per level, the
decoder one more; attention after each res block of the lowest-resolution level when ``using_sa``, and in the
mid blocks when ``using_mid_sa``.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from .multiscale import MultiScaleVQConfig


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=1e-6)


def _conv3(cin: int, cout: int, stride: int = 1, padding: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=padding)


class ResnetBlock(nn.Module):
    """x + conv(SiLU(norm(conv(SiLU(norm(x)))))), a 1x1 ``nin_shortcut`` when the width changes."""

    def __init__(self, cin: int, cout: int, groups: int) -> None:
        super().__init__()
        self.norm1, self.conv1 = _norm(cin, groups), _conv3(cin, cout)
        self.norm2, self.conv2 = _norm(cout, groups), _conv3(cout, cout)
        self.nin_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        return self.nin_shortcut(x) + self.conv2(F.silu(self.norm2(h)))


class AttnBlock(nn.Module):
    """One-head self-attention over the H*W positions: x + proj_out(softmax(q^T k / sqrt(C)) v), fused qkv."""

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.norm = _norm(channels, groups)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, hh, ww = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, hh * ww).unbind(1)  # (B, C, N) each
        w = torch.softmax(torch.bmm(q.transpose(1, 2), k) * c ** -0.5, dim=2)  # (B, N_q, N_k)
        h = torch.bmm(v, w.transpose(1, 2)).reshape(b, c, hh, ww)  # h[:, :, i] = sum_j w[i, j] v[:, :, j]
        return x + self.proj_out(h)


class Downsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = _conv3(channels, channels, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # pad right and bottom, then 3x3 stride 2


class Upsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = _conv3(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    """One resolution: ``block`` res blocks, ``attn`` after each (lowest resolution only), a resampler."""

    def __init__(self, widths: list[tuple[int, int]], attention: bool, groups: int) -> None:
        super().__init__()
        self.block = nn.ModuleList(ResnetBlock(a, b, groups) for a, b in widths)
        self.attn = nn.ModuleList(AttnBlock(b, groups) for _, b in widths) if attention else nn.ModuleList()

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.block):
            h = block(h)
            if len(self.attn):
                h = self.attn[i](h)
        return h


def _mid(channels: int, cfg: MultiScaleVQConfig) -> nn.Module:
    mid = nn.Module()
    mid.block_1 = ResnetBlock(channels, channels, cfg.norm_num_groups)
    mid.attn_1 = AttnBlock(channels, cfg.norm_num_groups) if cfg.using_mid_sa else nn.Identity()
    mid.block_2 = ResnetBlock(channels, channels, cfg.norm_num_groups)
    return mid


class Encoder(nn.Module):
    """(B, in, H*stride, W*stride) -> (B, Cz, H, W); ``down.{i}`` levels from high to low resolution."""

    def __init__(self, cfg: MultiScaleVQConfig) -> None:
        super().__init__()
        n, g = len(cfg.ch_mult), cfg.norm_num_groups
        self.conv_in = _conv3(cfg.in_channels, cfg.ch)
        self.down = nn.ModuleList()
        cin = cfg.ch
        for i, mult in enumerate(cfg.ch_mult):
            cout = cfg.ch * mult
            level = _Level([(cin, cout)] + [(cout, cout)] * (cfg.num_res_blocks - 1), cfg.using_sa and i == n - 1, g)
            if i != n - 1:
                level.downsample = Downsample(cout)
            self.down.append(level)
            cin = cout
        self.mid = _mid(cin, cfg)
        self.norm_out, self.conv_out = _norm(cin, g), _conv3(cin, cfg.z_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """(B, Cz, H, W) -> (B, out, H*stride, W*stride); ``up.{i}`` is level i (run from i = n-1 down to 0)."""

    def __init__(self, cfg: MultiScaleVQConfig) -> None:
        super().__init__()
        n, g = len(cfg.ch_mult), cfg.norm_num_groups
        cin = cfg.ch * cfg.ch_mult[-1]
        self.conv_in = _conv3(cfg.z_channels, cin)
        self.mid = _mid(cin, cfg)
        levels = {}
        for i in reversed(range(n)):
            cout = cfg.ch * cfg.ch_mult[i]
            level = _Level([(cin, cout)] + [(cout, cout)] * cfg.num_res_blocks, cfg.using_sa and i == n - 1, g)
            if i != 0:
                level.upsample = Upsample(cout)
            levels[i] = level
            cin = cout
        self.up = nn.ModuleList(levels[i] for i in range(n))
        self.norm_out, self.conv_out = _norm(cin, g), _conv3(cin, cfg.out_channels)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(self.conv_in(z))))
        for level in reversed(self.up):
            h = level(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))
