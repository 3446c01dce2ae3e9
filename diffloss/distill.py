"""A few-step distilled Diffusion Loss head: a guided student that replaces the teacher's guided DDIM sampler.

Glossary
    N   rows (tokens); with guidance the caller's z holds [cond (N); uncond (N)] rows
    C   token channels, D condition width (the generator's decoder width)
    w   the classifier-free guidance scale of a row (the teacher: eps = eps_u + w (eps_c - eps_u))
    K   teacher steps: the frozen head's deterministic DDIM (eta = 0) on the K-step respaced cosine schedule
    S   student steps (1..8); b = 0..K counts the teacher steps taken, so state b lives at the teacher's
        respaced index K-1-b (abar_b = alphas_cumprod[K-1-b], fed original timestep timestep_map[K-1-b]),
        and b = K is the clean token (abar = 1, timestep -1)

The teacher. Deterministic DDIM (Song et al. 2021, eq. 12 with sigma = 0) makes x_T -> x_0 a fixed map of the
noise, so a student can learn it by regression (Luhman & Luhman 2021, arXiv 2101.02388, Sec. 3: one step).
With guidance the teacher's every step uses the guided eps, and the student takes w as an input (Meng et al.
2023, arXiv 2210.03142, Sec. 3.1 stage one: "a single model that matches the combined output of the two
(conditional and unconditional) models", conditioned on w through an embedding), and here also both
condition vectors, so one student call replaces the two teacher calls of a guided step.

The student's S steps. Its boundaries are the teacher's K steps split evenly, b_i = round(i K / S), i = 0..S:
student step i starts from the teacher's state at b_i and must land on the teacher's state at b_{i+1}. For S
dividing K this is progressive distillation (Salimans & Ho 2022, arXiv 2202.00512, Algorithm 2) with all of
its halving rounds collapsed into one: the target of a student step is the teacher's state after K/S of its
own steps. A step is DDIM-shaped (Salimans & Ho, eq. 4 / Algorithm 2): the student predicts x0_hat (an x-
parametrisation: Sec. 4 shows eps-prediction breaks at the low signal-to-noise ratio of the first step, where
abar ~ 2e-9 and x0 = (x - sqrt(1 - abar) eps) / sqrt(abar) would amplify the error ~2e4 times), then

    eps_hat = (x_a - sqrt(abar_a) x0_hat) / sqrt(1 - abar_a)
    x_b     = sqrt(abar_b) x0_hat + sqrt(1 - abar_b) eps_hat          (x_b = x0_hat at the clean end)

and its loss is Algorithm 2's: the x0 that would land exactly on the teacher's state,
x0_tgt = (x_b* - r x_a) / (sqrt(abar_b) - r sqrt(abar_a)), r = sqrt((1 - abar_b) / (1 - abar_a)), compared
with x0_hat under the truncated-SNR weight max(abar_a / (1 - abar_a), 1) (Sec. 4, "truncated SNR").
One student serves every trained S: it is also told where its step ends (t_next), since the same start state
has a different target for S = 1 (x_0) than for S = 2 (the teacher's half-way state).

Temperature. The reference sampler's temperature scales its per-step noise; a deterministic student has none,
so temperature scales x_T instead (x_T ~ N(0, temperature^2 I)), the common practice for deterministic
samplers (temperature-scaled latents): the only knob a fixed noise -> token map has. Default 1.0.
"""
from __future__ import annotations

import json
import math

import torch
from torch import Tensor, nn

from .diffusion import GaussianDiffusion, check_generator, cosine_diffusion
from .loss import NUM_TRAIN_TIMESTEPS, check_row_bucket, pad_rows, padded_rows, per_sample_noise
from .mlp import SimpleMLPAdaLN, timestep_embedding

GUIDANCE_DIM, NEXT_TIME_DIM = 32, 64  # widths of the w and t_next sinusoids fed with the conditions
FORMAT = "mar-distilled-head-v1"


def guidance_embedding(w: Tensor, dim: int = GUIDANCE_DIM) -> Tensor:
    """Sinusoid of the guidance scale (N,) -> (N, dim), frequencies 1 .. 1/100 per unit of w (smooth over the
    trained range [1, cfg_max]; Meng et al. 2023 Sec. 3.1 embed w as the time step is embedded)."""
    return timestep_embedding(w, dim, max_period=100.0)


