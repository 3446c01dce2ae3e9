"""Train MAR (or its KL-VAE tokenizer) from a YAML config, on one device or many through accelerate.

    python train.py --config configs/fashion_mnist.yaml [--section.key=value ...]
    accelerate launch train.py --config configs/mar_base_in256.yaml
    python train.py --config configs/fashion_mnist.yaml --cache-latents runs/fmnist/latents.safetensors

A run is a function of (config, step): micro-batch ``slot`` j = rank * grad_accum + a of step s takes
its data from the epoch permutation and its random draws from seed (seed, s, j) (mar/training.py),
so a resumed run, or 2 processes instead of 1 process with 2 accumulation steps, draws the same.
Checkpoints (plain data, atomic) go to <output_dir>/checkpoints; a rerun resumes from the latest.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import math
import signal
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.tracking import GeneralTracker
from tqdm.auto import tqdm

from mar import create_model
from mar.engine.checkpoint import (CheckpointError, checkpoint_path, export_safetensors, find_latest_checkpoint,
                            load_checkpoint, save_checkpoint)
from mar.config import ConfigError, TrainConfig, config_to_dict, effective_lr, load_config, save_config
from mar.engine.data import FashionMNISTDataset, ImageFolderDataset, LatentCacheDataset, save_latent_cache
from mar.io import write_grid
from mar.engine.loop import batch_indices, check_launch, ema_decay, ema_update, lr_at, param_groups, slot_seed
from tokenizers import KLTokenizer, kl_vae_preset
from tokenizers.training import KLVAEObjective, estimate_scaling_factor


class JSONLTracker(GeneralTracker):
    """accelerate tracker writing one JSON object per logged step to <run>/metrics.jsonl."""

    name, requires_logging_directory = "jsonl", True

    def __init__(self, run_dir: str):
        super().__init__()
        self.path = Path(run_dir) / "metrics.jsonl"

    @property
    def tracker(self):
        return self.path

    def store_init_configuration(self, values: dict) -> None:
        pass  # the resolved config is saved as config.yaml

    def log(self, values: dict, step: int | None = None, **kwargs) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **{k: float(v) for k, v in values.items()}}) + "\n")


class EpochIndexed(torch.utils.data.Dataset):
    """Items addressed as (epoch, index): the epoch fixes each item's flip, also inside loader workers."""

    def __init__(self, base):
        self.base = base

    def __len__(self):
        return len(self.base)

    def __getitem__(self, key):
        epoch, index = key
        self.base.set_epoch(epoch)
        return self.base[index]


def build_dataset(cfg: TrainConfig, return_pair: bool = False):
    """The configured dataset; ``return_pair`` gives (image, flipped image, label) for caching latents."""
    d = cfg.data
    if d.kind == "fashion_mnist":
        return FashionMNISTDataset(d.path, split=d.split, pad_to=d.image_size, hflip=d.hflip and not return_pair,
                                   seed=cfg.train.seed, return_pair=return_pair)
    if d.kind == "latents":
        if d.path is None:
            raise ConfigError("data.kind=latents needs data.path=<latent cache file> (made with --cache-latents)")
        if return_pair:
            raise ConfigError("--cache-latents needs images: set data.kind to imagefolder or fashion_mnist")
        return LatentCacheDataset(d.path, hflip=d.hflip, seed=cfg.train.seed)
    if d.path is None:
        raise ConfigError("data.kind=imagefolder needs data.path=<folder with one sub-folder per class>")
    return ImageFolderDataset(d.path, image_size=d.image_size, hflip=d.hflip and not return_pair,
                              seed=cfg.train.seed, return_pair=return_pair)


def build_tokenizer(cfg: TrainConfig) -> KLTokenizer:
    t = cfg.tokenizer
    overrides = {"in_channels": t.in_channels, "out_channels": t.in_channels} if t.in_channels else {}
    if t.checkpoint is None:
        tok = KLTokenizer(kl_vae_preset(t.preset, **overrides))
    elif str(t.checkpoint).endswith(".safetensors"):
        tok = KLTokenizer.load(t.checkpoint)
    else:
        tok = KLTokenizer.from_ldm_checkpoint(t.checkpoint, kl_vae_preset(t.preset, **overrides))
    if t.scaling_factor is not None:
        tok.config = dataclasses.replace(tok.config, scaling_factor=t.scaling_factor)
    return tok


