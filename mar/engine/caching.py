"""``train.py --cache-latents OUT``: encode a dataset once with the frozen tokenizer, for training on its latents.

OUT a folder: the sharded cache of ``mar.engine.latent_shards``, split over every process and machine of the
launch, bounded in memory, resumable; OUT a ``.safetensors`` file: the original single-file cache
(``mar.engine.data.save_latent_cache``), written by the main process with every moment in memory.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from tqdm.auto import tqdm

from mar.config.schema import TrainConfig
from mar.engine.data import build_dataset, save_latent_cache
from mar.engine.dist import any_rank, lock_folder
from mar.engine.latent_shards import (DTYPES, completed_shards, index_plan, plan_cache, read_index,
                                      tokenizer_fingerprint, write_index, write_shards)
from mar.engine.tasks import build_tokenizer
from mar.io import remove_stale_temps


def cache_latents(cfg: TrainConfig, out: Path, accelerator, shard_mb: float = 1024.0, dtype: str = "float32") -> Path:
    """``--cache-latents OUT``: the posterior moments of every image (and of its flip, with data.hflip) and the
    labels. OUT a folder: bounded shards written by every process of the launch (``mar.engine.latent_shards``),
    resumable; OUT a ``.safetensors`` file: one file written by the main process, which holds every moment in
    memory (the original format; small datasets)."""
    flip, device = cfg.data.hflip, accelerator.device
    dataset = build_dataset(cfg.data, cfg.train.seed, return_pair=flip)
    tok = build_tokenizer(cfg).to(device).eval().requires_grad_(False)
    made_by = tokenizer_fingerprint(tok)

    @torch.no_grad()
    def encode(images: torch.Tensor) -> torch.Tensor:
        return tok.encode_moments(images.to(device))

    if out.suffix == ".safetensors":
        if accelerator.is_main_process:
            _cache_one_file(cfg, out, tok, dataset, encode, made_by, DTYPES[dtype])
        accelerator.wait_for_everyone()
        return out
    d = cfg.data
    data = f"{d.kind}:{Path(d.path).resolve() if d.path else 'default'}:{d.split}:{d.image_size}"
    plan = plan_cache(len(dataset), tuple(encode(dataset[0][0][None]).shape[1:]), dtype, flip, shard_mb, made_by,
                      data, batch_size=cfg.optim.batch_size)
    out.mkdir(parents=True, exist_ok=True)
    with lock_folder(out, accelerator, what="latent cache run"):
        index = read_index(out)
        if index is not None:
            if index_plan(index) != plan:
                raise ValueError(f"{out} holds a complete latent cache of other data, tokenizer or options "
                                 f"({index_plan(index).data}): pass a new --cache-latents folder or delete it")
            accelerator.print(f"{out} is complete already ({plan.items} images in {plan.num_shards} shards)")
            return out
        if accelerator.is_main_process:
            remove_stale_temps(out, any_pid=True)  # an interrupted run's partial shards (we hold the lock)
        done = completed_shards(out, plan)  # every process, before any writes
        accelerator.wait_for_everyone()
        todo = [k for k in plan.owned(accelerator.process_index, accelerator.num_processes) if k not in done]
        if accelerator.is_main_process and done:
            print(f"resuming {out}: {len(done)} of {plan.num_shards} shards are complete")
        failed = None
        try:
            write_shards(out, plan, dataset, encode, todo, cfg.optim.batch_size, cfg.data.num_workers,
                         progress=accelerator.is_local_main_process)
        except (OSError, ValueError) as e:  # disk full, an unreadable image: the others must not wait forever
            failed = e
        if any_rank(failed is not None, device):
            raise failed or RuntimeError("another process failed writing its shards (its message is above); "
                                         "rerun the command to write the missing shards")
        if accelerator.is_main_process:
            write_index(out, plan, {"tokenizer": {"checkpoint": str(cfg.tokenizer.checkpoint),
                                                  "config": tok.config.to_dict()}})
            print(f"wrote {out}: {plan.items} images in {plan.num_shards} shards of <= {plan.shard_items}, moments "
                  f"{plan.moments_shape} {plan.dtype}{' with flips' if flip else ''}")
        accelerator.wait_for_everyone()
    return out


def _cache_one_file(cfg: TrainConfig, out: Path, tok, dataset, encode, made_by: str, dtype: torch.dtype) -> None:
    loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.optim.batch_size, num_workers=cfg.data.num_workers)
    moments, flips, labels = [], [], []
    for batch in tqdm(loader, desc="caching latents"):
        moments.append(encode(batch[0]).to("cpu", dtype))
        if cfg.data.hflip:
            flips.append(encode(batch[1]).to("cpu", dtype))
        labels.append(batch[-1])
    meta = {"scaling_factor": str(getattr(tok, "scaling_factor", 1.0)), "tokenizer": json.dumps(tok.config.to_dict()),
            "tokenizer_fingerprint": made_by}
    save_latent_cache(out, torch.cat(moments), torch.cat(flips) if flips else None, torch.cat(labels), meta)
    print(f"wrote {out}: {sum(len(m) for m in moments)} images, moments {tuple(moments[0].shape[1:])}")
