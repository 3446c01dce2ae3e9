"""DiffLoss: the per-token Diffusion Loss and its sampler (SPEC section 3).

Glossary
    N   rows (tokens; the caller repeats them diffusion_batch_mul times for training)
    C   token channels (target_channels), D condition width (z_channels)
    s   classifier-free guidance scale (cfg)

The transformer only sees two calls: `forward(target, z, mask) -> loss` and
`sample(z, temperature, cfg) -> tokens`; the diffusion stays inside this module.
"""
from __future__ import annotations

import contextlib
import math

import torch
from torch import Tensor, nn

from .diffusion import GaussianDiffusion, check_generator, cosine_diffusion
from .mlp import SimpleMLPAdaLN

NUM_TRAIN_TIMESTEPS = 1000
SAMPLERS = ("ddpm", "ddim")  # "ddpm": the reference ancestral sampler (default); "ddim": fast path
AUTOCAST_DTYPES = (None, torch.bfloat16, torch.float16)


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
        self._respaced: dict[int, GaussianDiffusion] = {}  # fast path: respaced diffusions by step count

    def sampling_diffusion(self, num_steps: int | None = None) -> GaussianDiffusion:
        """The sampler's diffusion: `gen_diffusion` for None, else the schedule respaced to `num_steps`
        (2..1000) evenly, built once per count and cached (the annealed schedule asks for many counts)."""
        if num_steps is None:
            return self.gen_diffusion
        if isinstance(num_steps, bool) or not isinstance(num_steps, int) or not 2 <= num_steps <= NUM_TRAIN_TIMESTEPS:
            raise ValueError(f"num_steps must be an int in [2, {NUM_TRAIN_TIMESTEPS}] or None, got {num_steps!r}")
        if num_steps not in self._respaced:
            self._respaced[num_steps] = cosine_diffusion(num_steps, NUM_TRAIN_TIMESTEPS)
        return self._respaced[num_steps]

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
               noise: tuple[Tensor, Tensor | None] | None = None, *, sampler: str = "ddpm", eta: float = 0.0,
               num_steps: int | None = None, autocast_dtype: torch.dtype | None = None,
               clip_denoised: float | None = None, row_bucket: int | None = None) -> Tensor:
        """Sample tokens (N, C) by ancestral sampling over `num_sampling_steps` (K).

        cfg == 1: z (N, D), x_T ~ N(0, I) (N, C). cfg != 1: z = [cond; uncond] (2N, D); x_T is drawn for
        N rows and duplicated, every step uses `guided_model_output`, and the cond half (first N rows)
        is returned. All noise is drawn with `generator` on z.device in z.dtype: x_T first, then (rows, C)
        per step. `noise` = (x_T (N, C), per-step noise (K, len(z), C)) replaces those draws. `generator` may
        also be a list of B generators, one per sample owning N / B consecutive rows of each half: the noise
        is then drawn sample by sample (`per_sample_noise`), so a sample's tokens do not depend on its batch.

        Fast path (opt-in; the defaults are the reference sampler): `sampler="ddim"` with `eta` in [0, 1]
        (eta = 0: deterministic, no per-step noise, so noise[1] may be None); `num_steps` respaces to that
        many steps instead of `num_sampling_steps` (K becomes num_steps); `autocast_dtype` (torch.bfloat16 or
        torch.float16) runs the net under autocast while x and the diffusion arithmetic stay in z.dtype.

        Guard (opt-in, either sampler): `clip_denoised` r clamps the predicted x0 to [-r, r] at every step
        (see `GaussianDiffusion.p_mean_variance`); None, the default, is the reference sampler.

        Static shapes (opt-in): `row_bucket` R runs the net on the rows padded with zeros up to a multiple of R
        (`row_padded`), so that over a whole generation the net sees only a few row counts, each captured once
        by CUDA graphs (`torch.compile(mode="reduce-overhead")`, `mar.model.compile_for_sampling`). The noise
        and the diffusion arithmetic keep the real rows: the draws are the same, the tokens equal to rounding.
        """
        check_sampling_options(sampler, eta, autocast_dtype, clip_denoised, row_bucket)
        diffusion = self.sampling_diffusion(num_steps)
        if z.dim() != 2:
            raise ValueError(f"z must be (N, D), got {tuple(z.shape)}")
        guided = float(cfg) != 1.0
        if guided and len(z) % 2:
            raise ValueError(f"with cfg != 1, z must hold [cond; uncond] rows (an even count), got {len(z)}")
        n = len(z) // 2 if guided else len(z)
        if isinstance(generator, (list, tuple)):  # one generator per sample: draw its rows' noise from it alone
            if noise is not None:
                raise ValueError("pass either noise or a list of generators, not both")
            drawn = 0 if sampler == "ddim" and eta == 0.0 else diffusion.num_timesteps  # eta = 0 DDIM: x_T only
            noise, generator = per_sample_noise(generator, n, self.in_channels, drawn, guided, z.device, z.dtype), None
        check_generator(generator, z.device)
        step_noise = None
        if noise is None:
            x_T = torch.randn((n, self.in_channels), generator=generator, device=z.device, dtype=z.dtype)
        else:
            x_T, step_noise = noise[0].to(device=z.device, dtype=z.dtype), noise[1]
            if tuple(x_T.shape) != (n, self.in_channels):
                raise ValueError(f"noise[0] (x_T) must have shape {(n, self.in_channels)}, got {tuple(x_T.shape)}")
        net = _embedded(self.net) if autocast_dtype is None else _output_in_input_dtype(_embedded(self.net))
        if guided:
            x_T = torch.cat([x_T, x_T], dim=0)  # (2N, C): both halves start from the same noise
        with autocast_region(self, z.device.type, autocast_dtype):  # weights are cast once, not at every step
            c = self.net.cond_embed(z)  # (N or 2N, W): the condition's embedding, the same at every step
            if row_bucket is not None:
                net = row_padded(net, c, row_bucket)
            if guided:
                def net_fn(x: Tensor, t: Tensor) -> Tensor:
                    return guided_model_output(net, x, t, c, float(cfg))
            else:
                def net_fn(x: Tensor, t: Tensor) -> Tensor:
                    return net(x, t, c)
            if sampler == "ddim":
                x = diffusion.ddim_sample_loop(net_fn, tuple(x_T.shape), x_T, eta, temperature, generator,
                                               step_noise=step_noise, clip_denoised=clip_denoised)
            else:
                x = diffusion.p_sample_loop(net_fn, tuple(x_T.shape), x_T, temperature, generator,
                                            step_noise=step_noise, clip_denoised=clip_denoised)
        return x[:n]