def build_mar(cfg: TrainConfig, tokenizer: KLTokenizer):
    m = dataclasses.asdict(cfg.model)
    if m.pop("vae_stride") != tokenizer.stride or m.pop("token_channels") != tokenizer.latent_channels:
        raise ConfigError(f"model.vae_stride/token_channels must match the tokenizer ({tokenizer.stride}, "
                          f"{tokenizer.latent_channels}): set model.vae_stride={tokenizer.stride} "
                          f"model.token_channels={tokenizer.latent_channels}")
    return create_model(m.pop("preset"), vae_stride=tokenizer.stride, token_channels=tokenizer.latent_channels,
                        generator=torch.Generator().manual_seed(cfg.train.seed), **m)


def batches(dataset, cfg: TrainConfig, start_step: int, rank: int, world: int):
    """Yield this rank's micro-batches from ``start_step`` on (grad_accum of them per step)."""
    b, accum = cfg.optim.batch_size, cfg.optim.grad_accum
    global_batch = b * accum * world

    def keys():
        step = start_step
        while True:
            for a in range(accum):
                epoch, idx = batch_indices(len(dataset), cfg.train.seed, step, global_batch, rank * accum + a, b)
                yield [(epoch, int(i)) for i in idx]
            step += 1

    return iter(torch.utils.data.DataLoader(EpochIndexed(dataset), batch_sampler=keys(), num_workers=cfg.data.num_workers,
                                            persistent_workers=cfg.data.num_workers > 0))


