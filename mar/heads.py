"""The per-token head: the interface a generator uses, and the Diffusion Loss head that implements it.

Glossary: N rows (one per token), D condition width (the generator's decoder width), C token channels.

A generator turns tokens into one condition vector z per token; the head is everything after that (MAR
paper, Sec. 3.1: "the autoregressive model produces a vector z ... the loss function L(z, x)"). A head is an
``nn.Module`` with:

    kind                      "continuous" (a token is a vector of C floats) or "discrete" (a code index)
    token_shape, token_dtype  one token's trailing shape and dtype: (C,) float for continuous, () int64 for codes
    loss(target, z, mask=None, generator=None) -> scalar
        target (N, *token_shape) clean tokens, z (N, D), mask (N,) 1 = counted; draws only from ``generator``
    sample(z, *, temperature, cfg, generator, options, num_steps=None) -> (N', *token_shape) new tokens
        cfg == 1: z (N, D), N' = N.  cfg != 1: z = [cond; uncond] (2N, D), N' = N (classifier-free guidance
        is the head's: on eps for diffusion, on logits for a categorical head). ``generator`` is one
        torch.Generator, or a list of B generators of which generator b owns rows [b n, (b+1) n) of each half
        (n = N / B), so that sample b's draws do not depend on the rest of the batch. ``options`` holds the
        sampler settings (``mar.config.SamplingOptions``: sampler, eta, precision, guard); ``num_steps``
        overrides a step budget (diffusion steps; ignored by a head without steps).

A head is built by a small frozen *spec* (``DiffusionHeadSpec`` here; a categorical head adds its own),
because a generator creates its head after initialising its own weights (the reference's order of random
draws) and the head needs the generator's decoder width: ``spec.build(token_dim, z_channels, generator)``.
The spec also names the module the generator registers the head under (``module_name``): the published MAR
checkpoints keep ``diffloss.*``, and the tokens' input embedding of the generator (``input_embedding``).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from torch import Tensor, nn

from diffloss import DiffLoss
from diffloss.distill import DistilledHead
from mar.engine.checkpoint import export_safetensors, read_safetensors

DISTILLED_NAME = "head_distilled.safetensors"  # train.py task=distill_head's export, beside the MAR weights
NO_DISTILLED_HEAD = ("no distilled head is attached to this model: load one with --distilled-head FILE or train one "
                     "with train.py task=distill_head")


class Head(Protocol):
    """What a generator asks of a per-token head (see the module docstring)."""

    kind: str
    token_shape: tuple[int, ...]
    token_dtype: torch.dtype

    def loss(self, target: Tensor, z: Tensor, mask: Tensor | None = None,
             generator: torch.Generator | None = None) -> Tensor: ...

    def sample(self, z: Tensor, *, temperature: float, cfg: float, generator, options,
               num_steps: int | None = None) -> Tensor: ...


class HeadSpec(Protocol):
    """Builds a head once the generator knows its sizes."""

    module_name: str

    def build(self, token_dim: int, z_channels: int, generator: torch.Generator | None = None) -> nn.Module: ...

    def input_embedding(self, token_dim: int, width: int) -> nn.Module: ...


class DiffusionHead(DiffLoss):
    """Diffusion Loss (MAR paper, Sec. 3.2) behind the Head interface: ``diffloss.DiffLoss`` unchanged (its
    parameters are the published ``diffloss.net.*``), plus ``loss`` with the ``batch_mul`` repeat and
    ``sample`` taking the options object.

    ``loss`` repeats every row ``batch_mul`` times before the diffusion loss: each token is trained with that
    many (t, noise) draws per step (the reference's ``diffusion_batch_mul``, 4), which uses the transformer's
    forward pass more than once per token.
    """

    kind = "continuous"
    token_dtype = torch.float32
    distilled_head: DistilledHead | None = None  # the few-step sampler, attached with ``attach_distilled``

    def __init__(self, target_channels: int, z_channels: int, depth: int, width: int,
                 num_sampling_steps: int | str = "100", batch_mul: int = 4, grad_checkpointing: bool = False,
                 generator: torch.Generator | None = None):
        super().__init__(target_channels, z_channels, depth, width, num_sampling_steps, grad_checkpointing,
                         generator)
        if batch_mul < 1:
            raise ValueError(f"diffusion_batch_mul must be >= 1, got {batch_mul}")
        self.batch_mul = batch_mul
        self.token_shape = (target_channels,)

    def loss(self, target: Tensor, z: Tensor, mask: Tensor | None = None,
             generator: torch.Generator | None = None) -> Tensor:
        n = self.batch_mul
        mask = None if mask is None else mask.repeat(n)
        return self(target.repeat(n, 1), z.repeat(n, 1), mask, generator=generator)

    def sample(self, z: Tensor, temperature: float = 1.0, cfg: float = 1.0, generator=None, noise=None, *,
               options=None, num_steps: int | None = None, **sampler_options) -> Tensor:
        """``DiffLoss.sample``; ``options`` (a ``SamplingOptions``) supplies sampler, eta, autocast and guard.

        With ``options.distilled_steps`` S the attached distilled head samples instead, in S steps (the same
        rows, generators and temperature; the diffusion sampler's settings and ``num_steps`` do not apply)."""
        if options is not None and options.distilled_steps is not None:
            if self.distilled_head is None:
                raise ValueError(NO_DISTILLED_HEAD)
            if noise is not None:
                raise ValueError("the distilled head draws only x_T from the generator: pass no noise")
            return self.distilled_head.sample(z, temperature, cfg, generator, num_steps=options.distilled_steps,
                                              row_bucket=options.row_bucket)
        if options is not None:
            if sampler_options:
                raise ValueError(f"pass the sampler settings either in options or as {sorted(sampler_options)}")
            sampler_options = dict(sampler=options.sampler, eta=options.eta, autocast_dtype=options.autocast_dtype,
                                   clip_denoised=options.clip_denoised, row_bucket=options.row_bucket)
        return super().sample(z, temperature, cfg, generator, noise, num_steps=num_steps, **sampler_options)

    def attach_distilled(self, head: DistilledHead | None, source: str = "the distilled head") -> None:
        """Use ``head`` for ``options.distilled_steps`` (None detaches). A plain attribute, not a submodule: the
        state dict keeps the published keys; ``.to()`` / ``.half()`` move it with this head (``_apply``)."""
        if head is not None:
            want = (self.in_channels, self.net.cond_embed.in_features)
            if (head.token_channels, head.z_channels) != want:
                raise ValueError(f"{source} was distilled for tokens of {head.token_channels} channels and conditions "
                                 f"of width {head.z_channels}, this model's head has {want[0]} and {want[1]}: pass the "
                                 "head distilled from these MAR weights with --distilled-head FILE, or train one with "
                                 "train.py task=distill_head --distill.teacher=<these weights>")
            p = next(self.net.parameters())
            head = head.to(device=p.device, dtype=p.dtype).eval().requires_grad_(False)
        object.__setattr__(self, "distilled_head", head)

    def _apply(self, fn, recurse: bool = True):
        super()._apply(fn, recurse)
        if self.distilled_head is not None:
            self.distilled_head._apply(fn, recurse)
        return self


@dataclass(frozen=True)
class DiffusionHeadSpec:
    """The Diffusion Loss head's sizes (MAR-B: depth 6, width 1024) and sampler defaults."""

    depth: int
    width: int
    num_sampling_steps: int | str = "100"
    batch_mul: int = 4
    grad_checkpointing: bool = False
    module_name: str = "diffloss"  # the published checkpoints' prefix

    def build(self, token_dim: int, z_channels: int, generator: torch.Generator | None = None) -> DiffusionHead:
        return DiffusionHead(token_dim, z_channels, self.depth, self.width, self.num_sampling_steps, self.batch_mul,
                             self.grad_checkpointing, generator)

    def input_embedding(self, token_dim: int, width: int) -> nn.Module:
        """Continuous tokens enter the generator through a Linear (the reference's ``z_proj``)."""
        return nn.Linear(token_dim, width)


def save_distilled_head(head: DistilledHead, path: str | Path) -> Path:
    """Write ``head`` (weights, sizes, trained steps, K, cfg_max and ``head.info`` provenance) as safetensors,
    atomically (``export_safetensors``)."""
    state, meta = head.export_state()
    return export_safetensors(state, path, meta)


def load_distilled_head(path: str | Path) -> DistilledHead:
    """The ``DistilledHead`` of a ``save_distilled_head`` file, in eval mode on CPU."""
    state, meta = read_safetensors(path)
    return DistilledHead.from_state(state, meta, source=str(path))
