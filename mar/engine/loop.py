"""The training loop (``fit``) and its pure pieces: LR schedule, weight-decay groups, EMA, the metrics log.

Glossary: s optimizer step, j micro-batch slot = rank * grad_accum + a, E steps per epoch.

``fit`` drives any task (``mar.engine.tasks``: what is trained, its loss and its exports): LR from ``lr_at`` at
the fractional epoch s / E, gradient accumulation, clipping, EMA, logging (tqdm, ``metrics.jsonl``,
TensorBoard), atomic plain-data checkpoints, exact resume, and SIGTERM / Ctrl-C (a checkpoint, then exit 130).
Slot j of step s draws everything from ``slot_seed(seed, s, j)`` and its data from the epoch permutation
(``mar.engine.data``), so a run is a function of (config, step).

The accelerator is passed in (duck-typed: ``prepare``, ``backward``, ``reduce``, ``gather``, ``autocast``,
``no_sync``, ``clip_grad_norm_``, ``unwrap_model``, ``wait_for_everyone``, ``log``): this module does not
import accelerate, read a config file or see an argparse object. With ``train.fsdp`` the model, its optimizer
state and its EMA are sharded over the processes (``mar.engine.fsdp.Sharding``, ``fs`` below; None = the plain
path); checkpoints stay plain full state dicts either way.
"""
from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import signal
import time
from pathlib import Path

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from mar.config.loader import config_to_dict
from mar.config.schema import TrainConfig, effective_lr
from mar.engine.checkpoint import CheckpointError, checkpoint_path, find_latest_checkpoint, load_checkpoint, save_checkpoint
from mar.engine.data import slot_seed, train_batches
from mar.engine.fsdp import sharding_for
from mar.io import write_text


def lr_at(epoch: float, base_lr: float, warmup_epochs: float, total_epochs: float,
          schedule: str = "constant", min_lr: float = 0.0) -> float:
    """Learning rate at a fractional epoch: linear warmup from 0, then constant or half-cosine to min_lr."""
    if epoch < warmup_epochs:
        return base_lr * epoch / warmup_epochs
    if schedule == "constant":
        return base_lr
    if schedule == "cosine":
        span = max(total_epochs - warmup_epochs, 1e-12)
        progress = min((epoch - warmup_epochs) / span, 1.0)
        return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown lr schedule {schedule!r}: use 'constant' or 'cosine'")