def cache_latents(cfg: TrainConfig, out: str, accelerator: Accelerator) -> None:
    """Encode the dataset once: posterior moments of each image and of its flip, plus labels."""
    flip = cfg.data.hflip  # with data.hflip=false no flipped copies are encoded (half the time and space)
    dataset = build_dataset(cfg, return_pair=flip)
    tok = build_tokenizer(cfg).to(accelerator.device).eval()
    loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.optim.batch_size, num_workers=cfg.data.num_workers)
    moments, flips, labels = [], [], []
    with torch.no_grad():
        for batch in tqdm(loader, desc="caching latents"):
            moments.append(tok.encode_moments(batch[0].to(accelerator.device)).cpu())
            if flip:
                flips.append(tok.encode_moments(batch[1].to(accelerator.device)).cpu())
            labels.append(batch[-1])
    meta = {"scaling_factor": str(tok.scaling_factor), "tokenizer": json.dumps(tok.config.to_dict())}
    save_latent_cache(out, torch.cat(moments), torch.cat(flips) if flip else None, torch.cat(labels), meta)
    print(f"wrote {out}: {sum(len(m) for m in moments)} images, moments {tuple(moments[0].shape[1:])}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML config (configs/*.yaml); see mar/config.py for every key")
    p.add_argument("--resume", help="checkpoint to resume from (default: the latest in the run directory)")
    p.add_argument("--no-resume", action="store_true", help="start fresh even if the run directory has checkpoints")
    p.add_argument("--cache-latents", metavar="OUT", help="encode the dataset to a latent cache file and exit")
    args, overrides = p.parse_known_args(argv)
    bad = [o for o in overrides if not o.startswith("--") or "=" not in o]
    if bad:
        p.error(f"unrecognised arguments {bad}: overrides are written --section.key=value")
    try:
        cfg = load_config(TrainConfig, args.config, overrides)
    except (ConfigError, FileNotFoundError) as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    try:
        return train(cfg, args)
    except (ConfigError, CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except FloatingPointError as e:
        print(f"training stopped: {e}", file=sys.stderr)
        return 3


def train(cfg: TrainConfig, args) -> int:
    cpu = not torch.cuda.is_available()
    precision = ("no" if cpu else "bf16") if cfg.train.mixed_precision == "auto" else cfg.train.mixed_precision
    run_dir = Path(cfg.train.output_dir)
    if "tensorboard" in cfg.train.trackers:
        import importlib.util

        if not (importlib.util.find_spec("tensorboard") or importlib.util.find_spec("tensorboardX")):
            raise ConfigError("train.trackers has tensorboard but the tensorboard package is not installed: "
                              "pip install tensorboard, or use train.trackers=[jsonl]")
    accelerator = Accelerator(cpu=cpu, mixed_precision=precision, log_with=[JSONLTracker(str(run_dir))]
                              + (["tensorboard"] if "tensorboard" in cfg.train.trackers else []), project_dir=str(run_dir))
    if args.cache_latents:
        if accelerator.is_main_process:
            cache_latents(cfg, args.cache_latents, accelerator)
        return 0
    rank, world, accum, device = accelerator.process_index, accelerator.num_processes, cfg.optim.grad_accum, accelerator.device
    check_launch(world)
    global_batch = cfg.optim.batch_size * accum * world
    dataset = build_dataset(cfg)
    steps_per_epoch = len(dataset) // global_batch
    max_steps = cfg.train.max_steps or cfg.optim.epochs * max(steps_per_epoch, 1)
    base_lr = effective_lr(cfg.optim, global_batch)

    torch.manual_seed(cfg.train.seed)  # initialisations that take no generator (diffusers' VAE)
    if cfg.task == "mar" and cfg.tokenizer.checkpoint is None:
        raise ConfigError("task=mar needs a trained tokenizer: set tokenizer.checkpoint=<kl16.ckpt or a tokenizer "
                          ".safetensors written by a task=tokenizer run>")
    tokenizer = build_tokenizer(cfg).to(device)
    if cfg.task == "mar":
        tokenizer.eval().requires_grad_(False)
        model = build_mar(cfg, tokenizer).to(device)
        groups = param_groups(model, cfg.optim.weight_decay)
    else:
        model = KLVAEObjective(tokenizer, cfg.vae).to(device)
        groups = model.param_groups(base_lr, cfg.optim.weight_decay)
    ema = copy.deepcopy(model if cfg.task == "mar" else model.tokenizer).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(groups, lr=base_lr, betas=tuple(cfg.optim.betas))
    for g in optimizer.param_groups:
        g.setdefault("lr_mult", g["lr"] / base_lr if base_lr else 1.0)

    step = 0
    ckpt = None if args.no_resume else (Path(args.resume) if args.resume else find_latest_checkpoint(run_dir))
    if ckpt is not None:
        state = load_checkpoint(ckpt)
        if state.get("config", {}).get("model") != config_to_dict(cfg)["model"] or state.get("task") != cfg.task:
            raise CheckpointError(f"{ckpt} was written for a different model/task config: resume with its config "
                                  f"or pass --no-resume / a new train.output_dir")
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        step = int(state["step"])
        accelerator.print(f"resumed from {ckpt} at step {step}")
    model, optimizer = accelerator.prepare(model, optimizer)
    if accelerator.scaler is not None and ckpt is not None and state.get("scaler"):
        accelerator.scaler.load_state_dict(state["scaler"])
    unwrapped = accelerator.unwrap_model(model)

    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
    accelerator.init_trackers("mar")

    def save(at_step: int) -> Path | None:
        accelerator.wait_for_everyone()
        if not accelerator.is_main_process:
            return None
        state = {"task": cfg.task, "step": at_step, "config": config_to_dict(cfg),
                 "model": unwrapped.state_dict(), "ema": ema.state_dict(), "optimizer": optimizer.state_dict(),
                 "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None,
                 "rng": {"scheme": "per-slot seeds from (train.seed, step, slot)", "seed": cfg.train.seed},
                 "data": {"epoch": at_step // max(steps_per_epoch, 1), "step_in_epoch": at_step % max(steps_per_epoch, 1),
                          "global_batch": global_batch}}
        return save_checkpoint(state, checkpoint_path(run_dir, at_step))

    stop = {"signal": None}

    def on_signal(signum, frame):
        stop["signal"] = signum

    old_handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    data = batches(dataset, cfg, step, rank, world)
    bar = tqdm(total=max_steps, initial=step, disable=not accelerator.is_local_main_process, desc=f"train {cfg.task}")
    t_last, n_last = time.perf_counter(), step
    try:
        while step < max_steps:
            lr = lr_at(step / max(steps_per_epoch, 1), base_lr, cfg.optim.warmup_epochs, cfg.optim.epochs,
                       cfg.optim.lr_schedule, cfg.optim.min_lr)
            for g in optimizer.param_groups:
                g["lr"] = lr * g["lr_mult"]
            model.train()
            logs, loss_sum = {}, torch.zeros((), device=device)
            for a in range(accum):
                x, y = next(data)
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                seed = slot_seed(cfg.train.seed, step, rank * accum + a)
                torch.manual_seed(seed)  # dropout
                g = torch.Generator(device).manual_seed(seed)
                with accelerator.no_sync(model) if a < accum - 1 else contextlib.nullcontext():
                    with accelerator.autocast():
                        if cfg.task == "mar":
                            if cfg.data.kind == "latents":
                                tokens = tokenizer.sample_from_moments(x, generator=g)
                            else:
                                with torch.no_grad():
                                    tokens = tokenizer.encode(x, generator=g)
                            loss = model(tokens, y, generator=g)
                        else:
                            loss, logs = model(x, step=step, generator=g)
                    accelerator.backward(loss / accum)
                loss_sum += loss.detach() / accum
            # one small all-reduce: mean loss, and any rank asking to stop
            flags = accelerator.reduce(torch.stack([loss_sum, torch.tensor(float(stop["signal"] is not None),
                                                                            device=device)]), reduction="sum")
            mean_loss = float(flags[0]) / world
            if not math.isfinite(mean_loss):
                raise FloatingPointError(f"non-finite loss ({mean_loss}) at step {step}; no checkpoint was written for "
                                         f"it (the last good one is kept). Lower the learning rate or check the data.")
            if cfg.optim.grad_clip > 0:
                accelerator.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            ema_update(ema, unwrapped if cfg.task == "mar" else unwrapped.tokenizer,
                       ema_decay(cfg.optim.ema_rate, step, cfg.optim.ema_warmup))
            step += 1
            bar.update(1)
            if step % cfg.train.log_every_steps == 0 or step == max_steps:
                dt = time.perf_counter() - t_last
                ips = (step - n_last) * global_batch / max(dt, 1e-9)
                t_last, n_last = time.perf_counter(), step
                bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}", img_s=f"{ips:.1f}")
                accelerator.log({"loss": mean_loss, "lr": lr, "images_per_s": ips,
                                 **{k: float(v) for k, v in logs.items()}}, step=step)
            if step % cfg.train.save_every_steps == 0 or step == max_steps or float(flags[1]) > 0:
                save(step)
            if cfg.task == "mar" and (step % cfg.train.sample_every_steps == 0 or step == max_steps):
                if accelerator.is_main_process:
                    write_sample_grid(ema, tokenizer, cfg, run_dir / "samples" / f"step-{step:08d}.png")
            if float(flags[1]) > 0:
                accelerator.print(f"stopped by signal at step {step}; checkpoint saved, rerun the command to resume")
                return 130
    finally:
        bar.close()
        for s, h in old_handlers.items():
            signal.signal(s, h)
    check_in_sync(accelerator, unwrapped)
    if accelerator.is_main_process:
        finish(cfg, ema if cfg.task == "mar" else unwrapped.tokenizer, tokenizer, dataset, run_dir, device)
    accelerator.end_training()
    return 0


