"""The configuration schema: the sections of a training config and their checks (defaults: the reference
MAR-B ImageNet recipe, MAR paper Sec. 5.1 / Appendix B).

A ``__post_init__`` check raises ``ValueError("<field> must ...")``; the loader turns it into a ConfigError
naming the dotted key. Derived numbers (the absolute learning rate) are functions, never written back.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Literal, Optional

import torch

from diffloss.diffusion import annealed_step_counts, respace_timesteps
from diffloss.loss import NUM_TRAIN_TIMESTEPS, check_sampling_options
from mar.schedules import check_guidance
from tokenizers import tokenizer_kind
from tokenizers.perceptual import PerceptualNetConfig
from tokenizers.training import VAETrainConfig
from tokenizers.vq import VQTrainConfig


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


@dataclass
class ModelConfig:
    preset: str = "mar_base"
    # The parts (tokenizer x generator x head): the generator ``arch``, ``mar`` bidirectional masked (MAR), ``maskgit`` (MAR's network
    # with MaskGIT's cosine mask ratio and confidence decoding), ``causal`` (decoder-only AR, KV cache);
    # ``order`` of a causal generator (MAR and MaskGIT train on random orders); ``head`` diffloss (continuous
    # tokens) or categorical (cross-entropy over codes; its MLP sizes are diffloss_depth / diffloss_width).
    # ``var``: next-scale prediction (VAR, coarse to fine over a scale pyramid; presets var_d*), with head
    # categorical (VAR, on a multi-scale VQ), hybrid (HART: VAR's scales + a residual Diffusion Loss head, on a
    # hybrid multi-scale tokenizer) or diffloss (continuous next-scale over a KL-VAE latent's residual pyramid).
    # MAR's own fields (buffer_size, mask_ratio_min, attn/proj dropout, diffusion_batch_mul for var+categorical)
    # do not apply to var; label_drop_prob is VAR's class dropout (cond_drop_rate).
    arch: Literal["mar", "maskgit", "causal", "var"] = "mar"
    order: Literal["random", "raster"] = "random"
    head: Literal["diffloss", "categorical", "hybrid"] = "diffloss"
    kv_cache: bool | None = None  # causal generation with a KV cache (None = on for causal)
    patch_nums: Optional[list[int]] = None  # var: the scales (side of each token map; None = the tokenizer's)
    img_size: int = 256
    vae_stride: int = 16
    patch_size: int = 1
    token_channels: int = 16
    num_classes: int = 1000
    buffer_size: int = 64
    label_drop_prob: float = 0.1
    attn_dropout: float = 0.1
    proj_dropout: float = 0.1
    mask_ratio_min: float = 0.7
    diffusion_batch_mul: int = 4
    num_sampling_steps: int | str = "100"  # diffusion steps of the sampler: 100, "100", or per section "10,20"
    grad_checkpointing: bool = False
    # None = take the size from the preset
    encoder_embed_dim: int | None = None
    encoder_depth: int | None = None
    encoder_num_heads: int | None = None
    decoder_embed_dim: int | None = None
    decoder_depth: int | None = None
    decoder_num_heads: int | None = None
    diffloss_depth: int | None = None
    diffloss_width: int | None = None

    def __post_init__(self) -> None:
        _check(self.img_size % (self.vae_stride * self.patch_size) == 0,
               f"img_size must be a multiple of vae_stride * patch_size = {self.vae_stride * self.patch_size}, "
               f"got {self.img_size}")
        _check(0.0 < self.mask_ratio_min <= 1.0, f"mask_ratio_min must be in (0, 1], got {self.mask_ratio_min}")
        _check(0.0 <= self.label_drop_prob < 1.0, f"label_drop_prob must be in [0, 1), got {self.label_drop_prob}")
        _check(self.diffusion_batch_mul >= 1, f"diffusion_batch_mul must be >= 1, got {self.diffusion_batch_mul}")
        _check(not (self.kv_cache and self.arch != "causal"),
               f"kv_cache must be null or false for arch {self.arch!r}: a KV cache needs causal attention "
               "(each position attends only to earlier ones); set model.arch=causal or drop model.kv_cache")
        _check(self.arch == "causal" or self.order == "random",
               f"order must be 'random' for arch {self.arch!r} (masked generators train on random orders); "
               "raster order is for model.arch=causal")
        _check(self.arch != "maskgit" or self.head == "categorical",
               "head must be 'categorical' for arch 'maskgit' (it picks codes by their probability)")
        _check(self.head != "hybrid" or self.arch == "var",
               "head 'hybrid' (HART) is for model.arch=var: set model.arch=var or pick head diffloss/categorical")
        _check(self.patch_nums is None or self.arch == "var",
               f"patch_nums is for model.arch=var (next-scale), got arch {self.arch!r}: drop model.patch_nums")
        if self.patch_nums is not None:
            pn = self.patch_nums
            _check(isinstance(pn, (list, tuple)) and len(pn) >= 2
                   and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in pn)
                   and all(a < b for a, b in zip(pn, pn[1:])),
                   f"patch_nums must be a strictly increasing list of >= 2 positive ints (e.g. [1, 2, 3, 4, 6, 8]), "
                   f"got {pn!r}")
            _check(pn[-1] * self.vae_stride == self.img_size,
                   f"patch_nums must end at the latent side img_size / vae_stride = {self.img_size // self.vae_stride},"
                   f" got {pn[-1]}: the last scale is the full token map")
        try:
            respace_timesteps(NUM_TRAIN_TIMESTEPS, self.num_sampling_steps)
        except ValueError:
            raise ValueError(f"num_sampling_steps must be an int or a string of step counts like '100' or '10,20' "
                             f"(each count from 1 to its section's share of the {NUM_TRAIN_TIMESTEPS} training steps), "
                             f"got {self.num_sampling_steps!r}") from None


@dataclass
class TokenizerConfig:
    preset: str = "kl16"
    checkpoint: str | None = None  # LDM .ckpt (published KL-16) or a project .safetensors
    scaling_factor: float | None = None  # None = the tokenizer's own factor
    in_channels: int | None = None  # None = the preset's (3); 1 for grey images
    continuous: bool = False  # a VQ tokenizer's pre-quantization latent as continuous tokens (MAR paper, Table 2)
    # multi-scale (VAR) tokenizers: train the decoder on f_hat and on f_hat + residual, half of the time each
    # (HART's hybrid tokenizer, arXiv 2410.10812 Sec. 3.1); the tokenizer file records it
    hybrid: bool = False


@dataclass
class DataConfig:
    kind: Literal["imagefolder", "fashion_mnist", "latents"] = "imagefolder"
    path: str | None = None  # None = the kind's default location (Fashion-MNIST: the Debian package's)
    split: str = "train"
    image_size: int = 256
    hflip: bool = True
    num_workers: int = 4
    cache_path: str | None = None

    def __post_init__(self) -> None:
        _check(self.image_size >= 1, f"image_size must be >= 1, got {self.image_size}")
        _check(self.num_workers >= 0,
               f"num_workers must be >= 0 (0 = load in the main process), got {self.num_workers}")


@dataclass
class OptimConfig:
    batch_size: int = 64  # per process
    grad_accum: int = 1
    blr: float = 1e-4  # lr = blr * global_batch / 256 unless `lr` is set
    lr: float | None = None
    min_lr: float = 0.0
    lr_schedule: Literal["constant", "cosine"] = "constant"
    warmup_epochs: float = 100
    epochs: int = 400
    weight_decay: float = 0.02
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 3.0
    ema_rate: float = 0.9999
    ema_warmup: bool = False  # decay min(ema_rate, (1+step)/(10+step)): for short runs; off in the reference recipe

    def __post_init__(self) -> None:
        _check(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        _check(self.grad_accum >= 1, f"grad_accum must be >= 1, got {self.grad_accum}")
        _check(self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}")
        _check(self.warmup_epochs >= 0, f"warmup_epochs must be >= 0 (0 = no warmup), got {self.warmup_epochs}")
        _check(self.grad_clip >= 0, f"grad_clip must be >= 0 (0 = no clipping), got {self.grad_clip}")
        _check(all(0.0 <= b < 1.0 for b in self.betas), f"betas must be in [0, 1), got {list(self.betas)}")
        _check(0.0 <= self.ema_rate <= 1.0, f"ema_rate must be in [0, 1], got {self.ema_rate}")


@dataclass
class RunConfig:
    output_dir: str = "runs/mar"
    seed: int = 0
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    save_every_steps: int = 1000
    sample_every_steps: int = 5000
    log_every_steps: int = 50
    # the run's length: the LR schedule (warmup, cosine) ends here; null = optim.epochs
    max_steps: int | None = None
    # pause at this step (a checkpoint, exit 0) without changing the schedule; rerun without it to continue
    stop_at_step: int | None = None
    # resume a checkpoint whose run had another length, on the schedule of the new length (the LR jumps to
    # that schedule's value at the resumed step: a warm restart); refused unless set
    reschedule: bool = False
    trackers: list[Literal["jsonl", "tensorboard"]] = field(default_factory=lambda: ["jsonl"])
    # FSDP (mar.engine.fsdp): shard parameters, gradients and optimizer state over the processes (task=mar);
    # full_shard frees each block's gathered weights after its forward, shard_grad_op keeps them until the
    # backward (faster, more memory); cpu_offload keeps the shards in CPU memory between uses (CUDA only)
    fsdp: bool = False
    fsdp_sharding: Literal["full_shard", "shard_grad_op"] = "full_shard"
    fsdp_cpu_offload: bool = False

    def __post_init__(self) -> None:
        for name in ("save_every_steps", "sample_every_steps", "log_every_steps"):
            _check(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        _check(self.max_steps is None or self.max_steps >= 1,
               f"max_steps must be >= 1, or null to train for optim.epochs, got {self.max_steps}")
        _check(self.stop_at_step is None or self.stop_at_step >= 1,
               f"stop_at_step must be >= 1, or null to train to the end, got {self.stop_at_step}")
        _check(self.fsdp_sharding in ("full_shard", "shard_grad_op"),
               f"fsdp_sharding must be 'full_shard' or 'shard_grad_op' (hybrid sharding is not supported), "
               f"got {self.fsdp_sharding!r}")
        _check(self.fsdp or (self.fsdp_sharding == "full_shard" and not self.fsdp_cpu_offload),
               "fsdp_sharding and fsdp_cpu_offload are for sharded training: set train.fsdp=true, or drop them")
        _check(not (self.fsdp and self.mixed_precision == "fp16"),
               "fsdp does not support mixed_precision fp16 (its loss scaler would see each shard's overflow on one "
               "process only): use train.mixed_precision=bf16 (auto picks it on CUDA), or train.fsdp=false")


FEATURE_CACHES = ("off", "cfg", "tokens", "both")
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}  # autocast dtype of each precision


def precision_of(autocast_dtype: torch.dtype | None) -> str:
    """The precision name of an autocast dtype (None = fp32, no autocast)."""
    for name, dtype in PRECISIONS.items():
        if dtype == autocast_dtype:
            return name
    raise ValueError(f"autocast_dtype must be None, torch.bfloat16 or torch.float16, got {autocast_dtype!r}")


@dataclass(frozen=True)
class SamplingOptions:
    """How the head samples: the opt-in fast path and guard, validated once here. The defaults are the
    reference sampler (ancestral DDPM over the model's num_sampling_steps, fp32, no guard).

    ``sampler`` "ddim" with ``eta`` in [0, 1] (0 = deterministic); ``diffusion_steps_schedule`` (first, last)
    diffusion steps annealed over the generation steps (``diffusion_steps_shape`` linear or cosine; None = the
    model's fixed count); ``precision`` bf16 / fp16 runs the generator and the head under autocast;
    ``clip_denoised`` r clamps the head's predicted x0 to [-r, r] at every diffusion step (IDDPM's
    ``clip_denoised`` in token units; it keeps a briefly trained head stable). ``top_k`` / ``top_p`` /
    ``choice_temperature`` are the categorical head's and MaskGIT's (ignored by the Diffusion Loss head);
    ``more_smooth`` is the next-scale (VAR) sampler's.
    """

    sampler: Literal["ddpm", "ddim"] = "ddpm"
    eta: float = 0.0
    diffusion_steps_schedule: Optional[tuple[int, int]] = None
    diffusion_steps_shape: Literal["linear", "cosine"] = "linear"
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    clip_denoised: Optional[float] = None
    # Categorical heads (cross-entropy over codes): keep the top_k codes / the top_p nucleus (None = all), and
    # MaskGIT's pick noise (Gumbel scale at the first step, annealed to 0; the reference's 4.5).
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    choice_temperature: float = 4.5
    # Next-scale (VAR) generators: each scale's code embeddings as a Gumbel-softmax mixture instead of the sampled
    # codes (the reference's ``more_smooth``, for visualisation; never in its FID protocol).
    more_smooth: bool = False
    # Feature caching across MAR steps (opt-in; LazyMAR, Yan et al. 2025, Sec. 3): ``cfg`` computes the
    # unconditional conditions only at refresh steps and reuses their residual to the conditional ones in
    # between; ``tokens`` recomputes, at the steps between refreshes, only the tokens whose context changed (the
    # tokens written at the last step and the tokens predicted now), every other token's block outputs and
    # keys/values coming from the last refresh; ``both`` does both. A full forward runs every ``cache_refresh``
    # steps (and at the first); "off", the default, is the reference loop.
    feature_cache: Literal["off", "cfg", "tokens", "both"] = "off"
    cache_refresh: int = 2
    # A few-step distilled head (opt-in): sample with the distilled head attached to the model (its weights load
    # beside the MAR weights) in this many steps, instead of the Diffusion Loss sampler. None = the head's sampler.
    distilled_steps: Optional[int] = None
    # Static shapes for CUDA graphs (opt-in): the head's net runs on its rows padded with zeros up to a multiple of
    # row_bucket, so a whole generation shows it only a few row counts (``torch.compile(mode="reduce-overhead")``
    # captures one graph per count). The draws and the real rows' arithmetic are unchanged. None = as they come.
    row_bucket: Optional[int] = None

    def __post_init__(self) -> None:
        from mar.categorical import check_top

        check_top(self.top_k, self.top_p)
        _check(isinstance(self.choice_temperature, (int, float)) and not isinstance(self.choice_temperature, bool)
               and 0 <= self.choice_temperature < float("inf"),
               f"choice_temperature must be a finite number >= 0, got {self.choice_temperature!r}")
        _check(isinstance(self.more_smooth, bool), f"more_smooth must be true or false, got {self.more_smooth!r}")
        _check(self.precision in PRECISIONS, f"precision must be one of {', '.join(PRECISIONS)}, got "
                                             f"{self.precision!r}")
        check_sampling_options(self.sampler, self.eta, self.autocast_dtype, self.clip_denoised, self.row_bucket)
        steps = self.diffusion_steps_schedule
        if steps is not None:
            _check(isinstance(steps, (tuple, list)) and len(steps) == 2
                   and all(isinstance(v, int) and not isinstance(v, bool) and 2 <= v <= NUM_TRAIN_TIMESTEPS
                           for v in steps),
                   f"diffusion_steps_schedule must be (first, last), two ints in [2, {NUM_TRAIN_TIMESTEPS}] "
                   f"(e.g. (100, 25)), or None, got {steps!r}")
            object.__setattr__(self, "diffusion_steps_schedule", tuple(steps))
        _check(self.diffusion_steps_shape in ("linear", "cosine"),
               f"diffusion_steps_shape must be 'linear' or 'cosine', got {self.diffusion_steps_shape!r}")
        _check(self.feature_cache in FEATURE_CACHES, f"feature_cache must be one of {', '.join(FEATURE_CACHES)}, "
                                                     f"got {self.feature_cache!r}")
        _check(isinstance(self.cache_refresh, int) and not isinstance(self.cache_refresh, bool)
               and self.cache_refresh >= 1, f"cache_refresh must be an int >= 1 (1 = a full forward at every step), "
                                            f"got {self.cache_refresh!r}")
        _check(self.distilled_steps is None or (isinstance(self.distilled_steps, int)
                                                and not isinstance(self.distilled_steps, bool)
                                                and 1 <= self.distilled_steps <= 8),
               f"distilled_steps must be None / null (the Diffusion Loss sampler) or an int in [1, 8], got "
               f"{self.distilled_steps!r}")

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return PRECISIONS[self.precision]

    def steps_per_iteration(self, num_iter: int) -> list[int | None]:
        """Diffusion steps of each generation step: the annealed counts, or None (the model's fixed count)."""
        if self.diffusion_steps_schedule is None:
            return [None] * num_iter
        first, last = self.diffusion_steps_schedule
        return annealed_step_counts(first, last, num_iter, self.diffusion_steps_shape)

    def sampling_options(self) -> SamplingOptions:
        """Just the options (for a section that extends them)."""
        return SamplingOptions(**{f.name: getattr(self, f.name) for f in fields(SamplingOptions)})


@dataclass(frozen=True)
class SampleConfig(SamplingOptions):
    """The ``sample:`` section: generation settings of a run (its grids, and sample.py's defaults for its
    weights), plus the sampling options it extends."""

    num_iter: int = 64
    cfg: float = 1.0
    cfg_schedule: Literal["linear", "constant"] = "linear"
    temperature: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(self.num_iter >= 1, f"num_iter must be >= 1, got {self.num_iter}")
        check_guidance(self.cfg, self.temperature)


@dataclass
class DistillConfig:
    """task=distill_head: a few-step student of a trained MAR's Diffusion Loss head (``diffloss.distill``).

    ``teacher`` the MAR weights (a run folder or its mar_ema.safetensors; its tokenizer comes with it);
    ``depth`` / ``width`` the student's MLP (None = the teacher head's); ``steps`` the student step counts
    trained (each in [1, 8]); ``teacher_steps`` K of the teacher's deterministic DDIM; ``cfg_max``: each row's
    guidance scale w ~ U[1, cfg_max]; ``rows`` condition rows per micro-batch, drawn from the masked positions;
    ``no_guidance_prob`` the share of rows trained unguided (u = c, w = 1: sampling with cfg 1); ``clip_denoised``
    the teacher's guard (None = off); ``init_from_teacher`` starts the student from the teacher's weights where
    the sizes fit.
    """

    teacher: Optional[str] = None
    depth: Optional[int] = None
    width: Optional[int] = None
    steps: list[int] = field(default_factory=lambda: [1, 2, 4])
    teacher_steps: int = 50
    cfg_max: float = 5.0
    rows: int = 256
    no_guidance_prob: float = 0.1
    clip_denoised: Optional[float] = None
    init_from_teacher: bool = True

    def __post_init__(self) -> None:
        _check(isinstance(self.steps, list) and len(self.steps) >= 1 and len(set(self.steps)) == len(self.steps)
               and all(isinstance(s, int) and not isinstance(s, bool) and 1 <= s <= 8 for s in self.steps),
               f"steps must be a list of distinct step counts in [1, 8] (e.g. [1, 2, 4]), got {self.steps!r}")
        _check(max(self.steps) <= self.teacher_steps <= NUM_TRAIN_TIMESTEPS,
               f"teacher_steps must be in [{max(self.steps)}, {NUM_TRAIN_TIMESTEPS}] (at least the largest of steps), "
               f"got {self.teacher_steps}")
        for name in ("depth", "width"):
            v = getattr(self, name)
            _check(v is None or v >= (0 if name == "depth" else 1),
                   f"{name} must be null (the teacher head's) or {'>= 0' if name == 'depth' else '>= 1'}, got {v}")
        _check(1.0 <= self.cfg_max < float("inf"), f"cfg_max must be a finite number >= 1, got {self.cfg_max}")
        _check(self.rows >= 1, f"rows must be >= 1, got {self.rows}")
        _check(0.0 <= self.no_guidance_prob <= 1.0, f"no_guidance_prob must be in [0, 1], got {self.no_guidance_prob}")
        check_sampling_options("ddim", 0.0, None, self.clip_denoised)


@dataclass
class TrainConfig:
    task: Literal["mar", "tokenizer", "feature_net", "distill_head"] = "mar"
    model: ModelConfig = field(default_factory=ModelConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: RunConfig = field(default_factory=RunConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    vae: VAETrainConfig = field(default_factory=VAETrainConfig)  # used when task = tokenizer (KL-VAE presets)
    vq: VQTrainConfig = field(default_factory=VQTrainConfig)  # used when task = tokenizer (VQ presets)
    perceptual: PerceptualNetConfig = field(default_factory=PerceptualNetConfig)  # task = feature_net
    distill: DistillConfig = field(default_factory=DistillConfig)  # task = distill_head

    def __post_init__(self) -> None:
        """The parts must fit: a categorical head needs discrete tokens, Diffusion Loss continuous ones, a
        next-scale categorical or hybrid head a multi-scale tokenizer."""
        try:
            kind = tokenizer_kind(self.tokenizer.preset, self.tokenizer.continuous)
        except ValueError as e:
            raise ValueError(f"tokenizer.preset: {e}") from None
        _check(not self.tokenizer.hybrid or kind == "multiscale",
               f"tokenizer.hybrid is for multi-scale tokenizers (HART), got {self.tokenizer.preset!r} ({kind}): "
               "use a multi-scale preset (msvq_*, var_vqvae) or drop tokenizer.hybrid")
        if self.task != "mar":
            return
        m = self.model
        if m.arch == "var" and m.head in ("categorical", "hybrid"):
            _check(kind == "multiscale", f"model.arch=var with head {m.head} needs a multi-scale tokenizer "
                   f"(msvq_*, var_vqvae), got {self.tokenizer.preset!r} ({kind} tokens): change tokenizer.preset, or "
                   "set model.head=diffloss for continuous next-scale on a KL tokenizer")
            _check(m.patch_nums is None, "model.patch_nums must be null for VAR/HART: the scales are the multi-scale "
                   "tokenizer's (its patch_nums)")
            return
        _check(kind != "multiscale", f"the multi-scale tokenizer {self.tokenizer.preset!r} is for model.arch=var "
               "with head categorical (VAR) or hybrid (HART)")
        _check(m.arch != "var" or m.patch_nums is not None,
               "continuous next-scale (model.arch=var, head diffloss) needs model.patch_nums, the scales of the "
               "latent pyramid (e.g. [1, 2, 3, 4, 6, 8] for 8x8 latents)")
        want = "discrete" if self.model.head == "categorical" else "continuous"
        if kind != want:
            fix = ("use a VQ tokenizer preset (vq_*) without tokenizer.continuous" if want == "discrete" else
                   "use a KL tokenizer, or set tokenizer.continuous=true to feed a VQ tokenizer's latent")
            raise ValueError(f"model.head={self.model.head} needs {want} tokens but tokenizer "
                             f"{self.tokenizer.preset!r} gives {kind} ones: {fix}, or set model.head="
                             f"{'categorical' if kind == 'discrete' else 'diffloss'}")


def effective_lr(optim: OptimConfig, global_batch: int) -> float:
    """Absolute peak learning rate: ``optim.lr`` if set, else ``blr * global_batch / 256``.

    global_batch = batch_size * grad_accum * number of processes.
    """
    return optim.lr if optim.lr is not None else optim.blr * global_batch / 256
