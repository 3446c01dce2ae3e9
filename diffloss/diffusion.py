"""Gaussian diffusion for the per-token Diffusion Loss (SPEC section 3).

Cosine schedule, timestep respacing, learned-range variance, the hybrid MSE + VLB training loss and
ancestral sampling with temperature: the ~250 lines of improved-diffusion that MAR actually uses.

Glossary
    N       rows (tokens, already repeated diffusion_batch_mul times by the caller)
    C       token channels; the net outputs 2C = (eps_hat, v)
    T       training timesteps (1000); K = respaced steps (num_sampling_steps, e.g. 100)
    t       an index into this diffusion's own schedule, in [0, K); `timestep_map[t]` is the original
            step in [0, T) that the net is fed
    abar    alpha_bar_t = prod_{s<=t} (1 - beta_s)

Equations (Ho et al. 2020, eq. 4, 6, 7; Nichol & Dhariwal 2021 "IDDPM", eq. 15)
    q(x_t | x_0)          = N(sqrt(abar_t) x_0, (1 - abar_t) I)
    q(x_{t-1} | x_t, x_0) = N(c1_t x_0 + c2_t x_t, pvar_t I)
        c1_t = beta_t sqrt(abar_{t-1}) / (1 - abar_t),  c2_t = (1 - abar_{t-1}) sqrt(1 - beta_t) / (1 - abar_t)
        pvar_t = beta_t (1 - abar_{t-1}) / (1 - abar_t)   ("clipped" log: log pvar_0 := log pvar_1)
    p(x_{t-1} | x_t)      = N(c1_t x0_hat + c2_t x_t, exp(logvar))
        x0_hat = sqrt(1/abar_t) x_t - sqrt(1/abar_t - 1) eps_hat              (no clipping)
        logvar = f log(beta_t) + (1 - f) log(pvar_t clipped),  f = (v + 1) / 2
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

ModelFn = Callable[[Tensor, Tensor], Tensor]  # (x_t (N, C), original timesteps (N,)) -> (N, 2C)


# ----------------------------------------------------------------------------- schedules (pure functions)
def cosine_alpha_bar(t: Tensor) -> Tensor:
    """abar(t) = cos(((t + 0.008) / 1.008) * pi / 2)^2 for t in [0, 1] (Nichol & Dhariwal, eq. 17)."""
    return torch.cos((t + 0.008) / 1.008 * (math.pi / 2)) ** 2


def cosine_betas(num_timesteps: int = 1000, max_beta: float = 0.999) -> Tensor:
    """beta_i = min(1 - abar((i+1)/T) / abar(i/T), max_beta), i = 0..T-1; float64 (T,)."""
    if num_timesteps < 2:
        raise ValueError(f"num_timesteps must be >= 2, got {num_timesteps}")
    i = torch.arange(num_timesteps, dtype=torch.float64, device="cpu")
    ratio = cosine_alpha_bar((i + 1) / num_timesteps) / cosine_alpha_bar(i / num_timesteps)
    return (1.0 - ratio).clamp(max=max_beta)


def _parse_sections(num_steps: int | str) -> list[int]:
    if isinstance(num_steps, int) and not isinstance(num_steps, bool):
        return [num_steps]
    if isinstance(num_steps, str):
        parts = [p.strip() for p in num_steps.split(",")]
        if parts and all(p.isdigit() for p in parts):
            return [int(p) for p in parts]
    raise ValueError(
        f"num_steps must be an int or a string of step counts like '100' or '10,20', got {num_steps!r}")


def respace_timesteps(num_timesteps: int, num_steps: int | str) -> Tensor:
    """Original timesteps kept when sampling with fewer steps; ascending LongTensor (K,).

    improved-diffusion's `space_timesteps`: [0, T) is split into len(sections) equal parts and each part
    keeps `count` steps at start + round(i * (size - 1) / (count - 1)) (Python rounding, accumulated
    stride). For 1000 / "100": 0, 10, 20, ..., 989, 999 (stride 999/99).
    """
    sections = _parse_sections(num_steps)
    size_per, extra = divmod(num_timesteps, len(sections))
    kept: list[int] = []
    start = 0
    for i, count in enumerate(sections):
        size = size_per + (1 if i < extra else 0)
        if not 1 <= count <= size:
            raise ValueError(f"cannot keep {count} steps out of a section of {size} timesteps "
                             f"(num_timesteps={num_timesteps}, num_steps={num_steps!r})")
        stride = 1.0 if count == 1 else (size - 1) / (count - 1)
        cur = 0.0
        for _ in range(count):
            kept.append(start + round(cur))
            cur += stride
        start += size
    return torch.tensor(sorted(set(kept)), dtype=torch.long, device="cpu")


def respaced_betas(betas: Tensor, kept: Tensor) -> Tensor:
    """beta'_k = 1 - abar[kept_k] / abar[kept_{k-1}] with abar[kept_{-1}] := 1; float64 (K,)."""
    abar = torch.cumprod(1.0 - betas.to(torch.float64), dim=0)[kept]
    prev = torch.cat([abar.new_ones(1), abar[:-1]])
    return 1.0 - abar / prev


