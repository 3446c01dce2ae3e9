"""The denoiser of the Diffusion Loss: a small MLP with adaptive LayerNorm (SPEC section 3).

Glossary
    N   rows (one per token and diffusion draw)
    C   token channels (in_channels); the output has out_channels = 2C: (eps_hat, v)
    D   condition width (the MAR decoder width, z_channels)
    W   model width (model_channels); depth = num_res_blocks
    y   the conditioning vector, y = TimestepMLP(sinusoid(t)) + cond_embed(z)   (N, W)

Parameter names follow the published MAR checkpoints (`diffloss.net.*` without the `diffloss.` prefix):
time_embed.mlp.{0,2}, cond_embed, input_proj, res_blocks.{i}.{in_ln, mlp.{0,2}, adaLN_modulation.1},
final_layer.{norm_final, linear, adaLN_modulation.1}.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint


def timestep_embedding(t: Tensor, dim: int = 256, max_period: float = 10000.0,
                       dtype: torch.dtype = torch.float32) -> Tensor:
    """Sinusoidal embedding (N,) -> (N, dim) = [cos(t f_i), sin(t f_i)], f_i = exp(-ln(max_period) i / (dim/2)),
    i = 0..dim/2-1 (a zero column is appended for odd dim). Computed in `dtype` (float32 as the reference)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=dtype) / half)
    args = t[:, None].to(dtype) * freqs[None]  # (N, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """AdaLN modulation x * (1 + scale) + shift."""
    return x * (1 + scale) + shift


class TimestepEmbedder(nn.Module):
    """Integer timesteps (N,) -> (N, W): sinusoid(256) -> Linear(256, W) -> SiLU -> Linear(W, W)."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(),
                                 nn.Linear(hidden_size, hidden_size))

    def forward(self, t: Tensor) -> Tensor:
        dtype = self.mlp[0].weight.dtype
        t_freq = timestep_embedding(t, self.frequency_embedding_size, dtype=torch.promote_types(dtype, torch.float32))
        return self.mlp(t_freq.to(dtype))  # (N, W)


class ResBlock(nn.Module):
    """x + gate * MLP(LN(x) * (1 + scale) + shift), with (shift, scale, gate) = Linear(W, 3W)(SiLU(y))."""

    def __init__(self, channels: int):
        super().__init__()
        self.in_ln = nn.LayerNorm(channels, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(channels, channels), nn.SiLU(), nn.Linear(channels, channels))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(channels, 3 * channels))

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        shift, scale, gate = self.adaLN_modulation(y).chunk(3, dim=-1)  # 3 x (N, W)
        h = self.mlp(modulate(self.in_ln(x), shift, scale))
        return x + gate * h


class FinalLayer(nn.Module):
    """Linear(W, out)(LN(x) * (1 + scale) + shift), LN without affine, (shift, scale) = Linear(W, 2W)(SiLU(y))."""

    def __init__(self, model_channels: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(model_channels, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(model_channels, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(model_channels, 2 * model_channels))

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(y).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))  # (N, out)


class SimpleMLPAdaLN(nn.Module):
    """forward(x (N, C), t (N,) original integer timesteps, c (N, D)) -> (N, out_channels).

    Init: every Linear xavier_uniform with zero bias; time-MLP weights N(0, 0.02); the adaLN output
    Linears and the final Linear zero, so the untrained net outputs exactly 0. `generator` makes the
    init reproducible. With `grad_checkpointing`, the res blocks recompute their activations in backward.
    """

    def __init__(self, in_channels: int, model_channels: int, out_channels: int, z_channels: int,
                 num_res_blocks: int, grad_checkpointing: bool = False,
                 generator: torch.Generator | None = None):
        super().__init__()
        if min(in_channels, model_channels, out_channels, z_channels) < 1 or num_res_blocks < 0:
            raise ValueError("channel counts must be >= 1 and num_res_blocks >= 0")
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels
        self.num_res_blocks = num_res_blocks
        self.grad_checkpointing = grad_checkpointing

        self.time_embed = TimestepEmbedder(model_channels)
        self.cond_embed = nn.Linear(z_channels, model_channels)
        self.input_proj = nn.Linear(in_channels, model_channels)
        self.res_blocks = nn.ModuleList([ResBlock(model_channels) for _ in range(num_res_blocks)])
        self.final_layer = FinalLayer(model_channels, out_channels)
        self.initialize_weights(generator)

    @torch.no_grad()
    def initialize_weights(self, generator: torch.Generator | None = None) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                fan_out, fan_in = module.weight.shape
                bound = math.sqrt(6.0 / (fan_in + fan_out))  # xavier_uniform, gain 1
                module.weight.uniform_(-bound, bound, generator=generator)
                module.bias.zero_()
        self.time_embed.mlp[0].weight.normal_(0.0, 0.02, generator=generator)
        self.time_embed.mlp[2].weight.normal_(0.0, 0.02, generator=generator)
        zeroed = [block.adaLN_modulation[-1] for block in self.res_blocks]
        zeroed += [self.final_layer.adaLN_modulation[-1], self.final_layer.linear]
        for linear in zeroed:
            linear.weight.zero_()
            linear.bias.zero_()

    def forward(self, x: Tensor, t: Tensor, c: Tensor, embedded: bool = False) -> Tensor:
        """``embedded``: c is already ``cond_embed(c)`` (N, W), as a sampling loop computes it once for all its
        steps (the condition does not change between diffusion steps; the same values, so the same output)."""
        if x.shape[-1] != self.in_channels:
            raise ValueError(f"x has {x.shape[-1]} channels, the net expects in_channels={self.in_channels}")
        x = self.input_proj(x)  # (N, W)
        y = self.time_embed(t) + (c if embedded else self.cond_embed(c))  # (N, W)
        use_checkpoint = self.grad_checkpointing and torch.is_grad_enabled()
        for block in self.res_blocks:
            x = checkpoint(block, x, y, use_reentrant=False) if use_checkpoint else block(x, y)
        return self.final_layer(x, y)  # (N, 2C)