def per_sample_noise(generators, n: int, channels: int, steps: int, guided: bool, device, dtype
                     ) -> tuple[Tensor, Tensor | None]:
    """All the sampler's noise for N = B * r rows, drawn sample by sample: generator b draws its r rows.

    Generator b draws (1 + steps * halves, r, C) at once: its x_T rows, then its rows of every step (cond half,
    then uncond half with CFG). Returns (x_T (N, C), per-step noise (steps, halves * N, C)) in the row layout of
    `DiffLoss.sample` ([cond (N); uncond (N)] per step), or (x_T, None) for steps = 0 (deterministic DDIM).
    """
    b = len(generators)
    if n % b:
        raise ValueError(f"{n} rows do not split over {b} per-sample generators: pass one per sample")
    r, halves = n // b, 2 if guided else 1
    draws = [torch.randn((1 + steps * halves, r, channels), generator=g, device=g.device, dtype=dtype).to(device)
             for g in generators]
    x_t = torch.cat([d[0] for d in draws])  # (N, C)
    if steps == 0:
        return x_t, None
    per_step = torch.stack([d[1:].reshape(steps, halves, r, channels) for d in draws], dim=2)  # (S, halves, B, r, C)
    return x_t, per_step.reshape(steps, halves * n, channels)


def check_sampling_options(sampler: str = "ddpm", eta: float = 0.0, autocast_dtype: torch.dtype | None = None,
                           clip_denoised: float | None = None, row_bucket: int | None = None) -> None:
    """One clear error for a bad fast-path or guard option."""
    check_row_bucket(row_bucket)
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}: use one of {', '.join(SAMPLERS)}")
    if sampler == "ddpm" and eta != 0.0:
        raise ValueError(f"eta={eta} applies to sampler='ddim' only; the ddpm sampler has no eta")
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must be in [0, 1] (0 = deterministic DDIM), got {eta}")
    if autocast_dtype not in AUTOCAST_DTYPES:
        raise ValueError(f"autocast_dtype must be None, torch.bfloat16 or torch.float16, got {autocast_dtype!r}")
    if clip_denoised is not None and (isinstance(clip_denoised, bool) or not isinstance(clip_denoised, (int, float))
                                      or not math.isfinite(clip_denoised) or clip_denoised <= 0):
        raise ValueError(f"clip_denoised must be None / null (off, the reference sampler) or a positive number r "
                         f"(the predicted x0 is clamped to [-r, r], in token units), got {clip_denoised!r}")


