"""DiffLoss: the per-token Diffusion Loss and its sampler (SPEC section 3).

Glossary
    N   rows (tokens; the caller repeats them diffusion_batch_mul times for training)
    C   token channels (target_channels), D condition width (z_channels)
    s   classifier-free guidance scale (cfg)

The transformer only sees two calls: `forward(target, z, mask) -> loss` and
`sample(z, temperature, cfg) -> tokens`; the diffusion stays inside this module.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .diffusion import GaussianDiffusion, check_generator, cosine_diffusion
from .mlp import SimpleMLPAdaLN

NUM_TRAIN_TIMESTEPS = 1000


def guided_model_output(net: nn.Module, x: Tensor, t: Tensor, c: Tensor, cfg: float) -> Tensor:
    """Classifier-free guidance inside the head; x (2N, C), c = [cond; uncond] (2N, D) -> (2N, 2C).

    The net sees the cond half of x twice: out = net([x_c; x_c], t, c). Then
    eps = eps_u + s (eps_c - eps_u) replaces eps in BOTH halves; the variance channels stay per half.
    """
    half = x[: len(x) // 2]
    out = net(torch.cat([half, half], dim=0), t, c)  # (2N, 2C)
    eps, rest = out.split(x.shape[1], dim=1)
    eps_c, eps_u = eps.chunk(2, dim=0)
    eps_guided = eps_u + cfg * (eps_c - eps_u)
    return torch.cat([torch.cat([eps_guided, eps_guided], dim=0), rest], dim=1)


class DiffLoss(nn.Module):
    """Diffusion Loss over continuous tokens: an AdaLN MLP denoiser conditioned on z per token.

    `train_diffusion` has T = 1000 cosine steps; `gen_diffusion` is the same schedule respaced to
    `num_sampling_steps` (int or a string such as "100"). Only `net` holds parameters.
    """

    def __init__(self, target_channels: int, z_channels: int, depth: int, width: int,
                 num_sampling_steps: int | str = "100", grad_checkpointing: bool = False,
                 generator: torch.Generator | None = None):
        super().__init__()
        self.in_channels = target_channels
        self.net = SimpleMLPAdaLN(in_channels=target_channels, model_channels=width,
                                  out_channels=target_channels * 2, z_channels=z_channels,
                                  num_res_blocks=depth, grad_checkpointing=grad_checkpointing,
                                  generator=generator)
        self.train_diffusion: GaussianDiffusion = cosine_diffusion(None, NUM_TRAIN_TIMESTEPS)
        self.set_sampling_steps(num_sampling_steps)

    def set_sampling_steps(self, num_sampling_steps: int | str) -> None:
        """Respace the sampler to `num_sampling_steps` (e.g. 100 or "100") of the 1000 training steps;
        `self.num_sampling_steps` becomes the int number of steps K."""
        self.gen_diffusion: GaussianDiffusion = cosine_diffusion(num_sampling_steps, NUM_TRAIN_TIMESTEPS)
        self.num_sampling_steps: int = self.gen_diffusion.num_timesteps

    def forward(self, target: Tensor, z: Tensor, mask: Tensor | None = None,
                generator: torch.Generator | None = None) -> Tensor:
        """Scalar loss: sum(row_loss * mask) / sum(mask) (plain mean without mask).

        target (N, C) clean tokens, z (N, D) conditions, mask (N,) weights (1 = count the row). Per row
        t ~ U{0..999} then noise ~ N(0, I) are drawn with `generator` on target.device.
        """
        if target.dim() != 2 or target.shape[1] != self.in_channels:
            raise ValueError(f"target must be (N, {self.in_channels}), got {tuple(target.shape)}")
        if z.dim() != 2 or z.shape[0] != target.shape[0]:
            raise ValueError(f"z must be (N, D) with N = {target.shape[0]} rows, got {tuple(z.shape)}")
        if mask is not None and tuple(mask.shape) != (target.shape[0],):
            raise ValueError(f"mask must be ({target.shape[0]},), got {tuple(mask.shape)}")
        check_generator(generator, target.device)
        n = target.shape[0]
        t = torch.randint(0, NUM_TRAIN_TIMESTEPS, (n,), generator=generator, device=target.device)
        noise = torch.randn(target.shape, generator=generator, device=target.device, dtype=target.dtype)
        row_loss = self.train_diffusion.training_losses(self.net, target, t, z, noise)  # (N,)
        if mask is None:
            return row_loss.mean()
        mask = mask.to(row_loss.dtype)
        return (row_loss * mask).sum() / mask.sum()

    @torch.no_grad()
    def sample(self, z: Tensor, temperature: float = 1.0, cfg: float = 1.0,
               generator: torch.Generator | None = None,
               noise: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """Sample tokens (N, C) by ancestral sampling over `num_sampling_steps` (K).

        cfg == 1: z (N, D), x_T ~ N(0, I) (N, C). cfg != 1: z = [cond; uncond] (2N, D); x_T is drawn for
        N rows and duplicated, every step uses `guided_model_output`, and the cond half (first N rows)
        is returned. All noise is drawn with `generator` on z.device in z.dtype: x_T first, then (rows, C)
        per step. `noise` = (x_T (N, C), per-step noise (K, len(z), C)) replaces those draws (e.g. noise
        drawn sample by sample from per-sample generators).
        """
        if z.dim() != 2:
            raise ValueError(f"z must be (N, D), got {tuple(z.shape)}")
        check_generator(generator, z.device)
        guided = float(cfg) != 1.0
        if guided and len(z) % 2:
            raise ValueError(f"with cfg != 1, z must hold [cond; uncond] rows (an even count), got {len(z)}")
        n = len(z) // 2 if guided else len(z)
        step_noise = None
        if noise is None:
            x_T = torch.randn((n, self.in_channels), generator=generator, device=z.device, dtype=z.dtype)
        else:
            x_T, step_noise = noise[0].to(device=z.device, dtype=z.dtype), noise[1]
            if tuple(x_T.shape) != (n, self.in_channels):
                raise ValueError(f"noise[0] (x_T) must have shape {(n, self.in_channels)}, got {tuple(x_T.shape)}")
        if guided:
            x_T = torch.cat([x_T, x_T], dim=0)  # (2N, C): both halves start from the same noise

            def net_fn(x: Tensor, t: Tensor) -> Tensor:
                return guided_model_output(self.net, x, t, z, float(cfg))
        else:
            def net_fn(x: Tensor, t: Tensor) -> Tensor:
                return self.net(x, t, z)
        x = self.gen_diffusion.p_sample_loop(net_fn, tuple(x_T.shape), x_T, temperature, generator,
                                             step_noise=step_noise)
        return x[:n]
