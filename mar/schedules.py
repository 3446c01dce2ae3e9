"""The schedules of masked generation and training, as pure functions of numbers (MAR paper, Sec. 3.3).

Glossary: B batch, L tokens per image (seq_len), U tokens to generate (L, or fewer when some are known),
K generation steps (num_iter), m masked tokens.

Computed once per call of a generation loop, never per step. Everything stochastic takes a generator.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from mar.orders import rand


def check_guidance(cfg: float, temperature: float) -> None:
    """One clear error for a guidance scale below 0 or a temperature that is not positive."""
    def number(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    if not (number(cfg) and cfg >= 0):
        raise ValueError(f"cfg must be a finite number >= 0 (1 = no guidance), got {cfg!r}")
    if not (number(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0 (it scales the sampler's noise), got "
                         f"{temperature!r}")


def sample_mask_ratio(generator=None, min_ratio: float = 0.7, mean: float = 1.0, std: float = 0.25) -> float:
    """One training mask ratio r ~ Normal(mean, std) truncated to [min_ratio, 1.0] (MAR paper, Sec. 3.3).

    Inverse-CDF sampling: u ~ U(Phi(a), Phi(b)), r = mean + std * Phi^-1(u) with
    a = (min_ratio - mean) / std, b = (1 - mean) / std; in float64 so r stays inside the bounds.
    """
    a, b = (min_ratio - mean) / std, (1.0 - mean) / std
    cdf_a, cdf_b = (torch.special.ndtr(torch.tensor(v, dtype=torch.float64)) for v in (a, b))
    u = rand((1,), generator, generator.device if generator is not None else None, dtype=torch.float64)
    u = cdf_a + (cdf_b - cdf_a) * u.cpu()
    r = mean + std * torch.special.ndtri(u)
    return float(r.clamp(min_ratio, 1.0))


MASK_RATIO_SCHEDULES = ("truncnorm", "cosine")  # MAR (Sec. 3.3) / MaskGIT (Chang et al. 2022, Sec. 3.2)


def sample_mask_ratio_cosine(generator=None) -> float:
    """One training mask ratio of MaskGIT: r = cos(pi/2 * u), u ~ U[0, 1) (Chang et al. 2022, Sec. 3.2: the
    mask scheduling function gamma = cos evaluated at a uniform draw); r is in (0, 1]."""
    u = rand((1,), generator, generator.device if generator is not None else None, dtype=torch.float64)
    return float(torch.cos(math.pi / 2.0 * u.cpu()))


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


def generation_schedule(num_unknown: int, num_iter: int) -> list[int]:
    """Tokens still unknown after each generation step k = 0..K-1 (cosine schedule); the last entry is 0.

    mask_len_k = floor(U * cos(pi/2 * (k+1)/K)), clamped to [1, unknown_now - 1]; the last step predicts
    every remaining token. Step k predicts unknown_before - unknown_after tokens. U is the number of tokens to
    generate: L for plain sampling, the unknown count when editing (the schedule counts from it).
    """
    if num_iter < 1 or num_iter > num_unknown:
        raise ValueError(f"num_iter must be in [1, {num_unknown}] (the number of tokens to generate), got {num_iter}")
    masked_now, after = num_unknown, []
    for k in range(num_iter):
        if k == num_iter - 1:
            after.append(0)
            break
        mask_len = math.floor(num_unknown * math.cos(math.pi / 2.0 * (k + 1) / num_iter))
        mask_len = max(1, min(masked_now - 1, mask_len))
        after.append(mask_len)
        masked_now = mask_len
    return after


def cfg_scales(cfg: float, schedule: str, num_unknown: int, masked_after: Sequence[int]) -> list[float]:
    """CFG scale at each step: ``linear`` 1 + (cfg-1)*(U - mask_len)/U, ``constant`` cfg.

    ``mask_len`` is the step's clamped next-mask length, as in the reference (for the last step the clamp
    gives 1, not 0, so the linear scale ends at 1 + (cfg-1)*(U-1)/U). U as in ``generation_schedule``.
    """
    if schedule == "constant":
        return [float(cfg)] * len(masked_after)
    if schedule != "linear":
        raise ValueError(f"unknown cfg_schedule {schedule!r}: use 'linear' or 'constant'")
    last = len(masked_after) - 1
    u = num_unknown
    return [1.0 + (cfg - 1.0) * (u - (m if k < last else 1)) / u for k, m in enumerate(masked_after)]
