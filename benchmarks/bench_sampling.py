"""Generation throughput of MAR and where the time goes (transformer vs Diffusion-Loss head).

Prints one line per setting: images/s, s/image, tokens/s and the split of the time between the
encoder/decoder passes and the diffusion head's sampling loop. Random weights: speed does not
depend on the values.

    OMP_NUM_THREADS=1 python benchmarks/bench_sampling.py --preset mar_tiny --img-size 32 --vae-stride 4 \
        --token-channels 4 --batch 16 --num-iter 16 --cfg 1.0 3.0
    OMP_NUM_THREADS=1 python benchmarks/bench_sampling.py --preset mar_base --batch 1 --num-iter 16 --cfg 3.0
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from mar import create_model


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_generation(model, batch: int, num_iter: int, cfg: float, steps: int, device, repeats: int = 1):
    """Median wall time of ``sample_tokens`` and of the head's share inside it."""
    model.diffloss.set_sampling_steps(steps)
    head_time = [0.0]
    inner = model.diffloss.sample

    def timed_sample(*a, **kw):
        _sync(device)
        t0 = time.perf_counter()
        out = inner(*a, **kw)
        _sync(device)
        head_time[0] += time.perf_counter() - t0
        return out

    model.diffloss.sample = timed_sample
    labels = torch.arange(batch, device=device) % model.num_classes
    totals, heads = [], []
    try:
        for r in range(repeats + 1):  # the first run warms up
            head_time[0] = 0.0
            _sync(device)
            t0 = time.perf_counter()
            model.sample_tokens(batch, num_iter=num_iter, cfg=cfg, labels=labels,
                                generator=torch.Generator(device).manual_seed(r))
            _sync(device)
            if r > 0 or repeats == 0:
                totals.append(time.perf_counter() - t0)
                heads.append(head_time[0])
    finally:
        del model.diffloss.sample  # drop the instance attribute, back to the method
    return statistics.median(totals), statistics.median(heads)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="mar_tiny")
    p.add_argument("--img-size", type=int, default=256)
    p.add_argument("--vae-stride", type=int, default=16)
    p.add_argument("--token-channels", type=int, default=16)
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--batch", type=int, nargs="+", default=[1])
    p.add_argument("--num-iter", type=int, nargs="+", default=[64])
    p.add_argument("--steps", type=int, nargs="+", default=[100], help="diffusion sampling steps")
    p.add_argument("--cfg", type=float, nargs="+", default=[1.0, 3.0])
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args(argv)
    device = torch.device(a.device)
    model = create_model(a.preset, img_size=a.img_size, vae_stride=a.vae_stride, token_channels=a.token_channels,
                         num_classes=a.num_classes).to(device).eval()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"# {a.preset} ({n_params / 1e6:.1f}M params), {a.img_size}px, seq_len {model.seq_len}, device {device}, "
          f"threads {torch.get_num_threads()}, torch {torch.__version__}")
    print("batch num_iter steps cfg | s/image images/s tokens/s | transformer% head%")
    for batch in a.batch:
        for num_iter in a.num_iter:
            for steps in a.steps:
                for cfg in a.cfg:
                    total, head = time_generation(model, batch, num_iter, cfg, steps, device, a.repeats)
                    print(f"{batch:5d} {num_iter:8d} {steps:5d} {cfg:3.1f} | {total / batch:7.3f} "
                          f"{batch / total:9.3f} {batch * model.seq_len / total:8.1f} | "
                          f"{100 * (total - head) / total:10.1f}% {100 * head / total:4.1f}%", flush=True)


if __name__ == "__main__":
    main()
