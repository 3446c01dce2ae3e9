"""What every process of a launch must agree on: one lock per output folder, gathering, a clean shutdown.

Works on the process group accelerate (or torchrun) set up, through ``torch.distributed``; a single process
needs none of it. The accelerator-like object passed in needs ``is_main_process`` and ``device``.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch
import torch.distributed as dist

from mar.io import FolderBusy, FolderLock


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def any_rank(flag: bool, device) -> bool:
    """True on every process if ``flag`` is True on any."""
    if not _distributed():
        return flag
    t = torch.tensor(float(flag), device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def gather_objects(obj) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every process (picklable objects)."""
    if not _distributed():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


@contextlib.contextmanager
def lock_folder(folder: Path, accelerator, what: str = "run"):
    """Hold ``folder``'s lock (main process) for the block; every process raises FolderBusy if it is taken."""
    lock, message = FolderLock(folder, what), None
    if accelerator.is_main_process:
        try:
            lock.acquire()
        except FolderBusy as e:
            message = str(e)
    if any_rank(message is not None, accelerator.device):
        raise FolderBusy(message or f"{folder} is in use by another {what} (see the main process's message)")
    try:
        yield lock
    finally:
        lock.release()


def shutdown() -> None:
    """Destroy the process group so that every rank exits (gloo/nccl teardown at interpreter exit can hang)."""
    if _distributed():
        dist.destroy_process_group()
