"""Training tasks: what ``fit`` trains, its loss and its exports, one class per ``task:`` of the config.

A task has

    name                               the config's ``task`` value, recorded in every checkpoint
    build(device) -> nn.Module         the module the optimizer trains (fit wraps it for DDP)
    ema_source(module) -> nn.Module    the part whose EMA is kept (the generator, or the tokenizer)
    param_groups(module, lr)           AdamW groups (with ``lr_mult`` when parts train at other rates)
    loss(module, batch, step, g)       (scalar loss, detached logs) of one micro-batch, every draw from g
    identity(config dict) -> dict      the config sections that define the weights (a resume must match them)
    sample_grid(ema, step, path)       a picture of the progress (or nothing)
    export(ema, module, data, run_dir, device) -> Path   the file sampling uses

Tasks: mar (a generator), tokenizer, feature_net (the perceptual loss's network), distill_head (a few-step
student of a trained MAR's Diffusion Loss head). ``TASKS`` maps names to classes (``mar.engine.caching`` holds the
one-off encoding pass of ``--cache-latents``).
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from diffloss.distill import DistilledHead, DistillObjective, init_from_teacher
from mar import orders, schedules
from mar.config.loader import config_to_dict
from mar.config.schema import TrainConfig
from mar.engine.checkpoint import export_safetensors
from mar.engine.data import build_dataset
from mar.engine.latent_shards import tokenizer_fingerprint
from mar.engine.loop import param_groups
from mar.heads import DISTILLED_NAME, DiffusionHead, save_distilled_head
from mar.eval.sample_folders import fingerprint
from mar.io import atomic_write, write_grid
from mar.pipeline import model_device
from mar.registry import create_model
from mar.run import load_run
from tokenizers import compute_scaling_factor, open_tokenizer, tokenizer_kind
from tokenizers.training import KLVAEObjective, estimate_scaling_factor
from tokenizers.multiscale import MultiScaleVQVAE, multiscale_preset
from tokenizers.multiscale_training import MultiScaleVQObjective
from tokenizers.perceptual import PerceptualNet
from tokenizers.vq import VQObjective, VQTokenizer, vq_preset


def build_tokenizer(cfg: TrainConfig):
    """The configured tokenizer (KL-VAE, VQ, or a VQ's latent as continuous tokens)."""
    t = cfg.tokenizer
    return open_tokenizer(t.checkpoint, t.preset, t.in_channels, t.scaling_factor, continuous=t.continuous)


def check_latent_source(dataset, tokenizer) -> None:
    """Cached latents must come from the tokenizer being trained on: a cache records its tokenizer's weight
    fingerprint (caches written before it did are not checked)."""
    made_by = getattr(dataset, "tokenizer_fingerprint", None)
    if made_by is not None and made_by != tokenizer_fingerprint(tokenizer):
        where = getattr(dataset, "folder", None) or getattr(dataset, "path", "the latent cache")
        raise ValueError(f"{where} was encoded by another tokenizer (weight fingerprint {made_by[:12]}, this "
                         f"config's tokenizer.checkpoint has {tokenizer_fingerprint(tokenizer)[:12]}): set "
                         "tokenizer.checkpoint to the tokenizer that wrote it, or re-cache the data with this one "
                         "(train.py --cache-latents DIR)")


class _TaskData:
    """What every task shares: its dataset, built from the config's data section and kept for the checks of
    ``build`` (the latent cache's tokenizer)."""

    cfg: TrainConfig
    data = None

    def dataset(self):
        self.data = build_dataset(self.cfg.data, self.cfg.train.seed)
        return self.data


class MARTask(_TaskData):
    """A class-conditional generator on the tokens of a frozen tokenizer (MAR paper, Sec. 5.1)."""

    name = "mar"

    def __init__(self, cfg: TrainConfig):
        if cfg.tokenizer.checkpoint is None:
            raise ValueError("task=mar needs a trained tokenizer: set tokenizer.checkpoint=<kl16.ckpt or a tokenizer "
                             ".safetensors written by a task=tokenizer run>")
        self.cfg = cfg
        self.tokenizer = None

    @property
    def next_scale(self) -> bool:
        return self.cfg.model.arch == "var"

    def build(self, device) -> nn.Module:
        self.tokenizer = build_tokenizer(self.cfg).to(device).eval().requires_grad_(False)
        check_latent_source(self.data, self.tokenizer)
        if self.next_scale:
            return NextScaleObjective(build_next_scale(self.cfg, self.tokenizer).to(device), self.tokenizer)
        m = dataclasses.asdict(self.cfg.model)
        tok = self.tokenizer
        if m.pop("vae_stride") != tok.stride or m.pop("token_channels") != tok.token_channels:
            what = "the codebook size" if tok.kind == "discrete" else "the latent channels"
            raise ValueError(f"model.vae_stride/token_channels must match the tokenizer ({tok.stride}, "
                             f"{tok.token_channels}: {what}): set model.vae_stride={tok.stride} "
                             f"model.token_channels={tok.token_channels}")
        return create_model(m.pop("preset"), vae_stride=tok.stride, token_channels=tok.token_channels,
                            generator=torch.Generator().manual_seed(self.cfg.train.seed), **m).to(device)

    def ema_source(self, module: nn.Module) -> nn.Module:
        return module.model if isinstance(module, NextScaleObjective) else module

    def param_groups(self, module: nn.Module, lr: float) -> list[dict]:
        if isinstance(module, NextScaleObjective):
            return module.model.param_groups(self.cfg.optim.weight_decay)
        return param_groups(module, self.cfg.optim.weight_decay, (f"{module._head_name}.",))

    def loss(self, module, batch, step: int, generator: torch.Generator):
        x, y = batch
        if self.next_scale:
            return module(x, y, cached=self.cfg.data.kind == "latents", generator=generator)
        if self.cfg.data.kind == "latents":  # cached moments (KL) or latents (VQ): draw / look up the tokens
            tokens = self.tokenizer.sample_from_moments(x, generator=generator)
        else:
            with torch.no_grad():
                tokens = self.tokenizer.encode(x, generator=generator)
        return module(tokens, y, generator=generator), {}

    @staticmethod
    def identity(config: dict) -> dict:
        """The model section, without its sampler setting (num_sampling_steps may change between runs)."""
        return {k: v for k, v in (config.get("model") or {}).items() if k != "num_sampling_steps"}

    @torch.no_grad()
    def sample_grid(self, ema: nn.Module, step: int, path: Path) -> None:
        """A grid from the EMA weights: one row per class (up to 10 classes), 8 samples per row."""
        s = self.cfg.sample
        classes = min(self.cfg.model.num_classes, 10)
        labels = torch.arange(classes, device=model_device(ema)).repeat_interleave(8)
        g = torch.Generator(labels.device).manual_seed(self.cfg.train.seed)
        if self.next_scale:
            ema.attach(self.tokenizer)
        tokens = ema.sample_tokens(len(labels), num_iter=None if self.next_scale else min(s.num_iter, ema.seq_len),
                                   cfg=s.cfg,
                                   cfg_schedule=s.cfg_schedule, labels=labels, temperature=s.temperature,
                                   generator=g, options=s.sampling_options())
        write_grid(self.tokenizer.to_uint8(self.tokenizer.decode(ema.unpatchify(tokens) if self.next_scale else tokens))
                   .cpu().numpy(), 8, path)

    def export(self, ema: nn.Module, module: nn.Module, dataset, run_dir: Path, device) -> Path:
        """The EMA weights with the training config and the tokenizer config in the metadata."""
        meta = {"weights": "ema", "config": json.dumps(config_to_dict(self.cfg)),
                "tokenizer": json.dumps(self.tokenizer.config.to_dict())}
        return export_safetensors(ema.state_dict(), run_dir / "mar_ema.safetensors", meta)


def build_next_scale(cfg: TrainConfig, tokenizer) -> nn.Module:
    """The configured next-scale generator (VAR / HART on a multi-scale tokenizer, continuous next-scale on a KL
    one), sized from the tokenizer and checked against it; not yet attached to it."""
    m = dataclasses.asdict(cfg.model)
    tok, multiscale = tokenizer, tokenizer.kind == "multiscale"
    if m.pop("token_channels") != tok.token_channels or m.pop("vae_stride") != tok.stride:
        what = "the codebook size" if multiscale else "the latent channels"
        raise ValueError(f"model.vae_stride/token_channels must match the tokenizer ({tok.stride}, {tok.token_channels}:"
                         f" {what}): set model.vae_stride={tok.stride} model.token_channels={tok.token_channels}")
    patch_nums = tuple(tok.patch_nums) if multiscale else tuple(m["patch_nums"])
    if patch_nums[-1] * tok.stride != cfg.model.img_size:
        raise ValueError(f"model.img_size {cfg.model.img_size} does not fit the tokenizer's scales (last scale "
                         f"{patch_nums[-1]} x stride {tok.stride} = {patch_nums[-1] * tok.stride}): set model.img_size="
                         f"{patch_nums[-1] * tok.stride}")
    m["patch_nums"] = patch_nums
    token_dim = tok.config.z_channels if multiscale else tok.token_channels
    return create_model(m.pop("preset"), vae_stride=tok.stride, token_channels=tok.token_channels, token_dim=token_dim,
                        generator=torch.Generator().manual_seed(cfg.train.seed), **m)


class NextScaleObjective(nn.Module):
    """A next-scale generator's training loss as one module (what fit wraps for DDP): images or cached latents
    -> the tokenizer's latent (or its codes) -> ``model.training_loss``. The tokenizer is frozen and held as a
    plain reference, so the checkpoint holds the generator's weights only (under ``model.``)."""

    def __init__(self, model: nn.Module, tokenizer) -> None:
        super().__init__()
        self.model = model
        object.__setattr__(self, "_tokenizer", tokenizer)

    def forward(self, x: torch.Tensor, labels: torch.Tensor, cached: bool, generator: torch.Generator):
        tok = self._tokenizer
        with torch.no_grad():
            if tok.kind == "multiscale":  # the latent f; the codes are taken inside (VAR / HART)
                latent = x if cached else tok.encode_latent(x)
            else:  # KL: cached moments, or images
                latent = tok.sample_from_moments(x, generator=generator) if cached else tok.encode(x, generator=generator)
        if tok.kind == "multiscale":
            return self.model.training_loss(tok.quantize, latent, labels, generator)
        return self.model.training_loss(latent, labels, generator)


class TokenizerTask(_TaskData):
    """A tokenizer: the KL-VAE (reconstruction + KL, + an optional PatchGAN term, ``tokenizers.training``) or,
    for a ``vq*`` preset, the VQ tokenizer (reconstruction + codebook + beta * commitment, dead codes
    restarted, ``tokenizers.vq``), or for a multi-scale preset VAR's multi-scale VQVAE (reconstruction + the
    quantizer term over every scale, ``tokenizers.multiscale_training``; with ``tokenizer.hybrid`` HART's hybrid
    tokenizer, its decoder trained on the discrete f_hat and on the continuous latent, half of the time each)."""

    name = "tokenizer"

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        kind = tokenizer_kind(cfg.tokenizer.preset)
        self.vq, self.multiscale = kind == "discrete", kind == "multiscale"

    def build(self, device) -> nn.Module:
        t = self.cfg.tokenizer
        if self.multiscale:
            channels = {"in_channels": t.in_channels, "out_channels": t.in_channels} if t.in_channels else {}
            config = multiscale_preset(t.preset, **channels)
            if t.hybrid:
                config = dataclasses.replace(config, hybrid=True)
            tok = MultiScaleVQVAE(config, generator=torch.Generator().manual_seed(self.cfg.train.seed))
            return MultiScaleVQObjective(tok, self.cfg.vq.recon_loss).to(device)
        if self.vq:
            channels = {"in_channels": t.in_channels, "out_channels": t.in_channels} if t.in_channels else {}
            tok = VQTokenizer(vq_preset(t.preset, **channels), generator=torch.Generator().manual_seed(self.cfg.train.seed))
            return VQObjective(tok, self.cfg.vq).to(device)
        torch.manual_seed(self.cfg.train.seed)  # diffusers' VAE initialises from the global RNG only
        return KLVAEObjective(open_tokenizer(None, t.preset, t.in_channels, t.scaling_factor), self.cfg.vae).to(device)

    def ema_source(self, module: nn.Module) -> nn.Module:
        return module.tokenizer

    def param_groups(self, module: nn.Module, lr: float) -> list[dict]:
        return module.param_groups(lr, self.cfg.optim.weight_decay)

    def loss(self, module, batch, step: int, generator: torch.Generator):
        return module(batch[0], step=step, generator=generator)

    @staticmethod
    def identity(config: dict) -> dict:
        return {"tokenizer": {k: v for k, v in (config.get("tokenizer") or {}).items() if k != "checkpoint"},
                "vae": config.get("vae"), "vq": config.get("vq")}

    def sample_grid(self, ema: nn.Module, step: int, path: Path) -> None:
        pass  # the reconstruction loss in the logs is the progress

    @torch.no_grad()
    def export(self, ema: nn.Module, module: nn.Module, dataset, run_dir: Path, device) -> Path:
        """The trained (raw, as LDM VAEs are used) tokenizer, with the latent scaling factor 1/std computed from
        up to 2048 training images."""
        trained = ema if self.cfg.vae.export_ema and not (self.vq or self.multiscale) else module.tokenizer
        if self.multiscale:  # codes, or f_hat + residual: no latent scale to calibrate
            return atomic_write(run_dir / "tokenizer.safetensors", trained.save)
        bs = self.cfg.optim.batch_size
        loader = torch.utils.data.DataLoader(dataset, batch_size=bs, shuffle=False)
        images = (x.to(device) for _, (x, _y) in zip(range(max(1, 2048 // bs)), loader))
        if self.vq:  # the scale of the pre-quantization latent, for its use as continuous tokens (Table 2)
            latents = torch.cat([trained.encode_latent(x) for x in images])
            factor = compute_scaling_factor(latents)
        else:
            factor = estimate_scaling_factor(trained, images, torch.Generator(device).manual_seed(self.cfg.train.seed))
        trained.config = dataclasses.replace(trained.config, scaling_factor=factor)
        print(f"latent scaling factor 1/std from {min(len(dataset), 2048)} training images: {factor:.4f}")
        return atomic_write(run_dir / "tokenizer.safetensors", trained.save)


class FeatureNetTask(_TaskData):
    """The feature network of the offline perceptual loss (``tokenizers.perceptual``): a classifier trained with
    cross-entropy on labelled images, exported for ``vae.perceptual_net``. Its architecture, seed and data split
    must differ from the evaluation classifier's (configs/fmnist_perceptual.yaml)."""

    name = "feature_net"

    def __init__(self, cfg: TrainConfig):
        if cfg.data.kind == "latents":
            raise ValueError("task=feature_net trains on images: set data.kind to fashion_mnist or imagefolder")
        self.cfg = cfg

    def build(self, device) -> nn.Module:
        torch.manual_seed(self.cfg.train.seed)  # nn.Conv2d / nn.Linear initialise from the global RNG only
        return PerceptualNet(self.cfg.perceptual).to(device)

    def ema_source(self, module: nn.Module) -> nn.Module:
        return module

    def param_groups(self, module: nn.Module, lr: float) -> list[dict]:
        return param_groups(module, self.cfg.optim.weight_decay, no_decay_prefixes=())

    def loss(self, module, batch, step: int, generator: torch.Generator):
        images, labels = batch
        logits = module(images)
        loss = torch.nn.functional.cross_entropy(logits, labels)
        return loss, {"accuracy": (logits.argmax(1) == labels).float().mean().detach()}

    @staticmethod
    def identity(config: dict) -> dict:
        return {"perceptual": config.get("perceptual")}

    def sample_grid(self, ema: nn.Module, step: int, path: Path) -> None:
        pass

    @torch.no_grad()
    def export(self, ema: nn.Module, module: nn.Module, dataset, run_dir: Path, device) -> Path:
        """The EMA weights, with what they were trained on in the metadata."""
        c = self.cfg
        info = {"data": f"{c.data.kind}:{c.data.split}", "seed": c.train.seed, "steps": c.train.max_steps}
        return atomic_write(run_dir / "perceptual.safetensors", lambda tmp: ema.save(tmp, **info))


class DistillTask(_TaskData):
    """A few-step distilled Diffusion Loss head (``diffloss.distill``) for a trained, frozen MAR (``distill.teacher``).

    The training rows are the teacher's own sampling inputs: per image, a random order and a mask ratio as in
    ``MAR.forward``, then the frozen MAR's ``conditions`` for that visible set twice, with the class and with the
    "no class" vector (``embed_labels(None, b)``); the masked positions' (cond, uncond) rows, ``distill.rows`` of
    them drawn at random, go to the distillation loss (``DistillObjective``: w, x_T, the teacher's guided DDIM
    states under no_grad, the student's loss). Only the student trains; its EMA is exported as
    ``head_distilled.safetensors`` with the teacher's path and weight fingerprint (``mar.run.load_run`` checks it).
    """

    name = "distill_head"

    def __init__(self, cfg: TrainConfig):
        if cfg.distill.teacher is None:
            raise ValueError("task=distill_head needs the MAR to distill: set distill.teacher=<a MAR run folder or "
                             "its mar_ema.safetensors> (e.g. pretrained/fmnist)")
        self.cfg = cfg
        self.run = None

    def build(self, device) -> nn.Module:
        d = self.cfg.distill
        self.run = load_run(d.teacher, distilled_head=False).to(device)
        check_latent_source(self.data, self.run.tokenizer)
        mar = self.run.model.eval().requires_grad_(False)
        head = getattr(mar, "head", None)
        if not isinstance(head, DiffusionHead) or not hasattr(mar, "conditions"):
            raise ValueError(f"distill.teacher {d.teacher} is not a MAR with a Diffusion Loss head (model "
                             f"{type(mar).__name__}): task=distill_head distills MAR's per-token diffusion")
        net = head.net
        info = {"mar_weights": str(self.run.weights), "mar_fingerprint": fingerprint(self.run.state_dict),
                "teacher_clip_denoised": repr(d.clip_denoised)}
        student = DistilledHead(head.in_channels, net.cond_embed.in_features,
                                net.num_res_blocks if d.depth is None else d.depth,
                                net.model_channels if d.width is None else d.width, d.steps, d.teacher_steps,
                                d.cfg_max, generator=torch.Generator().manual_seed(self.cfg.train.seed), info=info)
        if d.init_from_teacher:
            init_from_teacher(student.student, net)
        return DistillObjective(student, net, d.no_guidance_prob, d.clip_denoised).to(device)

    def ema_source(self, module: nn.Module) -> nn.Module:
        return module.head

    def param_groups(self, module: nn.Module, lr: float) -> list[dict]:
        return param_groups(module, self.cfg.optim.weight_decay, no_decay_prefixes=())

    @torch.no_grad()
    def conditions(self, tokens: torch.Tensor, labels: torch.Tensor, generator: torch.Generator
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """(cond, uncond) rows (R, D) of the masked positions: MAR.forward's order and mask ratio, one batched
        ``conditions`` call for [class; "no class"] on the same visible set, then R = distill.rows rows drawn."""
        mar = self.run.model
        x = mar.patchify(tokens)  # (B, L, C)
        b, L = x.shape[:2]
        order = orders.random_orders(b, L, generator, x.device)
        m = schedules.num_masked_tokens(L, schedules.sample_mask_ratio(generator, mar.mask_ratio_min))
        masked, visible = schedules.split_by_order(order, m)
        classes = torch.cat([mar.embed_labels(labels, b), mar.embed_labels(None, b)])
        z = mar.conditions(torch.cat([x, x]), torch.cat([visible, visible]), classes)  # (2B, L, D)
        z = torch.gather(z, 1, torch.cat([masked, masked]).unsqueeze(-1).expand(-1, -1, z.shape[-1]))  # (2B, m, D)
        c, u = (h.reshape(b * m, -1) for h in z.chunk(2))
        if len(c) > self.cfg.distill.rows:
            pick = torch.randperm(len(c), generator=generator, device=generator.device)[: self.cfg.distill.rows]
            c, u = c[pick.to(c.device)], u[pick.to(c.device)]
        return c, u

    def loss(self, module, batch, step: int, generator: torch.Generator):
        x, y = batch
        tok, mar = self.run.tokenizer, self.run.model
        with torch.no_grad():
            tokens = (tok.sample_from_moments(x, generator=generator) if self.cfg.data.kind == "latents"
                      else tok.encode(x, generator=generator))
        if tokens.shape[1] * mar.patch_size**2 != mar.token_embed_dim:
            raise ValueError(f"the data gives tokens of {tokens.shape[1]} channels, the teacher MAR takes "
                             f"{mar.token_embed_dim // mar.patch_size**2}: cache the latents with the teacher's "
                             "tokenizer (train.py --cache-latents with its tokenizer.checkpoint)")
        c, u = self.conditions(tokens, y, generator)
        return module(c, u, generator)

    @staticmethod
    def identity(config: dict) -> dict:
        return {"distill": config.get("distill")}

    @torch.no_grad()
    def sample_grid(self, ema: nn.Module, step: int, path: Path) -> None:
        """The teacher MAR sampling with the EMA student (the config's sample section; distilled_steps null = the
        fewest trained): one row per class (up to 10), 8 samples per row."""
        s, mar = self.cfg.sample, self.run.model
        mar.head.attach_distilled(ema)
        options = dataclasses.replace(s.sampling_options(), distilled_steps=s.distilled_steps or min(ema.steps))
        labels = torch.arange(min(mar.num_classes, 10), device=model_device(mar)).repeat_interleave(8)
        g = torch.Generator(labels.device).manual_seed(self.cfg.train.seed)
        tokens = mar.sample_tokens(len(labels), num_iter=min(s.num_iter, mar.seq_len), cfg=s.cfg,
                                   cfg_schedule=s.cfg_schedule, labels=labels, temperature=s.temperature, generator=g,
                                   options=options)
        mar.head.attach_distilled(None)
        write_grid(self.run.tokenizer.to_uint8(self.run.tokenizer.decode(tokens)).cpu().numpy(), 8, path)

    def export(self, ema: nn.Module, module: nn.Module, dataset, run_dir: Path, device) -> Path:
        """The EMA student with its sizes, steps, teacher (path, fingerprint) and training length."""
        t = self.cfg.train
        ema.info.update(training_steps=str(t.max_steps if t.max_steps is not None else f"{self.cfg.optim.epochs} epochs"),
                        config=json.dumps(config_to_dict(self.cfg)))
        return save_distilled_head(ema, run_dir / DISTILLED_NAME)


TASKS = {task.name: task for task in (MARTask, TokenizerTask, FeatureNetTask, DistillTask)}