class GuidedStudent(nn.Module):
    """x0_hat = net(x_a, t_a, [c; u; g(w); e(t_b + 1)]) (N, C): the AdaLN MLP of the head (``SimpleMLPAdaLN``)
    with the condition widened to both condition vectors, the guidance scale and the step's end time.

    x (N, C) the state at original timestep t (N,) long; t_next (N,) long the end of the step (-1 = clean);
    c, u (N, D) the conditional and unconditional conditions; w (N,) the guidance scale.
    """

    def __init__(self, token_channels: int, z_channels: int, width: int, depth: int,
                 generator: torch.Generator | None = None):
        super().__init__()
        self.net = SimpleMLPAdaLN(in_channels=token_channels, model_channels=width, out_channels=token_channels,
                                  z_channels=2 * z_channels + GUIDANCE_DIM + NEXT_TIME_DIM, num_res_blocks=depth,
                                  generator=generator)

    def forward(self, x: Tensor, t: Tensor, t_next: Tensor, c: Tensor, u: Tensor, w: Tensor) -> Tensor:
        dtype = c.dtype
        cond = torch.cat([c, u, guidance_embedding(w).to(dtype), timestep_embedding(t_next + 1, NEXT_TIME_DIM)
                          .to(dtype)], dim=1)  # (N, 2D + 96)
        return self.net(x, t, cond)  # (N, C)


@torch.no_grad()
def init_from_teacher(student: GuidedStudent, teacher: SimpleMLPAdaLN) -> int:
    """Start the student from the teacher's weights where they fit (Salimans & Ho 2022, Algorithm 2 initialise
    the student from the teacher): the time MLP, input projection, res blocks and final modulation when the
    sizes match, and the c columns of the condition projection. The x0 output layer stays zero (the teacher
    predicts eps). Returns the number of tensors copied."""
    own, theirs, copied = student.net.state_dict(), teacher.state_dict(), 0
    for name, value in theirs.items():
        if name.startswith("final_layer.linear.") or name not in own:
            continue
        if name == "cond_embed.weight" and own[name].shape[0] == value.shape[0]:
            own[name][:, : value.shape[1]] = value  # the c part; u, w, t_next start at zero
            copied += 1
        elif own[name].shape == value.shape:
            own[name].copy_(value)
            copied += 1
    student.net.load_state_dict(own)
    return copied


def guided_output(net: nn.Module, x: Tensor, t: Tensor, c: Tensor, u: Tensor, w: Tensor) -> Tensor:
    """The teacher's guided output with a guidance scale per row: (N, 2C) = (eps_u + w (eps_c - eps_u), v_c).

    One batched call net([x; x], [t; t], [c; u]), as ``guided_model_output`` (the same numbers for a
    constant w); rows with u = c give eps_c exactly (their "guidance" is none).
    """
    out = net(torch.cat([x, x]), torch.cat([t, t]), torch.cat([c, u]))  # (2N, 2C)
    eps, rest = out.split(x.shape[1], dim=1)
    eps_c, eps_u = eps.chunk(2)
    return torch.cat([eps_u + w.to(eps.dtype)[:, None] * (eps_c - eps_u), rest[: len(x)]], dim=1)


@torch.no_grad()
def teacher_states(net: nn.Module, diffusion: GaussianDiffusion, x_T: Tensor, c: Tensor, u: Tensor, w: Tensor,
                   clip_denoised: float | None = None) -> Tensor:
    """Every state of the teacher's guided DDIM (eta = 0) from x_T: (K + 1, N, C), state b after b steps.

    The same steps as ``GaussianDiffusion.ddim_sample_loop`` (index K-1 down to 0, the net fed the original
    timesteps); ``clip_denoised`` is the head's guard (``ddim_step``), None = off.
    """
    x, states = x_T, [x_T]
    for i in reversed(range(diffusion.num_timesteps)):
        t = torch.full((len(x),), i, device=x.device, dtype=torch.long)
        out = guided_output(net, x, diffusion.original_timesteps(t), c, u, w)
        x = diffusion.ddim_step(out, x, t, None, 0.0, 1.0, clip_denoised)
        states.append(x)
    return torch.stack(states)