def param_groups(model: nn.Module, weight_decay: float, no_decay_prefixes: tuple[str, ...] = ("diffloss.",)
                 ) -> list[dict]:
    """AdamW groups as in the reference: no decay for 1-D parameters, biases and the head (``diffloss.``)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim == 1 or name.endswith(".bias") or name.startswith(no_decay_prefixes):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def ema_decay(rate: float, step: int, warmup: bool = False) -> float:
    """EMA decay at optimizer ``step``: ``rate``, or with warmup min(rate, (1 + step) / (10 + step)).

    The warmup lets short runs use an EMA (a fixed 0.9999 keeps 90% of the initial weights after 1000
    steps); the reference recipe uses the fixed rate.
    """
    return min(rate, (1.0 + step) / (10.0 + step)) if warmup else rate


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, rate: float) -> None:
    """ema <- rate * ema + (1 - rate) * model, parameter by parameter paired by name; buffers are copied."""
    params, buffers = dict(model.named_parameters()), dict(model.named_buffers())
    own_params, own_buffers = dict(ema.named_parameters()), dict(ema.named_buffers())
    if own_params.keys() != params.keys() or own_buffers.keys() != buffers.keys():
        diff = sorted((own_params.keys() | own_buffers.keys()) ^ (params.keys() | buffers.keys()))
        raise ValueError(f"the EMA copy and the model have different parameters ({', '.join(diff[:5])}): "
                         "the EMA must be a copy of the model it follows")
    for name, e in own_params.items():
        e.lerp_(params[name].detach().to(e.dtype), 1.0 - rate)
    for name, e in own_buffers.items():
        e.copy_(buffers[name])


def check_launch(num_processes: int) -> None:
    """Refuse to run when the launcher started more processes than accelerate sees (they would not sync).

    The trap: ``accelerate launch --multi_gpu`` on a machine without GPUs and without ACCELERATE_USE_CPU=1
    starts independent single-process runs that all believe they are rank 0.
    """
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != num_processes:
        raise ValueError(f"launched as {launched} processes but accelerate runs {num_processes}: the processes are "
                         "not synchronised. On CPU use ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu ...")


class MetricsLog:
    """``<run>/metrics.jsonl``: one JSON object per logged step. On a resume from step s the rows after s (logged
    after the checkpoint, and about to be replayed) are dropped first, so every step appears once."""

    def __init__(self, path: Path, resume_step: int, enabled: bool = True):
        self.path, self.enabled = path, enabled
        if enabled and path.is_file():
            rows = [line for line in path.read_text().splitlines() if line.strip()]
            kept = [line for line in rows if json.loads(line).get("step", 0) <= resume_step]
            if len(kept) != len(rows):
                write_text(path, "".join(line + "\n" for line in kept))

    def log(self, step: int, values: dict) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps({"step": step, **{k: float(v) for k, v in values.items()}}) + "\n")


@torch.no_grad()
def check_in_sync(accelerator, model: nn.Module) -> None:
    """Data parallel sanity check: every process must end with bit-identical parameters."""
    params = [p.detach().double() for p in model.parameters()]
    fingerprint = torch.stack([sum(p.sum() for p in params), sum((p * p).sum() for p in params)])
    every = accelerator.gather(fingerprint.unsqueeze(0))
    if not bool((every == every[0]).all()):
        raise RuntimeError(f"processes ended with different parameters: {every.tolist()}")
    accelerator.print(f"parameters identical on all {accelerator.num_processes} processes "
                      f"(fingerprint {every[0, 0].item():.10e}, {every[0, 1].item():.10e})")


def resume_point(run_dir: Path, resume: Path | None, fresh: bool) -> Path | None:
    """The checkpoint to resume from: ``resume``, else the run folder's latest (None with ``fresh``, which is
    refused when the folder already holds checkpoints: two runs would mix in one folder)."""
    latest = find_latest_checkpoint(run_dir)
    if fresh:
        if latest is not None:
            raise CheckpointError(f"--no-resume: {run_dir} already holds checkpoints up to {latest.name} of a run; "
                                  "pass a new train.output_dir, or delete that folder to start it again")
        return None
    return resume if resume is not None else latest


def check_schedule(ckpt: Path, state: dict, total_steps: int, reschedule: bool) -> None:
    """A resume continues the checkpoint's LR schedule: a run of another length (train.max_steps, optim.epochs)
    would move the cosine's end and so the LR at the resumed step (a warm restart), which needs
    train.reschedule=true. Checkpoints written before the schedule was recorded are not checked."""
    before = (state.get("schedule") or {}).get("total_steps")
    if before is None or int(before) == total_steps or reschedule:
        return
    raise CheckpointError(
        f"{ckpt} belongs to a run of {before} steps, whose LR schedule ends there; this config asks for "
        f"{total_steps} steps, which would restart the schedule. Resume with --train.max_steps={before} (pause "
        f"earlier with --train.stop_at_step=N), or pass --train.reschedule=true to continue on a schedule "
        f"recomputed for {total_steps} steps (a warm restart)")


def fit(task, cfg: TrainConfig, accelerator, run_dir: Path, dataset, ckpt: Path | None, on_ready=None) -> int:
    """Train ``task`` to ``cfg.train.max_steps`` (or ``optim.epochs``); returns 0, or 130 when stopped by a
    signal (after a checkpoint). ``ckpt`` is the checkpoint to resume from; ``on_ready()`` runs on the main
    process once everything is checked and built, before the first step (train.py writes config.yaml there)."""
    o, t = cfg.optim, cfg.train
    rank, world, device = accelerator.process_index, accelerator.num_processes, accelerator.device
    global_batch = o.batch_size * o.grad_accum * world
    steps_per_epoch = max(len(dataset) // global_batch, 1)
    max_steps = t.max_steps if t.max_steps is not None else o.epochs * steps_per_epoch
    total_epochs = max_steps / steps_per_epoch  # the schedule ends where the run ends
    base_lr = effective_lr(o, global_batch)
    fs = sharding_for(t, task.name, accelerator)
    model = task.build(device)
    ema = copy.deepcopy(task.ema_source(model)).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(task.param_groups(model, base_lr), lr=base_lr, betas=tuple(o.betas))
    for g in optimizer.param_groups:
        g.setdefault("lr_mult", g["lr"] / base_lr if base_lr else 1.0)
    step, state = 0, None
    if ckpt is not None:
        state = load_checkpoint(ckpt)
        if state.get("task") != task.name or state.get("identity", task.identity(state.get("config", {}))) \
                != task.identity(config_to_dict(cfg)):
            raise CheckpointError(f"{ckpt} was written for a different {task.name} config (task or model sizes): "
                                  "resume with its config, or pass a new train.output_dir")
        check_schedule(ckpt, state, max_steps, t.reschedule)
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        if fs is None:  # under FSDP it loads into the shards, below
            optimizer.load_state_dict(state["optimizer"])
        step = int(state["step"])
        accelerator.print(f"resumed from {ckpt} at step {step}")
    if fs is None:
        model, optimizer = accelerator.prepare(model, optimizer)
    else:
        model, optimizer = fs.prepare(model, optimizer, ema, task.ema_source,
                                      None if state is None else state["optimizer"])
    if accelerator.scaler is not None and state is not None and state.get("scaler"):
        accelerator.scaler.load_state_dict(state["scaler"])
    unwrapped = accelerator.unwrap_model(model)
    metrics = MetricsLog(run_dir / "metrics.jsonl", step, enabled=accelerator.is_main_process)
    if accelerator.is_main_process and on_ready is not None:
        on_ready()

    def save(at_step: int) -> None:
        accelerator.wait_for_everyone()
        if fs is not None:  # collectives: every process takes part, the main process receives the full states
            sharded = fs.full_states(unwrapped, optimizer, ema, task.ema_source(unwrapped))
        if accelerator.is_main_process:
            model_sd, ema_sd, optimizer_sd = sharded if fs is not None else \
                (unwrapped.state_dict(), ema.state_dict(), optimizer.state_dict())
            save_checkpoint({"task": task.name, "step": at_step, "config": config_to_dict(cfg),
                             "identity": task.identity(config_to_dict(cfg)), "model": model_sd,
                             "ema": ema_sd, "optimizer": optimizer_sd,
                             **({"fsdp": fs.describe()} if fs is not None else {}),
                             "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None,
                             "schedule": {"total_steps": max_steps, "steps_per_epoch": steps_per_epoch},
                             "rng": {"scheme": "per-slot seeds from (train.seed, step, slot)", "seed": t.seed},
                             "data": {"epoch": at_step // steps_per_epoch, "step_in_epoch": at_step % steps_per_epoch,
                                      "global_batch": global_batch}}, checkpoint_path(run_dir, at_step))

    stop = {"signal": None}
    old_handlers = {s: signal.signal(s, lambda signum, frame: stop.update(signal=signum))
                    for s in (signal.SIGTERM, signal.SIGINT)}
    data = train_batches(dataset, t.seed, o.batch_size, o.grad_accum, step, rank, world, cfg.data.num_workers,
                         pin_memory=torch.device(device).type == "cuda")
    bar = tqdm(total=max_steps, initial=step, disable=not accelerator.is_local_main_process, desc=f"train {task.name}")
    t_last, n_last = time.perf_counter(), step
    no_sync = accelerator.no_sync if fs is None else fs.no_sync
    try:
        while step < max_steps:
            lr = lr_at(step / steps_per_epoch, base_lr, o.warmup_epochs, total_epochs, o.lr_schedule, o.min_lr)
            for g in optimizer.param_groups:
                g["lr"] = lr * g["lr_mult"]
            model.train()
            logs, loss_sum = {}, torch.zeros((), device=device)
            for a in range(o.grad_accum):
                batch = [v.to(device, non_blocking=True) for v in next(data)]
                seed = slot_seed(t.seed, step, rank * o.grad_accum + a)
                torch.manual_seed(seed)  # dropout (nn.Dropout takes no generator)
                g = torch.Generator(device).manual_seed(seed)
                with no_sync(model) if a < o.grad_accum - 1 else contextlib.nullcontext():
                    with accelerator.autocast():
                        loss, logs = task.loss(model, batch, step, g)
                    accelerator.backward(loss / o.grad_accum)
                loss_sum += loss.detach() / o.grad_accum
            # one small all-reduce: mean loss, and any rank asking to stop
            flags = accelerator.reduce(torch.stack([loss_sum, torch.tensor(float(stop["signal"] is not None),
                                                                            device=device)]), reduction="sum")
            mean_loss = float(flags[0]) / world
            if not math.isfinite(mean_loss):  # every rank sees the reduced loss: all stop here, together
                accelerator.wait_for_everyone()  # (gloo's threads idle before the process group is freed)
                raise FloatingPointError(f"non-finite loss ({mean_loss}) at step {step}; no checkpoint was written for "
                                         f"it (the last good one is kept). Lower the learning rate or check the data.")
            if o.grad_clip > 0:
                accelerator.clip_grad_norm_(model.parameters(), o.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if fs is None:
                ema_update(ema, task.ema_source(unwrapped), ema_decay(o.ema_rate, step, o.ema_warmup))
            else:
                fs.ema_update(task.ema_source(unwrapped), ema_decay(o.ema_rate, step, o.ema_warmup))
            step += 1
            bar.update(1)
            if step % t.log_every_steps == 0 or step == max_steps:
                ips = (step - n_last) * global_batch / max(time.perf_counter() - t_last, 1e-9)
                t_last, n_last = time.perf_counter(), step
                bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}", img_s=f"{ips:.1f}")
                values = {"loss": mean_loss, "lr": lr, "images_per_s": ips, **{k: float(v) for k, v in logs.items()}}
                metrics.log(step, values)
                if "tensorboard" in t.trackers:
                    accelerator.log(values, step=step)
            if step % t.save_every_steps == 0 or step == max_steps or float(flags[1]) > 0:
                save(step)
            if step % t.sample_every_steps == 0 or step == max_steps:
                if fs is not None:  # collective: the main process's EMA module, current
                    fs.gather_ema(task.ema_source(unwrapped), ema)
                if accelerator.is_main_process:
                    task.sample_grid(ema, step, run_dir / "samples" / f"step-{step:08d}.png")
            if float(flags[1]) > 0:
                accelerator.print(f"stopped by signal at step {step}; checkpoint saved, rerun the command to resume")
                return 130
            if step == t.stop_at_step and step < max_steps:
                if step % t.save_every_steps:
                    save(step)
                accelerator.print(f"paused at step {step} of {max_steps} (train.stop_at_step); checkpoint saved, "
                                  "rerun without train.stop_at_step (or with a later one) to continue")
                return 0
    finally:
        bar.close()
        for s, h in old_handlers.items():
            signal.signal(s, h)
    if fs is None:
        check_in_sync(accelerator, unwrapped)
    else:
        fs.check_in_sync(unwrapped)
        fs.gather_ema(task.ema_source(unwrapped), ema)
    if accelerator.is_main_process:
        print(f"wrote {task.export(ema, unwrapped, dataset, run_dir, device)}")
    accelerator.wait_for_everyone()  # every rank leaves together, after the main process's export
    return 0
