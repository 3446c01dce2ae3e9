"""Training throughput (images/s) and peak memory per model setting, precision and gradient checkpointing.

Every configuration runs in a fresh subprocess, so its peak memory is its own: on CPU the peak resident
set size (VmHWM from /proc/self/status; the import baseline is printed beside it), on CUDA
``torch.cuda.max_memory_allocated``. A step is the real one: MAR forward (Diffusion Loss with
diffusion_batch_mul 4) under the chosen autocast, backward, AdamW step with the reference parameter groups.
Random tokens stand in for data (the cost does not depend on the values).

    OMP_NUM_THREADS=1 python benchmarks/bench_training.py --setting fmnist --batch 64 --steps 3
    OMP_NUM_THREADS=1 python benchmarks/bench_training.py --setting mar_base_256 --batch 2 --steps 1
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

from common import PRECISIONS, build, machine_line, peak_rss_mib, sync


def run_one(setting: str, batch: int, steps: int, precision: str, ckpt: bool, device: str) -> dict:
    """One configuration in this process: warm-up step, then `steps` timed steps."""
    from mar.engine.loop import param_groups

    base_rss = peak_rss_mib()
    model = build(setting, device, grad_checkpointing=ckpt).train()
    opt = torch.optim.AdamW(param_groups(model, 0.02), lr=1e-4, betas=(0.9, 0.95))
    g = torch.Generator(device).manual_seed(0)
    tokens = torch.randn(batch, model.token_channels, model.seq_h * model.patch_size, model.seq_w * model.patch_size,
                         generator=g, device=device)
    labels = torch.randint(0, model.num_classes, (batch,), generator=g, device=device)
    dtype = PRECISIONS[precision]

    def step():
        with torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype is not None):
            loss = model(tokens, labels, generator=g)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 3.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    step()  # warm-up (allocates the AdamW state)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    seconds = time.perf_counter() - t0
    out = {"setting": setting, "precision": precision, "grad_ckpt": ckpt, "batch": batch, "steps": steps,
           "images_per_s": batch * steps / seconds, "s_per_step": seconds / steps,
           "params_M": sum(p.numel() for p in model.parameters()) / 1e6,
           "base_rss_MiB": base_rss, "peak_rss_MiB": peak_rss_mib()}
    if torch.device(device).type == "cuda":
        out["peak_cuda_MiB"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--setting", nargs="+", default=["fmnist"])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=3, help="timed optimizer steps after one warm-up step")
    p.add_argument("--precision", nargs="+", default=["fp32", "bf16"], choices=sorted(PRECISIONS))
    p.add_argument("--grad-ckpt", nargs="+", type=int, default=[0, 1], choices=[0, 1])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:  # one configuration; the parent reads the JSON line
        print(json.dumps(run_one(a.setting[0], a.batch, a.steps, a.precision[0], bool(a.grad_ckpt[0]), a.device)))
        return
    print(machine_line(a.device))
    print("setting precision grad_ckpt batch | s/step images/s | peak memory MiB (import baseline)")
    for setting in a.setting:
        for precision in a.precision:
            for ckpt in a.grad_ckpt:
                cmd = [sys.executable, os.path.abspath(__file__), "--child", "--setting", setting, "--batch",
                       str(a.batch), "--steps", str(a.steps), "--precision", precision, "--grad-ckpt", str(ckpt),
                       "--device", a.device]
                proc = subprocess.run(cmd, capture_output=True, text=True)
                if proc.returncode != 0:
                    print(f"{setting} {precision} {ckpt}: failed\n{proc.stderr[-2000:]}", flush=True)
                    continue
                r = json.loads(proc.stdout.strip().splitlines()[-1])
                mem = (f"{r['peak_cuda_MiB']:.0f} (CUDA)" if "peak_cuda_MiB" in r
                       else f"{r['peak_rss_MiB']:.0f} ({r['base_rss_MiB']:.0f})")
                print(f"{setting} {precision} {ckpt} {a.batch} | {r['s_per_step']:.3f} {r['images_per_s']:.2f} | {mem}",
                      flush=True)


if __name__ == "__main__":
    main()
