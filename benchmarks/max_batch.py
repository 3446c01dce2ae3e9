"""The largest sampling batch that fits on a GPU, per preset (a full ``sample_tokens`` run per try).

    python benchmarks/max_batch.py --setting mar_base_256 mar_large_256 mar_huge_256 --cfg 3.0
    python benchmarks/max_batch.py --setting mar_base_256 --variant "precision=bf16"

Doubles the batch from --start until a try raises ``torch.cuda.OutOfMemoryError``, then bisects between
the last fit and the first failure. Memory does not depend on the number of diffusion steps (sampling runs
under no_grad and each step frees the previous), so the tries use --steps 2 to be quick; the peak is at the
MAR step that predicts the most tokens, so --num-iter should be the one used for sampling (default 64).
Prints the largest batch that fits and its peak memory (``torch.cuda.max_memory_allocated``).
"""
from __future__ import annotations

import argparse
from typing import Callable

import torch

from common import build, machine_line, parse_variant, split_num_iter


def largest_fit(fits: Callable[[int], bool], start: int = 1, limit: int = 1 << 16) -> int:
    """The largest b in [1, limit] with fits(b), assuming fits is monotone (True up to some b, False after):
    doubling from `start`, then bisection. Returns 0 if even 1 does not fit."""
    lo, b = 0, max(1, start)  # lo: the largest batch known to fit (0: none yet)
    while b <= limit and fits(b):
        lo, b = b, b * 2
    hi = min(b, limit + 1)  # the smallest batch known to fail (or one past the limit)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def try_batch(model, batch: int, num_iter: int, cfg: float, variant: dict, device) -> tuple[bool, float]:
    """(fits, peak GiB) of one generation at `batch`."""
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    labels = torch.arange(batch, device=device) % model.num_classes
    variant, num_iter = split_num_iter(variant, num_iter)
    try:
        model.sample_tokens(batch, num_iter=num_iter, cfg=cfg, labels=labels,
                            generator=torch.Generator(device).manual_seed(0), **variant)
    except torch.cuda.OutOfMemoryError:
        return False, float("nan")
    finally:
        torch.cuda.synchronize(device)
    return True, torch.cuda.max_memory_allocated(device) / 2**30


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--setting", nargs="+", default=["mar_base_256", "mar_large_256", "mar_huge_256"])
    p.add_argument("--num-iter", type=int, default=64)
    p.add_argument("--steps", type=int, default=2, help="diffusion steps per try (memory does not depend on it)")
    p.add_argument("--cfg", type=float, default=3.0)
    p.add_argument("--variant", default="exact", help="a sampling variant (common.parse_variant), e.g. precision=bf16")
    p.add_argument("--start", type=int, default=64)
    p.add_argument("--limit", type=int, default=1 << 14)
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("max_batch.py measures GPU memory: it needs CUDA (on a CPU the limit is RAM, not a batch)")
    device = torch.device("cuda")
    print(machine_line(device))
    variant = parse_variant(a.variant)
    for setting in a.setting:
        model = build(setting, device, num_sampling_steps=str(a.steps)).eval()
        peaks = {}

        def fits(b: int) -> bool:
            ok, peaks[b] = try_batch(model, b, a.num_iter, a.cfg, variant, device)
            print(f"  {setting}: batch {b}: {'fits, peak %.1f GiB' % peaks[b] if ok else 'out of memory'}", flush=True)
            return ok

        best = largest_fit(fits, a.start, a.limit)
        print(f"{setting} | num_iter {a.num_iter} cfg {a.cfg} {a.variant} | largest batch {best} | "
              f"peak {peaks.get(best, float('nan')):.1f} GiB")
        del model
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
