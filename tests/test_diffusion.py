"""Tests of diffloss/diffusion.py against closed-form formulas, independent float64 code written here,
and diffusers' DDPMScheduler (cosine "squaredcos_cap_v2" betas, learned_range variance, linspace spacing)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler

from diffloss import (GaussianDiffusion, cosine_alpha_bar, cosine_betas, cosine_diffusion, respace_timesteps,
                      respaced_betas)

T = 1000


def _scheduler() -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=T, beta_schedule="squaredcos_cap_v2", variance_type="learned_range",
                         prediction_type="epsilon", clip_sample=False, timestep_spacing="linspace")


def _ref_betas() -> np.ndarray:
    """Independent: beta_i = min(1 - abar((i+1)/T)/abar(i/T), 0.999) with Python floats."""
    abar = lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    return np.array([min(1 - abar((i + 1) / T) / abar(i / T), 0.999) for i in range(T)])


def _ref_abar() -> np.ndarray:
    return np.cumprod(1 - _ref_betas())


# ----------------------------------------------------------------------------- schedules
def test_cosine_alpha_bar_values():
    t = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    expect = [math.cos(0.008 / 1.008 * math.pi / 2) ** 2, math.cos(0.508 / 1.008 * math.pi / 2) ** 2,
              math.cos(math.pi / 2) ** 2]
    torch.testing.assert_close(cosine_alpha_bar(t), torch.tensor(expect, dtype=torch.float64), rtol=0, atol=1e-15)


def test_cosine_betas_closed_form():
    betas = cosine_betas(T)
    assert betas.dtype == torch.float64 and betas.shape == (T,)
    np.testing.assert_allclose(betas.numpy(), _ref_betas(), rtol=1e-12, atol=1e-15)
    assert betas[-1].item() == 0.999 and betas[:-1].max() < 0.999  # only the last beta is clipped
    # without clipping, cumprod(1 - beta) telescopes to abar((t+1)/T) / abar(0)
    abar = torch.cumprod(1 - betas, 0)[:-1]
    i = torch.arange(1, T, dtype=torch.float64)
    torch.testing.assert_close(abar, cosine_alpha_bar(i / T) / cosine_alpha_bar(torch.zeros(1, dtype=torch.float64)),
                               rtol=1e-10, atol=1e-15)


def test_betas_match_diffusers():
    sched = _scheduler()
    torch.testing.assert_close(cosine_betas(T), sched.betas.double(), rtol=0, atol=3e-8)  # float32 rounding
    torch.testing.assert_close(cosine_diffusion().alphas_cumprod, sched.alphas_cumprod.double(), rtol=2e-5, atol=1e-9)


def test_respacing_reference_values():
    kept = respace_timesteps(T, "100")
    assert kept.dtype == torch.long and len(kept) == 100
    assert kept[:4].tolist() == [0, 10, 20, 30] and kept[-3:].tolist() == [979, 989, 999]
    assert torch.equal(kept, torch.tensor([round(i * 999 / 99) for i in range(100)]))
    assert torch.equal(respace_timesteps(T, 100), kept)
    assert respace_timesteps(T, 1000).tolist() == list(range(T))
    assert respace_timesteps(10, "2,2").tolist() == [0, 4, 5, 9]  # two sections of 5 steps


@pytest.mark.parametrize("steps", [2, 10, 25, 50, 100, 250])
def test_respacing_matches_diffusers_linspace(steps):
    sched = _scheduler()
    sched.set_timesteps(steps)
    assert torch.equal(sched.timesteps, respace_timesteps(T, steps).flip(0))


@pytest.mark.parametrize("bad", [0, 1001, "ddim50", "abc", "", 2.5])
def test_respacing_rejects_bad_input(bad):
    with pytest.raises(ValueError):
        respace_timesteps(T, bad)


def test_respaced_betas_closed_form():
    kept = respace_timesteps(T, 100)
    new = respaced_betas(cosine_betas(T), kept)
    abar = _ref_abar()[kept.numpy()]
    expect = 1 - abar / np.concatenate([[1.0], abar[:-1]])
    np.testing.assert_allclose(new.numpy(), expect, rtol=1e-9, atol=1e-15)
    # the respaced chain has the same marginals q(x_t | x_0) at the kept steps
    gen = cosine_diffusion(100)
    np.testing.assert_allclose(gen.alphas_cumprod.numpy(), abar, rtol=1e-9)
    assert torch.equal(gen.timestep_map, kept) and gen.num_timesteps == 100


# ----------------------------------------------------------------------------- posterior and variance
@pytest.mark.parametrize("steps", [None, 100])
def test_posterior_matches_bayes(steps):
    """q(x_{t-1}|x_t,x_0) ∝ N(x_t; sqrt(a_t) x_{t-1}, b_t) N(x_{t-1}; sqrt(abar_{t-1}) x_0, 1-abar_{t-1})."""
    diff = cosine_diffusion(steps)
    kept = diff.timestep_map.numpy()
    abar = _ref_abar()[kept]
    abar_prev = np.concatenate([[1.0], abar[:-1]])
    alpha = abar / abar_prev
    beta = 1 - alpha
    t = torch.arange(1, diff.num_timesteps)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(len(t), 3, generator=g, dtype=torch.float64)
    xt = torch.randn(len(t), 3, generator=g, dtype=torch.float64)
    mean, var, logvar_clipped = diff.q_posterior_mean_variance(x0, xt, t)
    precision = 1 / (1 - abar_prev[1:]) + alpha[1:] / beta[1:]
    lin_x0 = np.sqrt(abar_prev[1:]) / (1 - abar_prev[1:]) / precision
    lin_xt = np.sqrt(alpha[1:]) / beta[1:] / precision
    expect = torch.from_numpy(lin_x0)[:, None] * x0 + torch.from_numpy(lin_xt)[:, None] * xt
    torch.testing.assert_close(mean, expect, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(var[:, 0], torch.from_numpy(1 / precision), rtol=1e-9, atol=0)
    torch.testing.assert_close(logvar_clipped[:, 0], torch.from_numpy(np.log(1 / precision)), rtol=0, atol=1e-9)
    # clipped: the log variance at t = 0 (where the posterior variance is 0) is the one at t = 1
    assert diff.posterior_variance[0] == 0
    assert diff.posterior_log_variance_clipped[0] == diff.posterior_log_variance_clipped[1]


def test_learned_range_endpoints():
    diff = cosine_diffusion(100)
    t = torch.tensor([0, 1, 50, 99])
    xt = torch.randn(4, 2, dtype=torch.float64)
    eps = torch.randn(4, 2, dtype=torch.float64)
    log_beta = torch.log(diff.betas[t])[:, None].expand(4, 2)
    log_post = diff.posterior_log_variance_clipped[t][:, None].expand(4, 2)
    for v, expect in [(1.0, log_beta), (-1.0, log_post), (0.0, 0.5 * (log_beta + log_post))]:
        out = torch.cat([eps, torch.full_like(eps, v)], dim=1)
        _, log_var, _ = diff.p_mean_variance(out, xt, t)
        torch.testing.assert_close(log_var, expect, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="2C"):
        diff.p_mean_variance(eps, xt, t)


def test_q_sample_matches_diffusers():
    diff = cosine_diffusion()
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g)
    t = torch.tensor([0, 1, 300, 500, 998, 999])
    torch.testing.assert_close(diff.q_sample(x0, t, noise), _scheduler().add_noise(x0, noise, t), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("steps", [None, 100])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_step_matches_diffusers(steps, dtype):
    """diffusers' DDPMScheduler.step (learned_range, no clipping) is our p_sample at temperature 1.

    float32: diffusers' own float32 tables (loose tolerance, |x| reaches ~600 at t = 999); float64: its
    alphas_cumprod replaced by the float64 cumprod of the closed-form betas (tight tolerance)."""
    diff = cosine_diffusion(steps)
    sched = _scheduler()
    if dtype == torch.float64:
        sched.alphas_cumprod = torch.from_numpy(_ref_abar())
        sched.one = torch.tensor(1.0, dtype=dtype)
    if steps is not None:
        sched.set_timesteps(steps)
    for idx in [diff.num_timesteps - 1, diff.num_timesteps // 2, 1, 0]:
        g = torch.Generator().manual_seed(idx)
        xt, eps = torch.randn(5, 4, generator=g, dtype=dtype), torch.randn(5, 4, generator=g, dtype=dtype)
        v = torch.rand(5, 4, generator=g, dtype=dtype) * 2 - 1
        out = torch.cat([eps, v], dim=1)
        orig = int(diff.timestep_map[idx])
        ref = sched.step(out, orig, xt, generator=torch.Generator().manual_seed(123)).prev_sample
        noise = torch.randn(5, 4, generator=torch.Generator().manual_seed(123), dtype=dtype)
        ours = diff.p_sample(out, xt, torch.full((5,), idx), noise)
        assert ours.dtype == dtype
        if dtype == torch.float64:
            torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)
        else:
            torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5 * max(ref.abs().max().item(), 1.0))


# ----------------------------------------------------------------------------- hybrid loss
def _ref_vb_bits(x0, xt, eps_hat, v, t, abar_all):
    """Independent float64 vb: KL(q || p) / ln 2 averaged over channels, or the discretized NLL at t = 0."""
    x0, xt, eps_hat, v = (a.double().numpy() for a in (x0, xt, eps_hat, v))

    def abar_prev(s):
        return abar_all[s - 1] if s > 0 else 1.0

    def post_var(s):
        return (1 - abar_prev(s)) / (1 - abar_all[s]) * (1 - abar_all[s] / abar_prev(s))

    def cdf(y):  # tanh approximation of the standard normal CDF
        return 0.5 * (1 + np.tanh(math.sqrt(2 / math.pi) * (y + 0.044715 * y ** 3)))
    out = []
    for i, ti in enumerate(t.tolist()):
        ab, ab_prev = abar_all[ti], abar_prev(ti)
        beta = 1 - ab / ab_prev
        log_post = math.log(post_var(max(ti, 1)))  # clipped: t = 0 uses the posterior variance at t = 1
        c1 = beta * math.sqrt(ab_prev) / (1 - ab)
        c2 = (1 - ab_prev) * math.sqrt(1 - beta) / (1 - ab)
        x0_hat = (xt[i] - math.sqrt(1 - ab) * eps_hat[i]) / math.sqrt(ab)
        mean_p = c1 * x0_hat + c2 * xt[i]
        f = (v[i] + 1) / 2
        logvar_p = f * math.log(beta) + (1 - f) * log_post
        if ti > 0:
            mean_q = c1 * x0[i] + c2 * xt[i]
            kl = 0.5 * (-1 + logvar_p - log_post + np.exp(log_post - logvar_p)
                        + (mean_q - mean_p) ** 2 / np.exp(logvar_p))
            out.append(kl.mean() / math.log(2))
        else:
            sd = np.exp(0.5 * logvar_p)
            hi, lo = cdf((x0[i] - mean_p + 1 / 255) / sd), cdf((x0[i] - mean_p - 1 / 255) / sd)
            p = np.where(x0[i] < -0.999, hi, np.where(x0[i] > 0.999, 1 - lo, hi - lo))
            out.append(-np.log(np.maximum(p, 1e-12)).mean() / math.log(2))
    return torch.tensor(out, dtype=torch.float64)


def test_hybrid_loss_matches_independent_computation():
    diff = cosine_diffusion()
    g = torch.Generator().manual_seed(2)
    n, c = 8, 5
    t = torch.tensor([0, 0, 0, 1, 2, 100, 700, 999])
    x0 = torch.rand(n, c, generator=g, dtype=torch.float64) * 2 - 1
    x0[0, 0], x0[1, 1] = -1.0, 1.0  # the open-ended edge bins of the decoder NLL
    noise = torch.randn(n, c, generator=g, dtype=torch.float64)
    out = torch.randn(n, 2 * c, generator=g, dtype=torch.float64) * 0.5
    out[:2, :c] = noise[:2] + 1e-3 * out[:2, :c]  # a near-perfect eps so the t=0 NLL is moderate
    xt = diff.q_sample(x0, t, noise)
    mse, vb = diff.hybrid_loss_terms(out, x0, xt, t, noise)
    torch.testing.assert_close(mse, ((noise - out[:, :c]) ** 2).mean(1), rtol=1e-12, atol=0)
    ref = _ref_vb_bits(x0, xt, out[:, :c], out[:, c:], t, _ref_abar())
    torch.testing.assert_close(vb, ref, rtol=1e-7, atol=1e-9)
    # training_losses = mse + vb with the net fed x_t and the original timesteps
    seen = {}

    def net(x, ts, cond):
        seen["x"], seen["t"] = x, ts
        return out
    loss = diff.training_losses(net, x0, t, torch.zeros(n, 3, dtype=torch.float64), noise)
    torch.testing.assert_close(loss, mse + vb)
    torch.testing.assert_close(seen["x"], xt)
    assert torch.equal(seen["t"], t)
    respaced = cosine_diffusion(10)  # a respaced process feeds the net the original timesteps
    respaced.training_losses(net, x0, torch.tensor([0, 1, 2, 3, 4, 5, 8, 9]), torch.zeros(n, 3), noise)
    assert seen["t"].tolist() == respace_timesteps(T, 10)[[0, 1, 2, 3, 4, 5, 8, 9]].tolist()


def test_vb_uses_detached_mean():
    diff = cosine_diffusion()
    g = torch.Generator().manual_seed(3)
    n, c = 6, 4
    t = torch.tensor([0, 5, 50, 400, 800, 999])
    x0, noise = torch.rand(n, c, generator=g) * 2 - 1, torch.randn(n, c, generator=g)
    out = torch.randn(n, 2 * c, generator=g).requires_grad_()
    xt = diff.q_sample(x0, t, noise)
    mse, vb = diff.hybrid_loss_terms(out, x0, xt, t, noise)
    (grad_vb,) = torch.autograd.grad(vb.sum(), out, retain_graph=True)
    assert torch.all(grad_vb[:, :c] == 0)
    assert torch.all(grad_vb[:, c:].abs().sum(1) > 0)
    (grad_all,) = torch.autograd.grad((mse + vb).sum(), out)
    torch.testing.assert_close(grad_all[:, :c], 2 * (out[:, :c] - noise).detach() / c)


# ----------------------------------------------------------------------------- sampling
def test_one_respaced_step_by_hand():
    diff = cosine_diffusion(100)
    g = torch.Generator().manual_seed(4)
    xt, eps = torch.randn(3, 2, generator=g, dtype=torch.float64), torch.randn(3, 2, generator=g, dtype=torch.float64)
    v = torch.rand(3, 2, generator=g, dtype=torch.float64) * 2 - 1
    noise = torch.randn(3, 2, generator=g, dtype=torch.float64)
    out = torch.cat([eps, v], 1)
    abar = _ref_abar()
    for idx in [99, 40, 1, 0]:
        t_now, t_prev = int(diff.timestep_map[idx]), (int(diff.timestep_map[idx - 1]) if idx else None)
        ab, ab_prev = abar[t_now], (abar[t_prev] if idx else 1.0)
        beta = 1 - ab / ab_prev
        post = lambda a, ap: (1 - ap) / (1 - a) * (1 - a / ap)  # noqa: E731
        log_post = math.log(post(ab, ab_prev) if idx else post(abar[10], abar[0]))  # clipped at idx 0
        x0_hat = (xt - math.sqrt(1 - ab) * eps) / math.sqrt(ab)
        mean = beta * math.sqrt(ab_prev) / (1 - ab) * x0_hat + (1 - ab_prev) * math.sqrt(1 - beta) / (1 - ab) * xt
        logvar = (v + 1) / 2 * math.log(beta) + (1 - v) / 2 * log_post
        t = torch.full((3,), idx)
        for temp in [1.0, 0.7, 0.0]:
            expect = mean + (idx > 0) * torch.exp(0.5 * logvar) * noise * temp
            torch.testing.assert_close(diff.p_sample(out, xt, t, noise, temp), expect, rtol=1e-9, atol=1e-9)
        # temperature 0 is the mean; temperature scales only the injected noise; t = 0 adds no noise
        torch.testing.assert_close(diff.p_sample(out, xt, t, noise, 0.0), mean, rtol=1e-9, atol=1e-9)
        assert torch.equal(diff.p_sample(out, xt, t, noise, 0.0), diff.p_sample(out, xt, t, 0 * noise, 1.0))
        if idx == 0:
            assert torch.equal(diff.p_sample(out, xt, t, noise, 1.0), diff.p_sample(out, xt, t, 100 * noise, 1.0))


def test_p_sample_loop_feeds_original_timesteps_and_is_a_chain_of_steps():
    diff = cosine_diffusion(10)
    w = torch.randn(4, 8, generator=torch.Generator().manual_seed(5)) * 0.3
    seen = []

    def net_fn(x, ts):
        seen.append(ts.clone())
        return torch.cat([torch.tanh(x @ w[:, :4]), torch.tanh(x @ w[:, 4:])], 1) + ts[:, None] / 1000

    x_T = torch.randn(3, 4, generator=torch.Generator().manual_seed(6))
    out = diff.p_sample_loop(net_fn, (3, 4), x_T, 0.9, torch.Generator().manual_seed(7))
    assert [s.tolist() for s in seen] == [[k] * 3 for k in reversed(respace_timesteps(T, 10).tolist())]
    g, x = torch.Generator().manual_seed(7), x_T
    for idx in reversed(range(10)):
        t = torch.full((3,), idx)
        x = diff.p_sample(net_fn(x, diff.timestep_map[t]), x, t, torch.randn(3, 4, generator=g), 0.9)
    torch.testing.assert_close(out, x, rtol=0, atol=0)
    with pytest.raises(ValueError, match="shape"):
        diff.p_sample_loop(net_fn, (2, 4), x_T)


def test_gaussian_diffusion_rejects_bad_betas():
    with pytest.raises(ValueError):
        GaussianDiffusion(torch.tensor([0.1]))
    with pytest.raises(ValueError):
        GaussianDiffusion(torch.tensor([0.1, 1.5]))
    with pytest.raises(ValueError):
        GaussianDiffusion(torch.tensor([0.1, 0.2]), timestep_map=torch.tensor([0]))