def annealed_step_counts(start: int, end: int, num_iter: int, shape: str = "linear") -> list[int]:
    """Diffusion steps K_k for MAR iterations k = 0..num_iter-1, going from `start` (k = 0) to `end` (last).

    u = k / (num_iter - 1) (u = 0 when num_iter = 1); linear: K = start + (end - start) u;
    cosine: K = end + (start - end) (1 + cos(pi u)) / 2 (stays near `start` longer, then falls). Rounded half
    up to an int. A fast-path option: the reference uses one fixed count for every iteration.
    """
    for name, v in (("start", start), ("end", end)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 2:
            raise ValueError(f"diffusion step counts must be ints >= 2 (a diffusion has 2 steps or more), "
                             f"got {name}={v!r}")
    if num_iter < 1:
        raise ValueError(f"num_iter must be >= 1, got {num_iter}")
    if shape not in ("linear", "cosine"):
        raise ValueError(f"unknown step-count schedule {shape!r}: use 'linear' or 'cosine'")
    counts = []
    for k in range(num_iter):
        u = k / (num_iter - 1) if num_iter > 1 else 0.0
        w = 1.0 - u if shape == "linear" else (1.0 + math.cos(math.pi * u)) / 2.0  # weight of `start`
        counts.append(int(math.floor(end + (start - end) * w + 0.5)))
    return counts


def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) per element, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x: Tensor) -> Tensor:
    """Phi(x) ~= 0.5 (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) (the approximation ADM/IDDPM use)."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def discretized_gaussian_log_likelihood(x: Tensor, mean: Tensor, log_scale: Tensor) -> Tensor:
    """log P(x) per element for N(mean, e^(2 log_scale)) integrated over bins of width 2/255 on [-1, 1];
    the outermost bins extend to -inf / +inf (x < -0.999 / x > 0.999). Natural log."""
    centered = x - mean
    inv_std = torch.exp(-log_scale)
    cdf_plus = approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


def check_generator(generator: torch.Generator | None, device: torch.device) -> None:
    """Raise a clear error when a generator lives on another device than the tensors it must fill."""
    if generator is not None and generator.device.type != torch.device(device).type:
        raise ValueError(f"the generator is on {generator.device} but the tensors are on {device}: "
                         f"create it with torch.Generator(device='{torch.device(device).type}')")


def _mean_flat(x: Tensor) -> Tensor:
    return x.mean(dim=tuple(range(1, x.dim())))


# ----------------------------------------------------------------------------- the diffusion process
class GaussianDiffusion:
    """A discrete Gaussian diffusion with K steps, eps prediction and learned-range variance.

    `betas` (K,) are this process's own betas (respaced ones for sampling); `timestep_map[t]` (K,) is the
    original integer timestep the net is fed at index t (identity when not respaced). All coefficients are
    float64 tables computed once; they are cast to the dtype of the tensor they multiply.
    """

    def __init__(self, betas: Tensor, timestep_map: Tensor | None = None):
        betas = torch.as_tensor(betas, dtype=torch.float64, device="cpu").detach()
        if betas.dim() != 1 or len(betas) < 2 or not bool(((betas > 0) & (betas <= 1)).all()):
            raise ValueError("betas must be a 1-D tensor of at least 2 values in (0, 1]")
        self.num_timesteps = len(betas)
        if timestep_map is None:
            timestep_map = torch.arange(self.num_timesteps, device="cpu")
        self.timestep_map = torch.as_tensor(timestep_map, dtype=torch.long, device="cpu")
        if self.timestep_map.shape != betas.shape:
            raise ValueError(f"timestep_map has shape {tuple(self.timestep_map.shape)}, betas {tuple(betas.shape)}")

        abar = torch.cumprod(1.0 - betas, dim=0)
        abar_prev = torch.cat([abar.new_ones(1), abar[:-1]])
        self.betas = betas
        self.alphas_cumprod = abar
        self.alphas_cumprod_prev = abar_prev
        self.posterior_variance = betas * (1.0 - abar_prev) / (1.0 - abar)
        # pvar_0 = 0, so its log is replaced by log pvar_1 ("clipped", as in IDDPM)
        self.posterior_log_variance_clipped = torch.log(
            torch.cat([self.posterior_variance[1:2], self.posterior_variance[1:]]))
        self.posterior_mean_coef1 = betas * abar_prev.sqrt() / (1.0 - abar)
        self.posterior_mean_coef2 = (1.0 - abar_prev) * (1.0 - betas).sqrt() / (1.0 - abar)
        self._tables = {
            "sqrt_abar": abar.sqrt(),
            "sqrt_one_minus_abar": (1.0 - abar).sqrt(),
            "sqrt_recip_abar": (1.0 / abar).sqrt(),
            "sqrt_recipm1_abar": (1.0 / abar - 1.0).sqrt(),
            "coef1": self.posterior_mean_coef1,
            "coef2": self.posterior_mean_coef2,
            "post_var": self.posterior_variance,
            "post_logvar_clipped": self.posterior_log_variance_clipped,
            "log_betas": torch.log(betas),
            # DDIM (fast path only)
            "sqrt_abar_prev": abar_prev.sqrt(),
            "one_minus_abar_prev": 1.0 - abar_prev,
        }
        self._on_device: dict[torch.device, dict[str, Tensor]] = {}
        self._scalars: dict[tuple, dict[str, list[Tensor]]] = {}

    # -- table look-up -------------------------------------------------------------------------------
    def _device_tables(self, device: torch.device) -> dict[str, Tensor]:
        if device not in self._on_device:
            dtype = torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64
            tables = {k: v.to(device=device, dtype=dtype) for k, v in self._tables.items()}
            tables["timestep_map"] = self.timestep_map.to(device)
            self._on_device[device] = tables
        return self._on_device[device]

    def _coef(self, name: str, t: Tensor | int, like: Tensor) -> Tensor:
        """table[name][t] cast to like.dtype, shaped (N, 1, ...) to broadcast against `like`; for an int t (every
        row at that step, as in a sampling loop) the precomputed 0-dim value (``_step_scalars``: the same value,
        without an index and a cast per call)."""
        if isinstance(t, int):
            return self._step_scalars(like)[name][t]
        values = self._device_tables(like.device)[name][t.to(like.device)]
        return values.to(like.dtype).view(-1, *([1] * (like.dim() - 1)))

    def _step_scalars(self, like: Tensor) -> dict[str, list[Tensor]]:
        """Every table's value at every step as a 0-dim tensor in like's dtype and device, built once: a loop
        whose rows share one step reads its coefficients without an index and a cast per step (the same values
        as ``_coef``, so the same arithmetic bit for bit)."""
        key = (like.device, like.dtype)
        if key not in self._scalars:
            tables = self._device_tables(like.device)
            self._scalars[key] = {k: list(v.to(like.dtype).unbind(0)) for k, v in tables.items()
                                  if k != "timestep_map"}
        return self._scalars[key]

    def original_timesteps(self, t: Tensor) -> Tensor:
        """timestep_map[t]: the original integer timesteps the net is fed, (N,) long."""
        return self._device_tables(t.device)["timestep_map"][t]

    # -- forward process and posterior -------------------------------------------------------------
    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise."""
        return self._coef("sqrt_abar", t, x0) * x0 + self._coef("sqrt_one_minus_abar", t, x0) * noise

    def q_posterior_mean_variance(self, x0: Tensor, xt: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q(x_{t-1} | x_t, x_0): (mean = c1 x0 + c2 xt, variance pvar_t, clipped log variance)."""
        mean = self._coef("coef1", t, xt) * x0 + self._coef("coef2", t, xt) * xt
        return mean, self._coef("post_var", t, xt), self._coef("post_logvar_clipped", t, xt)

    def p_mean_variance(self, model_output: Tensor, xt: Tensor, t: Tensor,
                        clip_denoised: float | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """p(x_{t-1} | x_t) from the net's (eps_hat, v) (N, 2C): returns (mean, log variance, x0_hat).

        `clip_denoised` r (opt-in, None = the reference: no clipping) clamps x0_hat to [-r, r] before the
        posterior mean, IDDPM's `clip_denoised` with the range in token units instead of [-1, 1].
        """
        channels = xt.shape[1]
        if model_output.shape[1] != 2 * channels:
            raise ValueError(f"model_output must have 2C = {2 * channels} channels (eps, v), "
                             f"got {model_output.shape[1]}")
        eps, v = model_output.split(channels, dim=1)
        frac = (v + 1) / 2
        log_var = (frac * self._coef("log_betas", t, xt)
                   + (1 - frac) * self._coef("post_logvar_clipped", t, xt))
        pred_x0 = self._predict_x0(xt, t, eps, clip_denoised)
        mean = self._coef("coef1", t, xt) * pred_x0 + self._coef("coef2", t, xt) * xt
        return mean, log_var, pred_x0

    def _predict_x0(self, xt: Tensor, t: Tensor, eps: Tensor, clip_denoised: float | None = None) -> Tensor:
        """x0_hat = sqrt(1/abar_t) x_t - sqrt(1/abar_t - 1) eps_hat, clamped to [-r, r] when r = clip_denoised."""
        pred_x0 = self._coef("sqrt_recip_abar", t, xt) * xt - self._coef("sqrt_recipm1_abar", t, xt) * eps
        return pred_x0 if clip_denoised is None else pred_x0.clamp(-clip_denoised, clip_denoised)

    # -- training ----------------------------------------------------------------------------------
    def hybrid_loss_terms(self, model_output: Tensor, x0: Tensor, xt: Tensor, t: Tensor,
                          noise: Tensor) -> tuple[Tensor, Tensor]:
        """Per-row (mse, vb), each (N,).

        mse = mean_C (noise - eps_hat)^2.
        vb  = mean_C KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)) / ln 2 for t > 0, and the discretized
              decoder NLL -log p(x_0|x_1) / ln 2 for t = 0; the mean of p uses eps_hat DETACHED, so vb
              trains only the variance channels v.
        """
        eps, v = model_output.split(xt.shape[1], dim=1)
        mse = _mean_flat((noise - eps) ** 2)
        mean, log_var, _ = self.p_mean_variance(torch.cat([eps.detach(), v], dim=1), xt, t)
        true_mean, _, true_log_var = self.q_posterior_mean_variance(x0, xt, t)
        kl = _mean_flat(normal_kl(true_mean, true_log_var, mean, log_var)) / math.log(2.0)
        nll = -_mean_flat(discretized_gaussian_log_likelihood(x0, mean, 0.5 * log_var)) / math.log(2.0)
        return mse, torch.where(t.to(kl.device) == 0, nll, kl)

    def training_losses(self, net: Callable[..., Tensor], x0: Tensor, t: Tensor, c: Tensor,
                        noise: Tensor | None = None, generator: torch.Generator | None = None) -> Tensor:
        """Per-row hybrid loss mse + vb, (N,). x0 (N, C), t (N,) indices, c (N, D) conditions; the net
        is called as net(x_t, timestep_map[t], c). `noise` defaults to N(0, I) drawn with `generator`."""
        if noise is None:
            check_generator(generator, x0.device)
            noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        xt = self.q_sample(x0, t, noise)
        model_output = net(xt, self.original_timesteps(t), c)
        mse, vb = self.hybrid_loss_terms(model_output, x0, xt, t, noise)
        return mse + vb

    # -- sampling ----------------------------------------------------------------------------------
    def p_sample(self, model_output: Tensor, xt: Tensor, t: Tensor | int, noise: Tensor,
                 temperature: float = 1.0, clip_denoised: float | None = None) -> Tensor:
        """One ancestral step: x_{t-1} = mean + [t > 0] exp(0.5 logvar) noise temperature. ``t``: (N,) indices, or
        one int index for every row (``_coef``)."""
        mean, log_var, _ = self.p_mean_variance(model_output, xt, t, clip_denoised)
        if isinstance(t, int):
            nonzero = 1.0 if t != 0 else 0.0
        else:
            nonzero = (t != 0).to(device=xt.device, dtype=xt.dtype).view(-1, *([1] * (xt.dim() - 1)))
        return mean + nonzero * torch.exp(0.5 * log_var) * noise * temperature

    def _start(self, shape: tuple[int, ...], noise: Tensor | None, generator: torch.Generator | None,
               device, dtype, step_noise: Tensor | None) -> Tensor:
        """x at the first sampling step: `noise`, or N(0, I) drawn with `generator`; checks `step_noise`'s shape."""
        check_generator(generator, noise.device if noise is not None else torch.device(device or "cpu"))
        if noise is None:
            noise = torch.randn(shape, generator=generator, device=device, dtype=dtype)
        if tuple(noise.shape) != tuple(shape):
            raise ValueError(f"noise has shape {tuple(noise.shape)} but shape is {tuple(shape)}")
        if step_noise is not None and tuple(step_noise.shape) != (self.num_timesteps, *shape):
            raise ValueError(f"step_noise must have shape {(self.num_timesteps, *tuple(shape))} (steps, *shape), "
                             f"got {tuple(step_noise.shape)}")
        return noise

    def p_sample_loop(self, net_fn: ModelFn, shape: tuple[int, ...], noise: Tensor | None = None,
                      temperature: float = 1.0, generator: torch.Generator | None = None,
                      device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                      step_noise: Tensor | None = None, clip_denoised: float | None = None) -> Tensor:
        """Ancestral sampling from index K-1 down to 0; returns x_0 of `shape`.

        x_{K-1} = `noise` (or N(0, I) drawn with `generator` on device/dtype); at each step the net gets
        the ORIGINAL timesteps (timestep_map, e.g. 999, 989, ..., 10, 0) and fresh N(0, I) noise of the
        full shape is drawn with `generator` (also at the last step, where it is multiplied by 0), or
        taken from `step_noise` (K, *shape), row s for the s-th step taken. `clip_denoised`: see
        `p_mean_variance` (opt-in; None is the reference sampler).
        """
        x = self._start(shape, noise, generator, device, dtype, step_noise)
        steps = self.timestep_map.tolist()
        for s, i in enumerate(reversed(range(self.num_timesteps))):
            t = torch.full((shape[0],), steps[i], device=x.device, dtype=torch.long)  # timestep_map[i], every row
            model_output = net_fn(x, t)
            if step_noise is None:
                eta = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            else:
                eta = step_noise[s].to(device=x.device, dtype=x.dtype)
            x = self.p_sample(model_output, x, i, eta, temperature, clip_denoised)  # int i: the step's scalars
        return x

    # -- DDIM (an opt-in fast path; the reference sampler above stays the default) ---------------------
    def ddim_step(self, model_output: Tensor, xt: Tensor, t: Tensor, noise: Tensor | None,
                  eta: float = 0.0, temperature: float = 1.0, clip_denoised: float | None = None) -> Tensor:
        """One DDIM step on this (respaced) schedule (Song et al. 2021, eq. 12), from the eps channels only:

            x0_hat  = sqrt(1/abar_t) x_t - sqrt(1/abar_t - 1) eps_hat
            sigma_t = eta sqrt((1 - abar_{t-1}) / (1 - abar_t)) sqrt(1 - abar_t / abar_{t-1}) = eta sqrt(pvar_t)
            x_{t-1} = sqrt(abar_{t-1}) x0_hat + sqrt(1 - abar_{t-1} - sigma_t^2) eps_hat + sigma_t noise temperature

        The learned variance channels are ignored. eta = 0 is deterministic (`noise` may be None); with
        eta = 1 the mean equals the ancestral mean and sigma_t^2 = pvar_t, so a net whose v outputs -1 gives
        exactly the DDPM step. At t = 0, abar_{-1} = 1 and pvar_0 = 0: the step returns x0_hat.
        With `clip_denoised` r, x0_hat is clamped to [-r, r] and eps_hat is recomputed from it (as in
        DDIM implementations that clip), so the step stays consistent with the clamped x0_hat.
        """
        if not 0.0 <= eta <= 1.0:
            raise ValueError(f"eta must be in [0, 1] (0 = deterministic DDIM, 1 = ancestral variance), got {eta}")
        channels = xt.shape[1]
        if model_output.shape[1] != 2 * channels:
            raise ValueError(f"model_output must have 2C = {2 * channels} channels (eps, v), "
                             f"got {model_output.shape[1]}")
        eps = model_output[:, :channels]
        tables = self._device_tables(xt.device)
        idx = t.to(xt.device)
        shape = (-1, *([1] * (xt.dim() - 1)))
        sigma2 = eta * eta * tables["post_var"][idx]  # in the tables' float64
        direction = (tables["one_minus_abar_prev"][idx] - sigma2).clamp(min=0.0).sqrt()
        pred_x0 = self._predict_x0(xt, t, eps, clip_denoised)
        if clip_denoised is not None:  # eps consistent with the clamped x0: (x_t sqrt(1/abar) - x0) / sqrt(1/abar - 1)
            eps = ((self._coef("sqrt_recip_abar", t, xt) * xt - pred_x0)
                   / self._coef("sqrt_recipm1_abar", t, xt))
        x = self._coef("sqrt_abar_prev", t, xt) * pred_x0 + direction.to(xt.dtype).view(shape) * eps
        if eta == 0.0:
            return x
        if noise is None:
            raise ValueError("DDIM with eta > 0 needs noise")
        return x + sigma2.sqrt().to(xt.dtype).view(shape) * noise * temperature

    def ddim_sample_loop(self, net_fn: ModelFn, shape: tuple[int, ...], noise: Tensor | None = None,
                         eta: float = 0.0, temperature: float = 1.0, generator: torch.Generator | None = None,
                         device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                         step_noise: Tensor | None = None, clip_denoised: float | None = None) -> Tensor:
        """DDIM from index K-1 down to 0, the net fed the original timesteps; returns x_0 of `shape`.

        x_{K-1} = `noise` (or N(0, I) drawn with `generator`). With eta = 0 nothing else is drawn; with
        eta > 0 fresh N(0, I) of the full shape is drawn per step (as in `p_sample_loop`) or taken from
        `step_noise` (K, *shape). `temperature` scales only the injected noise, so it has no effect at eta = 0.
        """
        x = self._start(shape, noise, generator, device, dtype, step_noise)
        for s, i in enumerate(reversed(range(self.num_timesteps))):
            t = torch.full((shape[0],), i, device=x.device, dtype=torch.long)
            model_output = net_fn(x, self.original_timesteps(t))
            fresh = None
            if eta > 0.0:
                fresh = (torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
                         if step_noise is None else step_noise[s].to(device=x.device, dtype=x.dtype))
            x = self.ddim_step(model_output, x, t, fresh, eta, temperature, clip_denoised)
        return x


def cosine_diffusion(num_steps: int | str | None = None, num_timesteps: int = 1000) -> GaussianDiffusion:
    """The cosine-schedule diffusion with T = num_timesteps, respaced to `num_steps` (None: no respacing)."""
    betas = cosine_betas(num_timesteps)
    if num_steps is None or num_steps == "":
        return GaussianDiffusion(betas)
    kept = respace_timesteps(num_timesteps, num_steps)
    return GaussianDiffusion(respaced_betas(betas, kept), timestep_map=kept)