@contextlib.contextmanager
def autocast_region(module: nn.Module, device_type: str, dtype: torch.dtype | None):
    """``torch.autocast(device_type, dtype)`` for a whole sampling loop; nothing when dtype is None.

    autocast keeps its low-precision copy of a weight for the whole region only for leaf tensors that
    require grad; the parameters of a frozen model (``requires_grad_(False)``, e.g. an EMA copy) would be
    cast again at every call, which makes the head's small matmuls slower than in fp32. Their flag is set
    for the region and restored after it. Use under ``torch.no_grad()`` only (nothing may be recorded).
    """
    if dtype is None:
        yield
        return
    if torch.is_grad_enabled():
        raise RuntimeError("autocast_region is for sampling: call it under torch.no_grad()")
    frozen = [p for p in module.parameters() if not p.requires_grad]
    try:
        for p in frozen:
            p.requires_grad_(True)
        with torch.autocast(device_type, dtype=dtype):
            yield
    finally:
        for p in frozen:
            p.requires_grad_(False)


def check_row_bucket(row_bucket: int | None) -> None:
    if row_bucket is not None and (isinstance(row_bucket, bool) or not isinstance(row_bucket, int) or row_bucket < 1):
        raise ValueError(f"row_bucket must be None / null (the rows as they come) or an int >= 1 (the head's rows "
                         f"are padded up to a multiple of it, for CUDA graphs), got {row_bucket!r}")


def padded_rows(n: int, row_bucket: int | None) -> int:
    """n rounded up to a multiple of row_bucket (n itself when None)."""
    return n if row_bucket is None else -(-n // row_bucket) * row_bucket


def pad_rows(x: Tensor, rows: int) -> Tensor:
    """x (n, ...) with rows - n zero rows appended (x itself when rows == n)."""
    return x if rows == len(x) else torch.cat([x, x.new_zeros((rows - len(x), *x.shape[1:]))])


def row_padded(net, c: Tensor, row_bucket: int):
    """net(x, t, c) that runs over `c`'s rows padded with zeros to a multiple of `row_bucket` and returns the
    real rows: every call of a sampling loop then has the same (static) shape. Each row of the AdaLN MLP is
    computed from that row alone, so the padding changes nothing but the matrix products' blocking."""
    rows = padded_rows(len(c), row_bucket)
    c_pad = pad_rows(c, rows)

    def fn(x: Tensor, t: Tensor, c_: Tensor) -> Tensor:
        n = len(x)
        return net(pad_rows(x, rows), pad_rows(t, rows), c_pad)[:n]
    return fn


def _embedded(net: nn.Module):
    """net(x, t, c) for a c already embedded by ``net.cond_embed`` (``SimpleMLPAdaLN.forward(embedded=True)``)."""
    def fn(x: Tensor, t: Tensor, c: Tensor) -> Tensor:
        return net(x, t, c, embedded=True)
    return fn


def _output_in_input_dtype(net):
    """net(x, t, c) with its (autocast, lower-precision) output cast back to x.dtype, so CFG and the
    diffusion arithmetic run at full precision."""
    def fn(x: Tensor, t: Tensor, c: Tensor) -> Tensor:
        return net(x, t, c).to(x.dtype)
    return fn
