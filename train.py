"""Train a generator (or its tokenizer) from a YAML config, on one device or many through accelerate.

    python train.py --config configs/fmnist_mar.yaml [--section.key=value ...]
    accelerate launch train.py --config configs/mar_base_in256.yaml --data.path=/data/imagenet/train
    python train.py --config configs/fmnist_mar.yaml --cache-latents runs/fmnist/latents.safetensors

The config's ``task`` picks what is trained (``mar.engine.tasks``: mar, tokenizer); ``mar.engine.loop.fit``
runs it. Micro-batch slot j = rank * grad_accum + a of step s takes its data from the epoch permutation and
its random draws from seed (seed, s, j), so a resumed run, or 2 processes instead of 1 process with 2
accumulation steps, draws the same. Checkpoints (plain data, atomic) go to <output_dir>/checkpoints; a rerun
resumes from the latest. One run at a time per output folder (a lock). Exit status: 0 done, 2 bad input or a
file system error (one line on stderr), 3 a non-finite loss, 130 stopped by a signal (resumable).
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import torch
from accelerate import Accelerator

from mar.config import ConfigError, TrainConfig, load_config, save_config
from mar.engine.checkpoint import CheckpointError
from mar.engine.dist import lock_folder, shutdown
from mar.engine.loop import check_launch, fit, resume_point
from mar.engine.caching import cache_latents
from mar.engine.tasks import TASKS
from mar.io import FolderBusy, describe_os_error, remove_stale_temps


def parse_args(argv: list[str] | None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML config (configs/*.yaml); mar/config/schema.py lists every key")
    p.add_argument("--resume", help="checkpoint to resume from (default: the latest in the run directory)")
    p.add_argument("--no-resume", action="store_true", help="start fresh (refused if the folder has checkpoints)")
    p.add_argument("--cache-latents", metavar="OUT",
                   help="encode the dataset to a latent cache and exit: OUT a folder = bounded shards written by every "
                        "process (resumable; train with data.kind=latents data.path=OUT), OUT a .safetensors file = "
                        "one file from the main process (holds every moment in memory: small datasets)")
    p.add_argument("--cache-shard-mb", type=float, default=1024.0, metavar="MB",
                   help="size bound of one shard of a cache folder, in MiB (default 1024)")
    p.add_argument("--cache-dtype", choices=["float32", "float16"], default="float32",
                   help="how the cached moments are stored (float16 halves the cache; default float32)")
    args, overrides = p.parse_known_args(argv)
    bad = [o for o in overrides if not o.startswith("--") or "=" not in o]
    if bad:
        p.error(f"unrecognised arguments {bad}: overrides are written --section.key=value")
    return args, overrides


def main(argv: list[str] | None = None) -> int:
    args, overrides = parse_args(argv)
    try:
        cfg = load_config(TrainConfig, args.config, overrides)
    except (ConfigError, FileNotFoundError) as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    try:
        if args.cache_latents:
            return cache(cfg, Path(args.cache_latents), args.cache_shard_mb, args.cache_dtype)
        return train(cfg, resume=Path(args.resume) if args.resume else None,
                     fresh=args.no_resume)
    except (ConfigError, CheckpointError, FileNotFoundError, FolderBusy, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # disk full, permissions, ...: the last complete checkpoint is kept
        print(f"error: {describe_os_error(e)}", file=sys.stderr)
        return 2
    except FloatingPointError as e:
        print(f"training stopped: {e}", file=sys.stderr)
        return 3
    finally:
        shutdown()


def accelerator_for(cfg: TrainConfig, **kwargs) -> Accelerator:
    """The launch's accelerator (CPU when no CUDA device; bf16 on CUDA for mixed_precision=auto)."""
    cpu = not torch.cuda.is_available()
    precision = ("no" if cpu else "bf16") if cfg.train.mixed_precision == "auto" else cfg.train.mixed_precision
    accelerator = Accelerator(cpu=cpu, mixed_precision=precision, **kwargs)
    check_launch(accelerator.num_processes)
    return accelerator


def cache(cfg: TrainConfig, out: Path, shard_mb: float, dtype: str) -> int:
    """Encode the dataset once (``mar.engine.caching``): every process of the launch takes its shards."""
    try:
        cache_latents(cfg, out, accelerator_for(cfg), shard_mb, dtype)
    except KeyboardInterrupt:  # complete shards are kept; the partial one is a temporary, removed on the rerun
        print(f"stopped; rerun the command to finish {out} (its complete shards are kept)", file=sys.stderr)
        return 130
    return 0


def train(cfg: TrainConfig, resume: Path | None = None, fresh: bool = False) -> int:
    """Check everything, then lock the output folder, then train; nothing is written before the checks pass."""
    cpu = not torch.cuda.is_available()
    precision = ("no" if cpu else "bf16") if cfg.train.mixed_precision == "auto" else cfg.train.mixed_precision
    run_dir = Path(cfg.train.output_dir)
    tensorboard = "tensorboard" in cfg.train.trackers
    if tensorboard and not (importlib.util.find_spec("tensorboard") or importlib.util.find_spec("tensorboardX")):
        raise ConfigError("train.trackers has tensorboard but the tensorboard package is not installed: "
                          "pip install tensorboard, or use train.trackers=[jsonl]")
    from mar.engine.fsdp import fsdp_plugin_kwargs  # train.fsdp on CUDA: accelerate shards (else mar.engine.fsdp)
    plugin = fsdp_plugin_kwargs(cfg.train, cuda=not cpu)
    if plugin is not None:
        from accelerate.utils import FullyShardedDataParallelPlugin

        plugin = FullyShardedDataParallelPlugin(**plugin)
    accelerator = Accelerator(cpu=cpu, mixed_precision=precision, log_with=["tensorboard"] if tensorboard else None,
                              project_dir=str(run_dir), fsdp_plugin=plugin)
    check_launch(accelerator.num_processes)
    task = TASKS[cfg.task](cfg)
    dataset = task.dataset()
    global_batch = cfg.optim.batch_size * cfg.optim.grad_accum * accelerator.num_processes
    if len(dataset) < global_batch:
        raise ValueError(f"the dataset has {len(dataset)} items, fewer than one global batch of {global_batch} "
                         f"(batch_size x grad_accum x processes): lower optim.batch_size or use more data")
    with lock_folder(run_dir, accelerator, what="training run"):
        ckpt = resume_point(run_dir, resume, fresh)

        def on_ready() -> None:  # main process, after every check: only now are records written
            for folder in (run_dir, run_dir / "checkpoints", run_dir / "samples"):
                remove_stale_temps(folder, any_pid=True)  # a killed run's temporaries (we hold the lock)
            save_config(cfg, run_dir / "config.yaml")
            if tensorboard:
                accelerator.init_trackers("mar")

        code = fit(task, cfg, accelerator, run_dir, dataset, ckpt, on_ready)
    accelerator.end_training()
    return code


if __name__ == "__main__":
    sys.exit(main())
