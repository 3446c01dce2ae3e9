"""Generation throughput of MAR, end to end (real ``sample_tokens`` runs), and where the time goes.

One line per setting: s/image, images/s, and the split between the transformer (encoder + decoder
passes and bookkeeping) and the Diffusion-Loss head's sampling loop. Random weights: speed does not
depend on the values. Every variant (see ``common.parse_variant``) is timed on the same model.

    # the Fashion-MNIST default (mar_small, 32 px, 8x8x8 tokens), exact path, a sweep
    OMP_NUM_THREADS=1 python benchmarks/bench_sampling.py --setting fmnist --batch 1 16 64 \
        --num-iter 16 64 --steps 100 --cfg 1.0 3.0
    # exact vs fast paths side by side
    OMP_NUM_THREADS=1 python benchmarks/bench_sampling.py --setting fmnist --batch 16 --num-iter 16 --cfg 3.0 \
        --variant exact "sampler=ddim,steps=25" "sampler=ddim,anneal=50-10,precision=bf16"
    # torch.compile of the blocks and the head MLP (its cold compile time is printed)
    OMP_NUM_THREADS=1 python benchmarks/bench_sampling.py --setting fmnist --batch 16 --compile
    # on a GPU: the head as CUDA graphs over static row counts (the fast mode with its rows padded to 1024)
    python benchmarks/bench_sampling.py --setting mar_base_256 --batch 64 --num-iter 64 --cfg 3.0 --compile \
        --compile-head-mode reduce-overhead --variant "sampler=ddim,steps=10,cache=both,refresh=3,precision=bf16,bucket=1024"

For the 256 px models on a CPU, full generations take minutes per image: use sampling_cost_model.py,
which measures the components and extrapolates over the schedule.
"""
from __future__ import annotations

import argparse
import time

import torch

from common import build, machine_line, parse_variant, split_cfg, split_num_iter, sync, timed


class HeadTimer:
    """Wraps ``model.diffloss.sample`` to time every call of the head; removed on exit.

    ``calls`` holds (start, end) perf_counter times, one per generation iteration that predicts tokens;
    the time between two calls is the transformer's (encoder + decoder pass and bookkeeping).
    """

    def __init__(self, model, device):
        self.model, self.device, self.calls = model, device, []

    @property
    def seconds(self) -> float:
        return sum(end - start for start, end in self.calls)

    def __enter__(self):
        inner = self.model.diffloss.sample

        def timed_sample(*args, **kwargs):
            sync(self.device)
            t0 = time.perf_counter()
            out = inner(*args, **kwargs)
            sync(self.device)
            self.calls.append((t0, time.perf_counter()))
            return out

        self.model.diffloss.sample = timed_sample
        return self

    def __exit__(self, *exc):
        del self.model.diffloss.sample  # the instance attribute; back to the method