@torch.no_grad()
def check_in_sync(accelerator: Accelerator, model: torch.nn.Module) -> None:
    """Data parallel sanity check: every process must end with bit-identical parameters."""
    params = [p.detach().double() for p in model.parameters()]
    fingerprint = torch.stack([sum(p.sum() for p in params), sum((p * p).sum() for p in params)])
    every = accelerator.gather(fingerprint.unsqueeze(0))
    if not bool((every == every[0]).all()):
        raise RuntimeError(f"processes ended with different parameters: {every.tolist()}")
    accelerator.print(f"parameters identical on all {accelerator.num_processes} processes "
                      f"(fingerprint {every[0, 0].item():.10e}, {every[0, 1].item():.10e})")


@torch.no_grad()
def write_sample_grid(ema, tokenizer: KLTokenizer, cfg: TrainConfig, path: Path) -> None:
    """A grid from the EMA weights: one row per class (up to 10 classes), 8 samples per row."""
    classes = min(cfg.model.num_classes, 10)
    labels = torch.arange(classes, device=tokenizer.vae.device).repeat_interleave(8)
    g = torch.Generator(labels.device).manual_seed(cfg.train.seed)
    tokens = ema.sample_tokens(len(labels), num_iter=min(cfg.sample.num_iter, ema.seq_len), cfg=cfg.sample.cfg,
                               cfg_schedule=cfg.sample.cfg_schedule, labels=labels,
                               temperature=cfg.sample.temperature, generator=g,
                               clip_denoised=cfg.sample.clip_denoised)
    images = tokenizer.to_uint8(tokenizer.decode(tokens)).cpu().numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    write_grid(images, 8, path)


def finish(cfg, trained, tokenizer, dataset, run_dir: Path, device) -> None:
    """Exports for sampling: the EMA MAR weights, or the trained tokenizer (raw weights, as LDM VAEs are
    used) with the latent scaling factor computed from data."""
    if cfg.task == "mar":
        meta = {"weights": "ema", "config": json.dumps(config_to_dict(cfg)),
                "tokenizer": json.dumps(tokenizer.config.to_dict())}
        out = export_safetensors(trained.state_dict(), run_dir / "mar_ema.safetensors", meta)
    else:
        loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.optim.batch_size, shuffle=False)
        images = (x.to(device) for _, (x, _y) in zip(range(max(1, 2048 // cfg.optim.batch_size)), loader))
        factor = estimate_scaling_factor(trained, images, torch.Generator(device).manual_seed(cfg.train.seed))
        trained.config = dataclasses.replace(trained.config, scaling_factor=factor)
        out = run_dir / "tokenizer.safetensors"
        trained.save(out)
        print(f"latent scaling factor 1/std from {min(len(dataset), 2048)} training images: {factor:.4f}")
    print(f"wrote {out}")


if __name__ == "__main__":
    sys.exit(main())
