"""Pure pieces of the training recipe (SPEC 5): learning-rate schedule, weight-decay groups, EMA,
the data order, and the seeding scheme that makes runs reproducible across resumes and devices.

Seeding: every micro-batch of the run has a *slot* j = rank * grad_accum + accumulation index within
its optimizer step; its random draws (orders, mask ratio, label drop, diffusion t and noise,
dropout) all come from ``slot_seed(seed, step, j)``. A run is therefore a function of
(config, step): resuming at step s, or running 2 processes instead of 1 process with 2
accumulation steps, draws exactly the same numbers.
"""
from __future__ import annotations

import math
import os

import torch
import torch.nn as nn

from mar.engine.data import epoch_permutation, item_seed


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


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups as in the reference: no decay for 1-D parameters, biases and all of DiffLoss."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim == 1 or name.endswith(".bias") or "diffloss" in name:
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
    """ema <- rate * ema + (1 - rate) * model, parameter by parameter; buffers are copied."""
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p.detach().to(e.dtype), 1.0 - rate)
    for e, b in zip(ema.buffers(), model.buffers()):
        e.copy_(b)


def slot_seed(seed: int, step: int, slot: int) -> int:
    """The seed of micro-batch ``slot`` at optimizer ``step``."""
    return item_seed(seed, step, slot)


def batch_indices(num_items: int, seed: int, step: int, global_batch: int, slot: int,
                  micro_batch: int) -> tuple[int, torch.Tensor]:
    """(epoch, dataset indices) of micro-batch ``slot`` at optimizer ``step``; epochs drop their last partial batch."""
    steps_per_epoch = num_items // global_batch
    if steps_per_epoch == 0:
        raise ValueError(f"the dataset has {num_items} items, fewer than one global batch of {global_batch}: "
                         "lower optim.batch_size or use more data")
    epoch, within = divmod(step, steps_per_epoch)
    start = within * global_batch + slot * micro_batch
    return epoch, epoch_permutation(num_items, seed, epoch)[start:start + micro_batch]


def check_launch(num_processes: int) -> None:
    """Refuse to run when the launcher started more processes than accelerate sees (they would not sync).

    The trap (see ENV.md): ``accelerate launch --multi_gpu`` on a machine without GPUs and without
    ACCELERATE_USE_CPU=1 starts independent single-process runs that all believe they are rank 0.
    """
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != num_processes:
        raise ValueError(f"launched as {launched} processes but accelerate runs {num_processes}: the processes are "
                         "not synchronised. On CPU use ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu ...")