class DistilledHead(nn.Module):
    """The few-step head: ``sample(z, temperature, cfg, generator, num_steps)`` with ``DiffLoss.sample``'s row
    conventions, by the student's DDIM-shaped steps on the teacher's boundaries (module docstring).

    ``steps`` the step counts it is trained for (sampling accepts only those), ``teacher_steps`` K,
    ``cfg_max`` the largest guidance scale it was trained on, ``info`` provenance strings (the MAR weights it
    was distilled from, training steps...) saved in the metadata.
    """

    kind = "continuous"

    def __init__(self, token_channels: int, z_channels: int, depth: int, width: int, steps=(1, 2, 4),
                 teacher_steps: int = 50, cfg_max: float = 5.0, generator: torch.Generator | None = None,
                 info: dict[str, str] | None = None):
        super().__init__()
        steps = tuple(sorted(set(int(s) for s in steps)))
        if not steps or not all(1 <= s <= 8 for s in steps):
            raise ValueError(f"steps must be step counts in [1, 8], got {list(steps)}")
        if not max(steps) <= teacher_steps <= NUM_TRAIN_TIMESTEPS:
            raise ValueError(f"teacher_steps must be in [{max(steps)}, {NUM_TRAIN_TIMESTEPS}] (at least the largest "
                             f"student step count), got {teacher_steps}")
        if not cfg_max >= 1.0:
            raise ValueError(f"cfg_max must be >= 1 (w is drawn in [1, cfg_max]), got {cfg_max}")
        self.token_channels, self.z_channels, self.depth, self.width = token_channels, z_channels, depth, width
        self.steps, self.teacher_steps, self.cfg_max = steps, teacher_steps, float(cfg_max)
        self.info = dict(info or {})
        self.token_shape = (token_channels,)
        self.student = GuidedStudent(token_channels, z_channels, width, depth, generator)
        self._teacher_diffusion = teacher = cosine_diffusion(teacher_steps, NUM_TRAIN_TIMESTEPS)
        self._abar = [*teacher.alphas_cumprod.flip(0).tolist(), 1.0]  # abar of state b = 0..K (float64 values)
        self._timestep = [*teacher.timestep_map.flip(0).tolist(), -1]  # original timestep of state b (-1 = clean)

    def teacher_diffusion(self) -> GaussianDiffusion:
        """The teacher's K-step respaced cosine schedule (``DiffLoss.sampling_diffusion(K)``'s), built once."""
        return self._teacher_diffusion

    def boundaries(self, num_steps: int) -> list[int]:
        """b_i = round(i K / S) (halves up), i = 0..S: the teacher steps taken at each student boundary."""
        self.check_steps(num_steps)
        k = self.teacher_steps
        return [(2 * i * k + num_steps) // (2 * num_steps) for i in range(num_steps + 1)]

    def check_steps(self, num_steps) -> None:
        if num_steps not in self.steps or isinstance(num_steps, bool):
            raise ValueError(f"this distilled head was trained for {', '.join(map(str, self.steps))} step(s), not "
                             f"{num_steps!r}: use one of those, or train it for {num_steps} with train.py "
                             f"task=distill_head --distill.steps=[..., {num_steps}]")

    # ------------------------------------------------------------------------------- one student step
    def predict(self, x: Tensor, b: int, b_next: int, c: Tensor, u: Tensor, w: Tensor) -> Tensor:
        """x0_hat (N, C) of the student for the step from boundary b to b_next."""
        t = torch.full((len(x),), self._timestep[b], device=x.device, dtype=torch.long)
        t_next = torch.full((len(x),), self._timestep[b_next], device=x.device, dtype=torch.long)
        return self.student(x, t, t_next, c, u, w.to(x.dtype))

    def coefficients(self, b: int, b_next: int) -> tuple[float, float, float]:
        """(sqrt(abar_b'), r = sqrt((1 - abar_b') / (1 - abar_b)), sqrt(abar_b)), computed in float64."""
        a, a_next = self._abar[b], self._abar[b_next]
        return math.sqrt(a_next), math.sqrt((1.0 - a_next) / (1.0 - a)), math.sqrt(a)

    def step(self, x: Tensor, x0_hat: Tensor, b: int, b_next: int) -> Tensor:
        """The DDIM-shaped update x_b' = sqrt(abar_b') x0_hat + sqrt(1 - abar_b') eps_hat (module docstring),
        written as sqrt(abar_b') x0_hat + r (x_b - sqrt(abar_b) x0_hat)."""
        s_next, r, s = self.coefficients(b, b_next)
        return s_next * x0_hat + r * (x - s * x0_hat)

    # ------------------------------------------------------------------------------- sampling
    @torch.no_grad()
    def sample(self, z: Tensor, temperature: float = 1.0, cfg: float = 1.0, generator=None,
               num_steps: int | None = None, row_bucket: int | None = None) -> Tensor:
        """Tokens (N, C) in ``num_steps`` student steps (None: the fewest trained).

        cfg == 1: z (N, D), no guidance (the student sees u = c, w = 1). cfg != 1: z = [cond; uncond] (2N, D),
        N rows are returned. x_T ~ N(0, I) (N, C) is the only draw, made with ``generator`` on z.device in
        z.dtype, and scaled by ``temperature``; ``generator`` may be a list of B per-sample generators, each
        drawing its N / B rows (``per_sample_noise``: a sample's tokens do not depend on its batch).
        ``row_bucket`` R: the student runs on rows padded with zeros to a multiple of R after the draw (static
        shapes for CUDA graphs; see ``DiffLoss.sample``).
        """
        check_row_bucket(row_bucket)
        steps = self.steps[0] if num_steps is None else num_steps
        bounds = self.boundaries(steps)
        if z.dim() != 2 or z.shape[1] != self.z_channels:
            raise ValueError(f"z must be (N, {self.z_channels}), got {tuple(z.shape)}")
        w = float(cfg)
        guided = w != 1.0
        if guided and len(z) % 2:
            raise ValueError(f"with cfg != 1, z must hold [cond; uncond] rows (an even count), got {len(z)}")
        if guided and not 1.0 <= w <= self.cfg_max + 1e-6:
            fix = f"use a cfg in [1, {self.cfg_max:g}]" + (f", or distill with --distill.cfg_max={math.ceil(w)}"
                                                             if w > 1 else "")
            raise ValueError(f"this distilled head was trained for guidance scales in [1, {self.cfg_max:g}], got "
                             f"cfg={w:g}: {fix}")
        if not (isinstance(temperature, (int, float)) and temperature > 0):
            raise ValueError(f"temperature must be a number > 0 (it scales x_T), got {temperature!r}")
        n = len(z) // 2 if guided else len(z)
        c, u = (z[:n], z[n:]) if guided else (z, z)
        if isinstance(generator, (list, tuple)):
            x, _ = per_sample_noise(generator, n, self.token_channels, 0, guided, z.device, z.dtype)
        else:
            check_generator(generator, z.device)
            x = torch.randn((n, self.token_channels), generator=generator, device=z.device, dtype=z.dtype)
        rows = padded_rows(n, row_bucket)
        x = pad_rows(x * temperature, rows)
        wt = torch.full((rows,), w, device=z.device, dtype=z.dtype)
        dtype = next(self.parameters()).dtype
        c, u = pad_rows(c.to(dtype), rows), pad_rows(u.to(dtype), rows)
        for b, b_next in zip(bounds[:-1], bounds[1:]):
            x = self.step(x, self.predict(x.to(dtype), b, b_next, c, u, wt).to(x.dtype), b, b_next)
        return x[:n]

    # ------------------------------------------------------------------------------- the distillation loss
    def distillation_loss(self, teacher: nn.Module, c: Tensor, u: Tensor, w: Tensor, x_T: Tensor,
                          clip_denoised: float | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """(mean loss over every trained S and step i, {"loss_s{S}": that S's mean, detached}).

        The teacher's states come from ``teacher_states`` under no_grad; only the student gets gradients. Step
        (S, i) from the teacher's x_{b_i}: || x0_hat - x0_tgt ||^2 averaged over C, weighted by
        max(SNR(b_i), 1) (module docstring), then averaged over rows.
        """
        states = teacher_states(teacher, self.teacher_diffusion(), x_T, c, u, w, clip_denoised)  # (K+1, N, C)
        terms, logs = [], {}
        for s in self.steps:
            bounds = self.boundaries(s)
            per_s = []
            for b, b_next in zip(bounds[:-1], bounds[1:]):
                x, target = states[b], states[b_next]
                s_next, r, s_now = self.coefficients(b, b_next)
                x0_tgt = (target - r * x) / (s_next - r * s_now)  # Salimans & Ho, Algorithm 2: x~
                snr = self._abar[b] / (1.0 - self._abar[b])
                err = (self.predict(x, b, b_next, c, u, w) - x0_tgt).pow(2).mean(dim=1)  # (N,)
                per_s.append(max(snr, 1.0) * err.mean())
            terms += per_s
            logs[f"loss_s{s}"] = torch.stack(per_s).mean().detach()
        return torch.stack(terms).mean(), logs

    # ------------------------------------------------------------------------------- plain-data export
    def export_state(self) -> tuple[dict[str, Tensor], dict[str, str]]:
        """(tensors, string metadata) for a safetensors file: the sizes, trained steps, K, cfg_max and ``info``."""
        meta = {"format": FORMAT, "token_channels": str(self.token_channels), "z_channels": str(self.z_channels),
                "depth": str(self.depth), "width": str(self.width), "steps": json.dumps(list(self.steps)),
                "teacher_steps": str(self.teacher_steps), "cfg_max": repr(self.cfg_max),
                "info": json.dumps(self.info, sort_keys=True)}
        return {k: v.detach() for k, v in self.state_dict().items()}, meta

    @classmethod
    def from_state(cls, state: dict[str, Tensor], meta: dict[str, str], source: str = "file") -> DistilledHead:
        """The head of ``export_state``'s (tensors, metadata); one clear ValueError for anything else."""
        if meta.get("format") != FORMAT:
            raise ValueError(f"{source} is not a distilled head (metadata format {meta.get('format')!r}, expected "
                             f"{FORMAT!r}): write one with train.py task=distill_head")
        try:
            head = cls(int(meta["token_channels"]), int(meta["z_channels"]), int(meta["depth"]), int(meta["width"]),
                       json.loads(meta["steps"]), int(meta["teacher_steps"]), float(meta["cfg_max"]),
                       info=json.loads(meta.get("info", "{}")))
            head.load_state_dict(state, strict=True)
        except (KeyError, ValueError, RuntimeError) as e:
            raise ValueError(f"{source} is a damaged distilled head ({type(e).__name__}: {str(e)[:300]})") from None
        return head.eval().requires_grad_(False)


class DistillObjective(nn.Module):
    """The distillation loss as one module (what a training loop wraps for DDP): ``forward(c, u, generator)``.

    Per row, in this order from ``generator``: w ~ U[1, cfg_max], a coin that with ``no_guidance_prob`` trains
    the row unguided (u := c, w := 1: the ``cfg == 1`` call of ``sample``), then x_T ~ N(0, I) (N, C). The
    frozen teacher net is a plain reference: the module's state dict is the student head's only (``head.*``).
    """

    def __init__(self, head: DistilledHead, teacher: nn.Module, no_guidance_prob: float = 0.1,
                 clip_denoised: float | None = None):
        super().__init__()
        self.head = head
        object.__setattr__(self, "_teacher", teacher)
        self.no_guidance_prob, self.clip_denoised = no_guidance_prob, clip_denoised

    def forward(self, c: Tensor, u: Tensor, generator: torch.Generator | None = None
                ) -> tuple[Tensor, dict[str, Tensor]]:
        check_generator(generator, c.device)
        n, head = len(c), self.head
        w = 1.0 + (head.cfg_max - 1.0) * torch.rand((n,), generator=generator, device=c.device, dtype=c.dtype)
        plain = torch.rand((n,), generator=generator, device=c.device) < self.no_guidance_prob
        u = torch.where(plain[:, None], c, u)
        w = torch.where(plain, torch.ones_like(w), w)
        x_T = torch.randn((n, head.token_channels), generator=generator, device=c.device, dtype=c.dtype)
        return head.distillation_loss(self._teacher, c, u, w, x_T, self.clip_denoised)
