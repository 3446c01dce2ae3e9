"""Shared pieces of the benchmark scripts: model settings by name, timing, machine description.

Run the scripts from the repository root (``python benchmarks/<script>.py``) with the package installed
(``pip install -e .``). On a shared CPU pin the thread count (``OMP_NUM_THREADS=1``) and read medians.
"""
from __future__ import annotations

import os
import platform
import statistics
import subprocess
import time
from typing import Callable

import torch

from mar import create_model

# name: (preset, create_model keyword arguments). "fmnist" is the embedded default (configs/fmnist_mar.yaml);
# the 256 px ones are the published ImageNet models on KL-16 tokens.
SETTINGS: dict[str, tuple[str, dict]] = {
    "fmnist": ("mar_small", dict(img_size=32, vae_stride=4, token_channels=8, num_classes=10, buffer_size=16,
                                 attn_dropout=0.0, proj_dropout=0.0)),
    "mar_base_256": ("mar_base", dict(img_size=256, vae_stride=16, token_channels=16, num_classes=1000)),
    "mar_large_256": ("mar_large", dict(img_size=256, vae_stride=16, token_channels=16, num_classes=1000)),
    "mar_huge_256": ("mar_huge", dict(img_size=256, vae_stride=16, token_channels=16, num_classes=1000)),
    "tiny": ("mar_tiny", dict(img_size=16, vae_stride=4, token_channels=4, num_classes=10, buffer_size=4)),
}
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def build(setting: str, device: torch.device | str = "cpu", **overrides):
    """A randomly initialised model of a named setting (speed does not depend on the weights' values)."""
    if setting not in SETTINGS:
        raise ValueError(f"unknown setting {setting!r}; valid: {', '.join(SETTINGS)}")
    preset, kwargs = SETTINGS[setting]
    kwargs = {**kwargs, **overrides, "generator": torch.Generator().manual_seed(0)}
    return create_model(preset, **kwargs).to(device)


def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device="cpu", repeats: int = 3, warmup: int = 1) -> float:
    """Median wall time of fn() over `repeats` runs after `warmup` unmeasured runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def cpu_model_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or "unknown CPU"


def machine_line(device: torch.device | str = "cpu") -> str:
    """One line naming the machine, threads and library versions, printed at the top of every result."""
    device = torch.device(device)
    what = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model_name()
    return (f"# {what}, {os.cpu_count()} logical CPUs, torch threads {torch.get_num_threads()} "
            f"(OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}), torch {torch.__version__}, "
            f"device {device}")


def peak_rss_mib() -> float:
    """This process's peak resident set size (VmHWM) in MiB, from /proc/self/status (Linux)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    raise RuntimeError("VmHWM not found in /proc/self/status (Linux only)")


def parse_variant(spec: str) -> dict:
    """A sampling variant as ``MAR.sample_tokens`` keyword arguments.

    "exact" (or "") is the reference path. Otherwise comma-separated key=value pairs:
      sampler=ddpm|ddim   eta=FLOAT   steps=K (fixed K diffusion steps)   anneal=START-END
      shape=linear|cosine (of the annealing)   precision=fp32|bf16|fp16 (autocast)
      cache=off|cfg|tokens|both (feature cache across MAR steps)   refresh=R (its full-forward interval)
      distilled=S (the distilled head in S steps)   iters=K (MAR steps instead of the run's / the sweep's)
      cfg=W (the guidance scale instead of the script's --cfg: a fast mode at its own best guidance)
      bucket=R (the head's rows padded to a multiple of R: static shapes for CUDA graphs)
    e.g. "sampler=ddim,anneal=50-10,precision=bf16", "sampler=ddim,steps=10,cache=both,refresh=3".
    """
    spec = spec.strip()
    if spec in ("", "exact"):
        return {}
    kwargs: dict = {}
    for item in spec.split(","):
        key, sep, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not sep:
            raise ValueError(f"variant item {item!r} is not key=value (in {spec!r})")
        if key == "sampler":
            kwargs["sampler"] = value
        elif key == "eta":
            kwargs["eta"] = float(value)
        elif key == "steps":
            kwargs["diffusion_steps_schedule"] = (int(value), int(value))
        elif key == "anneal":
            start, _, end = value.partition("-")
            kwargs["diffusion_steps_schedule"] = (int(start), int(end))
        elif key == "shape":
            kwargs["diffusion_steps_shape"] = value
        elif key == "precision":
            if value not in PRECISIONS:
                raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {value!r}")
            kwargs["autocast_dtype"] = PRECISIONS[value]
        elif key == "cache":
            kwargs["feature_cache"] = value
        elif key == "refresh":
            kwargs["cache_refresh"] = int(value)
        elif key == "distilled":
            kwargs["distilled_steps"] = int(value)
        elif key == "iters":
            kwargs["num_iter"] = int(value)
        elif key == "cfg":
            kwargs["cfg"] = float(value)
        elif key == "bucket":
            kwargs["row_bucket"] = int(value)
        else:
            raise ValueError(f"unknown variant key {key!r} in {spec!r}: "
                             "use sampler, eta, steps, anneal, shape, precision, cache, refresh, distilled, iters, cfg, bucket")
    return kwargs


def split_num_iter(variant: dict, num_iter: int) -> tuple[dict, int]:
    """(the variant's sampler keywords, its MAR steps): an ``iters=K`` item overrides ``num_iter``."""
    variant = dict(variant)
    return variant, variant.pop("num_iter", num_iter)


def split_cfg(variant: dict, cfg: float) -> tuple[dict, float]:
    """(the variant's sampler keywords, its guidance scale): a ``cfg=W`` item overrides ``cfg``."""
    variant = dict(variant)
    return variant, variant.pop("cfg", cfg)


def diffusion_steps_per_iter(model, variant: dict, num_iter: int) -> list[int]:
    """Diffusion steps each MAR iteration of ``variant`` runs (the model's fixed count by default)."""
    from diffloss.diffusion import annealed_step_counts

    schedule = variant.get("diffusion_steps_schedule")
    if schedule is None:
        return [model.diffloss.num_sampling_steps] * num_iter
    return annealed_step_counts(schedule[0], schedule[1], num_iter, variant.get("diffusion_steps_shape", "linear"))
