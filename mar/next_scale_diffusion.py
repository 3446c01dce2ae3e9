"""Continuous next-scale generation: VAR's coarse-to-fine transformer over a residual pyramid of continuous
latents (a KL-VAE's), with MAR's Diffusion Loss predicting every token of a scale (VAR, arXiv 2404.02905,
Sec. 3; Diffusion Loss, Li et al. 2024, arXiv 2406.11838, Sec. 3.2). Nothing is quantized.

Glossary
    B   batch;  S scales, k = 0..S-1;  pn_k the side of scale k;  L = sum_k pn_k^2 tokens
    C   transformer width;  Cz latent (token) channels;  H = pn_{S-1} the latent side
    f   tokens (B, Cz, H, H) (the tokenizer's scaled latents);  r_k the residual map of scale k

The pyramid is VAR's (``tokenizers.multiscale.residual_pyramid``) without a codebook and without phi:
r_k = area(f - sum_{j<k} up(r_j), pn_k), up = bicubic to H (none at the last scale), so sum_k up(r_k) = f.
The transformer (``mar.next_scale.NextScaleTrunk``) reads x_k = word_embed(area(sum_{j<k} up(r_j), pn_k)) under
the block-causal mask, exactly as VAR reads its code pyramid, and its hidden state at token i conditions the
Diffusion Loss of r at i: z_i = decoder_norm(h_i). Every token of every scale counts the same in the loss.

Sampling, scale by scale with the KV cache: z from the scale's hidden states, r_k from the head (guided with
s_k = 1 + t_k, t_k = cfg k / (S - 1): VAR's ramp in the logits' convention, eps_u + s (eps_c - eps_u)), then
f_hat += up(r_k) and the next input is area(f_hat, pn_{k+1}). The result f_hat is decoded by the tokenizer.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from mar.generate_scales import cfg_ramp
from mar.heads import DiffusionHead
from mar.next_scale import VAR_PRESETS, NextScaleTrunk, create_var
from tokenizers.multiscale import area_down, bicubic_up, pyramid_teacher_inputs, residual_pyramid


class NextScaleDiffusion(NextScaleTrunk):
    """The next-scale trunk with a per-token Diffusion Loss head (``decoder_norm``, ``diffloss``)."""

    def __init__(self, *, diffloss_depth: int = 3, diffloss_width: int = 256, num_sampling_steps: int | str = "100",
                 diffusion_batch_mul: int = 4, grad_checkpointing: bool = False,
                 generator: torch.Generator | None = None, device=None, **trunk_kwargs):
        trunk_kwargs.setdefault("vocab_size", 1)  # no codebook (the trunk's size checks only)
        super().__init__(generator=generator, device=device, **trunk_kwargs)
        meta = torch.device(device if device is not None else "cpu").type == "meta"
        with torch.device(device if device is not None else "cpu"):
            self.decoder_norm = nn.LayerNorm(self.embed_dim, eps=1e-6)
            self.diffloss = DiffusionHead(self.token_dim, self.embed_dim, diffloss_depth, diffloss_width,
                                          num_sampling_steps, diffusion_batch_mul, grad_checkpointing,
                                          generator=None if meta else generator)

    def _check_tokens(self, f: Tensor) -> None:
        side = self.patch_nums[-1]
        if f.ndim != 4 or tuple(f.shape[1:]) != (self.token_dim, side, side):
            raise ValueError(f"tokens must be (B, {self.token_dim}, {side}, {side}) (Cz, and the last scale's side), "
                             f"got {tuple(f.shape)}")

    def training_loss(self, f: Tensor, labels: Tensor, generator=None) -> tuple[Tensor, dict]:
        """(loss, logs): the Diffusion Loss of every pyramid token given its hidden state; f (B, Cz, H, H)."""
        self._check_tokens(f)
        r = residual_pyramid(f.float(), self.patch_nums)
        hidden, _ = self.hidden(labels, pyramid_teacher_inputs(r, self.patch_nums[-1]), generator)
        target = torch.cat([m.flatten(2).transpose(1, 2) for m in r], dim=1)  # (B, L, Cz), the trunk's token order
        z = self.decoder_norm(hidden)
        loss = self.head.loss(target.reshape(-1, self.token_dim), z.reshape(-1, self.embed_dim), generator=generator)
        return loss, {}

    @property
    def head(self) -> DiffusionHead:
        return self.diffloss

    @torch.no_grad()
    def sample(self, batch_size: int, *, labels: Tensor | None = None, cfg: float = 0.0, temperature: float = 1.0,
               generator=None, options=None, progress: bool = False, cfg_schedule: str = "linear") -> Tensor:
        """Tokens f_hat (B, Cz, H, H) coarse to fine (module docstring). ``labels`` (B,) or None (no class);
        ``cfg`` >= 0 in VAR's convention (0 = none); ``generator`` one, or a list of B (one per image)."""
        if isinstance(generator, (list, tuple)) and len(generator) != batch_size:
            raise ValueError(f"got {len(generator)} generators for a batch of {batch_size}: pass one per image")
        if not cfg >= 0:
            raise ValueError(f"cfg must be >= 0 (0 = no guidance), got {cfg!r}")
        b, device, num_scales, side = batch_size, self.pos_start.device, len(self.patch_nums), self.patch_nums[-1]
        labels = torch.full((b,), self.num_classes, device=device) if labels is None else labels.to(device)
        guided = cfg != 0
        cond = self.condition(torch.cat((labels, torch.full_like(labels, self.num_classes))) if guided else labels,
                              drop=False)
        x, cache = self.first_input(cond), self.start_cache()
        f_hat = cond.new_zeros(b, self.token_dim, side, side)
        for k, pn in enumerate(tqdm(self.patch_nums, disable=not progress, desc="scales")):
            z = self.decoder_norm(self.step(x, cond, cache).float())  # (B or 2B, n, C)
            s = 1.0 + cfg_ramp(cfg, k, num_scales, cfg_schedule)
            both = guided and s != 1.0  # [cond; uncond] rows to the head, else the cond half alone
            r = self.head.sample((z if both else z[:b]).reshape(-1, self.embed_dim), temperature=temperature,
                                 cfg=s if both else 1.0, generator=generator, options=options)  # (B n, Cz)
            r = r.view(b, pn * pn, self.token_dim).transpose(1, 2).reshape(b, self.token_dim, pn, pn)
            f_hat = f_hat + (r if k == num_scales - 1 else bicubic_up(r, side))
            if k + 1 < num_scales:
                nxt = area_down(f_hat, self.patch_nums[k + 1]).flatten(2).transpose(1, 2)
                x = self.scale_input(k + 1, nxt.to(cond.dtype))
                x = x.repeat(2, 1, 1) if guided else x
        return f_hat


    def _generate(self, batch_size: int, *, labels, cfg, cfg_schedule, temperature, generator, options,
                  known_codes, known_mask, progress) -> Tensor:
        if known_mask is not None:
            raise ValueError("editing is for VAR and HART (known codes teacher-forced at every scale); the continuous "
                             "next-scale model has no codes to keep: use a MAR model to edit continuous tokens")
        return self.sample(batch_size, labels=labels, cfg=cfg, temperature=temperature, generator=generator,
                           options=options, progress=progress, cfg_schedule=cfg_schedule)


def create_next_scale_diffusion(name: str, **overrides) -> NextScaleDiffusion:
    """A VAR preset's trunk (``mar.next_scale.VAR_PRESETS``) with the per-token Diffusion Loss head; pass
    ``token_dim`` (the latent channels), ``patch_nums``, ``num_classes`` and the head's sizes."""
    if name not in VAR_PRESETS:
        create_var(name)  # the one message listing the valid presets
    return NextScaleDiffusion(**{**VAR_PRESETS[name], **overrides})
