"""Random orders, masking and the generation schedules of MAR, as pure functions.

Glossary: B batch, L tokens per image (seq_len), K generation steps (num_iter).

Everything stochastic takes a ``torch.Generator`` (or a list of B generators, one per sample,
which makes sample b's draws independent of the rest of the batch). The schedules take and
return plain numbers, computed once per call of the generation loop, never per step.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

Generators = "torch.Generator | Sequence[torch.Generator] | None"


def _draw(fn, shape: tuple[int, ...], generator, device, dtype=torch.float32) -> torch.Tensor:
    """Call ``fn(shape, generator=..., device=..., dtype=...)`` drawing on the generator's device.

    ``generator`` may be None (global RNG), one generator, or a list of one generator per row of
    ``shape[0]``; the result is moved to ``device``.
    """
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"got {len(generator)} generators for a batch of {shape[0]}: pass one per sample")
        return torch.cat([_draw(fn, (1, *shape[1:]), g, device, dtype) for g in generator])
    gen_device = generator.device if generator is not None else device
    return fn(shape, generator=generator, device=gen_device, dtype=dtype).to(device)


def rand(shape, generator=None, device=None, dtype=torch.float32) -> torch.Tensor:
    """U[0, 1) draws; ``generator`` as in :func:`_draw`."""
    return _draw(lambda s, **kw: torch.rand(s, **kw), tuple(shape), generator, device, dtype)


def randn(shape, generator=None, device=None, dtype=torch.float32) -> torch.Tensor:
    """N(0, 1) draws; ``generator`` as in :func:`_draw`."""
    return _draw(lambda s, **kw: torch.randn(s, **kw), tuple(shape), generator, device, dtype)


def random_orders(batch_size: int, seq_len: int, generator=None, device=None) -> torch.Tensor:
    """One uniformly random permutation of range(L) per sample: (B, L) int64.

    argsort of i.i.d. uniforms is a uniform random permutation (ties have probability ~0).
    """
    keys = rand((batch_size, seq_len), generator, device, dtype=torch.float64)
    return torch.argsort(keys, dim=-1)


def sample_mask_ratio(generator=None, min_ratio: float = 0.7, mean: float = 1.0, std: float = 0.25) -> float:
    """One training mask ratio r ~ Normal(mean, std) truncated to [min_ratio, 1.0] (SPEC 2).

    Inverse-CDF sampling: u ~ U(Phi(a), Phi(b)), r = mean + std * Phi^-1(u) with
    a = (min_ratio - mean) / std, b = (1 - mean) / std; in float64 so r stays inside the bounds.
    """
    a, b = (min_ratio - mean) / std, (1.0 - mean) / std
    cdf_a, cdf_b = (torch.special.ndtr(torch.tensor(v, dtype=torch.float64)) for v in (a, b))
    u = rand((1,), generator, generator.device if generator is not None else None, dtype=torch.float64)
    u = cdf_a + (cdf_b - cdf_a) * u.cpu()
    r = mean + std * torch.special.ndtri(u)
    return float(r.clamp(min_ratio, 1.0))


def num_masked_tokens(seq_len: int, ratio: float) -> int:
    """Tokens masked for a training ratio: ceil(L * r)."""
    return int(math.ceil(seq_len * ratio))


def mask_from_orders(orders: torch.Tensor, num_masked: int) -> torch.Tensor:
    """Boolean mask (B, L): True on the first ``num_masked`` positions of each order."""
    mask = torch.zeros(orders.shape, dtype=torch.bool, device=orders.device)
    return mask.scatter(-1, orders[:, :num_masked], True)


def split_by_order(orders: torch.Tensor, num_masked: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(masked, visible) positions, each sorted ascending: (B, m) and (B, L - m) int64.

    The same positions as ``mask.nonzero()`` / ``(~mask).nonzero()`` row by row, without a host sync.
    """
    masked = orders[:, :num_masked].sort(dim=-1).values
    visible = orders[:, num_masked:].sort(dim=-1).values
    return masked, visible


def generation_schedule(seq_len: int, num_iter: int) -> list[int]:
    """Tokens still masked after each generation step k = 0..K-1 (SPEC 4); the last entry is 0.

    mask_len_k = floor(L * cos(pi/2 * (k+1)/K)), clamped to [1, masked_now - 1]; the last step
    predicts every remaining token. Step k predicts masked_before - masked_after tokens.
    """
    if num_iter < 1 or num_iter > seq_len:
        raise ValueError(f"num_iter must be in [1, seq_len={seq_len}], got {num_iter}")
    masked_now, after = seq_len, []
    for k in range(num_iter):
        if k == num_iter - 1:
            after.append(0)
            break
        mask_len = math.floor(seq_len * math.cos(math.pi / 2.0 * (k + 1) / num_iter))
        mask_len = max(1, min(masked_now - 1, mask_len))
        after.append(mask_len)
        masked_now = mask_len
    return after


def cfg_scales(cfg: float, schedule: str, seq_len: int, masked_after: Sequence[int]) -> list[float]:
    """CFG scale at each step: ``linear`` 1 + (cfg-1)*(L - mask_len)/L, ``constant`` cfg.

    ``mask_len`` is the step's clamped next-mask length, as in the reference (for the last step
    the clamp gives 1, not 0, so the linear scale ends at 1 + (cfg-1)*(L-1)/L).
    """
    if schedule == "constant":
        return [float(cfg)] * len(masked_after)
    if schedule != "linear":
        raise ValueError(f"unknown cfg_schedule {schedule!r}: use 'linear' or 'constant'")
    last = len(masked_after) - 1
    return [1.0 + (cfg - 1.0) * (seq_len - (m if k < last else 1)) / seq_len for k, m in enumerate(masked_after)]