def time_generation(model, batch: int, num_iter: int, cfg: float, variant: dict, device, repeats: int = 1,
                    warmup: int = 1, warmup_num_iter: int | None = None) -> tuple[float, float]:
    """(median total seconds, median head seconds) of one ``sample_tokens`` call; the ``warmup`` unmeasured runs
    take ``warmup_num_iter`` MAR steps (None: the measured count; a GPU needs only a short run to load kernels)."""
    labels = torch.arange(batch, device=device) % model.num_classes
    variant, num_iter = split_num_iter(variant, num_iter)
    variant, cfg = split_cfg(variant, cfg)
    totals, heads = [], []
    for r in range(warmup + repeats):
        steps = num_iter if r >= warmup or warmup_num_iter is None else min(warmup_num_iter, num_iter)
        with HeadTimer(model, device) as head:
            sync(device)
            t0 = time.perf_counter()
            model.sample_tokens(batch, num_iter=steps, cfg=cfg, labels=labels,
                                generator=torch.Generator(device).manual_seed(r), **variant)
            sync(device)
            total = time.perf_counter() - t0
        if r >= warmup:
            totals.append(total)
            heads.append(head.seconds)
    totals_sorted = sorted(range(len(totals)), key=totals.__getitem__)
    mid = totals_sorted[len(totals) // 2]
    return totals[mid], heads[mid]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--setting", default="fmnist", help="fmnist, tiny, mar_base_256, mar_large_256, mar_huge_256")
    p.add_argument("--batch", type=int, nargs="+", default=[16])
    p.add_argument("--num-iter", type=int, nargs="+", default=[16])
    p.add_argument("--steps", type=int, nargs="+", default=[100], help="the model's num_sampling_steps")
    p.add_argument("--cfg", type=float, nargs="+", default=[1.0, 3.0])
    p.add_argument("--variant", nargs="+", default=["exact"], help="sampling variants (see common.parse_variant)")
    p.add_argument("--compile", action="store_true", help="mar.model.compile_for_sampling before timing")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--warmup", type=int, default=1, help="unmeasured runs before each measured setting")
    p.add_argument("--warmup-num-iter", type=int, help="MAR steps of the warm-up runs (default: the measured count)")
    p.add_argument("--compile-mode", default=None, help="with --compile: torch.compile's mode (e.g. reduce-overhead "
                                                        "for CUDA graphs on a GPU; default: torch's)")
    p.add_argument("--compile-head-mode", default=None,
                   help="with --compile: compile the head's MLP with this mode and static shapes (dynamic=False), "
                        "e.g. reduce-overhead (CUDA graphs, one per row count): use with a bucket=R variant")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args(argv)
    device = torch.device(a.device)
    model = build(a.setting, device).eval()
    n_params = sum(q.numel() for q in model.parameters())
    print(machine_line(device))
    print(f"# {a.setting} ({n_params / 1e6:.1f}M params), seq_len {model.seq_len}, token dim {model.token_embed_dim}")
    if a.compile:
        from mar.model import compile_for_sampling

        model.diffloss.set_sampling_steps(a.steps[0])
        variant = parse_variant(a.variant[0])
        labels = torch.arange(a.batch[0], device=device) % model.num_classes
        run = lambda: model.sample_tokens(a.batch[0], num_iter=a.num_iter[0], cfg=a.cfg[-1], labels=labels,  # noqa
                                          generator=torch.Generator(device).manual_seed(0), **variant)
        eager = timed(run, device, repeats=1)
        head_kwargs = None if a.compile_head_mode is None else {"mode": a.compile_head_mode, "dynamic": False}
        compile_for_sampling(model, head_kwargs=head_kwargs, **({"mode": a.compile_mode} if a.compile_mode else {}))
        t0 = time.perf_counter()
        run()
        first = time.perf_counter() - t0
        steady = timed(run, device, repeats=1, warmup=0)
        print(f"# compile_for_sampling ({a.variant[0]}, batch {a.batch[0]}, num_iter {a.num_iter[0]}, "
              f"cfg {a.cfg[-1]}): "
              f"eager {eager:.2f} s, first compiled run {first:.1f} s, next {steady:.2f} s -> compile cost about "
              f"{first - steady:.1f} s, speed-up {eager / steady:.2f}x")
    cuda = device.type == "cuda"
    print("variant | batch num_iter steps cfg | s/image images/s | transformer% head%" + (" | peak GiB" if cuda else ""))
    for spec in a.variant:
        variant = parse_variant(spec)
        for steps in a.steps:
            model.diffloss.set_sampling_steps(steps)
            for batch in a.batch:
                for num_iter in a.num_iter:
                    for cfg in a.cfg:
                        if cuda:
                            torch.cuda.reset_peak_memory_stats(device)
                        total, head = time_generation(model, batch, num_iter, cfg, variant, device, a.repeats, a.warmup,
                                                      a.warmup_num_iter)
                        peak = f" | {torch.cuda.max_memory_allocated(device) / 2**30:.2f}" if cuda else ""
                        print(f"{spec} | {batch:5d} {num_iter:8d} {steps:5d} {cfg:3.1f} | {total / batch:8.4f} "
                              f"{batch / total:9.2f} | {100 * (total - head) / total:10.1f}% "
                              f"{100 * head / total:4.1f}%{peak}", flush=True)


if __name__ == "__main__":
    main()
