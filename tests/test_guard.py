"""The opt-in sampler guard `clip_denoised`: the predicted x0 clamped to [-r, r] at every diffusion step.

Checked against hand computations (float64, independent of the tables), and for being a no-op when off:
None and a range nothing reaches give the reference sampler bit for bit.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from diffloss import cosine_diffusion
from diffloss.loss import check_sampling_options
from test_fast_path import _ref_abar, tiny_model


def _posterior_by_hand(ab: float, ab_prev: float, xt: np.ndarray, x0: np.ndarray) -> np.ndarray:
    beta = 1 - ab / ab_prev
    return beta * math.sqrt(ab_prev) / (1 - ab) * x0 + (1 - ab_prev) * math.sqrt(1 - beta) / (1 - ab) * xt


@pytest.mark.parametrize("r", [0.5, 2.0])
def test_p_mean_variance_clamps_x0_hat_before_the_posterior_mean(r):
    diff = cosine_diffusion(10)
    kept = diff.timestep_map.tolist()
    abar = _ref_abar()
    g = torch.Generator().manual_seed(0)
    for idx in range(10):
        xt = torch.randn(6, 3, generator=g, dtype=torch.float64) * 2
        out = torch.randn(6, 6, generator=g, dtype=torch.float64)
        t = torch.full((6,), idx)
        mean, logvar, x0 = diff.p_mean_variance(out, xt, t, clip_denoised=r)
        ab, ab_prev = abar[kept[idx]], (abar[kept[idx - 1]] if idx else 1.0)
        x0_hand = np.clip((xt.numpy() - math.sqrt(1 - ab) * out[:, :3].numpy()) / math.sqrt(ab), -r, r)
        np.testing.assert_allclose(x0.numpy(), x0_hand, rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(mean.numpy(), _posterior_by_hand(ab, ab_prev, xt.numpy(), x0_hand),
                                   rtol=1e-8, atol=1e-8)
        assert (x0.abs() <= r).all() and (x0.abs() == r).any()  # the clamp is active in these draws
        # the variance does not depend on the guard
        torch.testing.assert_close(logvar, diff.p_mean_variance(out, xt, t)[1], rtol=0, atol=0)


def test_ddim_step_with_clamp_uses_the_eps_of_the_clamped_x0():
    diff = cosine_diffusion(10)
    kept = diff.timestep_map.tolist()
    abar = _ref_abar()
    g = torch.Generator().manual_seed(1)
    r = 0.7
    for idx in range(10):
        xt = torch.randn(5, 2, generator=g, dtype=torch.float64) * 2
        out = torch.randn(5, 4, generator=g, dtype=torch.float64)
        noise = torch.randn(5, 2, generator=g, dtype=torch.float64)
        t = torch.full((5,), idx)
        ab, ab_prev = abar[kept[idx]], (abar[kept[idx - 1]] if idx else 1.0)
        x0 = np.clip((xt.numpy() - math.sqrt(1 - ab) * out[:, :2].numpy()) / math.sqrt(ab), -r, r)
        eps = (xt.numpy() - math.sqrt(ab) * x0) / math.sqrt(1 - ab)
        eta = 0.5
        sigma = eta * math.sqrt((1 - ab_prev) / (1 - ab)) * math.sqrt(1 - ab / ab_prev)
        expect = (math.sqrt(ab_prev) * x0 + math.sqrt(max(1 - ab_prev - sigma ** 2, 0)) * eps
                  + sigma * noise.numpy() * 0.9)
        got = diff.ddim_step(out, xt, t, noise, eta, 0.9, clip_denoised=r)
        np.testing.assert_allclose(got.numpy(), expect, rtol=1e-8, atol=1e-8)


def test_guard_off_or_out_of_reach_is_the_reference_sampler_bit_for_bit():
    model = tiny_model()
    gen = lambda s: torch.Generator().manual_seed(s)  # noqa: E731
    for kw in [dict(cfg=1.0, generator=lambda: gen(5)), dict(cfg=3.0, generator=lambda: [gen(7), gen(8)])]:
        args = dict(num_iter=4, cfg=kw["cfg"], labels=torch.tensor([1, 7]))
        ref = model.sample_tokens(2, generator=kw["generator"](), **args)
        assert torch.equal(ref, model.sample_tokens(2, generator=kw["generator"](), clip_denoised=None, **args))
        assert torch.equal(ref, model.sample_tokens(2, generator=kw["generator"](), clip_denoised=1e30, **args))


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_guard_bounds_the_generated_tokens(sampler):
    """The last step returns the (clamped) x0_hat: every token lies in [-r, r]; without the guard the random
    head (whose first step amplifies its eps by ~1e4) gives tokens far outside."""
    model = tiny_model()
    kw = dict(num_iter=4, cfg=2.0, labels=torch.tensor([3, 4, 5]), sampler=sampler)
    free = model.sample_tokens(3, generator=torch.Generator().manual_seed(0), **kw)
    r = 0.25
    guarded = model.sample_tokens(3, generator=torch.Generator().manual_seed(0), clip_denoised=r, **kw)
    assert free.abs().max() > 4 * r
    assert guarded.abs().max() <= r * (1 + 1e-6) and guarded.abs().max() > 0.5 * r


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), float("inf"), True, "2"])
def test_bad_guard_values_are_one_clear_error(bad):
    with pytest.raises(ValueError, match="clip_denoised must be None"):
        check_sampling_options(clip_denoised=bad)
    with pytest.raises(ValueError, match="clip_denoised must be None"):
        tiny_model().sample_tokens(1, num_iter=2, clip_denoised=bad)
